"""The settings of a training run (scripts/dit/train.py, ``opendit train``), in sections. Each setting is one field:
default, help, flag, and its resume class (RUN: defines the run; CHANGE: may change on resume; MACHINE: this
session's machine; see opendit.config.fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, UNIT_FLOAT, float_flag, int_flag
from ..objectives import FLOW_SETTINGS, MEANFLOW_SETTINGS, OBJECTIVES
from ..precision import PRECISIONS
from ..training.optim import OPTIMIZERS
from ..transport import PATHS, PREDICTIONS, TIME_SAMPLINGS
from .fields import CHANGE, MACHINE, RUN, Config, section, setting

from ..parallelize import PLUGINS
DATASETS = ("cifar10", "imagefolder", "digits", "latents")


@dataclass
class ModelSettings:
    model: str = setting("DiT-XL/2", "one of opendit.models.DiT_models (DiT-XL/2 ... DiT-S/8, DiT-T/*, DiT-N/*)",
                         resume=RUN)
    # block options of the LightningDiT lineage (names as there); each off by default = the published DiT
    use_rmsnorm: bool = setting(False, "RMSNorm (learnable weight) in place of the blocks' LayerNorm", resume=RUN)
    use_swiglu: bool = setting(False, "SwiGLU feed-forward (hidden width 2/3 of the MLP's)", resume=RUN)
    use_rope: bool = setting(False, "2-D rotary position embedding of queries and keys", resume=RUN)
    use_qknorm: bool = setting(False, "per-head norm of queries and keys (RMSNorm with --use_rmsnorm)", resume=RUN)
    wo_shift: bool = setting(False, "adaLN modulation without the shift terms", resume=RUN)
    wo_pos_embed: bool = setting(False, "no absolute sin-cos position embedding (needs --use_rope)", resume=RUN)

    @property
    def block_options(self) -> dict:
        return {k: bool(getattr(self, k)) for k in ("use_rmsnorm", "use_swiglu", "use_rope", "use_qknorm",
                                                     "wo_shift", "wo_pos_embed")}


@dataclass
class DataSettings:
    dataset: str = setting(
        "cifar10", "cifar10, imagefolder, digits (scikit-learn's 8x8 digits, offline) or latents (a folder written by "
        "scripts/dit/extract_features.py: VAE posteriors of images and their flips; the VAE is the extraction's)",
        resume=RUN)
    data_path: str = setting("./datasets", "cifar10: folder holding cifar-10-batches-py/; imagefolder: "
                                           "root/<class>/<images>", resume=CHANGE)
    image_size: int | None = setting(None, "training resolution (default: 8 for digits, 256 otherwise)",
                                     type=POSITIVE_INT, resume=RUN)
    num_classes: int | None = setting(None, "taken from the dataset when omitted; must agree with it",
                                      type=POSITIVE_INT, resume=RUN)
    vae: str = setting("auto", "auto (pixels up to 64 px, else ema), ema, mse, none, or a diffusers AutoencoderKL "
                               "folder", resume=RUN)
    latent_norm: bool = setting(
        False, "--dataset latents: normalize the latents per channel, (z - mean) / std with the data set's statistics "
               "(LightningDiT's latent_norm), instead of scaling them by the VAE's factor", resume=RUN)
    latent_multiplier: float = setting(1.0, "with --latent_norm: times this (default 1)", type=POSITIVE_FLOAT,
                                       resume=RUN)
    num_workers: int = setting(4, "data-loading workers (image folders; in-memory data needs none)", type=NONNEG_INT,
                               resume=MACHINE)
    on_bad_image: str = setting(
        "skip", "imagefolder: an unreadable file is skipped (replaced by the next image, counted, named in a warning) "
                "or stops the run", choices=["skip", "error"], resume=CHANGE)


@dataclass
class ObjectiveSettings:
    objective: str = setting(
        "diffusion", "diffusion: the DiT recipe (DDPM, epsilon + learned variance); flow: flow matching on an "
                     "interpolation path (SiT), time from noise (0) to data (1); meanflow: MeanFlow, 1-2 step "
                     "sampling (the average velocity over [t, r])", choices=OBJECTIVES, resume=RUN)
    path_type: str = setting("Linear", "flow: the interpolation path", choices=list(PATHS), resume=RUN)
    prediction: str = setting("velocity", "flow: what the model predicts", choices=list(PREDICTIONS), resume=RUN)
    loss_weight: str | None = setting(None, "flow: weighting of noise/score losses",
                                      choices=["velocity", "likelihood"], resume=RUN)
    train_eps: float | None = setting(None, "flow: keep training t this far from singular ends (default: 0 for "
                                            "velocity on Linear/GVP, else 1e-3; VP 1e-5)", type=UNIT_FLOAT, resume=RUN)
    sample_eps: float | None = setting(None, "flow: the same for sampling (default 0, 1e-3)", type=UNIT_FLOAT,
                                       resume=RUN)
    time_sampling: str = setting("uniform", "flow: how training draws t: uniform, or logit_normal (sigmoid of "
                                            "N(--time_mean, --time_std))", choices=list(TIME_SAMPLINGS), resume=RUN)
    time_mean: float = setting(0.0, "flow: mean of the logit-normal t", type=float_flag(), resume=RUN)
    time_std: float = setting(1.0, "flow: std of the logit-normal t", type=POSITIVE_FLOAT, resume=RUN)
    cosine_loss: float = setting(0.0, "flow: add LightningDiT's cosine velocity loss 1 - cos(v_pred, u_t) with this "
                                      "weight (alone: 1.0)", type=NONNEG_FLOAT, nargs="?", const=1.0, resume=RUN)

    # MeanFlow (--objective meanflow): the released code's names and defaults; p_mean, p_std, t_start and t_end are on
    # its time axis (t = 1 noise)
    p_mean: float = setting(-0.4, "meanflow: t and r are sigmoid(N(p_mean, p_std)) on the released axis (t = 1 noise)",
                            type=float_flag(), resume=RUN)
    p_std: float = setting(1.0, "meanflow: see --p_mean", type=POSITIVE_FLOAT, resume=RUN)
    data_proportion: float = setting(0.75, "meanflow: the fraction of each batch with r = t (plain flow matching)",
                                     type=UNIT_FLOAT, resume=RUN)
    omega: float = setting(1.0, "meanflow: guidance trained in, the velocity's weight: omega v + (1 - omega - kappa) "
                                "v_uncond + kappa v_cond (omega 1, kappa 0: none)", type=NONNEG_FLOAT, resume=RUN)
    kappa: float = setting(0.5, "meanflow: the conditional prediction's weight in that mix", type=NONNEG_FLOAT,
                           resume=RUN)
    t_start: float = setting(0.0, "meanflow: guidance trained in for t in [t_start, t_end] (released axis)",
                             type=UNIT_FLOAT, resume=RUN)
    t_end: float = setting(1.0, "meanflow: see --t_start", type=UNIT_FLOAT, resume=RUN)
    norm_p: float = setting(1.0, "meanflow: adaptive loss weight 1 / (loss + norm_eps)^norm_p", type=NONNEG_FLOAT,
                            resume=RUN)
    norm_eps: float = setting(0.01, "meanflow: see --norm_p", type=POSITIVE_FLOAT, resume=RUN)

    FLOW_ONLY = tuple(FLOW_SETTINGS)  # the settings a flow run records (opendit.objectives)
    MEANFLOW_ONLY = tuple(MEANFLOW_SETTINGS)


@dataclass
class OptimSettings:
    batch_size: int = setting(2, "per process (a resumed run keeps its global batch: per process x processes)",
                              type=POSITIVE_INT, resume=RUN)
    global_seed: int = setting(0, "the run's seed (weights, data order, every step's noise)", type=SEED, resume=RUN)
    lr: float = setting(1e-4, "", type=POSITIVE_FLOAT, resume=CHANGE)
    lr_schedule: str = setting("constant", "constant (the published recipe) or cosine decay to 0 at the last step",
                               choices=["constant", "cosine"], resume=CHANGE)
    warmup_steps: int = setting(0, "linear learning-rate warmup from 0", type=NONNEG_INT, resume=CHANGE)
    epochs: int = setting(1400, "", type=POSITIVE_INT, resume=CHANGE)
    max_steps: int | None = setting(None, "stop after this many optimizer steps in total", type=POSITIVE_INT,
                                    resume=CHANGE)
    optimizer: str = setting(
        "adamw", "adamw (as DiT, no weight decay) or muon: Muon on the transformer blocks' 2-D weights (momentum 0.95, "
                 "Nesterov, 5 Newton-Schulz steps, scaled to AdamW's RMS so --lr carries over) and AdamW on the rest",
        choices=OPTIMIZERS, resume=RUN)
    adam_beta2: float = setting(0.999, "AdamW's beta2 (0.999 as DiT; LightningDiT: 0.95)", type=float_flag(0.0, 0.9999),
                                resume=RUN)
    optimizer_impl: str = setting(
        "auto", "AdamW's kernels: fused (bad steps are skipped on the device: no host sync per step) or foreach (the "
                "step's flags are read on the host); auto: fused on GPUs, foreach on CPUs",
        choices=["auto", "fused", "foreach"], resume=MACHINE)
    grad_clip: float = setting(1.0, "max global gradient norm; 0 = off", type=NONNEG_FLOAT, resume=CHANGE)
    ema_decay: float = setting(0.9999, "", type=UNIT_FLOAT, resume=CHANGE)
    ema_std: float | None = setting(
        None, "EDM2's power-function EMA, replacing --ema_decay: the averaging profile's width as a fraction of the "
              "steps so far (relative std; EDM2: 0.05, 0.10), so it fits any run length; decay (1 - 1/k)^(gamma+1) "
              "after step k", type=float_flag(0.0, 12 ** -0.5, lo_open=True), resume=CHANGE)
    max_bad_steps: int = setting(10, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                     "(each is skipped); 0 = never", type=NONNEG_INT, resume=CHANGE)


@dataclass
class AlignmentSettings:
    repa_encoder: str | None = setting(
        None, "REPA: align the DiT's tokens with this frozen encoder's patch features: dinov2-vit-b (published), "
              "dinov2-vit-s/l/g[-reg], digits (the bundled digits classifier), package.module:factory; comma-separated "
              "for several. Off by default", resume=RUN)
    repa_encoder_weights: str | None = setting(
        None, "REPA: the encoder's weights file (DINOv2: dinov2_vitb14_pretrain.pth; default: the torch hub cache); "
              "comma-separated, one per encoder", resume=MACHINE)
    repa_depth: int = setting(8, "REPA: align the tokens after this block (1 = the first)", type=POSITIVE_INT,
                              resume=RUN)
    repa_lambda: float = setting(0.5, "REPA: weight of the alignment loss", type=NONNEG_FLOAT, resume=CHANGE)
    repa_projector_dim: int = setting(2048, "REPA: hidden width of the projector MLP", type=POSITIVE_INT, resume=RUN)


@dataclass
class ScheduleSettings:
    outputs: str = setting("./outputs", "run directories are created here as NNN-<model>", resume=MACHINE)
    load: str | None = setting(
        None, "resume: a checkpoint directory, a run directory (its newest intact checkpoint), or 'auto' (the newest "
              "run of this --model under --outputs that has a checkpoint; a new run when there is none). The run's "
              "settings come with it: seed, model, data set, image size, VAE and global batch must not differ; flags "
              "not given take the run's values; others (lr, max_steps, ...) are applied and recorded in history.jsonl. "
              "Fine-tune: weights without a training state (an `opendit export` folder, hf://OWNER/NAME, a "
              ".safetensors or .pt file, a published checkpoint's name) start a new run from them, with their "
              "architecture and objective unless flags say",
        resume=MACHINE)
    log_every: int = setting(10, "", type=POSITIVE_INT, resume=CHANGE)
    ckpt_every: int = setting(1000, "", type=POSITIVE_INT, resume=CHANGE)
    ckpt_keep: int = setting(3, "keep the newest K checkpoints of the run's current branch (0 = all); the one just "
                                "written and the one resumed from are never deleted", type=NONNEG_INT, resume=CHANGE)
    wandb: bool = setting(False, "also log to Weights & Biases: the losses, learning rate, FID and sample grids the "
                                 "run logs to TensorBoard, the run's config; files under RUN/wandb/ (needs the wandb "
                                 "package)", resume=MACHINE)
    wandb_project: str = setting("opendit", "the W&B project", resume=MACHINE)
    wandb_mode: str = setting("auto", "online, offline (no network: `wandb sync RUN/wandb/offline-run-*` later), or "
                                      "auto (WANDB_MODE, else online)", choices=["auto", "online", "offline"],
                              resume=MACHINE)
    config: str | None = setting(None, "a TOML recipe file setting any of these flags (keys without dashes); the "
                                       "command line overrides it (see recipes/)", resume=MACHINE)


@dataclass
class EvaluationSettings:
    eval_every: int = setting(
        0, "every N steps: FID of --eval_samples EMA samples (20 model evaluations: DPM-Solver++ 20 steps, or flow "
           "Heun on 11 points) against --eval_reference, logged as 'fid' (rank 0 samples; the others wait); 0 = off",
        type=NONNEG_INT, resume=CHANGE)
    eval_samples: int = setting(1000, "", type=int_flag(2), resume=CHANGE)
    eval_cfg_scale: float = setting(1.0, "", type=NONNEG_FLOAT, resume=CHANGE)
    eval_features: str = setting("auto", "auto (digits for --dataset digits, else inception), inception, digits, or "
                                         "package.module:factory", resume=CHANGE)
    eval_reference: str | None = setting(None, "an .npz (images or mu/sigma statistics) or an image folder; default: "
                                               "10,000 training images", resume=CHANGE)
    inception: str | None = setting(None, "the FID Inception weights file (default: the torch hub cache)",
                                    resume=MACHINE)
    final_samples: int = setting(0, "after training, write samples.png with this many EMA samples per class",
                                 type=NONNEG_INT, resume=CHANGE)
    final_cfg_scale: float = setting(4.0, "guidance scale of that grid", type=NONNEG_FLOAT, resume=CHANGE)


@dataclass
class MachineSettings:
    device: str = setting("auto", "", choices=["auto", "cpu", "cuda"], resume=MACHINE)
    plugin: str = setting("zero2", "zero2: FSDP2, weights gathered once per step, gradients and optimizer state "
                                   "sharded; fsdp: full sharding (ZeRO-3); ddp: replicated (one process: no wrapper)",
                          choices=PLUGINS, resume=MACHINE)
    mixed_precision: str = setting("bf16", "autocast dtype (fp32 master weights)", choices=list(PRECISIONS),
                                   resume=CHANGE)
    grad_reduce_dtype: str = setting("fp32", "dtype of the gradient all-reduce / reduce-scatter across processes",
                                     choices=["fp32", "bf16"], resume=CHANGE)
    grad_checkpoint: bool = setting(False, "recompute each block in the backward pass (less memory)", resume=MACHINE)
    enable_flashattn: bool = setting(False, "flash / cuDNN attention only (CUDA, bf16/fp16)", resume=MACHINE)
    enable_layernorm_kernel: bool = setting(False, "Triton LayerNorm (CUDA)", resume=MACHINE)
    enable_modulate_kernel: bool = setting(False, "Triton LayerNorm fused with the adaLN modulation (CUDA)",
                                           resume=MACHINE)
    compile: bool = setting(False, "torch.compile each transformer block", resume=MACHINE)


@dataclass
class TrainConfig(Config):
    """Everything a training run is told."""

    model: ModelSettings = section(ModelSettings, "model")
    data: DataSettings = section(DataSettings, "data")
    objective: ObjectiveSettings = section(ObjectiveSettings, "objective")
    optim: OptimSettings = section(OptimSettings, "optimization")
    alignment: AlignmentSettings = section(AlignmentSettings, "alignment (REPA)")
    schedule: ScheduleSettings = section(ScheduleSettings, "schedule and logging")
    evaluation: EvaluationSettings = section(EvaluationSettings, "evaluation")
    machine: MachineSettings = section(MachineSettings, "machine")
