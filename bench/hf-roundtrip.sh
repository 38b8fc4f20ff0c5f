#!/usr/bin/env bash
# Round-trip check: a bertrt-written model directory must load in Hugging Face
# transformers (BertForSequenceClassification + AutoTokenizer) and give the
# same probabilities as `bertrt predict` (max abs diff <= 1e-4, same labels,
# same token ids). See scripts/hf_roundtrip.py.
#
# Usage: bench/hf-roundtrip.sh [MODEL_DIR [TEXTS_FILE]]
#   Without MODEL_DIR, fine-tunes a tiny model first (1 epoch on ~570 VADER
#   movie+Amazon training rows, ~1 minute on 2 cores) into target/roundtrip-model.
# Builds nothing: needs target/release/bertrt (cargo build --release) or $BERTRT.
# Sets up bench/.venv on first use (bench/setup-venv.sh, ~2 minutes, 1.7 GB).
# Environment: BERTRT (default target/release/bertrt), VADER_DIR (default
#   assets/data/vader, else ../shared/data/vader-sentiment-4domains),
#   HF_ROUNDTRIP_TOL (default 1e-4).
set -euo pipefail
cd "$(dirname "$0")/.."

export BERTRT="${BERTRT:-target/release/bertrt}"
[[ -x "$BERTRT" ]] || { echo "hf-roundtrip: $BERTRT not found; run: cargo build --release" >&2; exit 1; }

bench/setup-venv.sh

if [[ $# -ge 1 ]]; then
    model="$1"
    shift
else
    data="${VADER_DIR:-assets/data/vader}"
    [[ -f "$data/movies.jsonl" ]] || data=../shared/data/vader-sentiment-4domains
    [[ -f "$data/movies.jsonl" ]] || { echo "hf-roundtrip: no VADER data (scripts/fetch-assets.sh or set VADER_DIR)" >&2; exit 1; }
    base=assets/models/all-MiniLM-L6-v2
    [[ -f "$base/model.safetensors" ]] || { echo "hf-roundtrip: $base missing (scripts/fetch-assets.sh --model-only)" >&2; exit 1; }
    work=target/roundtrip-data
    model=target/roundtrip-model
    mkdir -p "$work"
    # every 20th training row / every 10th dev row of movies + amazon
    grep -h '"split": "train"' "$data/movies.jsonl" "$data/amazon.jsonl" | awk 'NR % 20 == 0' > "$work/train.jsonl"
    grep -h '"split": "dev"' "$data/movies.jsonl" "$data/amazon.jsonl" | awk 'NR % 10 == 0' | head -160 > "$work/valid.jsonl"
    echo "hf-roundtrip: fine-tuning $base on $(wc -l < "$work/train.jsonl") rows (1 epoch) -> $model"
    "$BERTRT" finetune --model "$base" --train "$work/train.jsonl" --valid "$work/valid.jsonl" \
        --out "$model" --epochs 1 --lr 1e-4 --quiet > "$work/finetune.json"
fi

exec bench/.venv/bin/python scripts/hf_roundtrip.py "$model" "$@"
