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
                           optimizer_state=opt.state_dict(), running_states={"epoch": 0, "epoch_offset": 0, "global_step": 1})[0]


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
    "train: non-integer steps": ("train", ["--max_steps", "ten"], "argument --max_steps: must be an integer >= 1"),
    "train: zero batch": ("train", ["--batch_size", "0"], "argument --batch_size: must be an integer >= 1, got 0"),
    "train: zero ckpt_every": ("train", ["--ckpt_every", "0"], "argument --ckpt_every: must be an integer >= 1"),
    "train: negative max_bad_steps": ("train", ["--max_bad_steps", "-1"], "must be an integer >= 0, got -1"),
    "train: negative seed (was a traceback and a run directory)": ("train", ["--global_seed", "-1"], "argument --global_seed"),
    "train: nan lr (was a traceback)": ("train", ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    "train: cosine loss on one channel (exploded, or did nothing)": ("train", ["--objective", "flow", "--cosine_loss"],
                                                                      "with 1 channel it is +-1 everywhere"),
    "train: flash on cpu": ("train", ["--enable_flashattn"], "needs a CUDA GPU"),
    "train: outputs is a file": ("train", ["--outputs", "{afile}"], "is a file, not a directory"),
    "train: vae path missing": ("train", ["--vae", "{tmp}/no-vae"], "no such directory"),
    # train: checkpoints
    "train: load missing": ("train", ["--load", "{tmp}/no-such-ckpt"], "no such file"),
    "train: load truncated": ("train", ["--load", "{corrupt}"], "corrupt or truncated"),
    "train: load altered (hash)": ("train", ["--load", "{altered}"], "fails its SHA-256 check"),
    "train: load other model": ("train", ["--load", "{other}"], "does not fit this model"),
    # a file given to --load is weights to fine-tune from
    "train: load a plain file": ("train", ["--load", "{notes}"], "is not a readable checkpoint"),
    # sampling
    "sample: missing ckpt": (SAMPLE, ["--ckpt", "{tmp}/nothing.pt"], "no such file"),
    "sample: pickle with code": (SAMPLE, ["--ckpt", "{evil}"], "refusing to load"),
    "sample: not a checkpoint": (SAMPLE, ["--ckpt", "{notes}"], "not a readable checkpoint"),
    "sample: altered checkpoint": (SAMPLE, ["--ckpt", "{altered}"], "fails its SHA-256 check"),
    "sample: wrong model": (SAMPLE, ["--ckpt", "{ckpt}", "--model", "DiT-S/2"], "--model is DiT-S/2"),
    "sample: bad labels": (SAMPLE, ["--ckpt", "{ckpt}", "--labels", "3,x"], "comma-separated list"),
    "sample-ddp: zero samples": (SAMPLE_DDP, ["--ckpt", "{ckpt}", "--num_samples", "0"], "must be an integer >= 1"),
    "sample: unknown published name": (SAMPLE, ["--ckpt", "SiT-XL-2-256.pt"], "did you mean the published SiT-XL-2-256x256.pt"),
    "sample: cfg interval lo > hi": (SAMPLE, ["--ckpt", "{ckpt}", "--cfg_interval", "0.7", "0.3"], "need 0 <= LO <= HI"),
    "sample: sigma interval lo > hi": (SAMPLE_DDP, ["--ckpt", "{ckpt}", "--cfg_interval_sigma", "5", "1"],
                                       "need 0 <= LO <= HI"),
    "sample: both interval flags": (SAMPLE, ["--ckpt", "{ckpt}", "--cfg_interval", "0", "1", "--cfg_interval_sigma", "0",
                                             "inf"], "both give the guidance interval"),
    "sample: negative sigma": (SAMPLE, ["--ckpt", "{ckpt}", "--cfg_interval_sigma", "-1", "2"], "a number >= 0 or inf"),
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


# these run as real processes (stderr as a user sees it, warnings of imports included); the others in-process
AS_PROCESSES = {"train: nan lr (was a traceback)", "train: load truncated", "sample: pickle with code",
                "eval: not an npz", "run: malformed hostfile"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case):
    program, args, expected = CASES[case]
    fmt = {"tmp": str(tmp_path)}
    for key, make in FIXTURES.items():
        if "{" + key + "}" in " ".join(args):
            fmt[key] = make(str(tmp_path))
    before, repo_before = snapshot(tmp_path), sorted(os.listdir(REPO))
    if program == "train":
        r = run_train(*[a.format(**fmt) for a in TRAIN_BASE + args], process=case in AS_PROCESSES)
    else:
        r = run([a.format(**fmt) for a in program + args], process=case in AS_PROCESSES)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout and "pwned" not in r.stdout
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(REPO)) == repo_before


def test_there_are_at_least_twenty_distinct_cases():
    assert len({(str(p), tuple(a)) for p, a, _ in CASES.values()}) >= 20


# Every numeric flag of every program is checked while the command line is parsed (in process: no subprocess needed):
# a non-finite or out-of-range value is one line naming the flag and the allowed range, before anything is written.
NUMERIC = [
    ("opendit.cli.train", ["--lr", "inf"], "--lr", "a finite number > 0"),
    ("opendit.cli.train", ["--lr", "-0.5"], "--lr", "a finite number > 0"),
    ("opendit.cli.train", ["--final_cfg_scale", "nan"], "--final_cfg_scale", "a finite number >= 0"),
    ("opendit.cli.train", ["--eval_cfg_scale", "-1.5"], "--eval_cfg_scale", "a finite number >= 0"),
    ("opendit.cli.train", ["--ema_decay", "1.5"], "--ema_decay", "in [0, 1]"),
    ("opendit.cli.train", ["--grad_clip", "nan"], "--grad_clip", ">= 0"),
    ("opendit.cli.train", ["--global_seed", "-1"], "--global_seed", "an integer in [0, 4294967295]"),
    ("opendit.cli.train", ["--global_seed", str(2**64)], "--global_seed", "an integer in [0,"),
    ("opendit.cli.train", ["--warmup_steps", "-5"], "--warmup_steps", "an integer >= 0"),
    ("opendit.cli.train", ["--image_size", "0"], "--image_size", "an integer >= 1"),
    ("opendit.cli.train", ["--num_classes", "-3"], "--num_classes", "an integer >= 1"),
    ("opendit.cli.train", ["--epochs", "0"], "--epochs", "an integer >= 1"),
    ("opendit.cli.train", ["--log_every", "0"], "--log_every", "an integer >= 1"),
    ("opendit.cli.train", ["--ckpt_keep", "-1"], "--ckpt_keep", "an integer >= 0"),
    ("opendit.cli.train", ["--num_workers", "-2"], "--num_workers", "an integer >= 0"),
    ("opendit.cli.train", ["--final_samples", "-1"], "--final_samples", "an integer >= 0"),
    ("opendit.cli.train", ["--eval_every", "-1"], "--eval_every", "an integer >= 0"),
    ("opendit.cli.train", ["--eval_samples", "1"], "--eval_samples", "an integer >= 2"),
    ("opendit.cli.train", ["--objective", "flow", "--time_std", "0"], "--time_std", "a finite number > 0"),
    ("opendit.cli.train", ["--objective", "flow", "--time_mean", "nan"], "--time_mean", "a finite number"),
    ("opendit.cli.train", ["--objective", "flow", "--cosine_loss", "-1"], "--cosine_loss", "a finite number >= 0"),
    ("opendit.cli.train", ["--objective", "flow", "--train_eps", "2"], "--train_eps", "in [0, 1]"),
    ("opendit.cli.sample", ["--ckpt", "x", "--cfg_interval", "1.5", "0.5"], "--cfg_interval", "in [0, 1]"),
    ("opendit.cli.sample", ["--ckpt", "x", "--timestep_shift", "0"], "--timestep_shift", "a finite number > 0"),
    ("opendit.cli.sample", ["--ckpt", "x", "--last_step_size", "-0.1"], "--last_step_size", "in [0, 1]"),
    ("opendit.cli.sample_ddp", ["--ckpt", "x", "--atol", "inf"], "--atol", "a finite number > 0"),
    ("opendit.cli.sample", ["--ckpt", "x", "--cfg_scale", "nan"], "--cfg_scale", "a finite number >= 0"),
    ("opendit.cli.sample", ["--ckpt", "x", "--seed", "-1"], "--seed", "an integer in [0,"),
    ("opendit.cli.sample", ["--ckpt", "x", "--num_sampling_steps", "1001"], "--num_sampling_steps", "in [1, 1000]"),
    ("opendit.cli.sample", ["--ckpt", "x", "--guidance_channels", "0"], "--guidance_channels", "an integer >= 1"),
    ("opendit.cli.sample", ["--ckpt", "x", "--image_size", "-8"], "--image_size", "an integer >= 1"),
    ("opendit.cli.sample_ddp", ["--ckpt", "x", "--cfg_scale", "inf"], "--cfg_scale", "a finite number >= 0"),
    ("opendit.cli.sample_ddp", ["--ckpt", "x", "--per_proc_batch_size", "0"], "--per_proc_batch_size", "an integer >= 1"),
    ("opendit.cli.sample_ddp", ["--ckpt", "x", "--per_proc_batch_size", "any"], "--per_proc_batch_size", "or auto"),
    ("opendit.cli.sample", ["--ckpt", "x", "--cache_interval", "0"], "--cache_interval", "an integer >= 1"),
    ("opendit.cli.sample_ddp", ["--ckpt", "x", "--num_classes", "0"], "--num_classes", "an integer >= 1"),
    ("opendit.cli.extract_features", ["--data_path", "x", "--features_path", "y", "--shard_size", "0"], "--shard_size",
     "an integer >= 1"),
    ("opendit.cli.extract_features", ["--data_path", "x", "--features_path", "y", "--num_workers", "-1"], "--num_workers",
     "an integer >= 0"),
    ("opendit.cli.evaluate", ["a.npz", "digits", "--batch_size", "0"], "--batch_size", "an integer >= 1"),
    ("opendit.cli.evaluate", ["a.npz", "digits", "--splits", "-1"], "--splits", "an integer >= 1"),
    ("opendit.cli.convert", ["a.pt", "b.pt", "--num_heads", "0"], "--num_heads", "an integer >= 1"),
    ("opendit.cli.launch", ["--hostfile", "h", "--master_port", "70000", "s.py"], "--master_port", "in [1, 65535]"),
    ("opendit.cli.launch", ["--hostfile", "h", "--nproc_per_node", "0", "s.py"], "--nproc_per_node", "an integer >= 1"),
    ("opendit.cli", ["models", "--image_size", "0"], "--image_size", "an integer >= 1"),
]


@pytest.mark.parametrize("module,argv,flag,allowed", NUMERIC, ids=[f"{m.split('.')[-1]} {' '.join(a[-2:])}"
                                                                   for m, a, _, _ in NUMERIC])
def test_numeric_flag_out_of_range_is_one_line(tmp_path, monkeypatch, capsys, module, argv, flag, allowed):
    import importlib

    monkeypatch.chdir(tmp_path)
    extra = ["--outputs", str(tmp_path / "outputs")] if module == "opendit.cli.train" else []
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*argv, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}: must be ") and allowed in err[0], err
    assert argv[argv.index(flag) + 1] in err[0]  # names the value given
    assert os.listdir(tmp_path) == []  # nothing written: no run directory, no sample folder
