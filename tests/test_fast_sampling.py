"""The fast sampling path against its reference, the eager model: the compiled forward (Inductor) gives the eager
samples up to float32 reassociation, with guidance in an interval (two batch shapes) and DPM-Solver++'s kept
predictions; on a GPU, CUDA-graph replay gives the eager bf16 samples; the flags that do not go together are one line;
the batch size that fills a device; the PNG writer threads write what the plain writer wrote."""

import os

import pytest
import torch

from opendit.errors import UserError
from opendit.images import to_uint8
from opendit.models import DiT
from opendit.cli.sample_ddp import build_parser as ddp_parser
from opendit.sampling.compiled import auto_batch_size, batch_for_memory, check_fast_flags, compiled_forward
from opendit.sampling.folder import PngWriter, png_path, write_png
from opendit.sampling.generate import generate
from opendit.transport import create_transport

from helpers import perturbed

CPU = torch.device("cpu")


def tiny(device=CPU, **kw) -> DiT:
    torch.manual_seed(0)
    return perturbed(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                         num_classes=10, **kw)).to(device).eval()


def inputs(n=6, device=CPU):
    g = torch.Generator().manual_seed(3)
    return (torch.arange(n) % 10).to(device), torch.randn(n, 4, 8, 8, generator=g).to(device)


SAMPLERS = [dict(sampler="dpm-solver++", steps=6, cfg_scale=2.0, cfg_interval=(0.3, 1.0)),
            dict(objective=create_transport(), sampler="ode", steps=5, sampling_method="heun", cfg_scale=2.0,
                 cfg_interval=(0.3, 1.0))]


@pytest.mark.slow
def test_the_compiled_forward_gives_the_eager_samples():
    """Inductor computes the same float32 math in another order (fused reductions): a few float32 ulps (1e-7) per
    forward, amplified over 6 solver steps with guidance 2; we allow 1e-5 of the samples' scale (measured: 3e-7)."""
    model = tiny(learn_sigma=True)
    y, z = inputs()
    for kind in SAMPLERS:
        eager = generate(model, y, z, **kind)
        with compiled_forward(model):
            fast = generate(model, y, z, **kind)
            again = generate(model, y, z, **kind)  # the graphs are reused: same numbers again
        assert torch.equal(fast, again)
        scale = eager.abs().max().item()
        assert (fast - eager).abs().max().item() <= 1e-5 * scale, kind["sampler"]
    assert "forward" not in model.__dict__  # the model is plain again
    assert list(model._sampling_compiled) == ["default"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_gives_the_eager_bf16_samples():
    """bf16 rounds every activation to 2^-8 relative; the compiled graph fuses and rounds at other places, so two bf16
    runs of the same math differ by a few bf16 ulps per step: 3e-2 of the samples' scale after 6 guided steps. The
    replayed graph must also keep earlier outputs intact (copied out of the graph's buffer)."""
    device = torch.device("cuda")
    model = tiny(device, learn_sigma=True)
    y, z = inputs(device=device)
    for kind in SAMPLERS:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = generate(model, y, z, **kind).float()
            with compiled_forward(model, cuda_graphs=True):
                fast = generate(model, y, z, **kind).float()
        assert (fast - eager).abs().max().item() <= 3e-2 * eager.abs().max().item(), kind["sampler"]


def test_flags_that_do_not_go_together_are_one_line():
    from opendit.cli.flags import parse_argv
    from opendit.config import GridConfig

    def check(argv):
        cfg = parse_argv(GridConfig, argv)
        check_fast_flags(cfg.machine, cfg.cache, CPU)

    with pytest.raises(UserError, match="add --compile"):
        check(["--ckpt", "x", "--cuda_graphs"])
    with pytest.raises(UserError, match="needs a CUDA device"):
        check(["--ckpt", "x", "--compile", "--cuda_graphs"])
    with pytest.raises(UserError, match="leave out --compile"):
        check(["--ckpt", "x", "--compile", "--cache_method", "fora"])
    check(["--ckpt", "x", "--compile"])


def test_the_batch_that_fills_a_device():
    gib = 2**30
    # 1 GiB fixed + 0.5 GiB per sample in 40 GiB free, 85% usable: (34 - 1) / 0.5 = 66 -> 64
    assert batch_for_memory(0.5 * gib, 1 * gib, 40 * gib) == 64
    assert batch_for_memory(0.5 * gib, 1 * gib, 40 * gib, cap=32) == 32
    assert batch_for_memory(100 * gib, 0, 40 * gib) == 1
    assert auto_batch_size(lambda n: None, CPU) == 32  # a CPU: the default, no probe
    args = ddp_parser().parse_args(["--ckpt", "x", "--per_proc_batch_size", "auto"])
    assert args.per_proc_batch_size == "auto"
    assert ddp_parser().parse_args(["--ckpt", "x", "--per_proc_batch_size", "7"]).per_proc_batch_size == 7


def test_the_png_writer_threads_write_what_the_plain_writer_writes(tmp_path):
    images = torch.rand(2, 5, 3, 6, 7, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    with PngWriter(str(tmp_path / "threads")) as writer:
        os.makedirs(tmp_path / "threads")
        for b in range(2):
            writer.write(range(5 * b, 5 * b + 5), images[b])
    os.makedirs(tmp_path / "plain")
    for b in range(2):
        for i, img in zip(range(5 * b, 5 * b + 5), to_uint8(images[b])):
            write_png(png_path(str(tmp_path / "plain"), i), img)
    for i in range(10):
        with open(png_path(str(tmp_path / "threads"), i), "rb") as a, open(png_path(str(tmp_path / "plain"), i), "rb") as b:
            assert a.read() == b.read(), i
    assert sorted(os.listdir(tmp_path / "threads")) == sorted(os.listdir(tmp_path / "plain"))


def test_a_failing_png_write_is_raised_when_the_writer_closes(tmp_path):
    with pytest.raises(OSError):
        with PngWriter(str(tmp_path / "missing" / "folder")) as writer:
            writer.write(range(2), torch.zeros(2, 1, 4, 4))
