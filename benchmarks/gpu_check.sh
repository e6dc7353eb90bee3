#!/usr/bin/env bash
# One prepared GPU session: environment, the test suite (GPU tests included), then the training and
# sampling benchmarks for DiT-XL/2 @256 (latents). Writes logs and BENCHMARKS.md to $OUT when set.
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/opendit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import flash_attn" 2>/dev/null && echo "flash_attn installed" || echo "flash_attn not installed (SDPA flash/cuDNN backends)"

echo "== tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -4

echo "== training throughput: reference vs fast"
timeout 300 $PY benchmarks/train_throughput.py --model DiT-XL/2 --image_size 256 --batch_sizes 16,32 \
    --steps 10 --warmup 3 --sample --sample_batch 32 2>&1 | tee "$OUT/train_ref_fast.log"
echo "== training throughput: fast at larger batches"
timeout 200 $PY benchmarks/train_throughput.py --model DiT-XL/2 --image_size 256 --batch_sizes 64,128 \
    --configs fast --steps 8 --warmup 2 2>&1 | tee "$OUT/train_fast.log"
echo "== LightningDiT blocks (RMSNorm, SwiGLU, RoPE) vs DiT blocks, DiT-XL/2 @256, fast, compiled, batch 128"
timeout 240 $PY benchmarks/train_throughput.py --model DiT-XL/2 --image_size 256 --batch_sizes 128 \
    --configs fast,fast-lightning --compile --steps 8 --warmup 3 2>&1 | tee "$OUT/train_lightning.log"
echo "== sampling throughput: DiT-XL/2 @256, batch 64, bf16, guidance 4.0 everywhere and in [0.3, 1]"
timeout 300 $PY benchmarks/sample_throughput.py --model DiT-XL/2 --image_size 256 --batch 64 --device cuda \
    2>&1 | tee "$OUT/sample_throughput.log"
echo "== issue 17: the fast sampling path and the sync-free training step"
bash benchmarks/gpu_sampling.sh
echo "== REPA's cost per step (DiT-XL/2 @256, batch 64, DINOv2-B shaped encoder, bf16)"
timeout 120 $PY benchmarks/repa_cost.py --model DiT-XL/2 --image_size 256 --batch_size 64 --encoder dinov2-vit-b \
    --repa_depth 8 --projector_dim 2048 --device cuda --precision bf16 --steps 10 --repeats 2 2>&1 | tee "$OUT/repa_cost.log"
echo "== issue 27: MeanFlow's step (JVP through the Triton attention kernel) against a flow step, DiT-XL/2 @256 latents"
timeout 240 $PY benchmarks/meanflow_step.py --model DiT-XL/2 --image_size 32 --channels 4 --batch 64 --device cuda \
    --steps 5 --repeats 2 2>&1 | tee "$OUT/meanflow_step.log"
echo "== issue 28: the fast recipe's step (flow + LightningDiT blocks, Muon) against the DiT recipe's, DiT-XL/2 latents"
timeout 180 $PY benchmarks/fast_recipe_step.py --model DiT-XL/2 --image_size 32 --channels 4 --batch 64 --device cuda \
    --steps 5 --repeats 2 2>&1 | tee "$OUT/fast_recipe_step.log"
cp BENCHMARKS.md "$OUT/" 2>/dev/null || true
