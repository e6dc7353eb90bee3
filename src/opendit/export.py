"""``opendit export RUN_OR_CKPT DIR``: a trained run as a Hugging Face Hub model folder.

    DIR/model.safetensors   the EMA weights (or the raw weights with --model_weights), fp32, the DiT layout
    DIR/config.json         the run's config.json (every setting it was trained with: so the folder samples exactly
                            like the run) plus "opendit_export": the architecture with its block options, the objective
                            and its sampling defaults, the input space and VAE, the class names, the step
    DIR/README.md           the model card: the Hub's metadata header, what was trained on what for how long with
                            which recipe, the scores the run has, its sample grid, the commands that sample it
    DIR/samples.png         the run's final sample grid, when it has one

Uploading is the Hub's own client (``hf upload OWNER/NAME DIR``); ``--ckpt hf://OWNER/NAME`` then loads it in every
program that takes a checkpoint (opendit.hf_hub). The folder is written beside DIR under a temporary name and moved
into place when complete (opendit.atomic): a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

from safetensors.torch import save_file

from .atomic import atomic_path
from .checkpoint import checkpoint_step, is_checkpoint_dir, load_weights, run_dir_of
from .errors import UserError
from .models import config_from_state_dict
from .objectives import build_objective

FORMAT_VERSION = 1
DATASET_CARD_NAMES = {"cifar10": "cifar10", "digits": "scikit-learn digits (8x8)"}


def _checkpoint_of(source: str) -> str | None:
    """The checkpoint directory a weights file belongs to (ema.pt or model/model.safetensors), or None."""
    d = os.path.dirname(os.path.abspath(source))
    for cand in (d, os.path.dirname(d)):
        if is_checkpoint_dir(cand):
            return cand
    return None


def _scores(run_dir: str, run_cfg: dict) -> list[str]:
    """The scores the run has: FID logged during training (metrics.jsonl), and for the digits each eval/*.npz scored
    with the project's digits classifier."""
    lines = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            fids = [json.loads(line) for line in f if '"fid"' in line]
        n = run_cfg.get("eval_samples", "?")
        lines += [f"- FID ({n} EMA samples, `--eval_every`) at step {r['step']}: {r['fid']:.2f}" for r in fids[-3:]]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    eval_dir = os.path.join(run_dir, "eval")
    if run_cfg.get("dataset") == "digits" and os.path.isdir(eval_dir):
        from .eval.digits import score_npz

        for name in sorted(f for f in os.listdir(eval_dir) if f.endswith(".npz")):
            try:
                s = score_npz(os.path.join(eval_dir, name))
            except Exception:  # not a sample batch of digits: not a score
                continue
            lines.append(f"- `eval/{name}` ({s['n']} samples, the digits classifier): accuracy {s['accuracy']:.1%}, "
                         f"pixel FD {s['pixel_fd']:.2f}, feature FD {s['feature_fd']:.2f}")
    return lines


def export_record(sd: dict, run_cfg: dict, step: int | None) -> dict:
    """The "opendit_export" entry of config.json: what the weights are and how they sample."""
    arch = config_from_state_dict(sd)
    objective = build_objective(run_cfg)
    return {
        "format": FORMAT_VERSION,
        "architecture": arch,
        "objective": objective.record(),
        "sampling": {"sampler": objective.default_sampler, "num_sampling_steps": objective.default_steps,
                     "cfg_scale": run_cfg.get("final_cfg_scale")},
        "input": {"image_size": run_cfg.get("image_size"), "vae": run_cfg.get("vae_resolved"),
                  "latent_stats": run_cfg.get("latent_stats")},
        "class_names": run_cfg.get("class_names") or [str(i) for i in range(arch["num_classes"])],
        "step": step,
    }


def model_card(record: dict, run_cfg: dict, scores: list[str], has_grid: bool, repo_hint: str) -> str:
    arch, obj = record["architecture"], record["objective"]
    blocks = [k for k, on in arch["options"].items() if on]
    dataset = run_cfg.get("dataset", "?")
    tags = ["diffusion", "dit", "class-conditional", "image-generation"]
    tags += {"flow": ["flow-matching"], "meanflow": ["flow-matching", "meanflow", "one-step"]}.get(obj["objective"], [])
    header = ["---", "library_name: opendit", "tags:", *(f"- {t}" for t in tags)]
    if dataset in DATASET_CARD_NAMES:
        header += ["datasets:", f"- {dataset}"]
    header.append("---")
    sampler = record["sampling"]
    steps = f" --num_sampling_steps {sampler['num_sampling_steps']}" if sampler["num_sampling_steps"] else ""
    cfg = sampler["cfg_scale"]
    cfg_flag = f" --cfg_scale {cfg:g}" if cfg is not None and obj["objective"] != "meanflow" else ""
    body = [
        f"# {arch['name']} trained with opendit on {DATASET_CARD_NAMES.get(dataset, dataset)}",
        "",
        f"A class-conditional {arch['name']} ({'with ' + ', '.join(blocks) if blocks else 'DiT blocks'}), objective "
        f"{obj['objective']}, {record['input']['image_size']} px "
        f"({'latents of ' + record['input']['vae'] if record['input']['vae'] else 'pixel space'}), "
        f"{len(record['class_names'])} classes, trained for {record['step']} steps at global batch "
        f"{run_cfg.get('global_batch')} (lr {run_cfg.get('lr')}, {run_cfg.get('lr_schedule')}, "
        f"{run_cfg.get('optimizer', 'adamw')}, seed {run_cfg.get('global_seed')})"
        + (f" with the recipe `{run_cfg['config']}`" if run_cfg.get("config") else "") + ". The weights are "
        + ("the EMA of the training weights" if record["weights"] == "ema" else "the raw training weights (not the EMA)")
        + "; `config.json` holds every training setting.",
        "",
        "## Scores",
        "",
        *(scores or ["No scores were recorded in the run (`--eval_every`, or sample and score it as below)."]),
        "",
    ]
    if has_grid:
        body += ["## Samples", "", "![samples](samples.png)", ""]
    body += [
        "## Use",
        "",
        "```shell",
        "pip install -e '.[hub]'    # in an opendit checkout: huggingface_hub reads hf:// addresses",
        f"python scripts/dit/sample_dit.py --ckpt hf://{repo_hint}{cfg_flag}{steps}",
        f"python scripts/dit/sample_ddp.py --ckpt hf://{repo_hint} --num_samples 50000{cfg_flag}{steps}",
    ]
    if obj["objective"] == "diffusion" and not blocks:
        body.append(f"opendit convert hf://{repo_hint} dit-diffusers/    # a diffusers DiTTransformer2DModel folder")
    body += ["```", "", f"Exported by `opendit export` on {datetime.date.today().isoformat()}.", ""]
    return "\n".join(header + [""] + body)


def export_run(src: str, dst: str, *, model_weights: bool = False, force: bool = False,
               repo: str = "OWNER/NAME") -> str:
    """Write the hub-ready folder of ``src`` (a run or checkpoint directory) to ``dst``; returns ``dst``."""
    if os.path.isfile(dst):
        raise UserError(f"{dst} is a file; the export is a folder")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise UserError(f"{dst} exists and is not an empty folder; pass --force to replace it")
    sd, source, run_cfg = load_weights(src, model_weights)
    if run_cfg is None:
        raise UserError(f"{src}: not a run or checkpoint directory (opendit export needs the run's config.json; "
                        f"for a bare weights file use opendit convert)")
    ckpt = _checkpoint_of(source)
    step = checkpoint_step(ckpt) if ckpt else None
    run_dir = run_dir_of(source)
    record = {**export_record(sd, run_cfg, step), "weights": "model (raw)" if model_weights else "ema"}
    grid = os.path.join(run_dir, "samples.png")
    has_grid = os.path.isfile(grid)
    with atomic_path(dst) as tmp:  # a folder beside DST, renamed over it when complete, removed on any failure
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**run_cfg, "opendit_export": record}, f, indent=2)
        if has_grid:
            shutil.copyfile(grid, os.path.join(tmp, "samples.png"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(record, run_cfg, _scores(run_dir, run_cfg), has_grid, repo))
    return dst
