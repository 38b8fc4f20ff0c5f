#!/usr/bin/env bash
# The main job on the default model and data. Until fine-tuning lands, this
# embeds examples/sentences.txt with all-MiniLM-L6-v2 and prints each
# sentence's nearest neighbour by cosine similarity.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh --model-only
model=assets/models/all-MiniLM-L6-v2
cargo build --release --quiet
target/release/bertrt info --model "$model"
target/release/bertrt embed --model "$model" --normalize --input examples/sentences.txt \
  > target/demo-embeddings.jsonl
python3 - examples/sentences.txt target/demo-embeddings.jsonl <<'PY'
import json, sys
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()
vecs = [json.loads(line)["embedding"] for line in open(sys.argv[2])]
print(f"\n{len(vecs)} embeddings of dimension {len(vecs[0])}; nearest neighbours:")
for i, v in enumerate(vecs):
    sims = [(sum(a * b for a, b in zip(v, w)), j) for j, w in enumerate(vecs) if j != i]
    best, j = max(sims)
    print(f"  {best:.3f}  {texts[i]!r}\n         -> {texts[j]!r}")
PY
