#!/usr/bin/env bash
# Issue 17's GPU rows in one short run (under 10 minutes, about 6 expected, on an H100/H200; gpu_check.sh calls it too):
#   the GPU-only test of the CUDA-graph sampler; DiT-XL/2 @256 DPM-Solver++ 20 with guidance 4: eager at batch 64
#   (everywhere, interval [0.3, 1], TaylorSeer cache) and compiled + CUDA graphs at batch 128; the training step with
#   and without its host sync (DiT-XL/2 batch 128, bf16, eager blocks: compiling XL would take minutes of the budget).
# Goals (BENCHMARKS.md): sampling >= 50% of the bf16 bound (>= 52 img/s for DPM-Solver++ 20 with guidance, batch
# >= 64); training >= 45% MFU at batch 128. Run from the repository root:  bash benchmarks/gpu_sampling.sh
set -uo pipefail
OUT=${OUT:-/tmp/opendit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== GPU test: CUDA-graph replay gives the eager bf16 samples"
timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_sampling.py 2>&1 | tail -3 | tee "$OUT/fast_tests.log"
cd benchmarks
echo "== sampling DiT-XL/2 @256 batch 64, DPM-Solver++ 20, cfg 4: eager"
timeout 90 $PY sample_throughput.py --model DiT-XL/2 --image_size 256 --batch 64 --samplers DPM-Solver++ \
    2>&1 | tee "$OUT/sample_eager_b64.log"
echo "== sampling DiT-XL/2 @256 batch 128, DPM-Solver++ 20, cfg 4: compiled + CUDA graphs"
timeout 240 $PY sample_throughput.py --model DiT-XL/2 --image_size 256 --batch 128 --samplers DPM-Solver++ \
    --compile --cuda_graphs 2>&1 | grep -v Warning | tee "$OUT/sample_graphs_b128.log"
echo "== training step: host guard vs sync-free, DiT-XL/2 @256 batch 128, bf16"
timeout 120 $PY step_sync.py --model DiT-XL/2 --image_size 256 --batch 128 --steps 10 --repeats 2 \
    2>&1 | tee "$OUT/step_sync.log"
