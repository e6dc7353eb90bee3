"""Train a class-conditional DiT: ``train(cfg)`` (cfg: a TrainConfig) is the body of scripts/dit/train.py.

Read top to bottom: ``train`` (processes -> what to resume: the run's settings -> ``build`` -> ``open_session`` ->
``train_loop`` -> final checkpoint and sample grid); ``build`` (data and the space the model works in, the DiT of its
DiTConfig, REPA's parts, parallelism, optimizer, objective); ``open_session`` (resume or start, the run directory, its
config.json, history and log); ``train_loop`` (draws, step, log, checkpoint, evaluation). A ``Run`` holds what they
built. The step itself is opendit.training.step; its randomness opendit.training.randomness (a function of seed and
global step over the global batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import distributed
from ..alignment import check_alignment_settings, setup_alignment
from ..config import TrainConfig
from ..config.train import DATASETS, ObjectiveSettings, OptimSettings
from ..data import GlobalBatchPlan, build_dataset, default_image_size, plan_batches
from ..data.latents import LatentDataset
from ..errors import TrainingFailed, UserError
from ..flops import dit_train_flops_per_image
from ..models import (MODEL_NAMES, AttentionBackendError, DiT, DiTConfig, block_options_problem, model_config,
                      unknown_model)
from ..objectives import Objective, build_objective
from ..parallelize import ModelOptions, check_model_options, parallelize_dit
from ..precision import Precision
from ..preemption import StopRequest
from ..space import Space, check_patch, training_space
from ..transport.transport import ONE_CHANNEL_COSINE
from .bad_images import BadImages
from .ema import EMA, NOT_AVERAGED, ema_decay_at
from .optim import build_optimizer, learning_rate
from .randomness import draw_step_randomness, step_seed
from .resume import check_initial_weights, load_initial_weights, plan_resume, restore
from .run_settings import HISTORY_FILE, append_history, describe_changes
from .runlog import RunLog, check_wandb, new_run_dir, start_wandb
from .state import TrainState
from .step import StepBatch, train_step


@dataclass
class Run:
    """What a training session works with, built in order by ``build`` (data, model, optimizer, objective) and
    ``open_session`` (resumed or fresh state, the run directory, its log)."""

    cfg: TrainConfig
    env: object
    precision: Precision
    options: ModelOptions
    global_batch: int
    dataset: object = None
    space: Space = None
    model: DiT = None  # the plain model (sharded in place under zero2 / fsdp)
    train_model: torch.nn.Module = None  # what the step calls: the model, or its DDP wrapper
    opt: torch.optim.Optimizer = None
    objective: Objective = None
    alignment: object = None  # REPA, or None
    shapes: dict = None  # the model's state dict shapes (checked against a checkpoint)
    state: TrainState = None
    ema: EMA = None
    ckpt_dir: str | None = None  # the checkpoint resumed from
    run_dir: str | None = None
    created: bool = False  # this session created run_dir
    log: RunLog = None
    batch_plan: GlobalBatchPlan = None
    total_steps: int = 0

    def ema_model(self):
        """A fresh plain model holding the EMA weights, on rank 0 (None elsewhere; collective)."""
        ema_state = self.ema.state_dict(self.env)
        return sampling_model(self.model, self.options, ema_state, self.env) if self.env.is_main else None


def train(cfg: TrainConfig, given: set[str] | None = None, command: list[str] | None = None) -> int:
    """``given``: the settings given on the command line or in the recipe (None: all of them); on resume the others
    come from the run (see run_settings). ``command``: the command line, recorded in the run's history."""
    validate(cfg)
    env = distributed.init_distributed(cfg.machine.device)
    run, stop = None, StopRequest()
    try:
        # --- what to resume, and the settings of that run: they decide the model and the data, so they come first
        resume = plan_resume(cfg, given, env)
        validate(cfg, given)
        run = Run(cfg, env, Precision(cfg.machine.mixed_precision, env.device), ModelOptions.from_config(cfg.machine),
                  cfg.optim.batch_size * env.world_size)
        build(run, resume)
        open_session(run, resume, command)
        bad = BadImages(cfg.data.on_bad_image, env, run.log, earlier=run.state.bad_images)
        progress = Progress(cfg, env, run.log, run.run_dir, run.model, run.opt, run.global_batch, run.total_steps,
                            run.state)
        stop.install()
        stopped = train_loop(run, progress, bad, stop)
        progress.settle(run.state)
        progress.close()
        save_checkpoint(run, bad)
        if stopped:
            run.log.info(f"stopped cleanly at step {run.state.global_step}; resume with --load {run.run_dir} (or "
                         f"--load auto)")
            return stop.exit_code
        if cfg.evaluation.final_samples > 0:
            write_final_grid(run)
        distributed.barrier(env)
        return 0
    except (UserError, AttentionBackendError) as e:
        if run is not None and run.created and run.run_dir and not ckpt.list_checkpoints(run.run_dir):
            run.log.close()
            shutil.rmtree(run.run_dir, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    finally:
        stop.restore()
        if run is not None and run.log is not None:
            run.log.close()


def build(run: Run, resume) -> None:
    """Data and the space the model works in (pixels or a VAE's latents); the model, REPA's parts on it, parallelism,
    the optimizer and the objective."""
    cfg, env = run.cfg, run.env
    run.dataset, run.space = load_data(cfg, run.global_batch, env.device, resume)
    check_patch(run.space, cfg.model.model, model_config(cfg.model.model)["patch_size"])
    check_model_options(run.options, env.device, run.precision)
    run.objective = build_objective(dataclasses.asdict(cfg.objective))  # the diffusion, a flow or MeanFlow
    run.model = build_model(model_settings(cfg, run.space, run.dataset.num_classes, run.objective.model_fields),
                            cfg.optim.global_seed, env.device)
    run.alignment = setup_alignment(cfg, run.model, run.dataset, env.device)  # REPA: encoders, projectors on the model
    run.shapes = {k: tuple(v.shape) for k, v in run.model.state_dict().items()}
    if resume.init:  # fine-tuning: the weights checked against the plain model (loaded once it is sharded)
        check_initial_weights(run.model, resume, env)
    run.train_model = parallelize_dit(run.model, run.options, env, run.precision)  # zero2 / fsdp: sharded in place
    run.opt = build_optimizer(run.model, cfg.optim.lr, env.device, cfg.optim.adam_beta2, cfg.optim.optimizer_impl,
                              cfg.optim.optimizer)
    if cfg.objective.cosine_loss and run.space.channels == 1:
        raise UserError(f"--cosine_loss on {cfg.data.dataset} ({run.space.channels} channel): {ONE_CHANNEL_COSINE}")


def open_session(run: Run, resume, command) -> None:
    """Resume (weights, EMA, optimizer, counters) or start; the run directory, its config.json, history and log."""
    cfg, env = run.cfg, run.env
    if resume.load:
        run.state, run.ema, run.ckpt_dir = restore(resume.load, run.model, run.opt, run.precision, env, run.shapes,
                                                   resume.notes)
        run.run_dir = os.path.dirname(os.path.abspath(run.ckpt_dir))
    else:
        if resume.init:
            load_initial_weights(run.model, resume, env)
        run.state, run.ema = TrainState(), EMA(run.model)  # the EMA starts from the model's weights
    if env.is_main and run.run_dir is None:
        run.run_dir, run.created = new_run_dir(cfg.schedule.outputs, cfg.model.model), True
    run.run_dir = distributed.broadcast_object(run.run_dir, env)
    config, sched = run_config(run, resume), cfg.schedule
    wandb_run = distributed.on_rank0(lambda: start_wandb(run.run_dir, sched.wandb_project, sched.wandb_mode, config),
                                     env) if sched.wandb else None
    run.log = RunLog(run.run_dir if env.is_main else None, wandb_run)
    run.batch_plan = GlobalBatchPlan(len(run.dataset), run.global_batch, rank=env.rank, world_size=env.world_size,
                                     seed=cfg.optim.global_seed, shuffle=True, flip=run.dataset.flip)
    if run.state.epoch_offset + run.global_batch > len(run.dataset):  # the saved position was the end of an epoch
        run.state.next_epoch()
    epochs_steps = cfg.optim.epochs * run.batch_plan.steps_per_epoch
    run.total_steps = min(cfg.optim.max_steps or epochs_steps, epochs_steps)
    branch, moved = record_session(env, run.run_dir, run.created, run.ckpt_dir, run.state, resume, command,
                                   config=config)
    describe_run(run)
    describe_session(env, run.log, run.run_dir, run.ckpt_dir, run.state, resume, branch, moved)
    if run.ckpt_dir and (note := schedule_tail_note(cfg.optim, run.state.global_step, run.total_steps)):
        run.log.info(note)


def train_loop(run: Run, progress: "Progress", bad: BadImages, stop: StopRequest) -> bool:
    """Until the last step or a stop (returns whether a stop ended it): each step draws its randomness from (seed,
    step), takes one optimizer step (or skips a bad one on every rank), logs, checkpoints and evaluates on
    schedule."""
    cfg, env, state, space, alignment = run.cfg, run.env, run.state, run.space, run.alignment
    evaluator = fid_evaluator(cfg, run.dataset, run.run_dir, env)
    class_dropout = run.model.y_embedder.dropout_prob
    sl = slice(env.rank * cfg.optim.batch_size, (env.rank + 1) * cfg.optim.batch_size)
    shape = (space.channels, *space.input_size)
    vae_shape = shape if space.latent else None  # the posterior noise has the latents' shape
    gen = torch.Generator(device=env.device)
    run.train_model.train()
    while state.global_step < run.total_steps:
        for x, y, problems, stored in plan_batches(run.dataset, run.batch_plan, state.epoch, state.epoch_offset,
                                                   cfg.data.num_workers, pin_memory=env.device.type == "cuda",
                                                   features=bool(alignment and alignment.stored)):
            if problems:
                bad.note(problems, y, state.global_step + 1)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            gen.manual_seed(step_seed(cfg.optim.global_seed, state.global_step))
            draws = draw_step_randomness(gen, run.objective, run.global_batch, sl, shape, vae_shape, class_dropout,
                                         env.device)
            # REPA: the encoders' features of the clean images (or those stored with the latents), on the device
            features = alignment.features(x, stored, run.precision, env.device) if alignment else None
            if space.latent:
                x = space.codec.encode(x, draws.vae_eps)
            batch = StepBatch(x, y, draws.t, draws.drop if class_dropout > 0 else None, draws.noise, features)
            lr = learning_rate(state.global_step, lr=cfg.optim.lr, schedule=cfg.optim.lr_schedule,
                               warmup=cfg.optim.warmup_steps, total=run.total_steps)
            ema_decay = ema_decay_at(state.global_step + 1, cfg.optim.ema_decay, cfg.optim.ema_std)
            result = train_step(run.train_model, run.model, run.opt, run.objective, batch, lr=lr,
                                grad_clip=cfg.optim.grad_clip, precision=run.precision, ema=run.ema,
                                ema_decay=ema_decay, env=env, stop=stop,
                                aux_losses=(alignment.loss,) if alignment else (), step_number=state.global_step + 1)
            progress.record(result, state)  # a device-guarded step's flags: read at the next step
            state.advance(run.global_batch)
            step = state.global_step
            if step % cfg.schedule.log_every == 0 or step == run.total_steps or progress.stop:
                progress.report(state, lr, bad.total())
            if progress.stop:
                run.log.info(f"stop requested ({stop.name or 'a signal on another rank'}) at step {step}: writing a "
                             f"checkpoint, then exiting")
                return True
            if step % cfg.schedule.ckpt_every == 0 and step < run.total_steps:
                progress.settle(state)  # the counters of every step so far (a device-guarded step is read late)
                save_checkpoint(run, bad)
            if cfg.evaluation.eval_every and step % cfg.evaluation.eval_every == 0:
                evaluate_fid(evaluator, run, step)
                run.train_model.train()
            if step >= run.total_steps:
                break
        else:  # the epoch ran out
            state.next_epoch()
    return False


# ----------------------------------------------------------------------------- setting up

def validate(cfg: TrainConfig, given: set[str] | None = None) -> None:
    if cfg.model.model not in MODEL_NAMES:
        raise UserError(unknown_model(cfg.model.model))
    if cfg.data.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {cfg.data.dataset!r}; choose cifar10, imagefolder, digits or latents")
    if os.path.exists(cfg.schedule.outputs) and not os.path.isdir(cfg.schedule.outputs):
        raise UserError(f"--outputs {cfg.schedule.outputs} is a file, not a directory")
    if cfg.schedule.wandb:
        check_wandb()
    elif given is not None and (orphans := [k for k in ("wandb_project", "wandb_mode") if k in given]):
        raise UserError(f"--{orphans[0]} is a setting of the W&B logger; add --wandb")
    if cfg.objective.objective != "flow" and given is not None:
        if flow_only := [k for k in ObjectiveSettings.FLOW_ONLY if k in given]:
            raise UserError(f"--{flow_only[0]} is a setting of the flow objective; add --objective flow (the run's "
                            f"objective is {cfg.objective.objective})")
    if cfg.objective.objective != "meanflow" and given is not None:
        if mf_only := [k for k in ObjectiveSettings.MEANFLOW_ONLY if k in given]:
            raise UserError(f"--{mf_only[0]} is a setting of the meanflow objective; add --objective meanflow (the "
                            f"run's objective is {cfg.objective.objective})")
    if cfg.objective.objective == "meanflow" and (cfg.objective.omega != 1.0 or cfg.objective.kappa != 0.0):
        ev = cfg.evaluation
        for flag, value in (("final_cfg_scale", ev.final_cfg_scale), ("eval_cfg_scale", ev.eval_cfg_scale)):
            if value != 1.0 and (flag == "eval_cfg_scale" or (given is not None and flag in given)):
                raise UserError(f"--{flag} {value:g}: a meanflow run trains guidance in (--omega / --kappa); its "
                                f"samples are drawn at guidance 1")
    check_alignment_settings(cfg.alignment, given)
    mc = model_config(cfg.model.model)
    if problem := block_options_problem(cfg.model.block_options, mc["hidden_size"], mc["num_heads"]):
        raise UserError(re.sub(r"\b((?:use|wo)_\w+)", r"--\1", problem))  # the options by their flags
    if cfg.model.use_rmsnorm and ModelOptions.from_config(cfg.machine).norm != "torch":
        raise UserError("--enable_layernorm_kernel / --enable_modulate_kernel are Triton LayerNorm kernels; with "
                        "--use_rmsnorm use --compile instead (Inductor fuses RMSNorm with the modulation)")
    if given is not None and "latent_multiplier" in given and not cfg.data.latent_norm:
        raise UserError("--latent_multiplier scales the normalized latents; add --latent_norm")
    if given is not None and cfg.objective.time_sampling != "logit_normal":
        if unused := [k for k in ("time_mean", "time_std") if k in given]:
            raise UserError(f"--{unused[0]} sets the logit-normal t; add --time_sampling logit_normal")
    if given is not None and cfg.optim.optimizer == "muon" and "optimizer_impl" in given:
        raise UserError("--optimizer_impl chooses AdamW's kernels; --optimizer muon has one implementation")


def load_data(cfg: TrainConfig, global_batch: int, device, resume) -> tuple[object, Space]:
    """The training set and the space its images become the model's input in."""
    if cfg.data.dataset == "latents":  # precomputed: the size and VAE are the extraction's
        dataset = LatentDataset(cfg.data.data_path)
        if cfg.data.image_size is not None and cfg.data.image_size != dataset.image_size:
            raise UserError(f"--image_size {cfg.data.image_size}: the latents in {cfg.data.data_path} were extracted at "
                            f"{dataset.image_size} px")
        image_size = dataset.image_size
    else:
        image_size = cfg.data.image_size or default_image_size(cfg.data.dataset)
        dataset = build_dataset(cfg.data.dataset, cfg.data.data_path, image_size)
    if cfg.data.num_classes is not None and cfg.data.num_classes != dataset.num_classes:
        raise UserError(f"--num_classes {cfg.data.num_classes} contradicts the dataset, which has {dataset.num_classes} classes")
    if len(dataset) < global_batch:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch ({global_batch})")
    latents = dataset if cfg.data.dataset == "latents" else None
    space = training_space(cfg.data.vae, image_size, dataset.channels, device, saved=resume.saved,
                           run_dir=resume.run_dir, latents=latents,
                           norm_multiplier=cfg.data.latent_multiplier if cfg.data.latent_norm else None)
    return dataset, space


def model_settings(cfg: TrainConfig, space: Space, num_classes: int, objective_fields: dict | None = None) -> DiTConfig:
    """The DiTConfig of a run: the registry name's structure, the space's input grid and channels, the data set's
    classes, the block options, and what the objective needs of it (MeanFlow: a second time, no variance half)."""
    return DiTConfig.from_name(cfg.model.model, input_size=space.input_size, in_channels=space.channels,
                               num_classes=num_classes, **cfg.model.block_options, **(objective_fields or {}))


def build_model(config: DiTConfig, seed: int, device) -> DiT:
    """The plain DiT of a run, initialized from ``seed`` (identical initial weights on every rank)."""
    torch.manual_seed(seed)
    return DiT(config).to(device)


def sampling_model(trained: DiT, options: ModelOptions, state: dict, env) -> DiT:
    """A plain eval-mode DiT of the trained model's config holding ``state`` (the EMA weights), with the run's
    attention backend."""
    m = DiT(trained.config).to(env.device).eval().set_attention_impl(options.attention)
    m.load_state_dict(state)
    return m


def run_config(run: Run, resume) -> dict:
    """config.json: the settings the run was started with (never rewritten; flat, by flag name), resolved: the image
    size, classes, VAE and objective the run has, its model's DiTConfig, and for a fine-tuned run the weights it
    started from (``init_from``: --load as given, the file read)."""
    space, dataset = run.space, run.dataset
    return dict(run.cfg.flat(), image_size=space.image_size, num_classes=dataset.num_classes,
                input_size=space.input_size[0], in_channels=space.channels, vae_resolved=space.vae_name,
                world_size=run.env.world_size, global_batch=run.global_batch, class_names=list(dataset.class_names),
                **run.objective.record(),
                latent_stats=space.latent_norm.record() if space.latent_norm is not None else None,
                dit=run.model.config.to_dict(),
                **({"init_from": {"load": resume.init, "file": resume.init_source}} if resume.init else {}))


def record_session(env, run_dir: str, created: bool, ckpt_dir: str | None, state: TrainState, resume, command, *,
                   config: dict) -> tuple[str | None, list[str]]:
    """Rank 0: config.json (a new run), a new branch when resuming from an older checkpoint than the run's newest,
    one line in history.jsonl. Returns (the folder the abandoned branch was moved into or None, what it holds)."""
    branch, moved = None, []
    if env.is_main:
        if created or not os.path.isfile(os.path.join(run_dir, ckpt.CONFIG_FILE)):
            ckpt.write_text_atomic(os.path.join(run_dir, ckpt.CONFIG_FILE), json.dumps(config, indent=2))
        if ckpt_dir is not None:
            branch, moved = ckpt.start_branch(run_dir, ckpt_dir, time.strftime("%Y%m%d-%H%M%S"))
        append_history(run_dir, {"session": "resume" if ckpt_dir else "start", "command": command,
                                 "resumed_from": os.path.basename(ckpt_dir) if ckpt_dir else None,
                                 "global_step": state.global_step, "world_size": env.world_size,
                                 "changes": resume.changes,
                                 "branch_moved_aside": os.path.basename(branch) if branch else None})
    return branch, moved


def describe_optimization(o) -> str:
    """The optimizer and the EMA in words (``o``: the run's OptimSettings); --ema_std replaces --ema_decay."""
    opt = "Muon (blocks' matrices) + AdamW" if o.optimizer == "muon" else "AdamW"
    ema = (f"power-function EMA, relative std {o.ema_std:g} (not --ema_decay)" if o.ema_std is not None
           else f"EMA decay {o.ema_decay:g}")
    return f"{opt}, lr {o.lr:g} ({o.lr_schedule}, {o.warmup_steps} warmup steps), beta2 {o.adam_beta2:g}; {ema}"


def describe_run(run: Run) -> None:
    cfg, env, model, log = run.cfg, run.env, run.model, run.log
    n_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith(NOT_AVERAGED))
    flops = dit_train_flops_per_image(model.config)
    blocks = [k for k, on in model.options.items() if on]
    log.info(f"{cfg.model.model}{' (' + ', '.join(blocks) + ')' if blocks else ''}: {n_params / 1e6:.2f}M trainable "
             f"parameters, {flops / 1e9:.2f} GFLOP per image per step; "
             f"{run.space.describe()}; {cfg.data.dataset}: {len(run.dataset)} images, {run.dataset.num_classes} "
             f"classes; global batch {run.global_batch} ({env.world_size} x {cfg.optim.batch_size}), "
             f"{run.batch_plan.steps_per_epoch} steps/epoch; {cfg.machine.mixed_precision} on {env.device}, plugin "
             f"{cfg.machine.plugin}; objective {run.objective.describe()}; {describe_optimization(cfg.optim)}; "
             f"run dir {run.run_dir}")
    if run.alignment is not None:
        n_proj = sum(p.numel() for p in run.alignment.loss.projectors.parameters())
        log.info(f"{run.alignment.describe()}; projector(s) {n_proj / 1e6:.2f}M parameters (trained, not sampled)")
    if (w := run.precision.warning()) and env.is_main:
        print(f"warning: {w}", file=sys.stderr)
        log.info(f"warning: {w}")


def describe_session(env, log, run_dir: str, ckpt_dir: str | None, state: TrainState, resume, branch, moved) -> None:
    for note in resume.notes:
        log.info(note)
    if ckpt_dir:
        log.info(f"resumed from {ckpt_dir} at epoch {state.epoch}, global step {state.global_step}")
    if resume.changes:
        log.info(f"settings changed on resume (recorded in {HISTORY_FILE}): {describe_changes(resume.changes)}")
    if moved:
        log.info(f"{os.path.basename(ckpt_dir)} is older than the run's newest checkpoint: a new branch of the run "
                 f"starts here; moved the abandoned branch's {', '.join(moved)} aside into {branch} (kept, no "
                 f"longer used by --load {run_dir} or --load auto)")
    if env.is_main and (stale := ckpt.remove_stale_partials(run_dir)):
        log.info(f"removed what an interrupted checkpoint write left behind: {', '.join(stale)}")


def schedule_tail_note(optim: OptimSettings, step: int, total: int) -> str | None:
    """A resumed cosine schedule near its end (a finished run extended with a larger --max_steps): what the learning
    rate will be, and how to continue usefully. None when the schedule still has most of its rate."""
    if optim.lr_schedule != "cosine" or step >= total:
        return None
    kw = dict(lr=optim.lr, schedule="cosine", warmup=optim.warmup_steps, total=total)
    now, last = learning_rate(step, **kw), learning_rate(total - 1, **kw)
    if step < optim.warmup_steps or now >= 0.05 * optim.lr:
        return None
    return (f"note: the cosine schedule is resumed at step {step} of {total}: the learning rate runs from {now:.2g} "
            f"down to {last:.2g} (peak {optim.lr:g}), which barely trains. To continue usefully, resume with "
            f"--lr_schedule constant --lr LR (a constant tail; e.g. --lr {0.1 * optim.lr:g}), or train a new run with "
            f"the larger --max_steps (README: Extending a finished run)")


# ----------------------------------------------------------------------------- during the loop

class Progress:
    """The loop's bookkeeping between log lines: averages of loss and gradient norm over the updates, speed, skipped
    and overflowed steps, what rank 0 holds in memory; and the stop after --max_bad_steps bad steps in a row."""

    def __init__(self, cfg: TrainConfig, env, log, run_dir: str, model, opt, global_batch: int, total_steps: int,
                 state: TrainState):
        self.cfg, self.env, self.log, self.run_dir, self.model, self.opt = cfg, env, log, run_dir, model, opt
        self.global_batch, self.total_steps = global_batch, total_steps
        self.loss_sum = torch.zeros((), device=env.device)
        self.norm_sum = torch.zeros((), device=env.device)
        self.aux_sums: dict[str, torch.Tensor] = {}  # auxiliary losses (weighted), e.g. REPA's
        self.n, self.t_last, self.step_last = 0, time.perf_counter(), state.global_step
        self.bad_in_a_row, self.overflow_steps, self.memory = 0, 0, None
        self.pending, self.stop = None, False  # a step whose flags are not read yet; a stop was requested
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        # the bar only on a terminal (rank 0): batch-job logs get the log lines instead
        self.bar = tqdm(total=total_steps, initial=state.global_step, disable=None if env.is_main else True,
                        desc="train", unit="step", dynamic_ncols=True)

    def record(self, result, state: TrainState) -> None:
        """After each step. A step guarded on the host is taken in at once; one guarded on the device when the next
        step has been queued (its flags are on the host by then), or at ``settle``."""
        self.bar.update(1)
        previous, self.pending = self.pending, result
        if previous is not None:
            self.take(previous, state)
        if result.flags.on_host:
            self.settle(state)

    def settle(self, state: TrainState) -> None:
        """Take in the step still waiting (a host sync): before logging, checkpointing or stopping."""
        if self.pending is not None:
            result, self.pending = self.pending, None
            self.take(result, state)

    def take(self, result, state: TrainState) -> None:
        step = result.step
        self.stop = self.stop or result.stop
        if result.skipped:
            state.skipped_steps += 1
            self.bad_in_a_row += 1
            what = "loss" if result.nonfinite_loss else "gradient norm"
            self.log.info(f"warning: step {step}: non-finite {what}; update skipped on every rank "
                          f"({self.bad_in_a_row} in a row, {state.skipped_steps} in all)")
            if self.cfg.optim.max_bad_steps and self.bad_in_a_row >= self.cfg.optim.max_bad_steps:
                last = ckpt.list_checkpoints(self.run_dir)
                raise TrainingFailed(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient norm (the last: step "
                    f"{step}); stopped without saving. Last good checkpoint: {last[-1] if last else 'none'}. Try a "
                    f"lower --lr, --mixed_precision fp32, or --max_bad_steps 0 to keep skipping")
        elif result.overflow:
            self.overflow_steps += 1
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row = 0
            self.loss_sum += result.loss
            self.norm_sum += result.grad_norm
            for name, value in result.aux.items():
                self.aux_sums[name] = self.aux_sums.get(name, 0) + value
            self.n += 1
            if self.memory is None:
                self.note_memory()

    def note_memory(self) -> None:
        """What this rank holds, after the first update."""
        params = list(self.model.parameters())
        self.memory = {"param_bytes": distributed.tensor_bytes(params),
                       "grad_bytes": distributed.tensor_bytes(p.grad for p in params),
                       "optim_bytes": distributed.tensor_bytes(v for st in self.opt.state.values() for v in st.values()
                                                               if torch.is_tensor(v))}
        m = self.memory
        self.log.info(f"rank 0 holds (plugin {self.cfg.machine.plugin}, {self.env.world_size} process(es)): parameters "
                      f"{m['param_bytes'] / 2**20:.1f} MiB, gradients {m['grad_bytes'] / 2**20:.1f} MiB, "
                      f"optimizer state {m['optim_bytes'] / 2**20:.1f} MiB")
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "memory.json"), "w") as f:
                json.dump(dict(m, plugin=self.cfg.machine.plugin, world_size=self.env.world_size), f)

    def report(self, state: TrainState, lr: float, bad_images: int) -> None:
        """A log line and a metrics row: averages since the last one. ``bad_images``: a collective count."""
        self.settle(state)
        env, step = self.env, state.global_step
        avg_loss = distributed.all_reduce_mean(self.loss_sum / self.n, env).item() if self.n else math.nan
        avg_norm = (self.norm_sum / self.n).item() if self.n else math.nan
        steps_s = (step - self.step_last) / (time.perf_counter() - self.t_last)
        values = {"loss": avg_loss, "grad_norm": avg_norm, "steps_per_s": steps_s,
                  "images_per_s": steps_s * self.global_batch, "epoch": state.epoch, "lr": lr,
                  "skipped_steps": state.skipped_steps, "bad_images": bad_images}
        for name, total in self.aux_sums.items():  # "repa_loss": lambda x the alignment loss, as added to "loss"
            values[f"{name}_loss"] = distributed.all_reduce_mean(total / self.n, env).item() if self.n else math.nan
        if self.overflow_steps:
            values["fp16_overflow_steps"] = self.overflow_steps
        if env.device.type == "cuda":
            values["peak_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        self.log.metrics(step, values)
        self.log.info(f"step {step}/{self.total_steps} epoch {state.epoch} loss {avg_loss:.4f} grad_norm {avg_norm:.3f} "
                      f"{steps_s:.2f} steps/s {steps_s * self.global_batch:.1f} img/s"
                      + (f" peak {values['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in values else "")
                      + (f" skipped {state.skipped_steps}" if state.skipped_steps else "")
                      + (f" bad images {bad_images}" if bad_images else ""))
        self.bar.set_postfix(loss=f"{avg_loss:.4f}", img_s=f"{steps_s * self.global_batch:.1f}")
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.aux_sums = {}
        self.n, self.t_last, self.step_last = 0, time.perf_counter(), step

    def close(self) -> None:
        self.bar.close()


def save_checkpoint(run: Run, bad: BadImages) -> None:
    """Gather the whole model, EMA and optimizer states (collectives on every rank); rank 0 writes the checkpoint."""
    env, state, log = run.env, run.state, run.log
    model_state = distributed.full_model_state(run.model, env)
    ema_state = run.ema.state_dict(env)
    optim_state = distributed.full_optimizer_state(run.model, run.opt, env)
    n_bad_images = bad.total()
    if env.is_main:
        scaler = run.precision.scaler
        state.grad_scaler = scaler.state_dict() if scaler is not None else None
        rs = state.state_dict(global_batch=run.global_batch, world_size=env.world_size,
                              global_seed=run.cfg.optim.global_seed, bad_images=n_bad_images)
        keep = run.cfg.schedule.ckpt_keep
        path, deleted = ckpt.save_checkpoint(
            run.run_dir, ckpt.checkpoint_name(state.epoch, state.global_step), model_state=model_state,
            ema_state=ema_state, optimizer_state=optim_state, running_states=rs, keep=keep,
            protect=(run.ckpt_dir,) if run.ckpt_dir else ())
        log.info(f"saved checkpoint {path}" + (f"; deleted {', '.join(deleted)} (--ckpt_keep {keep})" if deleted else ""))
    distributed.barrier(env)


def fid_evaluator(cfg: TrainConfig, dataset, run_dir: str, env):
    """--eval_every: the FID of EMA samples (rank 0 samples and scores; the others wait), or None."""
    ev = cfg.evaluation
    if not ev.eval_every:
        return None
    from ..eval.periodic import PeriodicFID
    from ..hf_hub import local_path

    features = ev.eval_features if ev.eval_features != "auto" else \
        ("digits" if cfg.data.dataset == "digits" else "inception")
    return distributed.on_rank0(lambda: PeriodicFID(  # rank 0 fetches hf:// inputs into the Hub cache
        features=features, inception=local_path(ev.inception, "--inception"),
        reference=local_path(ev.eval_reference, "--eval_reference"), dataset=dataset, run_dir=run_dir,
        num_samples=ev.eval_samples, cfg_scale=ev.eval_cfg_scale, seed=cfg.optim.global_seed, device=env.device,
        class_names=dataset.class_names), env)


def evaluate_fid(evaluator, run: Run, step: int) -> None:
    """The FID of the EMA model's samples at ``step`` (rank 0 samples and scores; the others wait)."""
    model, env, ev = run.ema_model(), run.env, run.cfg.evaluation
    if env.is_main:
        t0 = time.perf_counter()
        fid = evaluator(step, model, run.space, num_classes=run.dataset.num_classes, device=env.device,
                        precision=run.precision, objective=run.objective)
        run.log.metrics(step, {"fid": fid})
        run.log.image("eval/samples", evaluator.grid, step)  # also eval/step{S}.png
        run.log.info(f"step {step}: FID {fid:.3f} ({evaluator.name} features, {ev.eval_samples} EMA samples, cfg "
                     f"{ev.eval_cfg_scale}; {time.perf_counter() - t0:.1f} s)")
    distributed.barrier(env)


def write_final_grid(run: Run) -> None:
    """samples.png: --final_samples EMA samples per class (rank 0)."""
    from ..sampling.generate import describe_settings, quick_sampler
    from ..sampling.grid import write_sample_grid

    model, env, ev = run.ema_model(), run.env, run.cfg.evaluation
    scale = 1.0 if run.objective.guidance_trained_in else ev.final_cfg_scale  # trained in: sampled at 1
    if env.is_main:
        path = os.path.join(run.run_dir, "samples.png")
        write_sample_grid(path, model, run.space, num_classes=run.dataset.num_classes,
                          class_names=run.dataset.class_names, per_class=ev.final_samples,
                          cfg_scale=scale, device=env.device, seed=run.cfg.optim.global_seed,
                          precision=run.precision, objective=run.objective)
        sampling = dict(quick_sampler(run.objective), cfg_scale=scale)
        run.log.info(f"wrote {ev.final_samples} EMA samples per class ({describe_settings(sampling)}) to {path}")
