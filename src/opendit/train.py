"""Train a class-conditional DiT.

    python scripts/dit/train.py --dataset digits --model DiT-S/2 --mixed_precision fp32       # one process
    torchrun --standalone --nproc_per_node=2 scripts/dit/train.py --model DiT-XL/2 --batch_size 2 --num_classes 10

Read top to bottom: arguments -> processes -> data -> (VAE) -> model, EMA, optimizer -> resume -> run directory ->
the training loop (loss, backward, clip, step, EMA, log, checkpoint) -> final checkpoint and sample grid.

Randomness is a function of (global seed, global step): every step draws the timesteps, noise, label drops and VAE
posterior noise of the whole global batch from one generator and each rank takes its slice, and the data order is a
seeded permutation per epoch. So ranks never share noise, a run on N processes of batch B matches a 1-process run of
batch N*B, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import faults, parallel, run_settings
from .data import GlobalBatchPlan, ImageFolder, build_dataset, default_image_size, plan_batches
from .data.latents import LatentDataset, PrecomputedLatents
from .diffusion import create_diffusion
from .ema import EMA
from .errors import (NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, UNIT_FLOAT, ArgumentParser, RankError,
                     TrainingFailed, UserError, int_flag)
from .evaluate import PeriodicFID
from .flops import dit_train_flops_per_image, model_cost_config
from .images import labelled_grid, save_image_atomic
from .models import AttentionBackendError, DiT_models
from .preemption import StopRequest
from .run_settings import append_history, apply_run_settings, describe_changes, saved_settings
from .sample import generate
from .vae import load_vae, resolve_vae


# ----------------------------------------------------------------------------- arguments

def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a class-conditional DiT (torchrun for several processes).")
    a = p.add_argument
    a("--model", default="DiT-XL/2", help="one of opendit.models.DiT_models (DiT-XL/2 ... DiT-S/8, DiT-T/*, DiT-N/*)")
    a("--dataset", default="cifar10",
      help="cifar10, imagefolder, digits (scikit-learn's 8x8 digits, offline) or latents (a folder written by "
           "scripts/dit/extract_features.py: VAE posteriors of images and their flips; the VAE is the extraction's)")
    a("--data_path", default="./datasets", help="cifar10: folder holding cifar-10-batches-py/; imagefolder: root/<class>/<images>")
    a("--image_size", type=POSITIVE_INT, default=None, help="training resolution (default: 8 for digits, 256 otherwise)")
    a("--num_classes", type=POSITIVE_INT, default=None, help="taken from the dataset when omitted; must agree with it")
    a("--batch_size", type=POSITIVE_INT, default=2, help="per process")
    a("--epochs", type=POSITIVE_INT, default=1400)
    a("--max_steps", type=POSITIVE_INT, default=None, help="stop after this many optimizer steps in total")
    a("--lr", type=POSITIVE_FLOAT, default=1e-4)
    a("--lr_schedule", default="constant", choices=["constant", "cosine"],
      help="constant (the published recipe) or cosine decay to 0 at the last step")
    a("--warmup_steps", type=NONNEG_INT, default=0, help="linear learning-rate warmup from 0")
    a("--grad_clip", type=NONNEG_FLOAT, default=1.0, help="max global gradient norm; 0 = off")
    a("--ema_decay", type=UNIT_FLOAT, default=0.9999)
    a("--global_seed", type=SEED, default=0)
    a("--num_workers", type=NONNEG_INT, default=4, help="data-loading workers (image folders; in-memory data needs none)")
    a("--log_every", type=POSITIVE_INT, default=10)
    a("--ckpt_every", type=POSITIVE_INT, default=1000)
    a("--ckpt_keep", type=NONNEG_INT, default=3,
      help="keep the newest K checkpoints of the run's current branch (0 = all); the one just written and the one "
           "resumed from are never deleted")
    a("--outputs", default="./outputs", help="run directories are created here as NNN-<model>")
    a("--load", default=None,
      help="resume: a checkpoint directory, a run directory (its newest intact checkpoint), or 'auto' (the newest run "
           "of this --model under --outputs that has a checkpoint; a new run when there is none). The run's settings "
           "come with it: seed, model, data set, image size, VAE and global batch must not differ; flags not given "
           "take the run's values; others (lr, max_steps, ...) are applied and recorded in history.jsonl")
    a("--max_bad_steps", type=NONNEG_INT, default=10,
      help="stop after this many steps in a row with a non-finite loss or gradient norm (each is skipped); 0 = never")
    a("--on_bad_image", default="skip", choices=["skip", "error"],
      help="imagefolder: an unreadable file is skipped (replaced by the next image, counted, named in a warning) or "
           "stops the run")
    a("--plugin", default="zero2", choices=parallel.PLUGINS,
      help="zero2: FSDP2, weights gathered once per step, gradients and optimizer state sharded; fsdp: full sharding "
           "(ZeRO-3); ddp: replicated (one process: no wrapper)")
    a("--grad_reduce_dtype", default="fp32", choices=["fp32", "bf16"],
      help="dtype of the gradient all-reduce / reduce-scatter across processes")
    a("--mixed_precision", default="bf16", choices=list(parallel.PRECISIONS), help="autocast dtype (fp32 master weights)")
    a("--grad_checkpoint", action="store_true", help="recompute each block in the backward pass (less memory)")
    a("--enable_flashattn", action="store_true", help="flash / cuDNN attention only (CUDA, bf16/fp16)")
    a("--enable_layernorm_kernel", action="store_true", help="Triton LayerNorm (CUDA)")
    a("--enable_modulate_kernel", action="store_true", help="Triton LayerNorm fused with the adaLN modulation (CUDA)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--vae", default="auto", help="auto (pixels up to 64 px, else ema), ema, mse, none, or a diffusers AutoencoderKL folder")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--final_samples", type=NONNEG_INT, default=0, help="after training, write samples.png with this many EMA samples per class")
    a("--final_cfg_scale", type=NONNEG_FLOAT, default=4.0, help="guidance scale of that grid")
    a("--eval_every", type=NONNEG_INT, default=0,
      help="every N steps: FID of --eval_samples EMA samples (DPM-Solver++ 20 steps) against --eval_reference, logged "
           "as 'fid' (rank 0 samples; the others wait); 0 = off")
    a("--eval_samples", type=int_flag(2), default=1000)
    a("--eval_cfg_scale", type=NONNEG_FLOAT, default=1.0)
    a("--eval_features", default="auto", help="auto (digits for --dataset digits, else inception), inception, digits, "
                                              "or package.module:factory")
    a("--eval_reference", default=None,
      help="an .npz (images or mu/sigma statistics) or an image folder; default: 10,000 training images")
    a("--inception", default=None, help="the FID Inception weights file (default: the torch hub cache)")
    return p


def validate(args) -> None:
    if args.model not in DiT_models:
        raise UserError(f"unknown model {args.model!r}; choose from {', '.join(DiT_models)}")
    if args.dataset not in ("cifar10", "imagefolder", "digits", "latents"):
        raise UserError(f"unknown --dataset {args.dataset!r}; choose cifar10, imagefolder, digits or latents")
    if os.path.exists(args.outputs) and not os.path.isdir(args.outputs):
        raise UserError(f"--outputs {args.outputs} is a file, not a directory")


# ----------------------------------------------------------------------------- run directory and logging

def new_run_dir(outputs: str, model_name: str) -> str:
    try:
        os.makedirs(outputs, exist_ok=True)
        taken = [int(m.group(1)) for d in os.listdir(outputs) if (m := re.match(r"^(\d{3,})-", d))]
        path = os.path.join(outputs, f"{(max(taken) + 1 if taken else 0):03d}-{model_name.replace('/', '-')}")
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"--outputs {outputs}: cannot create a run directory ({e.strerror or e})") from None
    return path


class RunLog:
    """log.txt + stdout, metrics.jsonl, and TensorBoard scalars when tensorboard is installed (rank 0 only)."""

    def __init__(self, run_dir: str | None):
        self.run_dir = run_dir
        self.tb = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def info(self, msg: str) -> None:
        if self.run_dir is None:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        tqdm.write(line)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    def metrics(self, step: int, values: dict) -> None:
        if self.run_dir is None:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def learning_rate(step: int, *, lr: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 0."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


# ----------------------------------------------------------------------------- randomness

def step_seed(global_seed: int, global_step: int) -> int:
    return int(np.random.SeedSequence([global_seed, global_step, 0x0D17]).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_step_randomness(gen: torch.Generator, global_batch: int, sl: slice, shape, vae_shape, num_timesteps: int,
                         class_dropout: float, device):
    """Timesteps, label drops, diffusion noise and VAE posterior noise for this rank's slice of the global batch."""
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=device)[sl]
    drop = (torch.rand(global_batch, generator=gen, device=device) < class_dropout)[sl]
    noise = torch.randn((global_batch, *shape), generator=gen, device=device)[sl]
    vae_eps = torch.randn((global_batch, *vae_shape), generator=gen, device=device)[sl] if vae_shape else None
    return t, drop, noise, vae_eps


# ----------------------------------------------------------------------------- sample grid

@torch.no_grad()
def write_sample_grid(path: str, model, codec, *, num_classes: int, class_names, per_class: int, cfg_scale: float,
                      shape, device, seed: int, precision: parallel.Precision) -> None:
    classes = list(range(num_classes)) if num_classes <= 10 else list(np.linspace(0, num_classes - 1, 10).round().astype(int))
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((len(labels), *shape), generator=g, device=device)
    with precision.autocast():  # the training precision (flash attention needs bf16/fp16)
        out = generate(model, labels, z, sampler="dpm-solver++", steps=20, cfg_scale=cfg_scale)
    images = codec.decode(out.float()) if codec is not None else out.float()
    save_image_atomic(labelled_grid(images, labels.tolist(), class_names), path)


# ----------------------------------------------------------------------------- main

def train(args, given: set[str] | None = None, command: list[str] | None = None) -> int:
    """``given``: the flags set on the command line (None: all of them); on resume the others come from the run
    (see run_settings). ``command``: the command line, recorded in the run's history."""
    validate(args)
    env = parallel.init_distributed(args.device)
    log = RunLog(None)
    run_dir, created_run_dir, stop = None, False, None
    try:
        # --- what to resume, and the settings of that run: they decide the model and the data, so they come first
        load, notes, saved, changes = args.load, [], None, {}
        if load == "auto":
            load = parallel.broadcast_object(ckpt.find_auto_resume(args.outputs, args.model) if env.is_main else None, env)
            if load is None:
                notes.append(f"--load auto: no checkpoint of {args.model} under {args.outputs}; starting a new run")
        if load:
            load_run_dir, saved = parallel.broadcast_object(parallel.on_rank0(lambda: saved_settings(load), env), env)
            changes = apply_run_settings(args, given, saved, env.world_size, load_run_dir)
            validate(args)

        precision = parallel.Precision(args.mixed_precision, env.device)
        parallel.check_plugin(args.plugin)
        global_batch = args.batch_size * env.world_size

        # --- data
        if args.dataset == "latents":  # precomputed: the size and VAE are the extraction's
            dataset = LatentDataset(args.data_path)
            if args.image_size is not None and args.image_size != dataset.image_size:
                raise UserError(f"--image_size {args.image_size}: the latents in {args.data_path} were extracted at "
                                f"{dataset.image_size} px")
            image_size = dataset.image_size
        else:
            image_size = args.image_size or default_image_size(args.dataset)
            dataset = build_dataset(args.dataset, args.data_path, image_size)
        if args.num_classes is not None and args.num_classes != dataset.num_classes:
            raise UserError(f"--num_classes {args.num_classes} contradicts the dataset, which has {dataset.num_classes} classes")
        num_classes = dataset.num_classes
        if len(dataset) < global_batch:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch ({global_batch})")

        # --- pixel or latent space
        if args.dataset == "latents":
            wanted = resolve_vae(args.vae, image_size) if args.vae != "auto" else dataset.vae
            if wanted != dataset.vae and not (os.path.exists(wanted) and os.path.exists(dataset.vae)
                                              and os.path.samefile(wanted, dataset.vae)):
                raise UserError(f"--vae {args.vae}: the latents in {args.data_path} were extracted with {dataset.vae}; "
                                f"drop --vae or extract again")
            codec, vae_name = PrecomputedLatents(dataset, env.device), dataset.vae
        else:
            vae_name = resolve_vae(args.vae, image_size)
            if saved and "vae_resolved" in saved and vae_name != saved["vae_resolved"]:
                raise UserError(f"--vae {args.vae}: the run in {load_run_dir} was trained with the VAE "
                                f"{saved['vae_resolved'] or 'none (pixel space)'}; resume without --vae or start a new run")
            codec = load_vae(vae_name, env.device) if vae_name else None
        if codec is not None:
            if image_size % codec.downsample:
                raise UserError(f"--image_size {image_size} is not divisible by the VAE's downsampling factor {codec.downsample}")
            input_size, in_channels = image_size // codec.downsample, codec.latent_channels
        else:
            input_size, in_channels = image_size, dataset.channels
        patch = int(args.model.split("/")[-1])
        if input_size % patch:
            space = "latent" if codec else "image"
            raise UserError(f"the {space} size {input_size} (from --image_size {image_size}) is not divisible by "
                            f"{args.model}'s patch size {patch}")
        if args.enable_flashattn and env.device.type != "cuda":
            raise UserError("--enable_flashattn needs a CUDA GPU (flash / cuDNN attention); drop the flag on a CPU")
        if args.enable_flashattn and precision.dtype is None:
            raise UserError("--enable_flashattn needs --mixed_precision bf16 or fp16")
        if args.enable_layernorm_kernel or args.enable_modulate_kernel:
            from .kernels import kernels_available

            if (why := kernels_available(env.device)) is not None:
                raise UserError(f"--enable_layernorm_kernel / --enable_modulate_kernel: {why}")

        # --- model, EMA, optimizer, diffusion
        torch.manual_seed(args.global_seed)  # identical initial weights on every rank
        model = DiT_models[args.model](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                       enable_flashattn=args.enable_flashattn, grad_checkpoint=args.grad_checkpoint,
                                       enable_layernorm_kernel=args.enable_layernorm_kernel,
                                       enable_modulate_kernel=args.enable_modulate_kernel)
        model = model.to(env.device)
        if args.compile:
            for block in model.blocks:  # per block: small graphs, no graph break inside a block
                block.compile()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ddp_model = parallel.wrap_model(model, args.plugin, env, precision, args.grad_reduce_dtype)  # zero2/fsdp: in place
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0,
                                fused=env.device.type == "cuda")
        diffusion = create_diffusion(timestep_respacing="")
        class_dropout = model.y_embedder.dropout_prob

        # --- resume: rank 0 reads the checkpoint; weights and optimizer state reach the others by broadcast
        epoch, epoch_offset, global_step = 0, 0, 0
        skipped_steps, bad_images = 0, 0
        ckpt_dir = None
        if load:
            def read_checkpoint() -> dict:
                ckpt_dir, state, skipped = ckpt.find_resumable(load)
                notes.extend(f"warning: {w}; resuming from an older checkpoint" for w in skipped)
                ckpt.check_fits(shapes, state["model"], f"checkpoint {ckpt_dir} (model)")
                ckpt.check_fits(shapes, state["ema"], f"checkpoint {ckpt_dir} (ema.pt)")
                state["running_states"]["dir"] = ckpt_dir
                return state

            state = parallel.on_rank0(read_checkpoint, env) or {"model": {}, "ema": {}, "optimizer": {},
                                                                "running_states": None}
            rs = parallel.broadcast_object(state["running_states"], env)
            ckpt_dir = rs["dir"]
            parallel.load_full_model_state(model, state["ema"], env)  # the EMA starts from ema.pt ...
            ema = EMA(model)
            parallel.load_full_model_state(model, state["model"], env)  # ... and the model from its own weights
            try:
                parallel.load_full_optimizer_state(model, opt, state["optimizer"], env)
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"checkpoint {ckpt_dir}: the optimizer state does not fit this model ({e})") from None
            epoch, epoch_offset, global_step = rs["epoch"], rs["epoch_offset"], rs["global_step"]
            skipped_steps, bad_images = rs.get("skipped_steps", 0), rs.get("bad_images", 0)
            if precision.scaler is not None and rs.get("grad_scaler"):
                precision.scaler.load_state_dict(rs["grad_scaler"])
            run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
            del state
        else:
            ema = EMA(model)

        # --- run directory (rank 0 creates, everyone learns its name)
        if env.is_main and run_dir is None:
            run_dir = new_run_dir(args.outputs, args.model)
            created_run_dir = True
        run_dir = parallel.broadcast_object(run_dir, env)
        log = RunLog(run_dir if env.is_main else None)
        plan = GlobalBatchPlan(len(dataset), global_batch, rank=env.rank, world_size=env.world_size,
                               seed=args.global_seed, shuffle=True, flip=dataset.flip)
        if plan.steps_per_epoch == 0:
            raise UserError("the dataset is smaller than one global batch")
        if epoch_offset + global_batch > len(dataset):  # the saved position was the end of an epoch
            epoch, epoch_offset = epoch + 1, 0
        total_steps = args.max_steps or args.epochs * plan.steps_per_epoch
        total_steps = min(total_steps, args.epochs * plan.steps_per_epoch)

        # config.json: the settings the run was started with (never rewritten); history.jsonl: one line per session
        config = dict(vars(args), image_size=image_size, num_classes=num_classes, input_size=input_size,
                      in_channels=in_channels, vae_resolved=vae_name, world_size=env.world_size, global_batch=global_batch,
                      class_names=list(dataset.class_names), objective="diffusion")
        branch, moved = None, []
        if env.is_main:
            if created_run_dir or not os.path.isfile(os.path.join(run_dir, ckpt.CONFIG_FILE)):
                ckpt.write_text_atomic(os.path.join(run_dir, ckpt.CONFIG_FILE), json.dumps(config, indent=2))
            if ckpt_dir is not None:  # resuming from an older checkpoint than the run's newest starts a new branch
                branch, moved = ckpt.start_branch(run_dir, ckpt_dir, time.strftime("%Y%m%d-%H%M%S"))
            append_history(run_dir, {"session": "resume" if ckpt_dir else "start", "command": command,
                                     "resumed_from": os.path.basename(ckpt_dir) if ckpt_dir else None,
                                     "global_step": global_step, "world_size": env.world_size, "changes": changes,
                                     "branch_moved_aside": os.path.basename(branch) if branch else None})
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = dit_train_flops_per_image(**model_cost_config(model))
        log.info(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters, {flops / 1e9:.2f} GFLOP per image per step; "
                 f"input {in_channels}x{input_size}x{input_size} ({'latents of ' + vae_name if codec else 'pixels'}); "
                 f"{args.dataset}: {len(dataset)} images, {num_classes} classes; global batch {global_batch} "
                 f"({env.world_size} x {args.batch_size}), {plan.steps_per_epoch} steps/epoch; "
                 f"{args.mixed_precision} on {env.device}, plugin {args.plugin}; run dir {run_dir}")
        if (w := precision.warning()) and env.is_main:
            print(f"warning: {w}", file=sys.stderr)
            log.info(f"warning: {w}")
        for note in notes:
            log.info(note)
        if load:
            log.info(f"resumed from {ckpt_dir} at epoch {epoch}, global step {global_step}")
        if changes:
            log.info(f"settings changed on resume (recorded in {run_settings.HISTORY_FILE}): {describe_changes(changes)}")
        if moved:
            log.info(f"{os.path.basename(ckpt_dir)} is older than the run's newest checkpoint: a new branch of the run "
                     f"starts here; moved the abandoned branch's {', '.join(moved)} aside into {branch} (kept, no "
                     f"longer used by --load {run_dir} or --load auto)")
        if env.is_main and (stale := ckpt.remove_stale_partials(run_dir)):
            log.info(f"removed what an interrupted checkpoint write left behind: {', '.join(stale)}")

        bad_images_here = 0  # this rank, this session

        def total_bad_images() -> int:  # collective
            return bad_images + int(parallel.all_reduce_(torch.tensor(float(bad_images_here), device=env.device), env))

        def save(at_epoch: int, at_offset: int) -> None:
            # gathered on every rank (collectives), written by rank 0
            model_state = parallel.full_model_state(model, env)
            ema_state = ema.state_dict(env)
            optim_state = parallel.full_optimizer_state(model, opt, env)
            n_bad_images = total_bad_images()
            if env.is_main:
                rs = {"epoch": at_epoch, "epoch_offset": at_offset, "global_step": global_step,
                      "step_in_epoch": at_offset // global_batch, "global_batch": global_batch,
                      "world_size": env.world_size, "global_seed": args.global_seed,
                      "rng": "per-step generators seeded from (global_seed, global_step); data order from (global_seed, epoch)",
                      "skipped_steps": skipped_steps, "bad_images": n_bad_images,
                      "grad_scaler": precision.scaler.state_dict() if precision.scaler is not None else None}
                path, deleted = ckpt.save_checkpoint(
                    run_dir, ckpt.checkpoint_name(at_epoch, global_step), model_state=model_state, ema_state=ema_state,
                    optimizer_state=optim_state, running_states=rs, keep=args.ckpt_keep,
                    protect=(ckpt_dir,) if ckpt_dir else ())
                log.info(f"saved checkpoint {path}" + (f"; deleted {', '.join(deleted)} (--ckpt_keep {args.ckpt_keep})"
                                                      if deleted else ""))
            parallel.barrier(env)

        def ema_model(ema_state: dict):
            m = DiT_models[args.model](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                       enable_flashattn=args.enable_flashattn).to(env.device).eval()
            m.load_state_dict(ema_state)
            return m

        # --- FID during training (rank 0 samples and scores; the others wait)
        features = args.eval_features if args.eval_features != "auto" else \
            ("digits" if args.dataset == "digits" else "inception")
        evaluator = parallel.on_rank0(lambda: PeriodicFID(
            features=features, inception=args.inception, reference=args.eval_reference, dataset=dataset, run_dir=run_dir,
            num_samples=args.eval_samples, cfg_scale=args.eval_cfg_scale, seed=args.global_seed, device=env.device),
            env) if args.eval_every else None

        def evaluate_fid() -> None:
            ema_state = ema.state_dict(env)  # collective
            if env.is_main:
                t0 = time.perf_counter()
                fid = evaluator(global_step, ema_model(ema_state), codec, num_classes=num_classes, shape=shape,
                                device=env.device, precision=precision)
                log.metrics(global_step, {"fid": fid})
                log.info(f"step {global_step}: FID {fid:.3f} ({evaluator.name} features, {args.eval_samples} EMA "
                         f"samples, cfg {args.eval_cfg_scale}; {time.perf_counter() - t0:.1f} s)")
            parallel.barrier(env)

        seen_bad_files: set[str] = set()

        def note_bad_images(problems: list[str], labels: torch.Tensor) -> None:
            """Unreadable files in this rank's batch: skipped (already replaced by the next image) and counted, or an
            error under --on_bad_image error or when no readable substitute was found."""
            first = problems[0]
            if args.on_bad_image == "error":
                raise RankError(f"unreadable image {first} (--on_bad_image error; 'skip' replaces such files by the "
                                f"next image and counts them)")
            if bool((labels < 0).any()):
                raise RankError(f"no readable image among {ImageFolder.MAX_SUBSTITUTES + 1} files in a row, starting "
                                f"with {first}; is --data_path right?")
            nonlocal bad_images_here
            bad_images_here += len(problems)
            for line in problems:
                path = line.split(": ", 1)[0]
                if path not in seen_bad_files:
                    seen_bad_files.add(path)
                    msg = f"warning: skipped unreadable image {line} (rank {env.rank}, step {global_step + 1})"
                    log.info(msg) if env.is_main else print(msg, file=sys.stderr)

        # --- training loop: every step ends with one small all-reduce of [loss non-finite, grad norm non-finite,
        # stop requested], so all ranks skip the same bad steps and stop after the same step
        ddp_model.train()
        shape = (in_channels, input_size, input_size)
        vae_shape = (codec.latent_channels, input_size, input_size) if codec else None
        rank_slice = slice(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)
        gen = torch.Generator(device=env.device)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        loss_sum = torch.zeros((), device=env.device)
        norm_sum = torch.zeros((), device=env.device)
        flags = torch.zeros(3, device=env.device)
        n_logged, t_last, step_last = 0, time.perf_counter(), global_step
        bad_in_a_row, overflow_steps, stopped = 0, 0, False
        memory = None
        stop = StopRequest().install()
        # the bar only on a terminal (rank 0): batch-job logs get the log lines instead
        bar = tqdm(total=total_steps, initial=global_step, disable=None if env.is_main else True, desc="train",
                   dynamic_ncols=True)
        while global_step < total_steps and not stopped:
            for x, y, problems in plan_batches(dataset, plan, epoch, epoch_offset, args.num_workers,
                                               pin_memory=env.device.type == "cuda"):
                if problems:
                    note_bad_images(problems, y)
                x = x.to(env.device, non_blocking=True)
                y = y.to(env.device, non_blocking=True)
                gen.manual_seed(step_seed(args.global_seed, global_step))
                t, drop, noise, vae_eps = draw_step_randomness(gen, global_batch, rank_slice, shape, vae_shape,
                                                               diffusion.num_timesteps, class_dropout, env.device)
                if codec is not None:
                    x = codec.encode(x, vae_eps)
                with precision.autocast():
                    kwargs = dict(y=y, force_drop_ids=drop) if class_dropout > 0 else dict(y=y)
                    loss = diffusion.training_losses(ddp_model, x, t, kwargs, noise=noise)["loss"].mean()
                if faults.armed("nan_loss", global_step + 1, env.rank):
                    loss = loss * float("nan")
                opt.zero_grad(set_to_none=True)
                if precision.scaler is not None:
                    precision.scaler.scale(loss).backward()
                    precision.scaler.unscale_(opt)
                else:
                    loss.backward()
                lr = learning_rate(global_step, lr=args.lr, schedule=args.lr_schedule, warmup=args.warmup_steps,
                                   total=total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
                faults.maybe_signal(global_step + 1)
                faults.maybe_crash(global_step + 1)
                flags[0] = ~torch.isfinite(loss.detach())
                flags[1] = ~torch.isfinite(grad_norm.detach())
                flags[2] = float(stop.signum != 0)
                nonfinite_loss, nonfinite_grad, stop_now = (parallel.all_reduce_(flags, env, op="max") > 0).tolist()
                if nonfinite_loss or (nonfinite_grad and precision.scaler is None):
                    # skip the update everywhere: parameters, optimizer state and EMA stay as they were
                    skipped_steps += 1
                    bad_in_a_row += 1
                    if precision.scaler is not None:
                        precision.scaler.update()  # found inf/nan while unscaling: lowers the loss scale
                    what = "loss" if nonfinite_loss else "gradient norm"
                    log.info(f"warning: step {global_step + 1}: non-finite {what}; update skipped on every rank "
                             f"({bad_in_a_row} in a row, {skipped_steps} in all)")
                    if args.max_bad_steps and bad_in_a_row >= args.max_bad_steps:
                        last = ckpt.list_checkpoints(run_dir)
                        raise TrainingFailed(
                            f"{bad_in_a_row} steps in a row had a non-finite loss or gradient norm (the last: step "
                            f"{global_step + 1}); stopped without saving. Last good checkpoint: "
                            f"{last[-1] if last else 'none'}. Try a lower --lr, --mixed_precision fp32, or "
                            f"--max_bad_steps 0 to keep skipping")
                elif nonfinite_grad:  # fp16 overflow: the loss scaler skips the step and lowers its scale
                    precision.scaler.update()
                    overflow_steps += 1
                    bad_in_a_row = 0
                else:
                    if precision.scaler is not None:
                        precision.scaler.step(opt)
                        precision.scaler.update()
                    else:
                        opt.step()
                    ema.update(args.ema_decay)
                    bad_in_a_row = 0
                    loss_sum += loss.detach()
                    norm_sum += grad_norm.detach()
                    n_logged += 1
                    if memory is None:  # what this rank holds, after the first update
                        memory = {"param_bytes": parallel.tensor_bytes(model.parameters()),
                                  "grad_bytes": parallel.tensor_bytes(p.grad for p in model.parameters()),
                                  "optim_bytes": parallel.tensor_bytes(v for st in opt.state.values() for v in st.values()
                                                                       if torch.is_tensor(v))}
                        log.info(f"rank 0 holds (plugin {args.plugin}, {env.world_size} process(es)): parameters "
                                 f"{memory['param_bytes'] / 2**20:.1f} MiB, gradients {memory['grad_bytes'] / 2**20:.1f} MiB, "
                                 f"optimizer state {memory['optim_bytes'] / 2**20:.1f} MiB")
                        if env.is_main:
                            with open(os.path.join(run_dir, "memory.json"), "w") as f:
                                json.dump(dict(memory, plugin=args.plugin, world_size=env.world_size), f)
                global_step += 1
                epoch_offset += global_batch
                bar.update(1)

                if global_step % args.log_every == 0 or global_step == total_steps or stop_now:
                    avg_loss = parallel.all_reduce_mean(loss_sum / n_logged, env).item() if n_logged else math.nan
                    avg_norm = (norm_sum / n_logged).item() if n_logged else math.nan
                    dt = time.perf_counter() - t_last
                    steps_s = (global_step - step_last) / dt
                    values = {"loss": avg_loss, "grad_norm": avg_norm, "steps_per_s": steps_s,
                              "images_per_s": steps_s * global_batch, "epoch": epoch, "lr": lr,
                              "skipped_steps": skipped_steps, "bad_images": total_bad_images()}
                    if overflow_steps:
                        values["fp16_overflow_steps"] = overflow_steps
                    if env.device.type == "cuda":
                        values["peak_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                    log.metrics(global_step, values)
                    log.info(f"step {global_step}/{total_steps} epoch {epoch} loss {avg_loss:.4f} grad_norm {avg_norm:.3f} "
                             f"{steps_s:.2f} steps/s {steps_s * global_batch:.1f} img/s"
                             + (f" peak {values['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in values else "")
                             + (f" skipped {skipped_steps}" if skipped_steps else "")
                             + (f" bad images {values['bad_images']}" if values["bad_images"] else ""))
                    bar.set_postfix(loss=f"{avg_loss:.4f}", img_s=f"{steps_s * global_batch:.1f}")
                    loss_sum.zero_(); norm_sum.zero_()
                    n_logged, t_last, step_last = 0, time.perf_counter(), global_step

                if stop_now:
                    stopped = True
                    log.info(f"stop requested ({stop.name or 'a signal on another rank'}) at step {global_step}: "
                             f"writing a checkpoint, then exiting")
                    break
                if global_step % args.ckpt_every == 0 and global_step < total_steps:
                    save(epoch, epoch_offset)
                if args.eval_every and global_step % args.eval_every == 0:
                    evaluate_fid()
                    ddp_model.train()
                if global_step >= total_steps:
                    break
            else:  # the epoch ran out
                epoch, epoch_offset = epoch + 1, 0
        bar.close()
        save(epoch, epoch_offset)
        if stopped:
            log.info(f"stopped cleanly at step {global_step}; resume with --load {run_dir} (or --load auto)")
            return stop.exit_code

        ema_state = ema.state_dict(env) if args.final_samples > 0 else None  # collective
        if args.final_samples > 0 and env.is_main:
            path = os.path.join(run_dir, "samples.png")
            write_sample_grid(path, ema_model(ema_state), codec, num_classes=num_classes, class_names=dataset.class_names,
                              per_class=args.final_samples, cfg_scale=args.final_cfg_scale, shape=shape,
                              device=env.device, seed=args.global_seed, precision=precision)
            log.info(f"wrote {args.final_samples} EMA samples per class (DPM-Solver++ 20 steps, cfg {args.final_cfg_scale}) to {path}")
        parallel.barrier(env)
        return 0
    except (UserError, AttentionBackendError) as e:
        if created_run_dir and run_dir and not ckpt.list_checkpoints(run_dir):
            log.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    finally:
        if stop is not None:
            stop.restore()
        log.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = run_settings.given_flags(parser, argv)
    return parallel.run_main(functools.partial(train, given=given, command=[sys.argv[0], *argv]), args)


if __name__ == "__main__":
    sys.exit(main())
