"""Sample many images for evaluation, on any number of processes (torchrun).

    torchrun --standalone --nproc_per_node=8 scripts/dit/sample_ddp.py --ckpt DiT-XL-2-256x256.pt --num_samples 50000
    python scripts/dit/sample_ddp.py --ckpt outputs/demo/000-DiT-N-2 --num_samples 500 --sample_dir samples/demo

Sample i has label i mod num_classes (exactly uniform over classes) and is written to DIR/iiiiii.png; then DIR.npz holds
them all in the ADM evaluation format (arr_0: uint8 N x H x W x C, arr_1: int64 labels). Work is cut into batches of
--per_proc_batch_size; batch b is seeded from (seed, b) and done by rank b mod world_size, so every rank has its own
seeds and the result does not depend on the number of processes.

DIR/samples.json records what wrote the samples (the weights file and its SHA-256, model, sampler, steps, guidance,
seed, image size, VAE, labels, count, batch size, precision); DIR.npz carries the same record (``opendit_settings``, a
JSON string). A rerun with the same settings resumes (batches whose PNGs exist are skipped); other settings are refused
(one line naming what differs) unless --overwrite, which samples into DIR.overwrite/ and replaces DIR only once the new
samples are complete. Without --sample_dir the folder is named after the settings (samples/<model>-<checkpoint>-...),
so two different runs never share a default folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import parallel
from .errors import POSITIVE_INT, ArgumentParser, UserError
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


def build_npz(sample_dir: str, num_samples: int, num_classes: int, out: str, settings: dict | None = None) -> str:
    """``out`` (an ADM .npz) from DIR/000000.png ..., with the settings record; written atomically."""
    arrs = []
    for i in range(num_samples):
        with Image.open(png_path(sample_dir, i)) as im:
            a = np.asarray(im)
        arrs.append(a[..., None] if a.ndim == 2 else a)
    images = np.stack(arrs).astype(np.uint8)
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    extra = {SETTINGS_KEY: np.array(json.dumps(settings, sort_keys=True))} if settings is not None else {}
    tmp = out[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, arr_0=images, arr_1=labels, **extra)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- what wrote a sample folder

SETTINGS_FILE = "samples.json"
SETTINGS_KEY = "opendit_settings"
SETTINGS_FORMAT = "opendit-samples-v1"
INFORMATIONAL = ("format", "checkpoint")  # recorded, not compared: the same weights elsewhere give the same samples


def sample_settings(args, loaded, clip: bool) -> dict:
    """Everything that decides the images of a sample folder."""
    return {
        "format": SETTINGS_FORMAT,
        "checkpoint": os.path.abspath(loaded.source),
        "weights_sha256": ckpt.sha256_file(loaded.source),
        "model": loaded.name,
        "image_size": loaded.image_size,
        "vae": loaded.codec.name if loaded.codec is not None else None,
        "num_classes": loaded.num_classes,
        "labels": "sample i has class i mod num_classes",
        "sampler": args.sampler,
        "num_sampling_steps": args.num_sampling_steps,
        "cfg_scale": args.cfg_scale,
        "guidance_channels": args.guidance_channels,
        "clip_denoised": clip,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "per_proc_batch_size": args.per_proc_batch_size,  # batch b is seeded from (seed, b)
        "mixed_precision": args.mixed_precision,
        "enable_flashattn": args.enable_flashattn,
    }


def default_sample_dir(settings: dict) -> str:
    """samples/<model>-<checkpoint>-size-S-vae-V-<sampler>-<steps>-cfg-C-seed-S-<hash of all settings>."""
    src = settings["checkpoint"]
    parent = os.path.basename(os.path.dirname(src))
    stem = os.path.splitext(os.path.basename(src))[0]
    if ckpt.CKPT_RE.match(parent):  # ema.pt of a checkpoint directory
        name = f"{parent}-{stem}"
    elif parent == "model" and ckpt.CKPT_RE.match(os.path.basename(os.path.dirname(os.path.dirname(src)))):
        name = os.path.basename(os.path.dirname(os.path.dirname(src))) + "-model"
    else:
        name = stem
    vae = os.path.basename(os.path.normpath(settings["vae"])) if settings["vae"] else "none"
    compared = {k: v for k, v in settings.items() if k not in INFORMATIONAL}
    digest = hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("samples", f"{settings['model'].replace('/', '-')}-{name}-size-{settings['image_size']}-vae-{vae}-"
                                   f"{settings['sampler']}-{settings['num_sampling_steps']}-cfg-{settings['cfg_scale']:g}-"
                                   f"seed-{settings['seed']}-{digest}")


def read_settings(sample_dir: str) -> dict | None:
    try:
        with open(os.path.join(sample_dir, SETTINGS_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def settings_diff(old: dict, new: dict) -> list[str]:
    def show(d: dict, k: str) -> str:
        if k == "weights_sha256":  # the file and a short hash rather than 64 hex digits
            return f"{d.get('checkpoint')} (sha256 {str(d.get(k))[:12]})"
        return repr(d.get(k))

    keys = [k for k in {**old, **new} if k not in INFORMATIONAL and old.get(k) != new.get(k)]
    return [f"{'weights' if k == 'weights_sha256' else k} {show(old, k)} -> {show(new, k)}" for k in keys]


def prepare_sample_dir(sample_dir: str, settings: dict, overwrite: bool) -> str:
    """The folder to sample into (rank 0): ``sample_dir`` itself (new, or holding samples of the same settings: they
    are kept and the rest is done), or with ``overwrite`` a sibling ``DIR.overwrite`` that replaces it when complete.
    Samples of other settings, or files that no samples.json accounts for, are a one-line error and are left as they
    are."""
    if os.path.exists(sample_dir) and not os.path.isdir(sample_dir):
        raise UserError(f"--sample_dir {sample_dir} is a file, not a directory")
    work = sample_dir
    if os.path.isdir(sample_dir) and os.listdir(sample_dir):
        if overwrite:
            work = os.path.normpath(sample_dir) + ".overwrite"
            prior = read_settings(work) if os.path.isdir(work) else None
            if os.path.exists(work) and (prior is None or settings_diff(prior, settings)):
                shutil.rmtree(work)  # an unfinished --overwrite of other settings
        elif (old := read_settings(sample_dir)) is None:
            raise UserError(f"--sample_dir {sample_dir} holds files but no {SETTINGS_FILE} saying what wrote them; "
                            f"use another --sample_dir, or --overwrite to replace its contents")
        elif diff := settings_diff(old, settings):
            raise UserError(f"--sample_dir {sample_dir} holds samples of other settings ({'; '.join(diff)}); use "
                            f"another --sample_dir (the default is named after the settings), or --overwrite to "
                            f"replace them")
    os.makedirs(work, exist_ok=True)
    if read_settings(work) is None:
        ckpt.write_text_atomic(os.path.join(work, SETTINGS_FILE), json.dumps(settings, indent=1, sort_keys=True))
    return work


def finish_sample_dir(work: str, sample_dir: str, settings: dict, num_classes: int) -> str:
    """Build DIR.npz from the completed folder; an --overwrite folder replaces DIR only now (rank 0)."""
    base = os.path.normpath(sample_dir)
    out = base + ".npz"
    staged = build_npz(work, settings["num_samples"], num_classes, base + ".new.npz", settings)
    if work != sample_dir:
        aside = base + ".replaced"
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.exists(sample_dir):
            os.replace(sample_dir, aside)
        os.replace(work, sample_dir)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(staged, out)
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample many images (PNGs + an ADM-format .npz) from a DiT checkpoint, on N processes.")
    add_model_flags(p, cfg_scale=1.5)
    p.add_argument("--num_samples", type=POSITIVE_INT, default=50_000)
    p.add_argument("--per_proc_batch_size", type=POSITIVE_INT, default=32)
    p.add_argument("--sample_dir", default=None,
                   help="PNGs go here, DIR.npz beside it (default: samples/ plus a name made of the settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --sample_dir that holds samples of other settings (once the new ones are complete)")
    return p


def sample_all(args) -> int:
    env = parallel.init_distributed(args.device)
    precision = parallel.Precision(args.mixed_precision, env.device)
    loaded = load_for_sampling(args, env.device)
    check_sampling_flags(args, loaded)
    clip = clip_for(args, loaded)

    def prepare() -> tuple[str, str, dict]:
        settings = sample_settings(args, loaded, clip)
        sample_dir = os.path.normpath(args.sample_dir) if args.sample_dir else default_sample_dir(settings)
        return sample_dir, prepare_sample_dir(sample_dir, settings, args.overwrite), settings

    sample_dir, work, settings = parallel.broadcast_object(parallel.on_rank0(prepare, env), env)
    B, N = args.per_proc_batch_size, args.num_samples
    n_batches = -(-N // B)
    mine = range(env.rank, n_batches, env.world_size)
    todo = [b for b in mine if not all(os.path.exists(png_path(work, i)) for i in range(b * B, min(N, (b + 1) * B)))]
    if env.is_main:
        print(f"{loaded.name} from {loaded.source}: {N} samples, {args.sampler} {args.num_sampling_steps} steps, "
              f"cfg {args.cfg_scale}, {env.world_size} process(es) x batch {B} -> {sample_dir}; "
              f"{len(mine) - len(todo)} of this rank's {len(mine)} batches already done")
    for b in tqdm(todo, desc="sampling", disable=not env.is_main, dynamic_ncols=True):
        idx = range(b * B, min(N, (b + 1) * B))
        torch.manual_seed(batch_seed(args.seed, b))
        y = torch.tensor([i % loaded.num_classes for i in idx], device=env.device)
        z = torch.randn(len(idx), loaded.in_channels, *loaded.input_size, device=env.device)
        with precision.autocast():
            x = generate(loaded.model, y, z, sampler=args.sampler, steps=args.num_sampling_steps,
                         cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, clip_denoised=clip)
        for i, img in zip(idx, to_uint8(to_images(loaded, x.float()))):
            write_png(png_path(work, i), img)
    parallel.barrier(env)
    if env.is_main:
        out = finish_sample_dir(work, sample_dir, settings, loaded.num_classes)
        print(f"wrote {N} PNGs to {sample_dir} and {out}")
    parallel.barrier(env)
    return 0


def main(argv=None) -> int:
    return parallel.run_main(sample_all, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
