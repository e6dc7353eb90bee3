#!/usr/bin/env bash
# The spec's training command: DiT-XL/2 on CIFAR-10 (256 px through the SD VAE), 2 processes on this node.
# Extra arguments are passed on, e.g.  bash scripts/dit/train_dit.sh --mixed_precision fp32 --max_steps 100
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
TORCHRUN=${TORCHRUN:-$([ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun)}  # the project's environment
exec "$TORCHRUN" --standalone --nproc_per_node="$NPROC" scripts/dit/train.py \
    --model DiT-XL/2 \
    --batch_size 2 \
    --num_classes 10 \
    "$@"
