#!/usr/bin/env bash
# Issue 17, point 5: the CUDA tests, bench_train and bench_decode on a lent GPU, in bf16, in one call that fits
# the device tool's 10-minute limit (each phase has its own time limit, so one hang costs only its phase).
#
# Here, once:    ./scripts/device_kit.sh          (builds .device/: pinned wheels, E2E data, the model's config)
# Through the device tool:
#                run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=590)
# Logs, tables and JSON lines land in $OUT (the tool brings them back). Settings: BATCH (training batch, 64),
# STEPS (timed training steps, 20), DEVICE (cuda), MODEL_SOURCE (config + tokenizer folder, .device/model),
# DECODE_ARGS (more bench_decode options). A dry run on a CPU with a tiny model:
#   PYTHON=.venv/bin/python DEVICE=cpu BATCH=2 STEPS=1 MODEL_SOURCE=/tmp/tiny-config \
#     DECODE_ARGS="--new-tokens 3 --batch1-inputs 1 --rows 3 --beam-inputs 3" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
BATCH=${BATCH:-64}
STEPS=${STEPS:-20}
DEVICE=${DEVICE:-cuda}
MODEL_SOURCE=${MODEL_SOURCE:-.device/model}
mkdir -p "$OUT"
[ -d .device/whl ] || { echo "no .device/: run ./scripts/device_kit.sh first and carry .device" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PREFIXTUNE_SHARED_DATA=$PWD/.device/data TOKENIZERS_PARALLELISM=false
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl ||
  exit 3
export PYTHONPATH=/tmp/site:$PWD
: >"$OUT/phases.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.txt"
rm -rf /tmp/model
"$PY" benchmarks/random_weights.py "$MODEL_SOURCE" /tmp/model || exit 4

phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/phases.txt"
}

phase tests 150 "$PY" -m pytest -q -x tests/test_cuda.py tests/test_lean.py tests/test_generation.py
phase train 220 "$PY" benchmarks/bench_train.py --device "$DEVICE" --dtype bf16 --model /tmp/model \
  --data .device/data/e2e --batch-size "$BATCH" --steps "$STEPS" --warmup 3 \
  --systems prefixtune,prefixtune_grouped,peft,peft_grouped --output "$OUT/train-cuda.md"
# shellcheck disable=SC2086  # DECODE_ARGS: several options
phase decode 180 "$PY" benchmarks/bench_decode.py --device "$DEVICE" --dtype bf16 --model /tmp/model \
  --data .device/data/e2e --repeats 2 --output "$OUT/decode-cuda.md" ${DECODE_ARGS:-}
cat "$OUT/phases.txt"
