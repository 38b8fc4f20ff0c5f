#!/usr/bin/env bash
# Named-entity recognition on real data: all-MiniLM-L6-v2 fine-tuned as a
# token classifier on WNUT-16 (noisy tweets, 10 entity types, BIO tags):
# trained on the train split, the checkpoint selected by dev entity F1,
# scored on the test split with entity-level (seqeval) precision/recall/F1.
# Prints test entity F1 per seed and mean +- std.
#
# Usage: bench/wnut-ner.sh [SEEDS=1,2,3] [extra finetune flags...]
# Environment: WNUT_DIR (default ../shared/data/wnut16-ner: one JSON Lines
#   file whose `split` field says train/dev/test), EPOCHS (default 10: mean
#   dev entity F1 over 3 seeds 0.505 at 10 epochs vs 0.460 at 5, see
#   bench/results/wnut-ner-*), LR (default 2e-4: MiniLM-L6 is small; at 5e-5
#   one epoch predicted only O, at 2e-4 two epochs reached dev F1 0.35),
#   BERTRT (default target/release/bertrt, built here).
# Takes about 5 minutes per seed on 2 cores; not a CI test.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-1,2,3}"
shift || true
data="${WNUT_DIR:-../shared/data/wnut16-ner}"
[[ -f "$data/wnut16_train.jsonl" ]] || { echo "wnut-ner: no $data/wnut16_train.jsonl (set WNUT_DIR)" >&2; exit 1; }
model=assets/models/all-MiniLM-L6-v2
[[ -f "$model/model.safetensors" ]] || scripts/fetch-assets.sh --model-only
bertrt="${BERTRT:-target/release/bertrt}"
if [[ -z "${BERTRT:-}" ]]; then
  cargo build --release --quiet
fi
work=target/wnut-ner
mkdir -p "$work"
# The files' `split` field is the split (trust it over any README).
python3 - "$data/wnut16_train.jsonl" "$work" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
files = {s: open(f"{out}/{s}.jsonl", "w") for s in ["train", "dev", "test"]}
for line in open(src, encoding="utf-8"):
    row = json.loads(line)
    files[row["split"]].write(json.dumps({"tokens": row["tokens"], "tags": row["tags"]}, ensure_ascii=False) + "\n")
for s, f in files.items():
    f.close()
PY
echo "wnut-ner: $(wc -l < "$work/train.jsonl") train, $(wc -l < "$work/dev.jsonl") dev, $(wc -l < "$work/test.jsonl") test sentences"
results="$work/results.jsonl"
: > "$results"
for seed in ${seeds//,/ }; do
  out="$work/model-seed$seed"
  start=$(date +%s)
  "$bertrt" finetune --task token-classification --model "$model" \
    --train "$work/train.jsonl" --valid "$work/dev.jsonl" --out "$out" --seed "$seed" \
    --epochs "${EPOCHS:-10}" --lr "${LR:-2e-4}" "$@" > "$work/summary-seed$seed.json"
  seconds=$(( $(date +%s) - start ))
  "$bertrt" eval --model "$out" --data "$work/test.jsonl" > "$work/test-seed$seed.json"
  python3 - "$work/summary-seed$seed.json" "$work/test-seed$seed.json" "$seed" "$seconds" >> "$results" <<'PY'
import json, sys
summary, test = (json.load(open(p)) for p in sys.argv[1:3])
print(json.dumps({"seed": int(sys.argv[3]), "train_seconds": int(sys.argv[4]),
                  "best_epoch": summary["best"]["epoch"], "dev_f1": summary["best"]["dev"]["entity_f1"],
                  "test_f1": test["entity_f1"], "test_precision": test["entity_precision"],
                  "test_recall": test["entity_recall"]}))
PY
  tail -1 "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'seed':>4} {'best epoch':>10} {'dev F1':>7} {'test P':>7} {'test R':>7} {'test F1':>8} {'train s':>8}")
for r in rows:
    print(f"{r['seed']:>4} {r['best_epoch']:>10} {r['dev_f1']:>7.4f} {r['test_precision']:>7.4f} "
          f"{r['test_recall']:>7.4f} {r['test_f1']:>8.4f} {r['train_seconds']:>8}")
f1 = [r["test_f1"] for r in rows]
std = statistics.stdev(f1) if len(f1) > 1 else 0.0
print(f"test entity F1 (seqeval): {statistics.mean(f1):.4f} +- {std:.4f} over {len(f1)} seed(s)")
PY
