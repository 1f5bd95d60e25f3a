#!/usr/bin/env bash
# Build .device/ (git-ignored): what benchmarks/gpu_check.sh needs on a GPU machine that reaches no network
# (issue 17, point 5). That machine has Python 3.12 with PyTorch, peft's needs and an older transformers, but
# neither this project's pins nor the data nor the default model. The kit holds:
#   .device/whl/    wheels of transformers and peft at this project's pins (pure Python; installed there with
#                   pip --no-index into /tmp/site);
#   .device/data/   the E2E train, dev and test files (read from ../shared/data, never committed);
#   .device/model/  the default model's config and tokenizer, without weights: gpu_check.sh makes random weights
#                   of the same shapes there (speed does not depend on the values; 538 MB of weights would not
#                   travel).
# About 25 MB, under the device tool's 64 MiB. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.device
PY=${PYTHON:-.venv/bin/python}
DATA=${PREFIXTUNE_SHARED_DATA:-../shared/data}
mkdir -p "$KIT/whl" "$KIT/data/e2e" "$KIT/model"
pin() { grep -o "\"$1[^\"]*\"" pyproject.toml | head -1 | tr -d '"'; }
for spec in "$(pin 'transformers>=')" "$(pin 'peft>=')"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$KIT/whl" "$spec"
done
install -m 644 "$DATA"/e2e/{trainset.csv,devset.csv,testset_w_refs.csv} "$KIT/data/e2e/"
install -m 644 "$DATA/SOURCES.md" "$KIT/data/"
MODEL=$("$PY" -c "from prefixtune.base import convert_default_model; print(convert_default_model())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$MODEL/$f" ] && cp "$MODEL/$f" "$KIT/model/"
done
du -sh "$KIT"
