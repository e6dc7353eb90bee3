#!/usr/bin/env bash
# The spec's inference command, for any checkpoint: the model, image size and classes are read from the checkpoint.
# Set MODEL / IMAGE_SIZE / NUM_CLASSES to have them checked against it (the spec's example: DiT-XL/2, 256, 10).
#   CKPT=outputs/000-DiT-XL-2 bash scripts/dit/sample_dit.sh [more flags, e.g. --cfg_scale 1.5 --out grid.png]
#   CKPT=DiT-XL-2-256x256.pt bash scripts/dit/sample_dit.sh --guidance_channels 3   # a published checkpoint by name
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${CKPT:-}" ]; then
    echo "error: set CKPT to a checkpoint (a run directory, ema.pt, a .pt/.safetensors file or a published name)" >&2
    exit 2
fi
args=(--ckpt "$CKPT")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${IMAGE_SIZE:-}" ] && args+=(--image_size "$IMAGE_SIZE")
[ -n "${NUM_CLASSES:-}" ] && args+=(--num_classes "$NUM_CLASSES")
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # the project's environment
exec "$PYTHON" scripts/dit/sample_dit.py "${args[@]}" "$@"
