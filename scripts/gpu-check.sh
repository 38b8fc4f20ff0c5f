#!/usr/bin/env bash
# GPU check for the CUDA backend: runs the prebuilt CUDA test binaries on a
# machine with an NVIDIA GPU (which has the driver, nvcc and python/torch but
# probably no cargo) and writes everything under $OUT.
#
# 1. Here, on a machine with cargo and nvcc (scripts/install-nvcc.sh):
#
#      scripts/gpu-check.sh --build
#
#    which runs `cargo test --release --test cuda --no-run` and copies the
#    test binary to target/gpu/cuda-tests (stripped of debug info to travel
#    light; target/ is gitignored, so nothing here gets committed).
#
# 2. On the GPU machine, from the repository root, with target/gpu carried
#    along (the device tool: carry ["target/gpu"], timeout_s 480):
#
#      scripts/gpu-check.sh [TEST_BINARY...]
#
#    Default binaries: target/gpu/cuda-* , else target/release/deps/cuda-*.
#    Output: $OUT (the device tool sets it; default
#    bench/results/gpu-<date>): gpu-check.log (all of it), nvidia-smi.txt,
#    tests-<binary>.txt, summary.txt (results, the GPU, forward timings).
#    Exit status 0 only if every test binary passed. Tests run with
#    BERTRT_REQUIRE_CUDA=1, so "no device" is a failure here, not a skip, and
#    with --include-ignored, which adds the forward timing test.
#
#    The MiniLM test needs the model: carry a copy (fp16 weights ~45 MB,
#    with tokenizer files) and set BERTRT_MINILM_DIR; without it that one
#    test prints a skip line and the others still run.
#
#    GPU_CHECK_SANITIZE=1 also runs the op tests under compute-sanitizer
#    (memcheck; Firecracker machines only, a few minutes).
#
# Must finish in under 8 minutes: each binary gets GPU_CHECK_TIMEOUT seconds
# (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--build" ]]; then
    set -e
    cargo test --release --test cuda --no-run 2>&1 | tee /tmp/gpu-check-build.log
    bin=$(grep -o 'target/release/deps/cuda-[0-9a-f]*' /tmp/gpu-check-build.log | tail -n 1)
    [[ -n "$bin" && -x "$bin" ]] || { echo "test binary not found in cargo's output" >&2; exit 1; }
    mkdir -p target/gpu
    cp "$bin" target/gpu/cuda-tests
    strip --strip-debug target/gpu/cuda-tests
    grep -qa 'attention_d32_f32' target/gpu/cuda-tests \
        || echo "WARNING: the binary holds no kernels (built without nvcc?)" >&2
    ls -l target/gpu/
    echo "carry [\"target/gpu\"] and run: scripts/gpu-check.sh"
    exit 0
fi

OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
TIMEOUT="${GPU_CHECK_TIMEOUT:-300}"

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
    mapfile -t bins < <(ls target/gpu/cuda-* 2>/dev/null)
    ((${#bins[@]})) || mapfile -t bins < <(ls target/release/deps/cuda-* 2>/dev/null | grep -v '\.d$')
fi
if ((${#bins[@]} == 0)); then
    echo "no test binaries: build them with scripts/gpu-check.sh --build and carry target/gpu" \
        | tee "$OUT/summary.txt"
    exit 2
fi

# A dry run on a machine without a GPU: GPU_CHECK_ALLOW_SKIP=1.
[[ "${GPU_CHECK_ALLOW_SKIP:-0}" == 1 ]] || export BERTRT_REQUIRE_CUDA=1
export RUST_BACKTRACE=1
status=0
summary=()
for bin in "${bins[@]}"; do
    name=$(basename "$bin")
    echo "== $bin"
    start=$(date +%s)
    timeout "$TIMEOUT" "$bin" --nocapture --test-threads=1 --include-ignored 2>&1 | tee "$OUT/tests-$name.txt"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    result=$(grep -E '^test result:' "$OUT/tests-$name.txt" | tail -n 1)
    summary+=("$name: exit $rc in ${secs}s; ${result:-no test result line}")
    mapfile -t -O "${#summary[@]}" summary < <(grep -E '^(timing|CUDA backend):' "$OUT/tests-$name.txt")
    ((rc == 0)) || status=1
    if [[ "${GPU_CHECK_SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer >/dev/null; then
        echo "== compute-sanitizer memcheck: $bin (op tests)"
        timeout "$TIMEOUT" compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$bin" --test-threads=1 --skip _bert_ --skip minilm 2>&1 | tail -n 40
        rc=${PIPESTATUS[0]}
        summary+=("$name under memcheck: exit $rc")
        ((rc == 0)) || status=1
    fi
done

{
    echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    printf '%s\n' "${summary[@]}"
    if ((status != 0)); then
        echo "FAILED"
    elif [[ -z "${BERTRT_REQUIRE_CUDA:-}" ]]; then
        echo "PASSED, skips allowed (GPU_CHECK_ALLOW_SKIP=1): not a GPU result"
    else
        echo "ALL PASSED"
    fi
} | tee "$OUT/summary.txt"
exit $status
