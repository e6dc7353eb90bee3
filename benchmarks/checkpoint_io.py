"""What a checkpoint costs: writing (serialisation + fsync), the manifest's SHA-256 pass, and verified loading.

    python benchmarks/checkpoint_io.py --model DiT-XL/2 --dir /tmp/ckpt-bench

Builds the model, an EMA copy and an AdamW state (exp_avg, exp_avg_sq) of the same shapes in fp32, saves them with
opendit.checkpoint.save_checkpoint into DIR, and loads them back with load_checkpoint (manifest check included).
Appends a line to BENCHMARKS.md with --record.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from opendit import checkpoint as ckpt  # noqa: E402
from opendit.models import DiT_models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--input_size", type=int, default=32)
    p.add_argument("--dir", default="/tmp/opendit-ckpt-bench")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=args.input_size)
    sd = model.state_dict()
    opt_state = {"state": {n: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
                           for n, v in sd.items() if n != "pos_embed"},
                 "param_groups": [{"lr": 1e-4, "params": [n for n in sd if n != "pos_embed"]}]}
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    t0 = time.perf_counter()
    path, _ = ckpt.save_checkpoint(args.dir, "epoch0-global_step1", model_state=sd, ema_state=sd,
                                   optimizer_state=opt_state, running_states={"epoch": 0, "epoch_offset": 0, "global_step": 1})
    t_save = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    del model, sd, opt_state  # room for the load
    t0 = time.perf_counter()
    ckpt.verify_manifest(path)
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.load_checkpoint(path)
    t_load = time.perf_counter() - t0
    line = (f"{args.model} checkpoint ({size / 2**30:.1f} GiB: weights, EMA, AdamW state) on this CPU host: save incl. "
            f"fsync + manifest {t_save:.1f} s; manifest check alone {t_verify:.1f} s ({size / 2**30 / t_verify:.2f} GiB/s "
            f"SHA-256); verified load {t_load:.1f} s")
    print(line)
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.record:
        with open(os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md"), "a") as f:
            f.write(f"\n- {time.strftime('%Y-%m-%d')}: {line}\n")


if __name__ == "__main__":
    main()
