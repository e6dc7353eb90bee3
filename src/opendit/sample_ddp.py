"""Sample many images for evaluation, on any number of processes (torchrun).

    torchrun --standalone --nproc_per_node=8 scripts/dit/sample_ddp.py --ckpt DiT-XL-2-256x256.pt --num_samples 50000
    python scripts/dit/sample_ddp.py --ckpt outputs/demo/000-DiT-N-2 --num_samples 500 --sample_dir samples/demo

Sample i has label i mod num_classes (exactly uniform over classes) and is written to DIR/iiiiii.png; then DIR.npz holds
them all in the ADM evaluation format (arr_0: uint8 N x H x W x C, arr_1: int64 labels). Work is cut into batches of
--per_proc_batch_size; batch b is seeded from (seed, b) and done by rank b mod world_size, so every rank has its own
seeds, the result does not depend on the number of processes, and a rerun skips the batches whose PNGs exist.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import parallel
from .errors import ArgumentParser, UserError
from .images import to_uint8
from .sample import add_model_flags, check_sampling_flags, clip_for, generate, load_for_sampling, to_images


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch, 0x5A3]).generate_state(1, dtype=np.uint64)[0] >> 1)


def png_path(sample_dir: str, i: int) -> str:
    return os.path.join(sample_dir, f"{i:06d}.png")


def write_png(path: str, img: np.ndarray) -> None:
    tmp = path + ".tmp.png"
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp)
    os.replace(tmp, path)


def build_npz(sample_dir: str, num_samples: int, num_classes: int) -> str:
    """DIR.npz from DIR/000000.png ... (written atomically)."""
    arrs = []
    for i in range(num_samples):
        with Image.open(png_path(sample_dir, i)) as im:
            a = np.asarray(im)
        arrs.append(a[..., None] if a.ndim == 2 else a)
    images = np.stack(arrs).astype(np.uint8)
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    out = sample_dir.rstrip("/") + ".npz"
    tmp = sample_dir.rstrip("/") + ".tmp.npz"
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, out)
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample many images (PNGs + an ADM-format .npz) from a DiT checkpoint, on N processes.")
    add_model_flags(p, cfg_scale=1.5)
    p.add_argument("--num_samples", type=int, default=50_000)
    p.add_argument("--per_proc_batch_size", type=int, default=32)
    p.add_argument("--sample_dir", default="samples", help="PNGs go here; DIR.npz beside it")
    return p


def sample_all(args) -> int:
    if args.num_samples <= 0 or args.per_proc_batch_size <= 0:
        raise UserError("--num_samples and --per_proc_batch_size must be positive")
    env = parallel.init_distributed(args.device)
    precision = parallel.Precision(args.mixed_precision, env.device)
    loaded = load_for_sampling(args, env.device)
    check_sampling_flags(args, loaded)
    if env.is_main:
        os.makedirs(args.sample_dir, exist_ok=True)
    parallel.barrier(env)
    B, N = args.per_proc_batch_size, args.num_samples
    n_batches = -(-N // B)
    mine = range(env.rank, n_batches, env.world_size)
    todo = [b for b in mine if not all(os.path.exists(png_path(args.sample_dir, i)) for i in range(b * B, min(N, (b + 1) * B)))]
    if env.is_main:
        print(f"{loaded.name} from {loaded.source}: {N} samples, {args.sampler} {args.num_sampling_steps} steps, "
              f"cfg {args.cfg_scale}, {env.world_size} process(es) x batch {B}; "
              f"{len(mine) - len(todo)} of this rank's {len(mine)} batches already done")
    clip = clip_for(args, loaded)
    for b in tqdm(todo, desc="sampling", disable=not env.is_main, dynamic_ncols=True):
        idx = range(b * B, min(N, (b + 1) * B))
        torch.manual_seed(batch_seed(args.seed, b))
        y = torch.tensor([i % loaded.num_classes for i in idx], device=env.device)
        z = torch.randn(len(idx), loaded.in_channels, *loaded.input_size, device=env.device)
        with precision.autocast():
            x = generate(loaded.model, y, z, sampler=args.sampler, steps=args.num_sampling_steps,
                         cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, clip_denoised=clip)
        for i, img in zip(idx, to_uint8(to_images(loaded, x.float()))):
            write_png(png_path(args.sample_dir, i), img)
    parallel.barrier(env)
    if env.is_main:
        out = build_npz(args.sample_dir, N, loaded.num_classes)
        print(f"wrote {N} PNGs to {args.sample_dir} and {out}")
    parallel.barrier(env)
    return 0


def main(argv=None) -> int:
    return parallel.run_main(sample_all, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
