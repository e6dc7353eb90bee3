import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in interpreter mode; must be set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference_*.py helpers

# Two cores: more intra-op threads only add contention when pytest runs tests serially.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
