#!/usr/bin/env bash
# Round-trip check: a bertrt-written model directory must load in Hugging Face
# transformers (BertForSequenceClassification + AutoTokenizer; a LoRA adapter
# directory through PEFT: the base model + PeftModel.from_pretrained) and give
# the same probabilities as `bertrt predict` (max abs diff <= 1e-4, same
# labels, same token ids). See scripts/hf_roundtrip.py.
#
# Usage: bench/hf-roundtrip.sh [MODEL_DIR [TEXTS_FILE]]
#        bench/hf-roundtrip.sh --lora
#   Without MODEL_DIR, fine-tunes a tiny model first (1 epoch on ~570 VADER
#   movie+Amazon training rows, ~1 minute on 2 cores) into target/roundtrip-model.
#   A MODEL_DIR holding adapters (adapter_config.json) is loaded through PEFT.
#   --lora: the same tiny fine-tune with LoRA (--lora-rank 8 --lr 1e-3), saved
#   merged (--merge-lora, target/roundtrip-lora-merged: a plain model) and as
#   PEFT adapters (target/roundtrip-lora), each checked; regression and
#   multi-label adapters (VADER score; [label, domain]); then, where WNUT-16
#   data is found, a token classifier (1 epoch on every 8th training
#   sentence) as adapters and merged (target/roundtrip-lora-ner[-merged])
#   through scripts/hf_roundtrip_ner.py. ~2-3 minutes on 2 cores; prints a
#   summary (worst difference per variant) and exits 1 if any fails.
# Builds nothing: needs target/release/bertrt (cargo build --release) or $BERTRT.
# Sets up bench/.venv on first use (bench/setup-venv.sh, ~2 minutes, 1.7 GB).
# Environment: BERTRT (default target/release/bertrt), VADER_DIR (default
#   assets/data/vader, else ../shared/data/vader-sentiment-4domains),
#   WNUT_DIR (default ../shared/data/wnut16-ner), HF_ROUNDTRIP_TOL (default 1e-4).
set -euo pipefail
cd "$(dirname "$0")/.."

export BERTRT="${BERTRT:-target/release/bertrt}"
[[ -x "$BERTRT" ]] || { echo "hf-roundtrip: $BERTRT not found; run: cargo build --release" >&2; exit 1; }

lora=
if [[ "${1:-}" == "--lora" ]]; then
    lora=1
    shift
    [[ $# -eq 0 ]] || { echo "hf-roundtrip: --lora takes no MODEL_DIR (a MODEL_DIR with adapters is checked through PEFT by itself)" >&2; exit 2; }
fi

bench/setup-venv.sh

if [[ $# -ge 1 ]]; then
    exec bench/.venv/bin/python scripts/hf_roundtrip.py "$@"
fi

data="${VADER_DIR:-assets/data/vader}"
[[ -f "$data/movies.jsonl" ]] || data=../shared/data/vader-sentiment-4domains
[[ -f "$data/movies.jsonl" ]] || { echo "hf-roundtrip: no VADER data (scripts/fetch-assets.sh or set VADER_DIR)" >&2; exit 1; }
base=assets/models/all-MiniLM-L6-v2
[[ -f "$base/model.safetensors" ]] || { echo "hf-roundtrip: $base missing (scripts/fetch-assets.sh --model-only)" >&2; exit 1; }
work=target/roundtrip-data
mkdir -p "$work"
# every 20th training row / every 10th dev row of movies + amazon
grep -h '"split": "train"' "$data/movies.jsonl" "$data/amazon.jsonl" | awk 'NR % 20 == 0' > "$work/train.jsonl"
grep -h '"split": "dev"' "$data/movies.jsonl" "$data/amazon.jsonl" | awk 'NR % 10 == 0' | head -160 > "$work/valid.jsonl"

# finetune OUT [FLAGS...]: the tiny 1-epoch fine-tune into OUT.
finetune() {
    local out="$1"
    shift
    echo "hf-roundtrip: fine-tuning $base on $(wc -l < "$work/train.jsonl") rows (1 epoch${*:+, $*}) -> $out"
    rm -rf "$out"
    "$BERTRT" finetune --model "$base" --train "$work/train.jsonl" --valid "$work/valid.jsonl" \
        --out "$out" --epochs 1 --quiet "$@" > "$work/finetune-$(basename "$out").json"
}

if [[ -z "$lora" ]]; then
    finetune target/roundtrip-model --lr 1e-4
    exec bench/.venv/bin/python scripts/hf_roundtrip.py target/roundtrip-model
fi

lora_flags=(--lora-rank 8 --lr 1e-3)
results=()
failed=0
# check NAME SCRIPT MODEL_DIR: runs the check, keeps its output, records the verdict.
check() {
    local name="$1" script="$2" dir="$3" log="$work/check-$1.log" verdict
    echo "hf-roundtrip: checking $name ($dir)"
    if bench/.venv/bin/python "$script" "$dir" > "$log" 2>&1; then verdict=PASS; else verdict=FAIL; failed=1; fi
    grep -v '^\[load\]' "$log"
    results+=("$(printf '%-18s %-4s %s' "$name" "$verdict" "$(grep -o 'worst max|d[a-z]*| [^ ]*' "$log" || true)")")
}

finetune target/roundtrip-lora-merged "${lora_flags[@]}" --merge-lora
check lora-merged scripts/hf_roundtrip.py target/roundtrip-lora-merged
finetune target/roundtrip-lora "${lora_flags[@]}"
check lora-adapter scripts/hf_roundtrip.py target/roundtrip-lora

# The other sequence problem types as adapters (PEFT's base load must get
# problem_type from config.json): VADER's score as regression, and
# [label, domain] as multi-label.
finetune target/roundtrip-lora-regression "${lora_flags[@]}" --task regression --label-column score
check lora-regression scripts/hf_roundtrip.py target/roundtrip-lora-regression
for split in train valid; do
    python3 -c 'import json, sys
for line in sys.stdin:
    row = json.loads(line)
    print(json.dumps({"text": row["text"], "label": [row["label"], row["domain"]]}))' \
        < "$work/$split.jsonl" > "$work/multi-$split.jsonl"
done
out=target/roundtrip-lora-multi
echo "hf-roundtrip: fine-tuning $base multi-label ([label, domain]; 1 epoch, ${lora_flags[*]}) -> $out"
rm -rf "$out"
"$BERTRT" finetune --task multi-label --model "$base" --train "$work/multi-train.jsonl" \
    --valid "$work/multi-valid.jsonl" --out "$out" --epochs 1 --quiet "${lora_flags[@]}" \
    > "$work/finetune-roundtrip-lora-multi.json"
check lora-multi scripts/hf_roundtrip.py "$out"

wnut="${WNUT_DIR:-../shared/data/wnut16-ner}/wnut16_train.jsonl"
if [[ -f "$wnut" ]]; then
    grep '"split": "train"' "$wnut" | awk 'NR % 8 == 0' > "$work/ner-train.jsonl"
    grep '"split": "dev"' "$wnut" | awk 'NR % 8 == 0' > "$work/ner-valid.jsonl"
    for merge in "" --merge-lora; do
        out=target/roundtrip-lora-ner${merge:+-merged}
        echo "hf-roundtrip: fine-tuning $base as a token classifier on $(wc -l < "$work/ner-train.jsonl") WNUT-16 sentences (1 epoch, ${lora_flags[*]}${merge:+ $merge}) -> $out"
        rm -rf "$out"
        "$BERTRT" finetune --task token-classification --model "$base" --train "$work/ner-train.jsonl" \
            --valid "$work/ner-valid.jsonl" --out "$out" --epochs 1 --quiet "${lora_flags[@]}" $merge \
            > "$work/finetune-$(basename "$out").json"
        check "lora-ner${merge:+-merged}" scripts/hf_roundtrip_ner.py "$out"
    done
else
    results+=("lora-ner           skipped: no $wnut (set WNUT_DIR)")
fi

echo
echo "hf-roundtrip --lora summary:"
printf '  %s\n' "${results[@]}"
exit "$failed"
