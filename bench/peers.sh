#!/usr/bin/env bash
# bertrt against its CPU peers, back to back in one run on this machine:
#   inference: ONNX Runtime fp32 (plain export and the ORT transformer
#              optimizer's fused graph) and ORT quantize_dynamic int8, vs
#              bertrt fp32, bf16 and INT8 (`cargo bench --bench encoder`), batch 1
#              at seq 16..512 and 32 x 128;
#   training:  PyTorch fp32 and bf16 autocast vs bertrt fp32 and bf16
#              (`cargo bench --bench train`), batch 16 x seq 128.
# Prints one table of p50/p95/p99 with the ratio bertrt/peer per shape, then
# the training samples/s and ratios. Run it on a quiet machine (every figure
# shares the box with nothing else).
#
# Inference runs in ROUNDS rounds (default 2), bertrt then ORT in each, and
# each side's figures per shape are those of its round with the lower p50:
# this host's speed drifts by 10-40% over minutes (shared VM), so one pass
# of each could compare a fast period with a slow one. Takes about 20
# minutes with 2 rounds on 2 cores.
#
# Usage: [ROUNDS=n] bench/peers.sh [OUT_DIR]   (default target/peers; keeps
# the raw JSON of every round)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/peers}"
mkdir -p "$out"
bench/setup-venv.sh
scripts/fetch-assets.sh
model=assets/models/all-MiniLM-L6-v2
py=bench/.venv/bin/python
threads=2

rounds="${ROUNDS:-2}"

echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$rounds"); do
  echo "== round $round of $rounds: bertrt encoder (cargo bench --bench encoder)"
  cargo bench --quiet --bench encoder > "$out/bertrt-encoder-r$round.log" 2>&1 || {
    cat "$out/bertrt-encoder-r$round.log"; exit 1; }
  cp target/bench-encoder.json "$out/bertrt-encoder-r$round.json"
  echo "== round $round of $rounds: ONNX Runtime (bench/ort_latency.py)"
  "$py" bench/ort_latency.py --model "$model" --work target/ort --threads "$threads" \
    --json "$out/ort-r$round.json" 2> "$out/ort-r$round.stderr"
done

echo "== bertrt training (cargo bench --bench train)"
cargo bench --quiet --bench train 2>&1 | grep 'samples/s' | tee "$out/bertrt-train.txt"
echo "== PyTorch training (bench/pytorch_train_speed.py)"
"$py" bench/pytorch_train_speed.py --model "$model" --threads "$threads" --json \
  | tee "$out/pytorch-train.txt"
tail -n 1 "$out/pytorch-train.txt" > "$out/pytorch-train.json"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" "$rounds" <<'PY'
import json, re, sys
out, rounds = sys.argv[1], int(sys.argv[2])
ours_runs = [json.load(open(f"{out}/bertrt-encoder-r{i}.json")) for i in range(1, rounds + 1)]
ort_runs = [json.load(open(f"{out}/ort-r{i}.json")) for i in range(1, rounds + 1)]
ours = ours_runs[0]

def by_shape(runs):
    """Per shape, the row of the round with the lowest p50."""
    best = {}
    for rows in runs:
        for r in rows:
            key = (r["batch"], r["seq"])
            if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
                best[key] = r
    return best

def mine(part):
    return by_shape([(run[part]["shapes"] if part else run["shapes"]) for run in ours_runs])

def peer(variant):
    return by_shape([run["variants"][variant] for run in ort_runs])

print(f"p50 per shape: each side's best of {rounds} interleaved round(s); p50s per round:")
for i, (o, r) in enumerate(zip(ours_runs, ort_runs), 1):
    print(f"  round {i}: bertrt int8 " + " ".join(f"{x['p50_ms']:.2f}" for x in o["int8"]["shapes"])
          + " | ORT int8 " + " ".join(f"{x['p50_ms']:.2f}" for x in r["variants"]["int8"]))

def table(title, mine, peers):
    print(f"\n{title}")
    head = f"{'shape':>7} | {'bertrt p50/p95/p99 ms':>24}"
    for name in peers:
        head += f" | {name + ' p50/p95/p99 ms':>30} {'ratio':>6}"
    print(head)
    for shape, r in mine.items():
        line = f"{shape[0]:>2}x{shape[1]:<4} | {r['p50_ms']:7.2f} {r['p95_ms']:7.2f} {r['p99_ms']:7.2f}  "
        for name, rows in peers.items():
            p = rows.get(shape)
            if p is None:
                line += f" | {'-':>30} {'-':>6}"
                continue
            line += (f" | {p['p50_ms']:9.2f} {p['p95_ms']:9.2f} {p['p99_ms']:9.2f}  "
                     f"{r['p50_ms'] / p['p50_ms']:6.2f}")
        print(line)

print(f"bertrt: {ours.get('backend', '?')}; onnxruntime {ort_runs[0]['onnxruntime']}")
print("ratio = bertrt p50 / peer p50 (below 1: bertrt faster)")
table("fp32", mine(None), {"ORT-optimized": peer("fp32-opt"), "ORT plain": peer("fp32")})
if "bf16" in ours:
    table("bf16 (bertrt) vs fp32 (ORT has no bf16 CPU kernels here)", mine("bf16"),
          {"ORT-optimized": peer("fp32-opt")})
if "int8" in ours:
    table("int8", mine("int8"), {"ORT int8": peer("int8")})

train = {}
for line in open(f"{out}/bertrt-train.txt"):
    m = re.search(r"(Fp32|Bf16) matmuls: p50 [\d.]+ s, ([\d.]+) samples/s", line)
    if m:
        train[m.group(1).lower()] = float(m.group(2))
torch_rows = json.load(open(f"{out}/pytorch-train.json"))
print("\ntraining, batch 16 x seq 128, samples/s")
for mode, peer in [("fp32", "fp32"), ("bf16", "bf16")]:
    theirs = torch_rows["results"][peer]["samples_per_s"]
    mine = train.get(mode)
    ratio = f"{mine / theirs:.2f}" if mine else "-"
    print(f"  {mode}: bertrt {mine or '-'}  PyTorch {theirs:.2f}  ratio {ratio}")
PY
