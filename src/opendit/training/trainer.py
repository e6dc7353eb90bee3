"""Train a class-conditional DiT: ``train(args)`` is the body of scripts/dit/train.py.

Read top to bottom: processes -> what to resume (the run's settings) -> data and the space the model works in ->
model, parallelism, optimizer, objective -> resume or start -> run directory -> the loop (draws, step, log,
checkpoint, evaluation) -> final checkpoint and sample grid. The step itself is opendit.training.step; its randomness
opendit.training.randomness (a function of seed and global step over the global batch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..alignment import check_alignment_flags, setup_alignment
from ..data import GlobalBatchPlan, build_dataset, default_image_size, plan_batches
from ..data.latents import LatentDataset
from ..errors import TrainingFailed, UserError
from ..flops import dit_train_flops_per_image, model_cost_config
from ..models import (BLOCK_OPTIONS, AttentionBackendError, DiT, DiT_models, block_options_problem, model_config,
                      unknown_model)
from ..objectives import FLOW_SETTINGS, build_objective, describe_objective, objective_settings
from ..parallelize import ModelOptions, check_model_options, parallelize_dit
from ..precision import Precision
from ..preemption import StopRequest
from ..space import Space, check_patch, training_space
from ..transport.transport import ONE_CHANNEL_COSINE
from . import checkpoint as ckpt
from .bad_images import BadImages
from .ema import EMA, NOT_AVERAGED
from .optim import build_optimizer, learning_rate
from .randomness import draw_step_randomness, step_seed
from .resume import plan_resume, restore
from .run_settings import HISTORY_FILE, append_history, describe_changes
from .runlog import RunLog, new_run_dir
from .state import TrainState
from .step import StepBatch, train_step

DATASETS = ("cifar10", "imagefolder", "digits", "latents")


def train(args, given: set[str] | None = None, command: list[str] | None = None) -> int:
    """``given``: the flags set on the command line (None: all of them); on resume the others come from the run (see
    run_settings). ``command``: the command line, recorded in the run's history."""
    validate(args)
    env = distributed.init_distributed(args.device)
    log, run_dir, created, stop = RunLog(None), None, False, StopRequest()
    try:
        # --- what to resume, and the settings of that run: they decide the model and the data, so they come first
        resume = plan_resume(args, given, env)
        validate(args, given)
        precision = Precision(args.mixed_precision, env.device)
        options = ModelOptions.from_flags(args)
        global_batch = args.batch_size * env.world_size

        # --- data, and the space the model works in (pixels or a VAE's latents)
        dataset, space = load_data(args, global_batch, env.device, resume)
        check_patch(space, args.model, int(args.model.split("/")[-1]))
        check_model_options(options, env.device, precision)

        # --- model, parallelism, EMA, optimizer, objective
        model = build_model(args.model, space, dataset.num_classes, args.global_seed, env.device, block_options(args))
        alignment = setup_alignment(args, model, dataset, env.device)  # REPA: encoders, projectors on the model
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        train_model = parallelize_dit(model, options, env, precision)  # zero2 / fsdp: sharded in place
        opt = build_optimizer(model, args.lr, env.device, getattr(args, "adam_beta2", 0.999),
                              getattr(args, "optimizer_impl", "auto"))
        objective = build_objective(vars(args))  # the diffusion or a flow (opendit.transport)
        if getattr(args, "cosine_loss", 0) and space.channels == 1:
            raise UserError(f"--cosine_loss on {args.dataset} ({space.channels} channel): {ONE_CHANNEL_COSINE}")
        class_dropout = model.y_embedder.dropout_prob

        # --- resume (weights, EMA, optimizer, counters) or start
        ckpt_dir = None
        if resume.load:
            state, ema, ckpt_dir = restore(resume.load, model, opt, precision, env, shapes, resume.notes)
            run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
        else:
            state, ema = TrainState(), EMA(model)
        if env.is_main and run_dir is None:
            run_dir, created = new_run_dir(args.outputs, args.model), True
        run_dir = distributed.broadcast_object(run_dir, env)
        log = RunLog(run_dir if env.is_main else None)
        batch_plan = GlobalBatchPlan(len(dataset), global_batch, rank=env.rank, world_size=env.world_size,
                                     seed=args.global_seed, shuffle=True, flip=dataset.flip)
        if state.epoch_offset + global_batch > len(dataset):  # the saved position was the end of an epoch
            state.next_epoch()
        total_steps = min(args.max_steps or args.epochs * batch_plan.steps_per_epoch,
                          args.epochs * batch_plan.steps_per_epoch)
        branch, moved = record_session(env, run_dir, created, ckpt_dir, state, resume, command,
                                       config=run_config(args, space, dataset, env.world_size, global_batch, objective))
        describe_run(args, env, log, model, space, dataset, batch_plan, global_batch, precision, run_dir, objective,
                     alignment)
        describe_session(env, log, run_dir, ckpt_dir, state, resume, branch, moved)
        if ckpt_dir and (note := schedule_tail_note(args, state.global_step, total_steps)):
            log.info(note)

        evaluator = fid_evaluator(args, dataset, run_dir, env)
        bad = BadImages(args.on_bad_image, env, log, earlier=state.bad_images)
        progress = Progress(args, env, log, run_dir, model, opt, global_batch, total_steps, state)

        def save() -> None:
            progress.settle(state)  # the counters of every step so far (a device-guarded step is read one step late)
            save_checkpoint(model, ema, opt, state, precision, bad, env, args, run_dir, ckpt_dir, global_batch, log)

        def ema_model():  # a fresh plain model holding the EMA weights, on rank 0 (collective)
            ema_state = ema.state_dict(env)
            return sampling_model(model, options, ema_state, env) if env.is_main else None

        # --- the loop: each step draws its randomness from (seed, step), takes one optimizer step (or skips a bad
        # one on every rank), logs, checkpoints and evaluates on schedule
        train_model.train()
        sl = slice(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)
        shape = (space.channels, *space.input_size)
        vae_shape = shape if space.latent else None  # the posterior noise has the latents' shape
        gen = torch.Generator(device=env.device)
        stop.install()
        stopped = False
        while state.global_step < total_steps and not stopped:
            for x, y, problems, stored in plan_batches(dataset, batch_plan, state.epoch, state.epoch_offset,
                                                       args.num_workers, pin_memory=env.device.type == "cuda",
                                                       features=bool(alignment and alignment.stored)):
                if problems:
                    bad.note(problems, y, state.global_step + 1)
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                gen.manual_seed(step_seed(args.global_seed, state.global_step))
                draws = draw_step_randomness(gen, objective, global_batch, sl, shape, vae_shape, class_dropout,
                                             env.device)
                # REPA: the encoders' features of the clean images (or those stored with the latents), on the device
                features = alignment.features(x, stored, precision, env.device) if alignment else None
                if space.latent:
                    x = space.codec.encode(x, draws.vae_eps)
                batch = StepBatch(x, y, draws.t, draws.drop if class_dropout > 0 else None, draws.noise, features)
                lr = learning_rate(state.global_step, lr=args.lr, schedule=args.lr_schedule,
                                   warmup=args.warmup_steps, total=total_steps)
                result = train_step(train_model, model, opt, objective, batch, lr=lr, grad_clip=args.grad_clip,
                                    precision=precision, ema=ema, ema_decay=args.ema_decay, env=env, stop=stop,
                                    aux_losses=(alignment.loss,) if alignment else (),
                                    step_number=state.global_step + 1)
                progress.record(result, state)  # a device-guarded step's flags: read at the next step
                state.advance(global_batch)
                if state.global_step % args.log_every == 0 or state.global_step == total_steps or progress.stop:
                    progress.report(state, lr, bad.total())
                if progress.stop:
                    stopped = True
                    log.info(f"stop requested ({stop.name or 'a signal on another rank'}) at step {state.global_step}: "
                             f"writing a checkpoint, then exiting")
                    break
                if state.global_step % args.ckpt_every == 0 and state.global_step < total_steps:
                    save()
                if args.eval_every and state.global_step % args.eval_every == 0:
                    evaluate_fid(evaluator, ema_model(), space, state.global_step, dataset.num_classes, precision,
                                 args, env, log, objective)
                    train_model.train()
                if state.global_step >= total_steps:
                    break
            else:  # the epoch ran out
                state.next_epoch()
        progress.settle(state)
        progress.close()
        save()
        if stopped:
            log.info(f"stopped cleanly at step {state.global_step}; resume with --load {run_dir} (or --load auto)")
            return stop.exit_code

        if args.final_samples > 0:
            write_final_grid(ema_model(), space, dataset, precision, args, env, run_dir, log, objective)
        distributed.barrier(env)
        return 0
    except (UserError, AttentionBackendError) as e:
        if created and run_dir and not ckpt.list_checkpoints(run_dir):
            log.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    finally:
        stop.restore()
        log.close()


# ----------------------------------------------------------------------------- setting up

def validate(args, given: set[str] | None = None) -> None:
    if args.model not in DiT_models:
        raise UserError(unknown_model(args.model))
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose cifar10, imagefolder, digits or latents")
    if os.path.exists(args.outputs) and not os.path.isdir(args.outputs):
        raise UserError(f"--outputs {args.outputs} is a file, not a directory")
    if getattr(args, "objective", "diffusion") != "flow" and given is not None:
        if flow_only := [k for k in FLOW_SETTINGS if k in given]:
            raise UserError(f"--{flow_only[0]} is a setting of the flow objective; add --objective flow (the run's "
                            f"objective is {getattr(args, 'objective', 'diffusion')})")
    check_alignment_flags(args, given)
    cfg = model_config(args.model)
    if problem := block_options_problem(block_options(args), cfg["hidden_size"], cfg["num_heads"],
                                        ModelOptions.from_flags(args).norm):
        raise UserError(problem)
    if given is not None and "latent_multiplier" in given and not getattr(args, "latent_norm", False):
        raise UserError("--latent_multiplier scales the normalized latents; add --latent_norm")
    if given is not None and getattr(args, "time_sampling", None) != "logit_normal":
        if unused := [k for k in ("time_mean", "time_std") if k in given]:
            raise UserError(f"--{unused[0]} sets the logit-normal t; add --time_sampling logit_normal")


def load_data(args, global_batch: int, device, resume) -> tuple[object, Space]:
    """The training set and the space its images become the model's input in."""
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
    if len(dataset) < global_batch:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch ({global_batch})")
    latents = dataset if args.dataset == "latents" else None
    space = training_space(args.vae, image_size, dataset.channels, device, saved=resume.saved,
                           run_dir=resume.run_dir, latents=latents,
                           norm_multiplier=args.latent_multiplier if getattr(args, "latent_norm", False) else None)
    return dataset, space


def block_options(args) -> dict:
    """The model's block options (``--use_rmsnorm`` ...; absent: off)."""
    return {k: bool(getattr(args, k, False)) for k in BLOCK_OPTIONS}


def build_model(name: str, space: Space, num_classes: int, seed: int, device, options: dict | None = None):
    """The plain DiT of a run, initialized from ``seed`` (identical initial weights on every rank)."""
    torch.manual_seed(seed)
    model = DiT_models[name](input_size=space.input_size[0], in_channels=space.channels, num_classes=num_classes,
                             **(options or {}))
    return model.to(device)


def sampling_model(trained, options: ModelOptions, state: dict, env):
    """A plain eval-mode DiT of the trained model's build holding ``state`` (the EMA weights), with the run's
    attention backend."""
    m = DiT(input_size=trained.input_size, patch_size=trained.patch_size, in_channels=trained.in_channels,
            hidden_size=trained.hidden_size, depth=len(trained.blocks), num_heads=trained.num_heads,
            mlp_ratio=trained.mlp_ratio, class_dropout_prob=trained.y_embedder.dropout_prob,
            num_classes=trained.num_classes, learn_sigma=trained.learn_sigma, **trained.options)
    m = m.to(env.device).eval().set_attention_impl(options.attention)
    m.load_state_dict(state)
    return m


def run_config(args, space: Space, dataset, world_size: int, global_batch: int, objective) -> dict:
    """config.json: the settings the run was started with (never rewritten), the objective's resolved."""
    return dict(vars(args), image_size=space.image_size, num_classes=dataset.num_classes, input_size=space.input_size[0],
                in_channels=space.channels, vae_resolved=space.vae_name, world_size=world_size,
                global_batch=global_batch, class_names=list(dataset.class_names), **objective_settings(objective),
                latent_stats=space.latent_norm.record() if space.latent_norm is not None else None)


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


def describe_run(args, env, log, model, space: Space, dataset, batch_plan, global_batch: int, precision, run_dir,
                 objective, alignment=None):
    n_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith(NOT_AVERAGED))
    flops = dit_train_flops_per_image(**model_cost_config(model))
    blocks = [k for k, on in model.options.items() if on]
    log.info(f"{args.model}{' (' + ', '.join(blocks) + ')' if blocks else ''}: {n_params / 1e6:.2f}M trainable "
             f"parameters, {flops / 1e9:.2f} GFLOP per image per step; "
             f"{space.describe()}; {args.dataset}: {len(dataset)} images, {dataset.num_classes} classes; global batch "
             f"{global_batch} ({env.world_size} x {args.batch_size}), {batch_plan.steps_per_epoch} steps/epoch; "
             f"{args.mixed_precision} on {env.device}, plugin {args.plugin}; objective {describe_objective(objective)}; "
             f"run dir {run_dir}")
    if alignment is not None:
        n_proj = sum(p.numel() for p in alignment.loss.projectors.parameters())
        log.info(f"{alignment.describe()}; projector(s) {n_proj / 1e6:.2f}M parameters (trained, not sampled)")
    if (w := precision.warning()) and env.is_main:
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


def schedule_tail_note(args, step: int, total: int) -> str | None:
    """A resumed cosine schedule near its end (a finished run extended with a larger --max_steps): what the learning
    rate will be, and how to continue usefully. None when the schedule still has most of its rate."""
    if args.lr_schedule != "cosine" or step >= total:
        return None
    kw = dict(lr=args.lr, schedule="cosine", warmup=args.warmup_steps, total=total)
    now, last = learning_rate(step, **kw), learning_rate(total - 1, **kw)
    if step < args.warmup_steps or now >= 0.05 * args.lr:
        return None
    return (f"note: the cosine schedule is resumed at step {step} of {total}: the learning rate runs from {now:.2g} "
            f"down to {last:.2g} (peak {args.lr:g}), which barely trains. To continue usefully, resume with "
            f"--lr_schedule constant --lr LR (a constant tail; e.g. --lr {0.1 * args.lr:g}), or train a new run with the "
            f"larger --max_steps (README: Extending a finished run)")


# ----------------------------------------------------------------------------- during the loop

class Progress:
    """The loop's bookkeeping between log lines: averages of loss and gradient norm over the updates, speed, skipped
    and overflowed steps, what rank 0 holds in memory; and the stop after --max_bad_steps bad steps in a row."""

    def __init__(self, args, env, log, run_dir: str, model, opt, global_batch: int, total_steps: int, state: TrainState):
        self.args, self.env, self.log, self.run_dir, self.model, self.opt = args, env, log, run_dir, model, opt
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
            if self.args.max_bad_steps and self.bad_in_a_row >= self.args.max_bad_steps:
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
        self.log.info(f"rank 0 holds (plugin {self.args.plugin}, {self.env.world_size} process(es)): parameters "
                      f"{m['param_bytes'] / 2**20:.1f} MiB, gradients {m['grad_bytes'] / 2**20:.1f} MiB, "
                      f"optimizer state {m['optim_bytes'] / 2**20:.1f} MiB")
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "memory.json"), "w") as f:
                json.dump(dict(m, plugin=self.args.plugin, world_size=self.env.world_size), f)

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


def save_checkpoint(model, ema: EMA, opt, state: TrainState, precision, bad: BadImages, env, args, run_dir: str,
                    resumed_from: str | None, global_batch: int, log) -> None:
    """Gather the whole model, EMA and optimizer states (collectives on every rank); rank 0 writes the checkpoint."""
    model_state = distributed.full_model_state(model, env)
    ema_state = ema.state_dict(env)
    optim_state = distributed.full_optimizer_state(model, opt, env)
    n_bad_images = bad.total()
    if env.is_main:
        state.grad_scaler = precision.scaler.state_dict() if precision.scaler is not None else None
        rs = state.state_dict(global_batch=global_batch, world_size=env.world_size, global_seed=args.global_seed,
                              bad_images=n_bad_images)
        path, deleted = ckpt.save_checkpoint(
            run_dir, ckpt.checkpoint_name(state.epoch, state.global_step), model_state=model_state,
            ema_state=ema_state, optimizer_state=optim_state, running_states=rs, keep=args.ckpt_keep,
            protect=(resumed_from,) if resumed_from else ())
        log.info(f"saved checkpoint {path}" + (f"; deleted {', '.join(deleted)} (--ckpt_keep {args.ckpt_keep})"
                                              if deleted else ""))
    distributed.barrier(env)


def fid_evaluator(args, dataset, run_dir: str, env):
    """--eval_every: the FID of EMA samples (rank 0 samples and scores; the others wait), or None."""
    if not args.eval_every:
        return None
    from ..eval.periodic import PeriodicFID

    features = args.eval_features if args.eval_features != "auto" else \
        ("digits" if args.dataset == "digits" else "inception")
    return distributed.on_rank0(lambda: PeriodicFID(
        features=features, inception=args.inception, reference=args.eval_reference, dataset=dataset, run_dir=run_dir,
        num_samples=args.eval_samples, cfg_scale=args.eval_cfg_scale, seed=args.global_seed, device=env.device), env)


def evaluate_fid(evaluator, model, space: Space, step: int, num_classes: int, precision, args, env, log,
                 objective) -> None:
    """``model``: the EMA model on rank 0 (None elsewhere)."""
    if env.is_main:
        t0 = time.perf_counter()
        fid = evaluator(step, model, space, num_classes=num_classes, device=env.device, precision=precision,
                        objective=objective)
        log.metrics(step, {"fid": fid})
        log.info(f"step {step}: FID {fid:.3f} ({evaluator.name} features, {args.eval_samples} EMA samples, cfg "
                 f"{args.eval_cfg_scale}; {time.perf_counter() - t0:.1f} s)")
    distributed.barrier(env)


def write_final_grid(model, space: Space, dataset, precision, args, env, run_dir: str, log, objective) -> None:
    """samples.png: --final_samples EMA samples per class (rank 0; ``model`` is None elsewhere)."""
    from ..sampling.generate import describe_settings, quick_sampler
    from ..sampling.grid import write_sample_grid

    if env.is_main:
        path = os.path.join(run_dir, "samples.png")
        write_sample_grid(path, model, space, num_classes=dataset.num_classes, class_names=dataset.class_names,
                          per_class=args.final_samples, cfg_scale=args.final_cfg_scale, device=env.device,
                          seed=args.global_seed, precision=precision, objective=objective)
        sampling = dict(quick_sampler(objective), cfg_scale=args.final_cfg_scale)
        log.info(f"wrote {args.final_samples} EMA samples per class ({describe_settings(sampling)}) to {path}")
