#!/usr/bin/env bash
# End-to-end fine-tuning on real data: all-MiniLM-L6-v2 on VADER movie +
# Amazon reviews (train/dev splits), tested on every domain's test split:
# reviews in-domain, tweets and NYT as domain shift. Default recipe, several
# seeds; prints test macro-F1 per domain as mean +- std.
#
# Usage: bench/vader-e2e.sh [SEEDS=1,2,3] [extra finetune flags...]
# Takes tens of minutes on 2 cores; not a CI test.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-1,2,3}"
shift || true
scripts/fetch-assets.sh
cargo build --release --quiet
data=assets/data/vader
work=target/vader-e2e
mkdir -p "$work"
python3 - "$data" "$work" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
rows = {d: [json.loads(l) for l in open(f"{src}/{d}.jsonl")] for d in ["movies", "amazon", "tweets", "nyt"]}
def dump(path, items):
    with open(path, "w") as f:
        for r in items:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
for split in ["train", "dev"]:
    dump(f"{out}/reviews-{split}.jsonl", [r for d in ["movies", "amazon"] for r in rows[d] if r["split"] == split])
for d, items in rows.items():
    dump(f"{out}/{d}-test.jsonl", [r for r in items if r["split"] == "test"])
PY
model=assets/models/all-MiniLM-L6-v2
results="$work/results.jsonl"
: > "$results"
for seed in ${seeds//,/ }; do
  out="$work/model-seed$seed"
  start=$(date +%s)
  target/release/bertrt finetune --model "$model" --train "$work/reviews-train.jsonl" \
    --valid "$work/reviews-dev.jsonl" --out "$out" --seed "$seed" "$@" > "$work/summary-seed$seed.json"
  echo "seed $seed trained in $(( $(date +%s) - start )) s"
  for domain in movies amazon tweets nyt; do
    target/release/bertrt eval --model "$out" --data "$work/$domain-test.jsonl" \
      | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'seed': $seed, 'domain': '$domain', 'macro_f1': r['macro_f1'], 'accuracy': r['accuracy'], 'ece': r['ece']}))" \
      >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'domain':<8} {'macro-F1 mean':>14} {'std':>7} {'accuracy':>9} {'ECE':>7}  seeds")
for d in ["movies", "amazon", "tweets", "nyt"]:
    r = [x for x in rows if x["domain"] == d]
    f1 = [x["macro_f1"] for x in r]
    std = statistics.stdev(f1) if len(f1) > 1 else 0.0
    print(f"{d:<8} {statistics.mean(f1):>14.4f} {std:>7.4f} {statistics.mean(x['accuracy'] for x in r):>9.4f} "
          f"{statistics.mean(x['ece'] for x in r):>7.4f}  {len(r)}")
PY
