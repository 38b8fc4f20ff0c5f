#!/usr/bin/env bash
# The main job on the default model and data: fine-tune all-MiniLM-L6-v2 on
# VADER movie + Amazon review sentiment (train split; dev for early stopping
# and calibration) with the default recipe, evaluate on the review test split
# and on tweets (domain shift), then classify a few sentences.
# Extra arguments go to `bertrt finetune` (e.g. --epochs 1 for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release --quiet
bertrt=target/release/bertrt
work=target/demo
mkdir -p "$work"
python3 - assets/data/vader "$work" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
def rows(domain):
    return [json.loads(l) for l in open(f"{src}/{domain}.jsonl")]
def dump(name, items):
    with open(f"{out}/{name}.jsonl", "w") as f:
        for r in items:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
reviews = rows("movies") + rows("amazon")
for split in ["train", "dev", "test"]:
    dump(f"reviews-{split}", [r for r in reviews if r["split"] == split])
dump("tweets-test", [r for r in rows("tweets") if r["split"] == "test"])
PY
$bertrt finetune --model assets/models/all-MiniLM-L6-v2 \
  --train "$work/reviews-train.jsonl" --valid "$work/reviews-dev.jsonl" \
  --out "$work/sentiment-model" "$@"
echo "== review test split (in domain)"
$bertrt eval --model "$work/sentiment-model" --data "$work/reviews-test.jsonl" --report
echo "== tweets test split (domain shift)"
$bertrt eval --model "$work/sentiment-model" --data "$work/tweets-test.jsonl" --report
echo "== predictions"
$bertrt predict --model "$work/sentiment-model" --input examples/sentences.txt
