"""The samplers of a digits flow model side by side (the README's "Which objective and sampler" table): 500 samples per
row with `sample_ddp.py` (labels i mod 10, the demo's seed and batch), scored like `make demo` at guidance 1.0 and 1.5.

    make demo-flow && python benchmarks/flow_samplers.py                 # the newest outputs/demo-flow run
    python benchmarks/flow_samplers.py --run outputs/time_to_quality/sit/000-DiT-N-2

Prints a Markdown table: accuracy / pixel FD / feature FD per guidance scale, and the model evaluations per sample.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from opendit.cli import sample_ddp  # noqa: E402
from opendit.eval.digits import score_npz  # noqa: E402

# (row label, model evaluations per sample, sampling flags); the guidance interval row is guided at cfg 1.5 only
ROWS = [
    ("ode heun, 11 points", 20, ["--sampler", "ode", "--sampling_method", "heun", "--num_sampling_steps", "11"]),
    ("ode euler, 21 points", 20, ["--sampler", "ode", "--sampling_method", "euler", "--num_sampling_steps", "21"]),
    ("ode heun, 11 points, `--timestep_shift 2`", 20,
     ["--sampler", "ode", "--sampling_method", "heun", "--num_sampling_steps", "11", "--timestep_shift", "2"]),
    ("ode heun, 11 points, `--timestep_shift 0.5`", 20,
     ["--sampler", "ode", "--sampling_method", "heun", "--num_sampling_steps", "11", "--timestep_shift", "0.5"]),
    ("ode heun, 11 points, `--cfg_interval 0.3 1`", 20,
     ["--sampler", "ode", "--sampling_method", "heun", "--num_sampling_steps", "11", "--cfg_interval", "0.3", "1"]),
    ("sde Euler `sigma`, 21 points", 21, ["--sampler", "sde", "--num_sampling_steps", "21"]),
    ("ode euler, 250 points", 249, ["--sampler", "ode", "--sampling_method", "euler", "--num_sampling_steps", "250"]),
    ("sde Euler `sigma`, 250 points", 250, ["--sampler", "sde", "--num_sampling_steps", "250"]),
]


def newest_run(outputs: str) -> str:
    runs = sorted(glob.glob(os.path.join(REPO, outputs, "*-DiT-N-2")))
    if not runs:
        raise SystemExit(f"no run under {outputs}: run `make demo-flow` first, or pass --run")
    return runs[-1]


def score(run: str, flags: list[str], cfg: float, out_root: str) -> str:
    name = "-".join(f.strip("-").replace(".", "p") for f in flags) + f"-cfg{cfg}"
    sample_dir = os.path.join(out_root, name)
    if not os.path.isfile(sample_dir + ".npz"):
        code = sample_ddp.main(["--ckpt", run, "--num_samples", "500", "--per_proc_batch_size", "250", "--device", "cpu",
                                "--cfg_scale", str(cfg), "--sample_dir", sample_dir, *flags])
        if code != 0:
            raise SystemExit(f"sampling failed: {flags}")
    s = score_npz(sample_dir + ".npz")
    return f"{s['accuracy']:.1%} / {s['pixel_fd']:.2f} / {s['feature_fd']:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a flow run directory (default: the newest under outputs/demo-flow)")
    args = p.parse_args()
    run = args.run or newest_run("outputs/demo-flow")
    out_root = os.path.join(run, "eval", "flow_samplers")
    print("| sampler (model evaluations) | cfg 1.0 | cfg 1.5 |")
    print("|---|---|---|")
    for label, nfe, flags in ROWS:
        interval = "--cfg_interval" in flags
        cfg10 = "(no guidance)" if interval else score(run, flags, 1.0, out_root)
        print(f"| {label} ({nfe}) | {cfg10} | {score(run, flags, 1.5, out_root)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
