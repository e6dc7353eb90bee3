"""Sample folders for evaluation: DIR/iiiiii.png for sample i (label i mod num_classes), then DIR.npz in the ADM
evaluation format (arr_0: uint8 N x H x W x C, arr_1: int64 labels), on any number of processes.

Work is cut into batches of ``per_proc_batch_size``; batch b is seeded from (seed, b) and done by rank b mod
world_size, so every rank has its own seeds and the result does not depend on the number of processes.

DIR/samples.json records what wrote the samples (the weights file and its SHA-256, model, sampler, steps, guidance,
seed, image size, VAE, labels, count, batch size, precision); DIR.npz carries the same record (``opendit_settings``, a
JSON string). A rerun with the same settings resumes (batches whose PNGs exist are skipped); other settings are refused
(one line naming what differs) unless ``overwrite``, which samples into DIR.overwrite/ and replaces DIR only once the
new samples are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import atomic_path, replace, write_text_atomic
from ..errors import UserError
from ..images import to_uint8_tensor
from ..precision import Precision
from .. import checkpoint as ckpt
from ..config.sample import FolderConfig
from ..parallelize import ModelOptions
from .compiled import auto_batch_size, check_fast_flags, compiled_forward
from .generate import describe_settings, generate
from .load import clip_for, load_for_sampling, sampler_settings


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch, 0x5A3]).generate_state(1, dtype=np.uint64)[0] >> 1)


def png_path(sample_dir: str, i: int) -> str:
    return os.path.join(sample_dir, f"{i:06d}.png")


def write_png(path: str, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp)


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
    with atomic_path(out) as tmp:
        np.savez(tmp, arr_0=images, arr_1=labels, **extra)
    return out


# ----------------------------------------------------------------------------- what wrote a sample folder

SETTINGS_FILE = "samples.json"
SETTINGS_KEY = "opendit_settings"
SETTINGS_FORMAT = "opendit-samples-v1"
INFORMATIONAL = ("format", "checkpoint")  # recorded, not compared: the same weights elsewhere give the same samples


def sample_settings(cfg: FolderConfig, loaded, clip: bool, sampling: dict) -> dict:
    """Everything that decides the images of a sample folder (``sampling``: generate's keyword arguments; an
    objective's sampler settings and a guidance interval are recorded only when they apply, so older folders still
    compare equal)."""
    extra = {}
    for key in ("cfg_interval", "cfg_interval_sigma"):
        if sampling.get(key) is not None:
            extra[key] = list(sampling[key])
    if sampling.get("cache") is not None:
        c = sampling["cache"]
        extra["cache"] = {"method": c.method, "interval": c.interval, "warmup": c.warmup}
    objective = sampling["objective"]
    if options := objective.sampler_settings(sampling["sampler"], sampling):  # the diffusion's samplers have none
        extra.update(objective.record())
        extra.update(options)
    machine, out = cfg.machine, cfg.output
    return extra | {
        "format": SETTINGS_FORMAT,
        "checkpoint": os.path.abspath(loaded.source),
        "weights_sha256": ckpt.sha256_file(loaded.source),
        "model": loaded.name,
        "image_size": loaded.image_size,
        "vae": loaded.codec.name if loaded.codec is not None else None,
        "num_classes": loaded.num_classes,
        "labels": "sample i has class i mod num_classes",
        "sampler": sampling["sampler"],
        "num_sampling_steps": sampling["steps"],
        "cfg_scale": sampling["cfg_scale"],
        "guidance_channels": cfg.guidance.guidance_channels,
        "clip_denoised": clip,
        "seed": cfg.sampler.seed,
        "num_samples": out.num_samples,
        "per_proc_batch_size": out.per_proc_batch_size,  # batch b is seeded from (seed, b)
        "mixed_precision": machine.mixed_precision,
        "enable_flashattn": machine.enable_flashattn,
    } | ({"compile": "cuda_graphs" if machine.cuda_graphs else "inductor"} if machine.compile else {})


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
        write_text_atomic(os.path.join(work, SETTINGS_FILE), json.dumps(settings, indent=1, sort_keys=True))
    return work


def finish_sample_dir(work: str, sample_dir: str, settings: dict, num_classes: int) -> str:
    """Build DIR.npz from the completed folder; an --overwrite folder replaces DIR only now (rank 0)."""
    base = os.path.normpath(sample_dir)
    out = base + ".npz"
    staged = build_npz(work, settings["num_samples"], num_classes, base + ".new.npz", settings)
    if work != sample_dir:
        replace(work, sample_dir)
    replace(staged, out)
    return out


class PngWriter:
    """Writes a batch's PNGs on worker threads while the device samples the next batch: the images go to the host by a
    copy that does not wait (pinned memory on a GPU), the threads wait for it. Leaving the block waits for every file
    (and raises a worker's error)."""

    def __init__(self, folder: str, workers: int = 4):
        self.folder, self.pool, self.pending = folder, ThreadPoolExecutor(workers), []

    def __enter__(self):
        return self

    def write(self, idx: range, images: torch.Tensor) -> None:
        """``images``: (N, C, H, W) in [-1, 1] on any device."""
        u8 = to_uint8_tensor(images)
        cuda = u8.device.type == "cuda"
        host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=cuda)
        host.copy_(u8, non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        running = []
        for f in self.pending:
            if f.done():
                f.result()  # raises a finished worker's error
            else:
                running.append(f)
        while len(running) > 4:  # at most a few batches in flight: bounded host memory
            running.pop(0).result()
        self.pending = running
        self.pending.append(self.pool.submit(self._write, idx, host, done))

    def _write(self, idx: range, host: torch.Tensor, done) -> None:
        if done is not None:
            done.synchronize()
        for i, img in zip(idx, host.numpy()):
            write_png(png_path(self.folder, i), img)

    def __exit__(self, *exc):
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
        return False


def resolve_auto_batch(loaded, sampling: dict, clip: bool, precision, env) -> int:
    """--per_proc_batch_size auto: two probe runs of the sampler (2 steps) measure the memory per sample."""
    def probe(n: int) -> None:
        y = torch.zeros(n, dtype=torch.long, device=env.device)
        z = torch.randn(n, loaded.in_channels, *loaded.input_size, device=env.device)
        with precision.autocast():
            x = generate(loaded.model, y, z, clip_denoised=clip, **{**sampling, "steps": 2})
        loaded.space.to_images(x.float())

    batch = auto_batch_size(probe, env.device)
    if env.distributed:  # every rank the same (the smallest), so that batch b is the same samples everywhere
        t = torch.tensor([batch], device=env.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        batch = int(t.item())
    if env.is_main:
        print(f"--per_proc_batch_size auto: {batch}")
    return batch


def sample_all(cfg: FolderConfig) -> int:
    """The body of sample_ddp.py."""
    machine, out = cfg.machine, cfg.output
    env = distributed.init_distributed(machine.device)
    precision = Precision(machine.mixed_precision, env.device)
    check_fast_flags(machine, cfg.cache, env.device)
    loaded = load_for_sampling(cfg.checkpoint, ModelOptions.from_config(machine), env.device, precision)
    sampling = sampler_settings(cfg, loaded)
    clip = clip_for(cfg, loaded)
    if out.per_proc_batch_size == "auto":
        out.per_proc_batch_size = resolve_auto_batch(loaded, sampling, clip, precision, env)

    def prepare() -> tuple[str, str, dict]:
        settings = sample_settings(cfg, loaded, clip, sampling)
        sample_dir = os.path.normpath(out.sample_dir) if out.sample_dir else default_sample_dir(settings)
        return sample_dir, prepare_sample_dir(sample_dir, settings, out.overwrite), settings

    sample_dir, work, settings = distributed.broadcast_object(distributed.on_rank0(prepare, env), env)
    B, N = out.per_proc_batch_size, out.num_samples
    n_batches = -(-N // B)
    mine = range(env.rank, n_batches, env.world_size)
    todo = [b for b in mine if not all(os.path.exists(png_path(work, i)) for i in range(b * B, min(N, (b + 1) * B)))]
    if env.is_main:
        print(f"{loaded.name} from {loaded.source} ({loaded.objective_note}): {N} samples, "
              f"{describe_settings(sampling)}, {env.world_size} process(es) x batch {B} -> {sample_dir}; "
              f"{len(mine) - len(todo)} of this rank's {len(mine)} batches already done")
    with PngWriter(work) as writer, compiled_forward(loaded.model, cuda_graphs=machine.cuda_graphs,
                                                      enabled=machine.compile):
        for b in tqdm(todo, desc="sampling", disable=not env.is_main, dynamic_ncols=True):
            idx = range(b * B, min(N, (b + 1) * B))
            torch.manual_seed(batch_seed(cfg.sampler.seed, b))
            y = torch.tensor([i % loaded.num_classes for i in idx], device=env.device)
            z = torch.randn(len(idx), loaded.in_channels, *loaded.input_size, device=env.device)
            with precision.autocast():
                x = generate(loaded.model, y, z, clip_denoised=clip, **sampling)
            writer.write(idx, loaded.space.to_images(x.float()))  # the VAE decodes in fp32, as published
    distributed.barrier(env)
    if env.is_main:
        path = finish_sample_dir(work, sample_dir, settings, loaded.num_classes)
        print(f"wrote {N} PNGs to {sample_dir} and {path}")
    distributed.barrier(env)
    return 0
