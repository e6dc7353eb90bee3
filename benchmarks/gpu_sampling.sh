#!/usr/bin/env bash
# Issue 17's GPU rows in one short run (about 8 minutes on an H100/H200; gpu_check.sh calls it too):
#   the fast sampling path (compiled, CUDA graphs, batch 64 and 128) against eager for DiT-XL/2 @256 DPM-Solver++ 20
#   with guidance; the GPU-only test of the CUDA-graph sampler; the training step with and without its host sync.
# Goals (BENCHMARKS.md): sampling >= 50% of the bf16 bound (>= 52 img/s for DPM-Solver++ 20 with guidance, batch
# >= 64); training >= 45% MFU at batch 128. Run from the repository root:  bash benchmarks/gpu_sampling.sh
set -uo pipefail
OUT=${OUT:-/tmp/opendit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
cd benchmarks
echo "== GPU tests of the fast sampling path"
timeout 120 $PY -m pytest -q -p no:cacheprovider ../tests/test_fast_sampling.py 2>&1 | tail -3 | tee "$OUT/fast_tests.log"
for B in 64 128; do
  echo "== sampling DiT-XL/2 @256 batch $B, DPM-Solver++ 20, cfg 4: eager (with the cached-steps row)"
  timeout 150 $PY sample_throughput.py --model DiT-XL/2 --image_size 256 --batch $B --samplers DPM-Solver++ \
      2>&1 | tee "$OUT/sample_eager_b$B.log"
  echo "== the same, compiled + CUDA graphs"
  timeout 200 $PY sample_throughput.py --model DiT-XL/2 --image_size 256 --batch $B --samplers DPM-Solver++ \
      --compile --cuda_graphs 2>&1 | tee "$OUT/sample_graphs_b$B.log"
done
echo "== sampling, compiled without CUDA graphs, batch 64"
timeout 150 $PY sample_throughput.py --model DiT-XL/2 --image_size 256 --batch 64 --samplers DPM-Solver++ --compile \
    2>&1 | tee "$OUT/sample_compiled_b64.log"
echo "== training step: host guard vs sync-free, DiT-XL/2 @256 batch 128, bf16, compiled blocks"
timeout 200 $PY step_sync.py --model DiT-XL/2 --image_size 256 --batch 128 --compile --steps 15 --repeats 2 \
    2>&1 | tee "$OUT/step_sync.log"
