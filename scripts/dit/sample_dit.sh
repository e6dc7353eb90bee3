#!/usr/bin/env bash
# The spec's inference command: a grid from a DiT-XL/2 checkpoint at 256 px (10 classes, e.g. CIFAR-10).
# CKPT=path/to/ema.pt (or a run directory) bash scripts/dit/sample_dit.sh [more flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python scripts/dit/sample_dit.py \
    --model DiT-XL/2 \
    --image_size 256 \
    --num_classes 10 \
    --ckpt "${CKPT:-outputs}" \
    "$@"
