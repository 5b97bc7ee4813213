#!/usr/bin/env bash
# Measures the README's GPU targets in one run (about 10.5 minutes on one H200, 2026-12-04): training images/s of the
# seed's 256² configuration under each speed option, the loader's supply rate, and the seconds per image of a
# 5-member DPM-Solver++ 20-step ensemble, eager and compiled. Built-in synthetic data; the model for the sampling
# rows is trained for one step (latency does not depend on the weights).
#
#   bash scripts/gpu_targets.sh [REPORT_DIR]          # reports (markdown tables and a log) go to REPORT_DIR
#
# Environment: PYTHON (python3), WORK (scratch folder, /tmp/gpu_targets), DEVICE (cuda), SIZE (256),
# WIDTH (128), BATCH (16), WORKERS (8), STEPS (timed training steps, 15), IMAGES (sampled test images, 24),
# PARTS (train,sample: both halves; under a 10-minute limit per command run PARTS=train, then PARTS=sample, each
# about 5.5 minutes).
# A CPU dry run of the whole flow: DEVICE=cpu SIZE=16 WIDTH=8 BATCH=2 WORKERS=0 STEPS=1 IMAGES=2 bash scripts/gpu_targets.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_targets}
REPORT=${1:-$WORK/report}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
WIDTH=${WIDTH:-128}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-8}
STEPS=${STEPS:-15}
IMAGES=${IMAGES:-24}
PARTS=${PARTS:-train,sample}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$REPORT"
LOG="$REPORT/gpu_targets.log"

DATA=(--data_name SYNTHETIC --data_dir "$WORK/data")
NET=(--image_size "$SIZE" --num_channels "$WIDTH" --num_res_blocks 2 --attention_resolutions 16)
FAST=tf32+cudnn_benchmark+bf16+channels_last
if [ "$DEVICE" = cpu ]; then FAST=channels_last; fi  # the CUDA-only options are refused on a CPU

step() {  # step NAME COMMAND...: run it, log it, keep going when it fails (later steps still report)
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$LOG"
  if "$@" 2>&1 | tee -a "$LOG"; then echo "== $name: done" | tee -a "$LOG"; else echo "== $name: FAILED" | tee -a "$LOG"; fi
}

{ "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true; } | tee -a "$LOG"

if [[ ",$PARTS," == *,train,* ]]; then
# 1. the model's own speed (one batch kept on the device) under each option, and the loader alone
step train-options "$PY" scripts/benchmark_train.py "${DATA[@]}" "${NET[@]}" --batch_size "$BATCH" \
  --num_workers "$WORKERS" --device "$DEVICE" --warmup 3 --steps "$STEPS" --data memory,loader_only \
  --variants "fp32,tf32+cudnn_benchmark,tf32+cudnn_benchmark+bf16,$FAST" --out_dir "$WORK/train_options"
cp "$WORK/train_options/benchmark_train.md" "$REPORT/train_options.md" 2>/dev/null || true

# 2. real training speed through the loader, with and without torch.compile (compiling takes minutes)
step train-compile "$PY" scripts/benchmark_train.py "${DATA[@]}" "${NET[@]}" --batch_size "$BATCH" \
  --num_workers "$WORKERS" --device "$DEVICE" --warmup 5 --steps "$STEPS" --data loader \
  --variants "$FAST,$FAST+compile" --out_dir "$WORK/train_compile"
cp "$WORK/train_compile/benchmark_train.md" "$REPORT/train_compile.md" 2>/dev/null || true
fi

if [[ ",$PARTS," == *,sample,* ]]; then

# 3. 5-member DPM-Solver++ 20 steps: eager bf16, then compiled + channels_last
step checkpoint "$PY" scripts/segmentation_train.py "${DATA[@]}" "${NET[@]}" --out_dir "$WORK/model" \
  --batch_size 2 --max_steps 1 --save_interval 1 --num_workers 0 --device "$DEVICE"
for mode in eager compiled; do
  extra=()
  if [ $mode = compiled ]; then extra=(--compile True --channels_last True); fi
  step "sample-$mode" "$PY" scripts/benchmark_sampling.py --model_path "$WORK/model" --out_dir "$WORK/sample_$mode" \
    --configs dpm_solver++:20 --ensemble_check dpm_solver++:20 --num_ensemble 5 --batch_size 8 \
    --max_images "$IMAGES" --device "$DEVICE" "${extra[@]}"
  cp "$WORK/sample_$mode/benchmark.md" "$REPORT/sample_$mode.md" 2>/dev/null || true
done
fi
echo "reports in $REPORT: $(ls "$REPORT" | tr '\n' ' ')"
