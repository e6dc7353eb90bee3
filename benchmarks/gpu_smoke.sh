#!/usr/bin/env bash
# CUDA paths the CPU suite cannot reach, in one short call: the GPU tests, then train.py on a CIFAR-10 fixture with
# bf16 + flash attention + gradient checkpointing and with fp16 (grad scaler), then sample_dit / sample_ddp from the
# run in bf16 with flash attention. Logs go to $OUT when set.
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
exit $status
