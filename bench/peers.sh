#!/usr/bin/env bash
# bertrt against its CPU peers, back to back in one run on this machine:
#   inference: ONNX Runtime fp32 (plain export and the ORT transformer
#              optimizer's fused graph) and ORT quantize_dynamic int8, vs
#              bertrt fp32, bf16 and INT8 (`cargo bench --bench encoder`), batch 1
#              at seq 16..512 and 32 x 128;
#   training:  PyTorch fp32 and bf16 autocast vs bertrt fp32 and bf16
#              (`cargo bench --bench train`), batch 16 x seq 128.
# Prints one table of p50/p95/p99 with the ratio bertrt/peer per shape, then
# the training samples/s and ratios. Takes about 15 minutes on 2 cores; run it
# on a quiet machine (every figure shares the box with nothing else).
#
# Usage: bench/peers.sh [OUT_DIR]   (default target/peers; keeps the raw JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/peers}"
mkdir -p "$out"
bench/setup-venv.sh
scripts/fetch-assets.sh
model=assets/models/all-MiniLM-L6-v2
py=bench/.venv/bin/python
threads=2

echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== bertrt encoder (cargo bench --bench encoder)"
cargo bench --quiet --bench encoder > "$out/bertrt-encoder.log" 2>&1 || {
  cat "$out/bertrt-encoder.log"; exit 1; }
cp target/bench-encoder.json "$out/bertrt-encoder.json"
echo "== ONNX Runtime (bench/ort_latency.py)"
"$py" bench/ort_latency.py --model "$model" --work target/ort --threads "$threads" \
  --json "$out/ort.json" 2> "$out/ort.stderr"

echo "== bertrt training (cargo bench --bench train)"
cargo bench --quiet --bench train 2>&1 | grep 'samples/s' | tee "$out/bertrt-train.txt"
echo "== PyTorch training (bench/pytorch_train_speed.py)"
"$py" bench/pytorch_train_speed.py --model "$model" --threads "$threads" --json \
  | tee "$out/pytorch-train.txt"
tail -n 1 "$out/pytorch-train.txt" > "$out/pytorch-train.json"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
ours = json.load(open(f"{out}/bertrt-encoder.json"))
ort = json.load(open(f"{out}/ort.json"))["variants"]

def by_shape(rows):
    return {(r["batch"], r["seq"]): r for r in rows}

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

print(f"bertrt: {ours.get('backend', '?')}; onnxruntime {json.load(open(f'{out}/ort.json'))['onnxruntime']}")
print("ratio = bertrt p50 / peer p50 (below 1: bertrt faster)")
table("fp32", by_shape(ours["shapes"]),
      {"ORT-optimized": by_shape(ort["fp32-opt"]), "ORT plain": by_shape(ort["fp32"])})
if "bf16" in ours:
    table("bf16 (bertrt) vs fp32 (ORT has no bf16 CPU kernels here)", by_shape(ours["bf16"]["shapes"]),
          {"ORT-optimized": by_shape(ort["fp32-opt"])})
if "int8" in ours:
    table("int8", by_shape(ours["int8"]["shapes"]), {"ORT int8": by_shape(ort["int8"])})

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
