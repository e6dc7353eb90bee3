#!/usr/bin/env bash
# Kernels on the GPU in one call: the kernel tests compiled for real (no interpreter), then DiT-XL/2 @256 training
# throughput of the fast configuration with and without the fused LayerNorm+modulate kernel, compiled per block.
set -uo pipefail
OUT=${OUT:-/tmp/opendit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
PY=${PY:-python3}
echo "== kernel tests on CUDA"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not trainer" 2>&1 | tail -2
for extra in "--compile" "--compile --modulate_kernel"; do
  echo "== fast $extra"
  timeout 200 $PY benchmarks/train_throughput.py --model DiT-XL/2 --image_size 256 --batch_sizes 128 --configs fast \
      --steps 8 --warmup 3 $extra 2>&1 | grep -E "^ *[0-9]+ +fast|GFLOP"
done
cp BENCHMARKS.md "$OUT/"
