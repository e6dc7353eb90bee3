"""Do --plugin zero2 / fsdp compute what --plugin ddp computes under --mixed_precision bf16?

Two measurements on DiT-N/2 (digits, CPU, gloo):

1. In one process (a 1-rank process group), one forward and backward of the same weights and batch under bf16
   autocast: the plain model (what every DDP rank computes) against FSDP2 with (a) FSDP2's default precision policy
   (every floating input and every parameter cast to bf16) and (b) opendit's policy (parallel.fsdp_precision_policies).
   The scale of bf16 autocast itself is the plain model's difference from fp32.
2. Training: --steps steps on 2 processes with each plugin under bf16, and ddp in fp32; per-step losses relative to
   ddp-bf16.

    python benchmarks/plugin_numerics.py [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from opendit.models import DiT_models  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = DiT_models["DiT-N/2"](input_size=8, in_channels=1, num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts every block at zero: give all weights some signal
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return m


def forward_backward(model, x, t, y, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    out.float().square().mean().backward()
    grads = torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten().float()
                       for p in model.parameters() if p.requires_grad])
    return out.detach().float(), grads


def in_process() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from opendit.parallelize import shard_model

    mesh = init_device_mesh("cpu", (1,))
    base = tiny_model()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 1000, (32,), generator=g), torch.randint(0, 10, (32,), generator=g)
    out32, grad32 = forward_backward(base, x, t, y, autocast=False)
    out_ddp, grad_ddp = forward_backward(base, x, t, y, autocast=True)
    rows = {"bf16 autocast (ddp) vs fp32": (rel(out_ddp, out32), rel(grad_ddp, grad32))}

    default = copy.deepcopy(base)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in default.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(default, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    out, grad = forward_backward(default, x, t, y, autocast=True)
    rows["FSDP2 default policy vs ddp"] = (rel(out, out_ddp), rel(grad, grad_ddp))

    ours = shard_model(copy.deepcopy(base), mesh, "zero2", torch.bfloat16)
    out, grad = forward_backward(ours, x, t, y, autocast=True)
    rows["opendit policy vs ddp"] = (rel(out, out_ddp), rel(grad, grad_ddp))
    dist.destroy_process_group()
    return rows


def training(steps: int) -> dict:
    train = os.path.join(REPO, "scripts", "dit", "train.py")
    common = ["--dataset", "digits", "--model", "DiT-N/2", "--device", "cpu", "--lr", "1e-3", "--batch_size", "16",
              "--max_steps", str(steps), "--log_every", "1", "--ckpt_every", str(steps), "--ckpt_keep", "0"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("ddp bf16", ["--plugin", "ddp", "--mixed_precision", "bf16"]),
                            ("zero2 bf16", ["--plugin", "zero2", "--mixed_precision", "bf16"]),
                            ("fsdp bf16", ["--plugin", "fsdp", "--mixed_precision", "bf16"]),
                            ("ddp fp32", ["--plugin", "ddp", "--mixed_precision", "fp32"])]:
            outputs = os.path.join(tmp, name.replace(" ", "-"))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train, *common,
                   *extra, "--outputs", outputs]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr[-2000:]}")
            run = os.path.join(outputs, os.listdir(outputs)[0])
            with open(os.path.join(run, "metrics.jsonl")) as f:
                out[name] = [json.loads(line)["loss"] for line in f]
    ref = out["ddp bf16"]
    return {name: max(abs(a - b) / abs(b) for a, b in zip(losses, ref)) for name, losses in out.items() if name != "ddp bf16"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--training_only", action="store_true", help="skip measurement 1 (e.g. to measure an older commit)")
    args = p.parse_args()
    torch.set_num_threads(2)
    if not args.training_only:
        print("one forward + backward, DiT-N/2 with random weights, batch 32 (relative L2 difference: output, gradients)")
        for name, (o, g) in in_process().items():
            print(f"  {name:<30} output {o:.2e}  gradients {g:.2e}")
    print(f"{args.steps} training steps on 2 processes, global batch 32 (max relative difference of the per-step loss "
          f"from ddp bf16)")
    for name, d in training(args.steps).items():
        print(f"  {name:<12} {d:.2e}")


if __name__ == "__main__":
    main()
