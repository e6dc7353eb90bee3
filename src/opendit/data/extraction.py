"""Precomputing a data set's VAE posteriors for ``--dataset latents`` (the format is opendit.data.latents'), on any
number of processes: shard k is encoded by rank k mod world_size; finished shards are kept on a rerun."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import atomic_path, write_text_atomic
from ..errors import UserError
from ..preemption import ignore_in_worker
from ..vae import VAE_NAMES, load_vae
from .datasets import ImageFolder, build_dataset
from .latents import FORMAT, INDEX, PARTS, feature_parts, latent_statistics, shard_paths

DTYPES = {"fp16": np.float16, "fp32": np.float32}


def source_batches(dataset, lo: int, hi: int, batch_size: int, num_workers: int):
    """(images (B, 3, S, S) in [-1, 1], labels (B,), problems) for source positions lo..hi-1 in order; an image folder is
    read by one DataLoader (its workers live for the whole range)."""
    starts = range(lo, hi, batch_size)
    if not isinstance(dataset, ImageFolder):
        for start in starts:
            idx = torch.arange(start, min(hi, start + batch_size))
            yield (*dataset.batch(idx, torch.zeros(len(idx), dtype=torch.bool)), [])
        return
    keys = [[(i, False) for i in range(start, min(hi, start + batch_size))] for start in starts]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=num_workers,
                                         worker_init_fn=ignore_in_worker if num_workers else None)
    for x, y, problems in loader:
        yield x, y.long(), [p for p in problems if p]


def write_shard(root: str, name: str, arrays: dict) -> None:
    parts = tuple(p for p in arrays if p != "index") + ("index",)
    files = shard_paths(root, name, parts)
    for part in parts:  # "index" last: a shard counts as done when all its files exist
        with atomic_path(files[part]) as tmp:
            np.save(tmp, arrays[part])


def shard_done(root: str, name: str, num_encoders: int = 0) -> bool:
    return all(os.path.isfile(f) for f in shard_paths(root, name, PARTS + feature_parts(num_encoders)).values())


def encoder_index(root: str, first_shard: str, encoder_names: list[str]) -> list[dict]:
    """index.json's record of the stored encoder features: name, tokens and width (read from the first shard)."""
    files = shard_paths(root, first_shard, feature_parts(len(encoder_names)))
    shapes = [np.load(f, mmap_mode="r").shape for f in files.values()]
    return [{"name": nm, "tokens": int(sh[2]), "dim": int(sh[3])} for nm, sh in zip(encoder_names, shapes)]


def extract(*, data_path: str, features_path: str, dataset: str = "imagefolder", image_size: int = 256,
            vae: str = "ema", batch_size: int = 32, shard_size: int = 4096, dtype: str = "fp16", num_workers: int = 4,
            device: str = "auto", repa_encoder: str | None = None, repa_encoder_weights: str | None = None) -> int:
    """The body of extract_features.py: the VAE posteriors (and REPA encoder features) of ``dataset`` into
    ``features_path``."""
    data_set = dataset
    env = distributed.init_distributed(device)
    dataset = build_dataset(data_set, data_path, image_size)
    if dataset.channels != 3:
        raise UserError(f"the VAE encodes RGB images; {data_set} has {dataset.channels} channel(s)")
    vae_name = VAE_NAMES.get(vae, vae)
    codec = load_vae(vae_name, env.device)
    from ..alignment import build_encoders, encode, parse_specs

    encoder_names = parse_specs(repa_encoder)
    encoders = build_encoders(repa_encoder, repa_encoder_weights, env.device, image_size)
    if image_size % codec.downsample:
        raise UserError(f"--image_size {image_size} is not divisible by the VAE's downsampling {codec.downsample}")
    try:
        os.makedirs(features_path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--features_path {features_path}: {e.strerror or e}") from None
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    names = [f"shard-{k:06d}" for k in range(num_shards)]
    mine = [k for k in range(env.rank, num_shards, env.world_size)
            if not shard_done(features_path, names[k], len(encoders))]
    skipped_bad = 0
    bar = tqdm(total=sum(min(shard_size, n - k * shard_size) for k in mine), disable=None if env.is_main else True,
               desc=f"encode (rank {env.rank})", unit="img")
    for k in mine:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        means, stds, labels, feats = [], [], [], [[] for _ in encoders]
        for x, y, problems in source_batches(dataset, lo, hi, batch_size, num_workers):
            for line in problems:
                skipped_bad += 1
                print(f"warning: unreadable image {line}: its slot holds the next readable image", file=sys.stderr)
            if bool((y < 0).any()):
                raise UserError(f"no readable image among {ImageFolder.MAX_SUBSTITUTES + 1} files in a row, "
                                f"starting with {problems[0]}")
            x = x.to(env.device)
            m0, s0 = codec.posterior(x)
            m1, s1 = codec.posterior(x.flip(-1))
            means.append(torch.stack([m0, m1], 1).cpu().numpy().astype(DTYPES[dtype]))
            stds.append(torch.stack([s0, s1], 1).cpu().numpy().astype(DTYPES[dtype]))
            labels.append(y.numpy().astype(np.int64))
            for e, (z0, z1) in enumerate(zip(encode(encoders, x), encode(encoders, x.flip(-1)))):
                feats[e].append(torch.stack([z0, z1], 1).cpu().numpy().astype(DTYPES[dtype]))
            bar.update(len(y))
        arrays = {"mean": np.concatenate(means), "std": np.concatenate(stds), "label": np.concatenate(labels)}
        arrays.update({part: np.concatenate(f) for part, f in zip(feature_parts(len(encoders)), feats)})
        write_shard(features_path, names[k], dict(arrays, index=np.arange(lo, hi)))
    bar.close()
    distributed.barrier(env)
    if env.is_main:
        missing = [nm for nm in names if not shard_done(features_path, nm, len(encoders))]
        if missing:
            raise UserError(f"{len(missing)} shards are missing in {features_path} (e.g. {missing[0]}); run again")
        side = image_size // codec.downsample
        files = [shard_paths(features_path, nm, ("mean", "std")) for nm in names]
        stats = latent_statistics([np.load(f["mean"], mmap_mode="r") for f in files],
                                  [np.load(f["std"], mmap_mode="r") for f in files])
        index = {"format": FORMAT, "vae": vae_name, "scaling_factor": codec.scale, "image_size": image_size,
                 "latent_shape": [codec.latent_channels, side, side], "dtype": dtype, "source": data_set,
                 "data_path": os.path.abspath(data_path), "num_images": n,
                 "class_names": list(dataset.class_names), "latent_stats": stats,
                 "encoders": encoder_index(features_path, names[0], encoder_names),
                 "shards": [{"name": nm, "count": min(shard_size, n - i * shard_size)} for i, nm in enumerate(names)]}
        write_text_atomic(os.path.join(features_path, INDEX), json.dumps(index, indent=1))
        print(f"wrote {n} images x 2 (unflipped, flipped) as {dtype} posteriors "
              f"{codec.latent_channels}x{side}x{side}"
              + "".join(f", {e['name']} features {e['tokens']}x{e['dim']}" for e in index["encoders"])
              + f" in {num_shards} shard(s) to {features_path}")
    if skipped_bad:
        print(f"warning: rank {env.rank} met {skipped_bad} unreadable image(s)", file=sys.stderr)
    distributed.barrier(env)
    return 0
