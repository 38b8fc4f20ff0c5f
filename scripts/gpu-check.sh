#!/usr/bin/env bash
# GPU check for the CUDA backend: runs the prebuilt CUDA test binaries on a
# machine with an NVIDIA GPU (which has the driver, nvcc and python/torch but
# probably no cargo), then the PyTorch side of the training benchmark, and
# writes everything under $OUT.
#
# 1. Here, on a machine with cargo and nvcc (scripts/install-nvcc.sh):
#
#      scripts/gpu-check.sh --build
#
#    which runs `cargo test --release --test cuda --test cuda_train --no-run`
#    (each of tests/cuda.rs, tests/cuda_train.rs that exists) and copies the
#    test binaries to target/gpu/cuda-tests and target/gpu/cuda_train-tests
#    (stripped of debug info to travel light: the device call carries at most
#    64 MiB, the repository included, so it warns over 40 MiB; target/ is
#    gitignored, so nothing here gets committed).
#
# 2. On the GPU machine, from the repository root, with target/gpu carried
#    along (the device tool: carry ["target/gpu"], timeout_s 480):
#
#      scripts/gpu-check.sh [TEST_BINARY...]
#
#    Default binaries: target/gpu/*-tests, else the newest
#    target/release/deps/cuda-* and cuda_train-*. Tests run with
#    BERTRT_REQUIRE_CUDA=1, so "no device" is a failure here, not a skip, and
#    with --include-ignored, which adds the timing tests (forward, and
#    training: `timing: bertrt <model> <mode> train b32 s128: ...` lines).
#
#    Then the training benchmark's PyTorch side, bench/gpu_train_peer.py
#    (BERT-base and MiniLM-L6 shapes, batch 32 x seq 128, bf16 and fp16
#    autocast with SDPA, fp32 for MiniLM only to save time), on the same GPU
#    in the same run, and a side-by-side table (samples/s, bertrt/PyTorch,
#    peak memory) from both sides' `timing:` lines in summary.txt.
#
#    Output: $OUT (the device tool sets it; default bench/results/gpu-<date>),
#    7 files, within the device tool's 8 files coming back:
#      gpu-check.log        everything printed
#      nvidia-smi.txt
#      tests-<binary>.txt   one per test binary (cuda-tests, cuda_train-tests)
#      pytorch-train.txt    the PyTorch benchmark's output
#      pytorch-train.json   its results
#      summary.txt          test results, the GPU, timings, the training table
#    Exit status: 0 all passed; 1 a test binary failed; 2 no test binaries;
#    3 the tests passed but the PyTorch benchmark failed (summary.txt says so).
#
#    The MiniLM test needs the model: carry a copy (fp16 weights ~45 MB,
#    with tokenizer files) and set BERTRT_MINILM_DIR; without it that one
#    test prints a skip line and the others still run.
#
#    GPU_CHECK_SANITIZE=1 also runs the op tests under compute-sanitizer
#    (memcheck; Firecracker machines only, a few minutes, within the budget).
#    GPU_CHECK_ALLOW_SKIP=1: a dry run without a GPU (skips pass).
#    GPU_CHECK_PYTHON (default python3) runs the benchmark; GPU_CHECK_PEER_ARGS
#    adds arguments to it (a dry run here: "--device cpu --steps 1 --batch 2
#    --seq 16" with GPU_CHECK_PYTHON=bench/.venv/bin/python).
#
# Time: it must finish in under 8 minutes (the device call's timeout_s 480
# would cut it off before summary.txt is written), so every step has a limit
# and all of them are cut to fit one budget:
#   GPU_CHECK_BUDGET        450 s  the whole run; a step gets at most what is left
#   GPU_CHECK_TIMEOUT       150 s  each test binary (cuda-tests took 7 s on an H200)
#   GPU_CHECK_PEER_TIMEOUT  180 s  the PyTorch benchmark, kept aside while tests run
#   the rest (nvidia-smi, library lookup, table)  ~10 s, also kept aside
# Worst case: 10 + 260 (both binaries, the second cut short) + 180 = 450 s,
# plus up to 10 s for `timeout -k` to kill a step that ignores SIGTERM.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--build" ]]; then
    set -e
    # tests/cuda_train.rs may not exist on every branch: build what is there.
    test_names=()
    for name in cuda cuda_train; do
        [[ -f "tests/$name.rs" ]] && test_names+=("$name")
    done
    ((${#test_names[@]})) || { echo "no tests/cuda.rs or tests/cuda_train.rs" >&2; exit 1; }
    cargo_args=()
    for name in "${test_names[@]}"; do cargo_args+=(--test "$name"); done
    cargo test --release "${cargo_args[@]}" --no-run 2>&1 | tee /tmp/gpu-check-build.log
    mkdir -p target/gpu
    rm -f target/gpu/*-tests  # no stale binary of a test that is gone rides along
    for name in "${test_names[@]}"; do
        bin=$(grep -o "target/release/deps/$name-[0-9a-f]*" /tmp/gpu-check-build.log | tail -n 1)
        [[ -n "$bin" && -x "$bin" ]] || { echo "test binary for tests/$name.rs not found in cargo's output" >&2; exit 1; }
        cp "$bin" "target/gpu/$name-tests"
        strip --strip-debug "target/gpu/$name-tests"
        grep -qa 'attention_d32_f32' "target/gpu/$name-tests" \
            || echo "WARNING: target/gpu/$name-tests holds no kernels (built without nvcc?)" >&2
    done
    ls -l target/gpu/
    size_mib=$(( ($(du -sk target/gpu | cut -f1) + 1023) / 1024 ))
    echo "target/gpu: $size_mib MiB"
    if ((size_mib > 40)); then
        echo "WARNING: target/gpu is $size_mib MiB: the device call carries at most 64 MiB with the repository (~12 MiB)" >&2
    fi
    echo "carry [\"target/gpu\"] and run: scripts/gpu-check.sh (timeout_s 480)"
    exit 0
fi

OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
TIMEOUT="${GPU_CHECK_TIMEOUT:-150}"
PEER_TIMEOUT="${GPU_CHECK_PEER_TIMEOUT:-180}"
PYTHON="${GPU_CHECK_PYTHON:-python3}"
REST_RESERVE=10
deadline=$(($(date +%s) + ${GPU_CHECK_BUDGET:-450}))

# Seconds the next step may run: its own limit, cut so that `reserve` seconds
# of the budget stay for the steps after it.
step_limit() {
    local own=$1 reserve=$2
    local left=$((deadline - $(date +%s) - reserve))
    echo $((left < own ? left : own))
}
MIN_STEP=10  # a step with less time than this is not started

echo "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, output in $OUT"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') $(git status --porcelain 2>/dev/null | wc -l) changed files"
uname -a
for tool in cargo nvcc python3 compute-sanitizer; do
    printf '%-18s %s\n' "$tool:" "$(command -v "$tool" || echo 'not found')"
done
command -v nvcc >/dev/null && nvcc --version | tail -n 2

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null; then
    { nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv; } \
        | tee "$OUT/nvidia-smi.txt"
else
    echo "nvidia-smi not found" | tee "$OUT/nvidia-smi.txt"
fi

# cudarc dlopens libcuda.so(.1) and libcublas.so(.13/.12/.11): make sure the
# loader finds cuBLAS (the CUDA toolkit's, else the one PyTorch's wheels carry).
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    dirs=()
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib; do
        compgen -G "$d/libcublas.so*" >/dev/null && dirs+=("$d")
    done
    if command -v python3 >/dev/null; then
        while IFS= read -r d; do dirs+=("$d"); done < <(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "libcublas.so*"), recursive=True):
        d = os.path.dirname(lib)
        if d not in seen:
            seen.add(d)
            print(d)
EOF
        )
    fi
    if ((${#dirs[@]})); then
        LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
    fi
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
find_lib() {
    ldconfig -p 2>/dev/null | grep -m1 -o "/[^ ]*$1[^ ]*" && return
    local d IFS=:
    for d in ${LD_LIBRARY_PATH:-}; do
        compgen -G "$d/$1*" | head -n 1 | grep . && return
    done
    echo "not found"
}
echo "libcuda:   $(find_lib libcuda.so)"
echo "libcublas: $(find_lib libcublas.so)"

if (($#)); then
    bins=("$@")
else
    mapfile -t bins < <(ls target/gpu/*-tests 2>/dev/null)
    if ((${#bins[@]} == 0)); then
        for name in cuda cuda_train; do
            newest=""
            for file in target/release/deps/"$name"-*; do
                [[ -f "$file" && -x "$file" && "$file" != *.d ]] || continue
                [[ -z "$newest" || "$file" -nt "$newest" ]] && newest=$file
            done
            [[ -n "$newest" ]] && bins+=("$newest")
        done
    fi
fi
if ((${#bins[@]} == 0)); then
    echo "no test binaries: build them with scripts/gpu-check.sh --build and carry target/gpu" \
        | tee "$OUT/summary.txt"
    exit 2
fi

# `timing:` lines, also those that follow "test name ... " on the same line
# (the harness prints that before the test's own output under --nocapture).
timing_lines() {
    sed -nE 's/^(test .* \.\.\. )?((timing|CUDA backend|FAILED|skipped): .*)$/\2/p' "$1"
}

# A dry run on a machine without a GPU: GPU_CHECK_ALLOW_SKIP=1.
[[ "${GPU_CHECK_ALLOW_SKIP:-0}" == 1 ]] || export BERTRT_REQUIRE_CUDA=1
export RUST_BACKTRACE=1
status=0
summary=()
for bin in "${bins[@]}"; do
    name=$(basename "$bin")
    limit=$(step_limit "$TIMEOUT" $((PEER_TIMEOUT + REST_RESERVE)))
    if ((limit < MIN_STEP)); then
        summary+=("$name: NOT RUN, the time budget is spent")
        status=1
        continue
    fi
    echo "== $bin (limit ${limit}s)"
    start=$(date +%s)
    timeout -k 10 "$limit" "$bin" --nocapture --test-threads=1 --include-ignored 2>&1 | tee "$OUT/tests-$name.txt"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    result=$(grep -E '^test result:' "$OUT/tests-$name.txt" | tail -n 1)
    ((rc == 124)) && result="TIMED OUT after ${limit}s${result:+; $result}"
    summary+=("$name: exit $rc in ${secs}s; ${result:-no test result line}")
    mapfile -t -O "${#summary[@]}" summary < <(timing_lines "$OUT/tests-$name.txt" | grep -Ev '^(FAILED|skipped):')
    ((rc == 0)) || status=1
    if [[ "${GPU_CHECK_SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer >/dev/null; then
        limit=$(step_limit "$TIMEOUT" $((PEER_TIMEOUT + REST_RESERVE)))
        if ((limit < MIN_STEP)); then
            summary+=("$name under memcheck: NOT RUN, the time budget is spent")
            continue
        fi
        echo "== compute-sanitizer memcheck: $bin (op tests, limit ${limit}s)"
        timeout -k 10 "$limit" compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$bin" --test-threads=1 --skip _bert_ --skip minilm 2>&1 | tail -n 40
        rc=${PIPESTATUS[0]}
        summary+=("$name under memcheck: exit $rc")
        ((rc == 0)) || status=1
    fi
done

# The training benchmark's PyTorch side. Its failure is reported, and the
# test results above stand either way.
echo "== training benchmark: PyTorch peer"
peer_ok=0
limit=$(step_limit "$PEER_TIMEOUT" "$REST_RESERVE")
if ((limit < MIN_STEP)); then
    summary+=("pytorch peer: NOT RUN, the time budget is spent")
else
    start=$(date +%s)
    # shellcheck disable=SC2086  # GPU_CHECK_PEER_ARGS is a list of words
    timeout -k 10 "$limit" "$PYTHON" bench/gpu_train_peer.py --models bert-base,minilm-l6 --modes bf16,fp16,fp32 \
        --skip bert-base:fp32 --json "$OUT/pytorch-train.json" ${GPU_CHECK_PEER_ARGS:-} 2>&1 \
        | tee "$OUT/pytorch-train.txt"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    note=""
    ((rc == 124)) && note=", TIMED OUT after ${limit}s"
    if ((rc == 0)); then
        peer_ok=1
    else
        last=$(grep -v '^\s*$' "$OUT/pytorch-train.txt" | tail -n 1)
        note+="; FAILED: ${last:-no output} (see pytorch-train.txt)"
    fi
    summary+=("pytorch peer (bench/gpu_train_peer.py): exit $rc in ${secs}s$note")
    mapfile -t -O "${#summary[@]}" summary < <(timing_lines "$OUT/pytorch-train.txt")
fi

# Side by side: the bertrt training timing lines (from the test binaries) next
# to PyTorch's. A row either side lacks says "missing".
training_table_py=$(cat <<'EOF'
import re
import sys

LINE = re.compile(r"timing: (bertrt|pytorch) (\S+) (\S+) train b(\d+) s(\d+): ([\d.]+) ms/step, "
                  r"([\d.]+) samples/s, peak (\S+) MiB")
# What the PyTorch side runs by default; rows either side lacks stay in the table.
EXPECTED = [("bert-base", "bf16"), ("bert-base", "fp16"),
            ("minilm-l6", "bf16"), ("minilm-l6", "fp16"), ("minilm-l6", "fp32")]
found = {}
for text in sys.stdin:
    m = LINE.search(text)
    if m:
        side, model, mode, batch, seq, _ms, sps, peak = m.groups()
        found[(side, model.lower(), mode.lower(), int(batch), int(seq))] = (float(sps), peak)
rows = [(model, mode, 32, 128) for model, mode in EXPECTED]
rows += sorted({key[1:] for key in found} - set(rows))
print("training, bertrt vs PyTorch (autocast + SDPA) on this GPU: samples/s, peak MiB")
header = ("model", "mode", "shape", "bertrt/s", "pytorch/s", "bertrt/pytorch", "bertrt MiB", "pytorch MiB")
print("%-10s %-5s %-9s %10s %10s %15s %11s %12s" % header)
for model, mode, batch, seq in rows:
    ours = found.get(("bertrt", model, mode, batch, seq))
    peer = found.get(("pytorch", model, mode, batch, seq))
    ratio = "%.2f" % (ours[0] / peer[0]) if ours and peer and peer[0] > 0 else "missing"
    print("%-10s %-5s %-9s %10s %10s %15s %11s %12s" % (
        model, mode, "b%d s%d" % (batch, seq),
        "%.1f" % ours[0] if ours else "missing", "%.1f" % peer[0] if peer else "missing", ratio,
        ours[1] if ours else "missing", peer[1] if peer else "missing"))
EOF
)
mapfile -t -O "${#summary[@]}" summary < <(printf '%s\n' "${summary[@]}" \
    | { "$PYTHON" -c "$training_table_py" 2>&1 || echo "training table: $PYTHON failed"; })

if ((status != 0)); then
    verdict="FAILED"
elif [[ -z "${BERTRT_REQUIRE_CUDA:-}" ]]; then
    verdict="PASSED, skips allowed (GPU_CHECK_ALLOW_SKIP=1): not a GPU result"
else
    verdict="ALL PASSED"
fi
if ((peer_ok == 0)); then
    verdict+="; PyTorch training benchmark FAILED (see pytorch-train.txt)"
    ((status == 0)) && status=3
fi
{
    echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    printf '%s\n' "${summary[@]}"
    echo "$verdict"
} | tee "$OUT/summary.txt"
exit $status
