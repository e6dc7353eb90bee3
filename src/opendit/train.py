"""Train a class-conditional DiT: the command line of scripts/dit/train.py and ``opendit train``.

    python scripts/dit/train.py --dataset digits --model DiT-S/2 --mixed_precision fp32       # one process
    torchrun --standalone --nproc_per_node=2 scripts/dit/train.py --model DiT-XL/2 --batch_size 2 --num_classes 10

The training itself is opendit.training.trainer.train (read it top to bottom).
"""

from __future__ import annotations

import sys

from .alignment import add_alignment_flags
from .errors import (NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, UNIT_FLOAT, ArgumentParser, float_flag,
                     int_flag)
from .objectives import add_objective_flags
from .parallelize import PLUGINS
from .precision import PRECISIONS
from .program import run_main
from .recipes import add_config_flag, parse_with_config
from .training.run_settings import given_flags
from .training.trainer import train


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
    a("--adam_beta2", type=float_flag(0.0, 0.9999), default=0.999, help="AdamW's beta2 (0.999 as DiT; LightningDiT: 0.95)")
    a("--optimizer_impl", default="auto", choices=["auto", "fused", "foreach"],
      help="AdamW's kernels: fused (bad steps are skipped on the device: no host sync per step) or foreach (the "
           "step's flags are read on the host); auto: fused on GPUs, foreach on CPUs")
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
    a("--plugin", default="zero2", choices=PLUGINS,
      help="zero2: FSDP2, weights gathered once per step, gradients and optimizer state sharded; fsdp: full sharding "
           "(ZeRO-3); ddp: replicated (one process: no wrapper)")
    a("--grad_reduce_dtype", default="fp32", choices=["fp32", "bf16"],
      help="dtype of the gradient all-reduce / reduce-scatter across processes")
    a("--mixed_precision", default="bf16", choices=list(PRECISIONS), help="autocast dtype (fp32 master weights)")
    a("--grad_checkpoint", action="store_true", help="recompute each block in the backward pass (less memory)")
    a("--enable_flashattn", action="store_true", help="flash / cuDNN attention only (CUDA, bf16/fp16)")
    a("--enable_layernorm_kernel", action="store_true", help="Triton LayerNorm (CUDA)")
    a("--enable_modulate_kernel", action="store_true", help="Triton LayerNorm fused with the adaLN modulation (CUDA)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    # block options of the LightningDiT lineage (names as there); each off by default = the published DiT
    a("--use_rmsnorm", action="store_true", help="RMSNorm (learnable weight) in place of the blocks' LayerNorm")
    a("--use_swiglu", action="store_true", help="SwiGLU feed-forward (hidden width 2/3 of the MLP's)")
    a("--use_rope", action="store_true", help="2-D rotary position embedding of queries and keys")
    a("--use_qknorm", action="store_true", help="per-head norm of queries and keys (RMSNorm with --use_rmsnorm)")
    a("--wo_shift", action="store_true", help="adaLN modulation without the shift terms")
    a("--wo_pos_embed", action="store_true", help="no absolute sin-cos position embedding (needs --use_rope)")
    a("--vae", default="auto", help="auto (pixels up to 64 px, else ema), ema, mse, none, or a diffusers AutoencoderKL folder")
    a("--latent_norm", action="store_true",
      help="--dataset latents: normalize the latents per channel, (z - mean) / std with the data set's statistics "
           "(LightningDiT's latent_norm), instead of scaling them by the VAE's factor")
    a("--latent_multiplier", type=POSITIVE_FLOAT, default=1.0, help="with --latent_norm: times this (default 1)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--final_samples", type=NONNEG_INT, default=0, help="after training, write samples.png with this many EMA samples per class")
    a("--final_cfg_scale", type=NONNEG_FLOAT, default=4.0, help="guidance scale of that grid")
    a("--eval_every", type=NONNEG_INT, default=0,
      help="every N steps: FID of --eval_samples EMA samples (20 model evaluations: DPM-Solver++ 20 steps, or flow Heun "
           "on 11 points) against --eval_reference, logged "
           "as 'fid' (rank 0 samples; the others wait); 0 = off")
    a("--eval_samples", type=int_flag(2), default=1000)
    a("--eval_cfg_scale", type=NONNEG_FLOAT, default=1.0)
    a("--eval_features", default="auto", help="auto (digits for --dataset digits, else inception), inception, digits, "
                                              "or package.module:factory")
    a("--eval_reference", default=None,
      help="an .npz (images or mu/sigma statistics) or an image folder; default: 10,000 training images")
    a("--inception", default=None, help="the FID Inception weights file (default: the torch hub cache)")
    add_objective_flags(p)
    add_alignment_flags(p)
    add_config_flag(p)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()

    def body(_) -> int:  # inside run_main: a bad --config file is one line too
        args, effective = parse_with_config(parser, argv, section="train")
        return train(args, given=given_flags(parser, effective), command=[sys.argv[0], *argv])

    return run_main(body, None)


if __name__ == "__main__":
    sys.exit(main())
