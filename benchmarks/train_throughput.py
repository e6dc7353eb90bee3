"""Training throughput of DiT: the reference configuration against opendit's fast one, interleaved in one run.

A training step = forward + hybrid loss (training_losses), backward, gradient clipping, AdamW, EMA update,
on precomputed latents (random tensors of the latent shape: the VAE is not in the loop).

    reference  fp32 weights and activations with TF32 matmuls, eager attention, no kernels, no compile
               (what the published trainer does)
    fast       bf16 autocast, SDPA flash/cuDNN attention (flash on CUDA), fused AdamW, foreach EMA,
               optional --compile

A configuration name may end in "-lightning": the same with LightningDiT's published block set (RMSNorm, SwiGLU,
2-D RoPE), e.g. --configs fast,fast-lightning compares the blocks at equal settings in one run.

Prints img/s, step time, peak memory, MFU and the ratio fast/reference for each batch size, and appends
rows to BENCHMARKS.md (device, torch version, settings). Also a sampling benchmark (--sample):
DiT-XL/2 250 DDPM steps with guidance and DPM-Solver++ 20 steps, in images/s.

    python benchmarks/train_throughput.py --model DiT-XL/2 --image_size 256 --batch_sizes 32,64 --device cuda
    python benchmarks/train_throughput.py --model DiT-S/2 --image_size 256 --batch_sizes 8 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.flops import dit_train_flops_per_image  # noqa: E402
from opendit.distributed import DistEnv  # noqa: E402
from opendit.models import DiT_models  # noqa: E402

BLOCK_SETS = {"": {}, "lightning": dict(use_rmsnorm=True, use_swiglu=True, use_rope=True)}
from opendit.parallelize import ModelOptions, parallelize_dit  # noqa: E402

# Dense bf16 peak of the chip, the usual MFU denominator (spec sheet, SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model + optimizer + EMA in a given configuration."""

    def __init__(self, args, config: str, device: torch.device):
        self.config, self.device = config, device
        base, _, blocks = config.partition("-")
        if base not in ("fast", "reference") or blocks not in BLOCK_SETS:
            raise SystemExit(f"unknown config {config!r}: fast or reference, optionally -lightning")
        fast = base == "fast"
        latent = args.image_size // 8
        torch.manual_seed(0)
        model = DiT_models[args.model](input_size=latent, in_channels=4, num_classes=args.num_classes,
                                       **BLOCK_SETS[blocks]).to(device)
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = [e for e, p in zip(self.ema.parameters(), model.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0, fused=(fast and device.type == "cuda"))
        self.model = model
        # the trainer's model transformation (one process: no data-parallel wrapper)
        options = ModelOptions(attention="flash" if (fast and device.type == "cuda") else ("sdpa" if fast else "eager"),
                               norm="modulate_kernel" if (args.modulate_kernel and fast and not blocks) else "torch",
                               grad_checkpoint=args.grad_checkpoint and fast, compile=args.compile and fast)
        self.forward = parallelize_dit(model, options, DistEnv(device=device))
        self.diffusion = create_diffusion("")
        low = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.fast_dtype or ("bf16" if device.type == "cuda" else "fp32")]
        self.autocast = torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=fast and low is not None)
        self.latent_shape = (4, latent, latent)
        self.num_classes = args.num_classes
        self.flops_per_image = dit_train_flops_per_image(model.config)

    def batch(self, n):
        g = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(n, *self.latent_shape, generator=g).to(self.device)
        y = torch.randint(0, self.num_classes, (n,), generator=g).to(self.device)
        return x, y

    def step(self, x, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.device)
        with self.autocast:
            loss = self.diffusion.training_losses(self.forward, x, t, dict(y=y))["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - 0.9999)
        return loss


def state_bytes(trainer: Trainer) -> int:
    """Bytes this trainer keeps between steps: weights, EMA, optimizer state."""
    tensors = list(trainer.model.parameters()) + list(trainer.ema.parameters())
    for st in trainer.opt.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def time_steps(trainer: Trainer, batch: int, warmup: int, steps: int) -> dict:
    x, y = trainer.batch(batch)
    for _ in range(warmup):
        trainer.step(x, y)
    sync(trainer.device)
    if trainer.device.type == "cuda":
        trainer.opt.zero_grad(set_to_none=True)
        # other trainers' state stays resident: count only this trainer's own bytes in its peak
        others = torch.cuda.memory_allocated(trainer.device) - state_bytes(trainer)
        torch.cuda.reset_peak_memory_stats(trainer.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = trainer.step(x, y)
        sync(trainer.device)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{trainer.config}: non-finite loss")
    times.sort()
    med = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated(trainer.device) - others) / 2**30 if trainer.device.type == "cuda" else float("nan")
    return {"step_s": med, "img_s": batch / med, "peak_gib": peak, "tflops": trainer.flops_per_image * batch / med / 1e12}


def train_benchmark(args, device) -> list[dict]:
    peak = peak_tflops(device)
    rows = []
    trainers = {c: Trainer(args, c, device) for c in args.configs}
    print(f"{args.model} @{args.image_size}px latents, {trainers[args.configs[0]].flops_per_image / 1e9:.0f} GFLOP/img/step, "
          f"device {device_name(device)}, torch {torch.__version__}")
    print(f"{'batch':>5} {'config':>15} {'step ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for batch in args.batch_sizes:
        res = {}
        for rep in range(args.repeats):  # interleave the configurations
            for c, tr in trainers.items():
                try:
                    r = time_steps(tr, batch, args.warmup if rep == 0 else 1, args.steps)
                except torch.OutOfMemoryError:
                    tr.opt.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    print(f"{batch:>5} {c:>15} out of memory")
                    continue
                if c not in res or r["step_s"] < res[c]["step_s"]:
                    res[c] = r
        for c, r in res.items():
            mfu = r["tflops"] / peak if peak else float("nan")
            print(f"{batch:>5} {c:>15} {r['step_s'] * 1e3:>9.1f} {r['img_s']:>9.1f} {r['tflops']:>8.1f} {mfu:>6.1%} {r['peak_gib']:>9.2f}")
            rows.append(dict(batch=batch, config=c, mfu=mfu, **r))
        for a, b in (("fast", "reference"), ("fast-lightning", "fast"), ("reference-lightning", "reference")):
            if a in res and b in res:
                print(f"{batch:>5} {'ratio':>15} {a}/{b} = {res[a]['img_s'] / res[b]['img_s']:.2f}x")
    return rows


def sample_benchmark(args, device) -> list[dict]:
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=latent, in_channels=4, num_classes=args.num_classes,
                                   attention_impl="flash" if device.type == "cuda" else "sdpa").to(device).eval()
    n = args.sample_batch
    z = torch.randn(n, 4, latent, latent, device=device)
    y = torch.randint(0, args.num_classes, (n,), device=device)
    kw = dict(y=torch.cat([y, torch.full_like(y, args.num_classes)]), cfg_scale=4.0)
    rows = []
    runs = [("ddpm", args.ddpm_steps), ("dpm-solver++", args.dpm_steps)]
    for name, steps in runs:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for timed in (False, True):  # first pass warms up
                if timed:
                    sync(device)
                    t0 = time.perf_counter()
                if name == "ddpm":
                    d = create_diffusion(str(steps if timed else 2))
                    out = d.p_sample_loop(model.forward_with_cfg, (2 * n, 4, latent, latent), noise=torch.cat([z, z]),
                                          clip_denoised=False, model_kwargs=kw)
                else:
                    out = create_diffusion("").dpm_solver_sample_loop(model.forward_with_cfg, (2 * n, 4, latent, latent),
                                                                      noise=torch.cat([z, z]), model_kwargs=kw,
                                                                      num_steps=steps if timed else 2)
            sync(device)
            dt = time.perf_counter() - t0
        assert torch.isfinite(out).all()
        print(f"sampling {args.model} @{args.image_size}: {name} {steps} steps, cfg 4.0, batch {n}: "
              f"{dt:.2f} s, {n / dt:.2f} img/s (latents; VAE decode not included)")
        rows.append(dict(sampler=name, steps=steps, batch=n, seconds=dt, img_s=n / dt))
    return rows


def append_markdown(args, device, train_rows, sample_rows):
    path = os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md")
    stamp = datetime.date.today().isoformat()
    lines = []
    if not os.path.exists(path):
        lines += ["# Benchmarks", "", "Rows are appended by `benchmarks/train_throughput.py`; ratios compare configurations "
                  "measured in the same run.", ""]
    settings = (f"{args.model} @{args.image_size}px (latents), steps={args.steps}, warmup={args.warmup}, "
                f"fast dtype={args.fast_dtype or ('bf16' if device.type == 'cuda' else 'fp32')}, "
                f"compile={args.compile}, grad_checkpoint={args.grad_checkpoint}, modulate_kernel={args.modulate_kernel}")
    what = f"training throughput, {args.model} @{args.image_size}" + (", compiled" if args.compile else ", eager") + \
        (", LayerNorm+modulate kernel" if args.modulate_kernel else "") + \
        (f", batch {'/'.join(map(str, args.batch_sizes))}" if getattr(args, "batch_sizes", None) else "")
    lines += [f"## {stamp} — {what}, {device_name(device)}, torch {torch.__version__}", "", settings, ""]
    if train_rows:
        lines += ["| batch | config | step ms | img/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|"]
        for r in train_rows:
            mfu = f"{r['mfu']:.1%}" if math.isfinite(r["mfu"]) else "— (CPU)"  # no peak to compare against
            peak = f"{r['peak_gib']:.2f}" if math.isfinite(r["peak_gib"]) else "—"
            lines.append(f"| {r['batch']} | {r['config']} | {r['step_s'] * 1e3:.1f} | {r['img_s']:.1f} | {r['tflops']:.1f} | "
                         f"{mfu} | {peak} |")
        by = {}
        for r in train_rows:
            by.setdefault(r["batch"], {})[r["config"]] = r
        for b, rs in by.items():
            for x, y in (("fast", "reference"), ("fast-lightning", "fast"), ("reference-lightning", "reference")):
                if x in rs and y in rs:
                    lines.append(f"\nbatch {b}: {x} / {y} = {rs[x]['img_s'] / rs[y]['img_s']:.2f}x")
        lines.append("")
    for r in sample_rows:
        lines.append(f"- sampling {r['sampler']} {r['steps']} steps, cfg 4.0, batch {r['batch']}: {r['img_s']:.2f} img/s")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--num_classes", type=int, default=1000)
    ap.add_argument("--batch_sizes", default="32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="reference,fast")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best of them is kept")
    ap.add_argument("--fast_dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="autocast dtype of the fast config (default bf16 on CUDA, fp32 on CPU, where bf16 matmuls are slow)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad_checkpoint", action="store_true")
    ap.add_argument("--modulate_kernel", action="store_true", help="fast config: the fused Triton LayerNorm+modulate")
    ap.add_argument("--no_train", action="store_true")
    ap.add_argument("--sample", action="store_true", help="also run the sampling benchmark")
    ap.add_argument("--sample_batch", type=int, default=32)
    ap.add_argument("--ddpm_steps", type=int, default=250)
    ap.add_argument("--dpm_steps", type=int, default=20)
    ap.add_argument("--no_record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.configs = args.configs.split(",")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference trainer's setting
        torch.backends.cudnn.allow_tf32 = True
    train_rows = [] if args.no_train else train_benchmark(args, device)
    sample_rows = sample_benchmark(args, device) if args.sample else []
    if not args.no_record:
        append_markdown(args, device, train_rows, sample_rows)


if __name__ == "__main__":
    main()
