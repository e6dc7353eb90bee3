"""Bad command lines and inputs: one line on stderr, exit code 2, no traceback, no run directory left behind."""

import os

import pytest

from helpers import TINY, run_train


def _corrupt_checkpoint(root):
    d = os.path.join(root, "run", "epoch0-global_step5")
    os.makedirs(os.path.join(d, "model"))
    os.makedirs(os.path.join(d, "optimizer"))
    with open(os.path.join(d, "model", "model.safetensors"), "wb") as f:
        f.write(b"\x00\x01truncated")
    with open(os.path.join(d, "running_states.json"), "w") as f:
        f.write('{"epoch": 0, "epoch_offset": 0, "global_step": 5}')
    return d


def _other_model_checkpoint(root):
    """A valid checkpoint of a different model (DiT-N/4) to load into DiT-N/2."""
    from opendit.checkpoint import save_checkpoint
    from opendit.models import DiT_models
    import torch

    m = DiT_models["DiT-N/4"](input_size=8, in_channels=1, num_classes=10)
    opt = torch.optim.AdamW(m.parameters())
    os.makedirs(os.path.join(root, "other"))
    return save_checkpoint(os.path.join(root, "other"), "epoch0-global_step1", model_state=m.state_dict(),
                           ema_state=m.state_dict(), optimizer_state=opt.state_dict(),
                           running_states={"epoch": 0, "epoch_offset": 0, "global_step": 1})


CASES = {
    "missing image folder": (["--dataset", "imagefolder", "--data_path", "{tmp}/nope"], "does not exist"),
    "cifar10 absent offline": (["--dataset", "cifar10", "--data_path", "{tmp}/empty", "--image_size", "32"], "extract it into"),
    "unknown model": (["--model", "DiT-Q/2"], "unknown model"),
    "num_classes contradicts data": (["--num_classes", "7"], "contradicts the dataset"),
    "image size vs patch": (["--image_size", "10", "--model", "DiT-N/4"], "not divisible"),
    "load missing": (["--load", "{tmp}/no-such-ckpt"], "no such file"),
    "load corrupt": (["--load", "{corrupt}"], "corrupt or truncated"),
    "load other model": (["--load", "{other}"], "does not fit this model"),
    "unknown flag": (["--bogus"], "unrecognized arguments"),
    "bad plugin": (["--plugin", "zero9"], "invalid choice"),
    "vae path missing": (["--vae", "{tmp}/no-vae"], "no such directory"),
    "negative batch": (["--batch_size", "0"], "must be positive"),
    "flash on cpu": (["--enable_flashattn"], "needs a CUDA GPU"),
    "batch larger than data": (["--batch_size", "5000"], "fewer than one global batch"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    args, expected = CASES[case]
    fmt = dict(tmp=str(tmp_path))
    if "{corrupt}" in " ".join(args):
        fmt["corrupt"] = _corrupt_checkpoint(str(tmp_path))
    if "{other}" in " ".join(args):
        fmt["other"] = _other_model_checkpoint(str(tmp_path))
    args = [a.format(**fmt) for a in args]
    outputs = tmp_path / "outputs"
    r = run_train(*TINY, "--batch_size", "8", "--max_steps", "1", "--outputs", str(outputs), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not outputs.exists() or not os.listdir(outputs)
