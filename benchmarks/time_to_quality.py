"""Time to quality on the bundled digits (CPU): each recipe trains the same model (DiT-N/2), batch, schedule, step
budget and seed as `make demo`; the EMA is scored every --eval_every steps as `make demo` scores it (500 samples, 20
model evaluations per sample, guidance 1.0 and 1.5, the digits classifier's accuracy and the pixel / feature Fréchet
distances). Writes a JSON of every point, a Markdown table (steps and training seconds to reach given quality levels)
between markers in BENCHMARKS.md, and a plot (quality vs steps, one curve per recipe) to docs/time_to_quality.png.

    python benchmarks/time_to_quality.py                       # every recipe, ~1 h on a 2-core CPU
    python benchmarks/time_to_quality.py --recipes dit,sit     # some; rows of earlier runs in the JSON are kept
    python benchmarks/time_to_quality.py --recipes dit,fast --seeds 1,2   # more seeds: the seed-spread table

A recipe is a name, a label and training flags on top of the common ones (RECIPES): later issues add rows there. A
recipe on its own schedule (OWN_SCHEDULE: fewer steps, its cosine ending there) is scored at its own interval.
The 20-evaluation sampler is the one training uses for its grid and FID (opendit.sampling.generate.quick_sampler):
DPM-Solver++ 20 steps for the diffusion, Heun on an 11-point grid (10 steps of 2 evaluations) for a flow. MeanFlow rows
are scored with 1 and with 2 network calls per sample at guidance 1 (guidance is trained in).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from opendit.eval.digits import score_npz  # noqa: E402
from opendit.checkpoint import list_checkpoints  # noqa: E402

# the demo's budget (Makefile DEMO_ARGS), the same for every recipe
COMMON = ["--dataset", "digits", "--model", "DiT-N/2", "--mixed_precision", "fp32", "--device", "cpu",
          "--batch_size", "128", "--lr", "2e-3", "--lr_schedule", "cosine", "--warmup_steps", "100",
          "--ema_decay", "0.995", "--global_seed", "0"]
# REPA on digits: the digits classifier's 4x4x64 conv features, the 16 tokens after block 2 of DiT-N/2's 4 (REPA
# aligns about a third of the way in: block 8 of 28 for XL, 4 of 12 for B), lambda 0.5 as published, projector width
# 512 = 4x the hidden size (the published 2048 is 1.8x XL's 1152; 2048 here would be 3.6x the DiT's own parameters)
REPA_FLAGS = ["--repa_encoder", "digits", "--repa_depth", "2", "--repa_lambda", "0.5", "--repa_projector_dim", "512"]
# LightningDiT's published block set (RMSNorm, SwiGLU, 2-D RoPE; QK-norm and no-shift off, as in its XL/1 config)
# with its objective (flow, logit-normal t); the optimizer and schedule stay the common ones. Its cosine velocity loss
# is left out: it is taken over channels, and the digits have one (the trainer refuses it there; it used to explode)
LIGHTNING_FLAGS = ["--use_rmsnorm", "--use_swiglu", "--use_rope",
                   "--objective", "flow", "--time_sampling", "logit_normal"]
MEANFLOW_FLAGS = ["--objective", "meanflow", "--kappa", "0.333333", "--optimizer", "muon"]
FAST_FLAGS = ["--lr", "4e-3", "--warmup_steps", "50"]
FAST_EMA = ["--ema_std", "0.1"]
RECIPES = [  # (key, label, flags)
    ("dit", "DiT (diffusion)", []),
    ("sit", "SiT (flow, uniform t)", ["--objective", "flow"]),
    ("sit-ln", "SiT + logit-normal t", ["--objective", "flow", "--time_sampling", "logit_normal"]),
    ("dit-repa", "DiT + REPA (digits encoder)", REPA_FLAGS),
    ("sit-repa", "SiT + REPA (digits encoder)", ["--objective", "flow", *REPA_FLAGS]),
    ("lightning", "LightningDiT blocks + flow (logit-normal t)", LIGHTNING_FLAGS),
    ("lightning-repa", "LightningDiT blocks + flow + REPA", [*LIGHTNING_FLAGS, *REPA_FLAGS]),
    # MeanFlow (recipes/digits-meanflow.toml: the released defaults with guidance 1.5 trained in, Muon): one training
    # run, scored with 1 and with 2 network calls per sample; guidance is trained in, so both "cfg" columns hold the
    # samples at guidance 1
    ("meanflow-1", "MeanFlow + Muon, 1 call (trained-in guidance 1.5 in both cfg columns)", MEANFLOW_FLAGS),
    ("meanflow-2", "MeanFlow + Muon, 2 calls (trained-in guidance 1.5 in both cfg columns)", MEANFLOW_FLAGS),
    # 500 steps on their own schedule (issue 28): LightningDiT blocks + flow with AdamW at its best peak lr on this
    # schedule (4e-3 of 2e-3, 4e-3, 6e-3) and a 50-step warmup, first with the demo's constant EMA 0.995 (a ~200-step
    # memory: 40% of such a run), then with EDM2's power-function EMA; then Muon at its best lr (1e-2 of 4e-3 to
    # 1.2e-2): recipes/digits-fast.toml
    ("fast-ema995", "500 steps: LightningDiT + flow, AdamW lr 4e-3, EMA 0.995", [*LIGHTNING_FLAGS, *FAST_FLAGS]),
    ("fast-adamw", "500 steps: the same, power-function EMA (std 0.1)", [*LIGHTNING_FLAGS, *FAST_FLAGS, *FAST_EMA]),
    ("fast", "500 steps: the same with Muon, lr 1e-2 (recipes/digits-fast.toml)",
     [*LIGHTNING_FLAGS, *FAST_FLAGS, *FAST_EMA, "--optimizer", "muon", "--lr", "1e-2"]),
]


# recipes trained on their own schedule: (steps, evaluation interval)
OWN_SCHEDULE: dict[str, tuple[int, int]] = {"fast-ema995": (500, 125), "fast-adamw": (500, 125), "fast": (500, 125)}


def run_key(key: str) -> str:
    """The training run a row scores (the MeanFlow rows share one)."""
    return "meanflow" if key.startswith("meanflow-") else key


def seeded(key: str, seed: int) -> str:
    """The results key of a recipe's run with another seed (seed 0: the recipe's own key)."""
    return key if seed == 0 else f"{key}@seed{seed}"


def calls_of(key: str) -> int | None:
    """Network calls per sample of a MeanFlow row (None: the 20-evaluation sampler)."""
    return int(key.rsplit("-", 1)[1]) if key.startswith("meanflow-") else None
# quality levels of the table: accuracy at guidance 1.5 (higher is better), Fréchet distances at guidance 1.0 (lower)
ACCURACY_LEVELS = (0.95, 0.98, 0.99)
PIXEL_FD_LEVELS = (40.0, 30.0, 25.0)
FEATURE_FD_LEVELS = (10.0, 7.0, 6.0)
MARK_BEGIN, MARK_END = "<!-- time-to-quality:begin -->", "<!-- time-to-quality:end -->"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(key: str, flags: list[str], steps: int, eval_every: int, out_root: str, seed: int = 0) -> str:
    outputs = os.path.join(out_root, seeded(run_key(key), seed))
    flags = [*flags, "--global_seed", str(seed)] if seed else flags
    if run_key(key) != key and os.path.isdir(outputs):  # a shared run already trained for another row
        runs = sorted(d for d in os.listdir(outputs) if not d.startswith("."))
        if runs and any(c.endswith(f"global_step{steps}") for c in list_checkpoints(os.path.join(outputs, runs[-1]))):
            return os.path.join(outputs, runs[-1])
    cmd = [sys.executable, os.path.join(REPO, "scripts", "dit", "train.py"), *COMMON, *flags, "--max_steps", str(steps),
           "--log_every", str(eval_every), "--ckpt_every", str(eval_every), "--ckpt_keep", "0", "--outputs", outputs]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL)
    runs = sorted(d for d in os.listdir(outputs) if not d.startswith("."))
    return os.path.join(outputs, runs[-1])


def training_seconds(run_dir: str) -> dict[int, float]:
    """Cumulative training seconds at each logged step (from the logged steps/s; checkpoint writes included)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = sorted((r for r in rows if "steps_per_s" in r), key=lambda r: r["step"])
    out, total, last = {}, 0.0, 0
    for r in rows:
        total += (r["step"] - last) / r["steps_per_s"]
        out[r["step"]] = total
        last = r["step"]
    return out


def evaluate(ckpt_dir: str, cfg: float, calls: int | None = None) -> dict:
    from opendit.cli import sample_ddp

    tag = f"mf{calls}" if calls else "q20"
    npz_dir = os.path.join(ckpt_dir, "..", "eval", f"{os.path.basename(ckpt_dir)}-{tag}-cfg{cfg}")
    objective = json.load(open(os.path.join(ckpt_dir, "..", "config.json"))).get("objective", "diffusion")
    sampler = (["--sampler", "ode", "--sampling_method", "heun", "--num_sampling_steps", "11"] if objective == "flow"
               else ["--sampler", "meanflow", "--num_sampling_steps", str(calls)] if objective == "meanflow"
               else ["--sampler", "dpm-solver++", "--num_sampling_steps", "20"])
    if not os.path.isfile(os.path.normpath(npz_dir) + ".npz"):
        code = sample_ddp.main(["--ckpt", ckpt_dir, "--num_samples", "500", "--per_proc_batch_size", "250",
                                "--device", "cpu", *sampler, "--cfg_scale", str(cfg), "--sample_dir", npz_dir])
        assert code == 0, f"sampling {ckpt_dir} failed"
    return score_npz(os.path.normpath(npz_dir) + ".npz")


def first_reaching(points: list[dict], key: str, level: float, higher_better: bool):
    for p in points:
        v = p[key]
        if (v >= level) if higher_better else (v <= level):
            return p
    return None


def table(results: dict) -> str:
    head = ["recipe", "s/step"]
    head += [f"acc@1.5 >= {lv:.0%}" for lv in ACCURACY_LEVELS]
    head += [f"pixel FD@1.0 <= {lv:g}" for lv in PIXEL_FD_LEVELS]
    head += [f"feature FD@1.0 <= {lv:g}" for lv in FEATURE_FD_LEVELS]
    head += ["final acc@1.5", "final pixel FD@1.0", "final feature FD@1.0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in RECIPES:
        if key not in results:
            continue
        pts = results[key]["points"]
        cells = [label, f"{pts[-1]['seconds'] / pts[-1]['step']:.3f}"]
        for k, levels, hb in (("acc_cfg1.5", ACCURACY_LEVELS, True), ("pixel_fd_cfg1.0", PIXEL_FD_LEVELS, False),
                              ("feature_fd_cfg1.0", FEATURE_FD_LEVELS, False)):
            for lv in levels:
                p = first_reaching(pts, k, lv, hb)
                cells.append(f"{p['step']} ({p['seconds']:.0f} s)" if p else "not reached")
        last = pts[-1]
        cells += [f"{last['acc_cfg1.5']:.1%}", f"{last['pixel_fd_cfg1.0']:.2f}", f"{last['feature_fd_cfg1.0']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_table(results: dict) -> str:
    """The recipes run with several seeds: each seed's final scores and their range (the noise a technique must
    beat)."""
    lines = ["| recipe | steps | seed | acc@1.5 | pixel FD@1.0 | feature FD@1.0 | training s |", "|" + "---|" * 7]
    for key, label, _ in RECIPES:
        runs = sorted((int(k.split("@seed")[1]), r) for k, r in results.items() if k.startswith(f"{key}@seed"))
        if key not in results or not runs:
            continue
        runs = [(0, results[key]), *runs]
        finals = [r["points"][-1] for _, r in runs]
        for (seed, _), f in zip(runs, finals):
            lines.append(f"| {label} | {f['step']} | {seed} | {f['acc_cfg1.5']:.1%} | {f['pixel_fd_cfg1.0']:.2f} | "
                         f"{f['feature_fd_cfg1.0']:.2f} | {f['seconds']:.0f} |")
        col = {m: [f[m] for f in finals] for m in ("acc_cfg1.5", "pixel_fd_cfg1.0", "feature_fd_cfg1.0", "seconds")}
        lines.append(f"| {label}: range | | | {min(col['acc_cfg1.5']):.1%}-{max(col['acc_cfg1.5']):.1%} | "
                     f"{min(col['pixel_fd_cfg1.0']):.2f}-{max(col['pixel_fd_cfg1.0']):.2f} | "
                     f"{min(col['feature_fd_cfg1.0']):.2f}-{max(col['feature_fd_cfg1.0']):.2f} | "
                     f"{min(col['seconds']):.0f}-{max(col['seconds']):.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / max(1, count - 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = np.floor(lo / step) * step
    return [float(round(v, 10)) for v in np.arange(start, hi + step * 0.5, step) if lo - 1e-9 <= v <= hi + 1e-9]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-3-5 ticks of each decade inside [lo, hi] (values, not logs)."""
    out = []
    for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1):
        out += [m * 10 ** e for m in (1, 2, 3, 5) if lo <= m * 10 ** e <= hi]
    return out


def plot(results: dict, path: str) -> None:
    """Quality against training steps (top row) and training seconds on this machine (bottom row): accuracy at cfg 1.5,
    pixel and feature FD at cfg 1.0 (log scale); grid lines at round values, the table's quality levels dashed. PIL
    only."""
    from PIL import Image, ImageDraw, ImageFont

    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
              (140, 86, 75), (227, 119, 194), (188, 189, 34), (127, 127, 127), (190, 140, 0), (0, 0, 0),
              (0, 90, 50), (110, 0, 110)]
    panels = [("acc_cfg1.5", "accuracy at cfg 1.5 (higher is better)", False, ACCURACY_LEVELS),
              ("pixel_fd_cfg1.0", "pixel FD at cfg 1.0 (log; lower is better)", True, PIXEL_FD_LEVELS),
              ("feature_fd_cfg1.0", "feature FD at cfg 1.0 (log; lower is better)", True, FEATURE_FD_LEVELS)]
    axes = [("step", "training steps"), ("seconds", "training seconds (this 2-core CPU)")]
    W, H, left, right, top, bottom = 470, 330, 62, 18, 34, 52
    keys = [k for k, _, _ in RECIPES if k in results]
    per_row = 2
    legend_rows = (len(keys) + per_row - 1) // per_row
    img = Image.new("RGB", (W * len(panels), H * len(axes) + 16 + 22 * legend_rows + 26), "white")
    d = ImageDraw.Draw(img)
    for r, (xkey, xlabel) in enumerate(axes):
        x_hi = max(p[xkey] for k in keys for p in results[k]["points"])
        xticks = nice_ticks(0, x_hi)
        if xticks[-1] < x_hi:  # the axis ends on a round value
            xticks.append(xticks[-1] + (xticks[1] - xticks[0]))
        x_hi = xticks[-1]
        for i, (metric, title, log, levels) in enumerate(panels):
            x0, y0, x1, y1 = i * W + left, r * H + top, (i + 1) * W - right, (r + 1) * H - bottom
            vals = [p[metric] for k in keys for p in results[k]["points"]] + list(levels)
            if log:
                lo, hi = np.log10(min(vals)) - 0.03, np.log10(max(vals)) + 0.03
                f = lambda v: float(np.log10(v))  # noqa: E731
                yticks = [(f(v), f"{v:g}") for v in log_ticks(10 ** lo, 10 ** hi)]
            else:
                lo, hi = min(vals) - 0.01, 1.0
                f = float
                yticks = [(v, f"{v:.0%}") for v in nice_ticks(lo, hi, 6)]
            X = lambda v: x0 + v / x_hi * (x1 - x0)  # noqa: E731
            Y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
            for v, text in yticks:  # horizontal grid lines and their labels
                d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
                d.text((x0 - 6, Y(v)), text, fill="black", font=small, anchor="rm")
            for v in xticks:
                d.line([(X(v), y0), (X(v), y1)], fill=(225, 225, 225))
                d.text((X(v), y1 + 5), f"{v:g}", fill="black", font=small, anchor="mt")
            for lv in levels:  # the table's quality levels, dashed
                y = Y(f(lv))
                for xs in range(int(x0), int(x1), 10):
                    d.line([(xs, y), (min(xs + 5, x1), y)], fill=(120, 120, 120), width=1)
            d.rectangle([x0, y0, x1, y1], outline="black")
            d.text((x0, y0 - 22), title, fill="black", font=font)
            d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=small, anchor="mt")
            for c, k in enumerate(keys):
                pts = [(X(p[xkey]), Y(f(p[metric]))) for p in results[k]["points"]]
                d.line(pts, fill=colors[c % len(colors)], width=4 if k == "fast" else 2)  # the recommended recipe
                for x, y in pts:
                    d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colors[c % len(colors)])
    base = H * len(axes) + 10
    for c, k in enumerate(keys):
        label = next(lbl for kk, lbl, _ in RECIPES if kk == k)
        x, y = 14 + (c % per_row) * 700, base + 22 * (c // per_row)
        d.rectangle([x, y + 2, x + 16, y + 14], fill=colors[c % len(colors)])
        d.text((x + 24, y), label, fill="black", font=font)
    d.text((14, base + 22 * legend_rows + 4), "DiT-N/2 on the 1,797 bundled digits, batch 128, the demo's schedule, seed 0; "
           "every 250 steps (500-step rows: 125) 500 EMA samples with 20 model evaluations; dashed: the table's levels",
           fill="black", font=small)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def write_markdown(results: dict, meta: dict, bench_md: str) -> None:
    body = "\n".join([
        MARK_BEGIN,
        f"## {meta['date']} — time to quality on digits (issues 14, 15, 16, 30, 28), {meta['device']}, "
        f"torch {meta['torch']}",
        "",
        f"`python benchmarks/time_to_quality.py` — every recipe trains DiT-N/2 on the 1,797 bundled digits with the "
        f"demo's budget (batch 128, lr 2e-3 cosine, 100 warmup steps, EMA 0.995, seed 0, {meta['steps']} steps, fp32; "
        f"the 500-step rows: their own cosine ending at 500, scored every 125 steps); "
        f"every {meta['eval_every']} steps the EMA draws 500 samples with 20 model evaluations (diffusion: "
        f"DPM-Solver++ 20 steps; flow: Heun, 11-point grid) at guidance 1.0 and 1.5, scored by the digits classifier. "
        f"Cells: first evaluated step (and training seconds on this machine) at which the level holds; rows trained on "
        f"different days ({', '.join(sorted({str(r.get('date')) for r in results.values()}))}) compare "
        f"seconds only roughly (this host's speed varies by ~5% between runs). Plot: "
        f"docs/time_to_quality.png; every point: benchmarks/results/time_to_quality.json.",
        "",
        table(results),
        "",
        *(["Seed spread (the same recipe and budget, other --global_seed; final scores):", "", spread, ""]
          if (spread := spread_table(results)) else []),
        "![time to quality](docs/time_to_quality.png)",
        MARK_END,
    ])
    text = open(bench_md).read() if os.path.isfile(bench_md) else "# Benchmarks\n"
    if MARK_BEGIN in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with open(bench_md, "w") as f:
        f.write(text)


def run_recipe(key: str, label: str, flags: list[str], seed: int, args) -> dict:
    """Train one recipe with one seed and score each of its checkpoints."""
    steps, eval_every = OWN_SCHEDULE.get(key, (args.steps, args.eval_every))
    run_dir = train(key, flags, steps, eval_every, args.work, seed)
    seconds = training_seconds(run_dir)
    points = []
    for ckpt_dir in list_checkpoints(run_dir):
        step = int(ckpt_dir.rsplit("global_step", 1)[1])
        calls = calls_of(key)
        s10 = evaluate(ckpt_dir, 1.0, calls)
        s15 = s10 if calls else evaluate(ckpt_dir, 1.5)  # MeanFlow: its guidance is trained in, sampled at 1
        points.append({"step": step, "seconds": seconds[step], "acc_cfg1.0": s10["accuracy"],
                       "pixel_fd_cfg1.0": s10["pixel_fd"], "feature_fd_cfg1.0": s10["feature_fd"],
                       "acc_cfg1.5": s15["accuracy"], "pixel_fd_cfg1.5": s15["pixel_fd"],
                       "feature_fd_cfg1.5": s15["feature_fd"]})
        print(f"{label} step {step}: acc@1.5 {s15['accuracy']:.1%} pixel FD@1.0 {s10['pixel_fd']:.2f} "
              f"feature FD@1.0 {s10['feature_fd']:.2f}", flush=True)
    return {"label": label, "flags": flags, "seed": seed, "points": points, "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(k for k, _, _ in RECIPES))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", default="0", help="comma-separated --global_seed values (0: the table's rows)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--work", default=os.path.join(REPO, "outputs", "time_to_quality"))
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "time_to_quality.json"))
    p.add_argument("--markdown", default=os.path.join(REPO, "BENCHMARKS.md"))
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "time_to_quality.png"))
    p.add_argument("--report_only", action="store_true", help="no training: the table and plot of the JSON")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    saved = json.load(open(args.results)) if os.path.isfile(args.results) else {}
    results = saved.get("recipes", {})
    for r in results.values():  # rows of runs before rows carried their date: the run's
        r.setdefault("date", (saved.get("meta") or {}).get("date"))
    wanted = [] if args.report_only else args.recipes.split(",")
    if unknown := set(wanted) - {k for k, _, _ in RECIPES}:
        p.error(f"unknown recipes {sorted(unknown)}")
    for key, label, flags in RECIPES:
        for seed in (int(v) for v in args.seeds.split(",")):
            if key in wanted:
                results[seeded(key, seed)] = run_recipe(key, label, flags, seed, args)
    meta = saved.get("meta") if args.report_only else {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps,
        "eval_every": args.eval_every, "device": f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)",
        "common_flags": COMMON}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"meta": meta, "recipes": results}, f, indent=1)
    print(table(results))
    plot(results, args.plot)
    write_markdown(results, meta, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
