#!/usr/bin/env bash
# Real-data runs for the task heads and training strategies, all-MiniLM-L6-v2,
# default recipe unless a row says otherwise, several seeds, trained on
# `train`, selected on `dev`, reported on `test` (mean +- std over seeds):
#   sms         SMS spam: spam F1 with and without balanced class weights and
#               dev-tuned decision thresholds (13% spam)
#   trec        TREC-6 question type: accuracy and macro-F1
#   regression  VADER tweets `score` (-4..+4): Pearson, Spearman, RMSE
#   strategies  VADER movies+amazon with 500 training examples: full
#               fine-tuning vs --freeze-bottom 4 vs gradual unfreezing vs
#               LoRA rank 8 (query, value)
# Reads the JSONL files of ../shared/data (see DATA.md; every row carries its
# split); DATA_DIR overrides. Takes about an hour on 2 cores for all of them.
#
# Usage: bench/tasks-e2e.sh [TASKS=sms,trec,regression,strategies] [SEEDS=1,2,3] [extra finetune flags...]
# Environment: DATA_DIR, WORK (default target/tasks-e2e), BERTRT (a built
# binary; default: build target/release/bertrt), ROWS (comma list: run only
# these rows), TUNE_LRS (see run below).
set -euo pipefail
cd "$(dirname "$0")/.."
tasks="${1:-sms,trec,regression,strategies}"
seeds="${2:-1,2,3}"
shift 2 || shift $# || true
data="${DATA_DIR:-../shared/data}"
[[ -d $data ]] || { echo "no data directory $data (set DATA_DIR)" >&2; exit 1; }
scripts/fetch-assets.sh
bertrt="${BERTRT:-target/release/bertrt}"
[[ -n ${BERTRT:-} ]] || cargo build --release --quiet
model=assets/models/all-MiniLM-L6-v2
work="${WORK:-target/tasks-e2e}"
mkdir -p "$work"
results="$work/results.jsonl"

# split FILE NAME TEXT LABEL: NAME-{train,dev,test}.jsonl with "text" and
# "label" keys.
split() {
  python3 - "$@" "$work" <<'PY'
import json, sys
src, name, text, label, out = sys.argv[1:6]
rows = [json.loads(l) for l in open(src)]
for part in ["train", "dev", "test"]:
    items = [{"text": r[text], "label": r[label]} for r in rows if r["split"] == part]
    with open(f"{out}/{name}-{part}.jsonl", "w") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
PY
}

# score ROW MODEL SEED [eval flags...]: evaluates MODEL on the test split of
# the current task, appends one result line.
score() {
  local row=$1 model=$2 seed=$3
  shift 3
  "$bertrt" eval --model "$model" --data "$work/$name-test.jsonl" "$@" \
    | python3 -c "
import json, sys
r = json.load(sys.stdin)
keep = {k: r[k] for k in ('accuracy', 'macro_f1', 'pearson', 'spearman', 'rmse') if k in r}
if 'per_class' in r and 'spam' in r['per_class']:
    keep['spam_f1'] = r['per_class']['spam']['f1']
print(json.dumps({'row': '$row', 'seed': $seed, **keep}))" >> "$results"
  echo "$row seed $seed: $(tail -n 1 "$results")"
}

# train ROW SEED [finetune flags...]: trains the current task's model for
# one seed into $work/model-ROW-seedSEED.
train() {
  local row=$1 seed=$2
  shift 2
  "$bertrt" finetune --model "$model" --train "$work/$name-train.jsonl" \
    --valid "$work/$name-dev.jsonl" --out "$work/model-$row-seed$seed" --seed "$seed" \
    --quiet "$@" > "$work/summary-$row-seed$seed.json"
}

# dev_score ROW SEED: the selection metric of the checkpoint kept, on dev.
dev_score() {
  python3 -c "
import json, sys
best = json.load(open(sys.argv[1]))['best']
print(best['dev'][best['metric']])" "$work/summary-$1-seed$2.json"
}

# run NAME ROW [finetune flags...]: trains NAME per seed as row ROW and scores
# each model on NAME-test. With TUNE_LRS (e.g. "3e-5,1e-4,2e-4") the first
# seed is trained at each learning rate, the one with the best dev score is
# kept (its first-seed model is reused) and the other seeds use it; test is
# never looked at while choosing. With ARGMAX_ROW set, the same model is
# scored a second time under that row with its tuned threshold ignored
# (binary thresholds are tuned after training, so they do not change the
# weights).
run() {
  name=$1
  local row=$2 lr_flags=()
  shift 2
  [[ -z ${ROWS:-} || ,$ROWS, == *,$row,* ]] || return 0
  local first=${seeds%%,*}
  if [[ -n ${TUNE_LRS:-} ]]; then
    local best_lr="" best=""
    for lr in ${TUNE_LRS//,/ }; do
      train "$row-lr$lr" "$first" "$@" --lr "$lr"
      local dev
      dev=$(dev_score "$row-lr$lr" "$first")
      echo "$row lr $lr seed $first: dev $dev" | tee -a "$work/lr-sweep.txt"
      if [[ -z $best ]] || python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$dev" "$best"; then
        best=$dev best_lr=$lr
      fi
    done
    echo "$row: lr $best_lr chosen on dev ($best)" | tee -a "$work/lr-sweep.txt"
    lr_flags=(--lr "$best_lr")
    rm -rf "$work/model-$row-seed$first"
    mv "$work/model-$row-lr$best_lr-seed$first" "$work/model-$row-seed$first"
    cp "$work/summary-$row-lr$best_lr-seed$first.json" "$work/summary-$row-seed$first.json"
  fi
  for seed in ${seeds//,/ }; do
    if [[ -z ${TUNE_LRS:-} || $seed != "$first" ]]; then
      train "$row" "$seed" "$@" "${lr_flags[@]}"
    fi
    score "$row" "$work/model-$row-seed$seed" "$seed"
    if [[ -n ${ARGMAX_ROW:-} ]]; then
      score "$ARGMAX_ROW" "$work/model-$row-seed$seed" "$seed" --argmax
    fi
  done
}

: > "$results"
for task in ${tasks//,/ }; do
  case $task in
    sms)
      split "$data/sms-spam/sms_spam.jsonl" sms text label
      ARGMAX_ROW=sms-no-thresholds run sms sms-default "$@"
      ARGMAX_ROW=sms-class-weights run sms sms-class-weights+thresholds --class-weights balanced "$@"
      ;;
    trec)
      split "$data/trec-questions/trec.jsonl" trec text coarse
      run trec trec6 "$@"
      ;;
    regression)
      split "$data/vader-sentiment-4domains/tweets.jsonl" tweets-score text score
      run tweets-score tweets-regression --task regression "$@"
      ;;
    strategies)
      python3 - "$data/vader-sentiment-4domains" "$work" <<'PY'
import json, random, sys
src, out = sys.argv[1:3]
rows = [json.loads(l) for d in ["movies", "amazon"] for l in open(f"{src}/{d}.jsonl")]
for part in ["train", "dev", "test"]:
    items = [{"text": r["text"], "label": r["label"]} for r in rows if r["split"] == part]
    if part == "train":
        random.Random(0).shuffle(items)
        items = items[:500]
    with open(f"{out}/reviews500-{part}.jsonl", "w") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
PY
      run reviews500 500-full --epochs 5 "$@"
      run reviews500 500-freeze-bottom-4 --epochs 5 --freeze-bottom 4 "$@"
      run reviews500 500-gradual-unfreezing --unfreeze-schedule "head:1,top2:1,top6:1,all:2" "$@"
      # LoRA wants a larger lr than full fine-tuning (5e-4 provisional: tune on dev).
      # LoRA trains far fewer weights and wants a ~10x larger lr: tune it
      # (TUNE_LRS=3e-4,1e-3,3e-3).
      run reviews500 500-lora-r8 --epochs 5 --lora-rank 8 "$@"
      ;;
    *) echo "unknown task $task (sms, trec, regression, strategies)" >&2; exit 1 ;;
  esac
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
order = list(dict.fromkeys(r["row"] for r in rows))
metrics = ["spam_f1", "macro_f1", "accuracy", "pearson", "spearman", "rmse"]
print(f"{'run':<30} " + " ".join(f"{m:>17}" for m in metrics) + "  seeds")
for name in order:
    rs = [r for r in rows if r["row"] == name]
    cells = []
    for m in metrics:
        v = [r[m] for r in rs if m in r]
        if not v:
            cells.append(f"{'-':>17}")
            continue
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        cells.append(f"{statistics.mean(v):>9.4f} +- {sd:.4f}")
    print(f"{name:<30} " + " ".join(cells) + f"  {len(rs)}")
PY
