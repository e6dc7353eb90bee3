"""Bad command lines and inputs, for every program: one line on stderr (``error: ...``), exit code 2, no traceback,
and no new file anywhere (neither under the test's directory nor in the working directory)."""

import os
import sys

import pytest
import torch

from helpers import REPO, TINY, run, run_train

SCRIPTS = os.path.join(REPO, "scripts", "dit")


def _corrupt_checkpoint(root):
    d = os.path.join(root, "run", "epoch0-global_step5")
    os.makedirs(os.path.join(d, "model"))
    os.makedirs(os.path.join(d, "optimizer"))
    with open(os.path.join(d, "model", "model.safetensors"), "wb") as f:
        f.write(b"\x00\x01truncated")
    with open(os.path.join(d, "running_states.json"), "w") as f:
        f.write('{"epoch": 0, "epoch_offset": 0, "global_step": 5}')
    return d


def _checkpoint(root, model="DiT-N/2"):
    """A valid checkpoint (with manifest) of a small digits model."""
    from opendit.checkpoint import save_checkpoint
    from opendit.models import DiT_models

    m = DiT_models[model](input_size=8, in_channels=1, num_classes=10)
    opt = torch.optim.AdamW(m.parameters())
    run_dir = os.path.join(root, model.replace("/", "-"))
    os.makedirs(run_dir, exist_ok=True)
    return save_checkpoint(run_dir, "epoch0-global_step1", model_state=m.state_dict(), ema_state=m.state_dict(),
                           optimizer_state=opt.state_dict(), running_states={"epoch": 0, "epoch_offset": 0, "global_step": 1})


def _altered_checkpoint(root):
    d = _checkpoint(root)
    path = os.path.join(d, "ema.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01  # same size, one byte changed
    open(path, "wb").write(bytes(data))
    return d


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _evil_pt(root):
    path = os.path.join(root, "evil.pt")
    torch.save({"pos_embed": torch.zeros(1), "payload": _Payload()}, path)
    return path


def _text_file(root, name, text):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write(text)
    return path


FIXTURES = {
    "corrupt": _corrupt_checkpoint,
    "other": lambda root: _checkpoint(root, "DiT-N/4"),
    "altered": _altered_checkpoint,
    "evil": _evil_pt,
    "notes": lambda root: _text_file(root, "notes.pt", "just text"),
    "afile": lambda root: _text_file(root, "afile", "x"),
    "hosts_bad": lambda root: _text_file(root, "hosts_bad", "node1 slots=eight\n"),
    "hosts_twice": lambda root: _text_file(root, "hosts_twice", "node1\nnode1 slots=2\n"),
    "ckpt": _checkpoint,
}

TRAIN_BASE = [*TINY, "--batch_size", "8", "--max_steps", "1", "--outputs", "{tmp}/outputs"]
SAMPLE = [sys.executable, os.path.join(SCRIPTS, "sample_dit.py"), "--device", "cpu", "--num_sampling_steps", "2",
          "--out", "{tmp}/o.png"]
SAMPLE_DDP = [sys.executable, os.path.join(SCRIPTS, "sample_ddp.py"), "--device", "cpu", "--num_sampling_steps", "2",
              "--sample_dir", "{tmp}/samples"]
LAUNCH = [sys.executable, "-m", "opendit.cli", "run", "--nproc_per_node", "1"]
CLI = [sys.executable, "-m", "opendit.cli"]

# case -> (program ("train" or a command prefix), arguments, text the error line must contain)
CASES = {
    # train: data
    "train: missing image folder": ("train", ["--dataset", "imagefolder", "--data_path", "{tmp}/nope"], "does not exist"),
    "train: cifar10 absent offline": ("train", ["--dataset", "cifar10", "--data_path", "{tmp}/empty", "--image_size", "32"],
                                      "extract it into"),
    "train: num_classes contradicts data": ("train", ["--num_classes", "7"], "contradicts the dataset"),
    "train: batch larger than data": ("train", ["--batch_size", "5000"], "fewer than one global batch"),
    # train: flags
    "train: unknown model": ("train", ["--model", "DiT-Q/2"], "unknown model"),
    "train: image size vs patch": ("train", ["--image_size", "10", "--model", "DiT-N/4"], "not divisible"),
    "train: unknown flag": ("train", ["--bogus"], "unrecognized arguments"),
    "train: bad plugin": ("train", ["--plugin", "zero9"], "invalid choice"),
    "train: bad precision": ("train", ["--mixed_precision", "fp8"], "invalid choice"),
    "train: bad on_bad_image": ("train", ["--on_bad_image", "maybe"], "invalid choice"),
    "train: non-integer steps": ("train", ["--max_steps", "ten"], "invalid int value"),
    "train: zero batch": ("train", ["--batch_size", "0"], "must be positive"),
    "train: zero ckpt_every": ("train", ["--ckpt_every", "0"], "must be positive"),
    "train: negative max_bad_steps": ("train", ["--max_bad_steps", "-1"], "non-negative"),
    "train: flash on cpu": ("train", ["--enable_flashattn"], "needs a CUDA GPU"),
    "train: outputs is a file": ("train", ["--outputs", "{afile}"], "is a file, not a directory"),
    "train: vae path missing": ("train", ["--vae", "{tmp}/no-vae"], "no such directory"),
    # train: checkpoints
    "train: load missing": ("train", ["--load", "{tmp}/no-such-ckpt"], "no such file"),
    "train: load truncated": ("train", ["--load", "{corrupt}"], "corrupt or truncated"),
    "train: load altered (hash)": ("train", ["--load", "{altered}"], "fails its SHA-256 check"),
    "train: load other model": ("train", ["--load", "{other}"], "does not fit this model"),
    "train: load a plain file": ("train", ["--load", "{notes}"], "expected a checkpoint directory"),
    # sampling
    "sample: missing ckpt": (SAMPLE, ["--ckpt", "{tmp}/nothing.pt"], "no such file"),
    "sample: pickle with code": (SAMPLE, ["--ckpt", "{evil}"], "refusing to load"),
    "sample: not a checkpoint": (SAMPLE, ["--ckpt", "{notes}"], "not a readable checkpoint"),
    "sample: altered checkpoint": (SAMPLE, ["--ckpt", "{altered}"], "fails its SHA-256 check"),
    "sample: wrong model": (SAMPLE, ["--ckpt", "{ckpt}", "--model", "DiT-S/2"], "--model is DiT-S/2"),
    "sample: bad labels": (SAMPLE, ["--ckpt", "{ckpt}", "--labels", "3,x"], "comma-separated list"),
    "sample-ddp: zero samples": (SAMPLE_DDP, ["--ckpt", "{ckpt}", "--num_samples", "0"], "must be positive"),
    # the hostfile launcher
    "run: missing hostfile": (LAUNCH, ["--hostfile", "{tmp}/hosts", "scripts/dit/train.py"], "No such file"),
    "run: malformed hostfile": (LAUNCH, ["--hostfile", "{hosts_bad}", "scripts/dit/train.py"], "expected 'HOST [slots=N]'"),
    "run: host listed twice": (LAUNCH, ["--hostfile", "{hosts_twice}", "scripts/dit/train.py"], "lists a host twice"),
    # evaluation, extraction, conversion
    "eval: missing samples": (CLI, ["eval", "{tmp}/none.npz", "digits", "--features", "digits"], "no such file"),
    "eval: not an npz": (CLI, ["eval", "{notes}", "digits", "--features", "digits"], "not a readable .npz"),
    "extract: missing folder": (CLI, ["extract-features", "--data_path", "{tmp}/nope", "--features_path", "{tmp}/f"],
                                "does not exist"),
    "convert: pickle with code": (CLI, ["convert", "{evil}", "{tmp}/out.safetensors"], "refusing to load"),
    "convert: unknown target": (CLI, ["convert", "{ckpt}", "{tmp}/out.xyz"], "cannot tell the format"),
}


def snapshot(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    program, args, expected = CASES[case]
    fmt = {"tmp": str(tmp_path)}
    for key, make in FIXTURES.items():
        if "{" + key + "}" in " ".join(args):
            fmt[key] = make(str(tmp_path))
    before, repo_before = snapshot(tmp_path), sorted(os.listdir(REPO))
    if program == "train":
        r = run_train(*[a.format(**fmt) for a in TRAIN_BASE + args])
    else:
        r = run([a.format(**fmt) for a in program + args])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout and "pwned" not in r.stdout
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(REPO)) == repo_before


def test_there_are_at_least_twenty_distinct_cases():
    assert len({(str(p), tuple(a)) for p, a, _ in CASES.values()}) >= 20
