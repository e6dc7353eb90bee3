#!/usr/bin/env bash
# CUDA paths the CPU suite cannot reach, in one short call: the GPU tests, then train.py on a CIFAR-10 fixture with
# bf16 + flash attention + gradient checkpointing and with fp16 (grad scaler), then sample_dit / sample_ddp from the
# run in bf16 with flash attention; then the reliability / evaluation paths on CUDA: an fp16 digits run with an injected
# NaN step and in-training FID, VAE feature extraction + --dataset latents with a tiny random VAE, and the FID
# Inception network's throughput (random weights). Logs go to $OUT when set.
set -uo pipefail
OUT=${OUT:-/tmp/opendit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 OPENDIT_OFFLINE=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
W=$(mktemp -d)
echo "== gpu tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3
$PY -c "from test_data import write_cifar; write_cifar('$W/data', per_batch=32)"
status=0
for prec in "bf16 --enable_flashattn --grad_checkpoint" "fp16"; do
  echo "== train.py $prec"
  timeout 150 $PY scripts/dit/train.py --dataset cifar10 --data_path $W/data --image_size 32 --model DiT-S/2 \
      --mixed_precision $prec --batch_size 32 --max_steps 30 --log_every 10 --device cuda --outputs $W/runs \
      --final_samples 2 > $W/train.log 2>&1 || { status=1; echo "train.py FAILED"; }
  tr '\r' '\n' < $W/train.log | grep -E "\] step 30|GFLOP|wrote|error|Error|Traceback" | cut -c1-200
done
RUN=$(ls -d $W/runs/*-DiT-S-2 | head -n 1)
echo "== sample_dit / sample_ddp (bf16, flash) from $RUN"
timeout 120 $PY scripts/dit/sample_dit.py --ckpt $RUN --mixed_precision bf16 --enable_flashattn --sampler dpm-solver++ \
    --num_sampling_steps 20 --out $OUT/grid.png 2>&1 | tail -1 || status=1
timeout 120 $PY scripts/dit/sample_ddp.py --ckpt $RUN --mixed_precision bf16 --enable_flashattn --num_samples 256 \
    --per_proc_batch_size 128 --num_sampling_steps 50 --sample_dir $W/samples 2>&1 | tail -1 || status=1
$PY -c "import numpy as np; d=np.load('$W/samples.npz'); print('npz', d['arr_0'].shape, d['arr_0'].dtype, d['arr_1'][:5])"
cp $RUN/log.txt $OUT/train_log.txt 2>/dev/null

echo "== fp16 digits run: NaN injected at step 5, FID every 20 steps (digits features)"
OPENDIT_FAULT=nan_loss@5 timeout 150 $PY scripts/dit/train.py --dataset digits --model DiT-N/2 --mixed_precision fp16 \
    --batch_size 256 --max_steps 40 --log_every 10 --eval_every 20 --eval_samples 500 --device cuda \
    --outputs $W/digits > $W/digits.log 2>&1 || { status=1; echo "digits run FAILED"; }
tr '\r' '\n' < $W/digits.log | grep -E "non-finite|FID|step 40|error|Traceback" | cut -c1-200

echo "== extract_features (CUDA, tiny VAE) + --dataset latents"
$PY -c "
import diffusers, torch
torch.manual_seed(0)
diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',)*2,
    up_block_types=('UpDecoderBlock2D',)*2, block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
    norm_num_groups=32, sample_size=32).save_pretrained('$W/vae')"
timeout 120 $PY scripts/dit/extract_features.py --dataset cifar10 --data_path $W/data --image_size 32 --vae $W/vae \
    --features_path $W/feats --device cuda 2>&1 | tail -1 || status=1
timeout 120 $PY scripts/dit/train.py --dataset latents --data_path $W/feats --model DiT-S/2 --batch_size 32 \
    --max_steps 20 --log_every 10 --device cuda --outputs $W/lat 2>&1 | tr '\r' '\n' | grep -E "step 20|error|Traceback" \
    | cut -c1-200 || status=1

echo "== FID Inception forward throughput (random weights, fp32, 256 px uint8 input)"
$PY -c "
import time, torch
from opendit.eval.inception import FIDInceptionV3
net = FIDInceptionV3().cuda().eval()
x = torch.randint(0, 256, (200, 3, 256, 256), dtype=torch.uint8, device='cuda')
with torch.no_grad():
    for _ in range(2): net(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5): net(x)
    torch.cuda.synchronize()
print(f'{5 * 200 / (time.perf_counter() - t):.0f} img/s at batch 200')"
exit $status
