#!/usr/bin/env bash
# Installs nvcc + ptxas (Debian's nvidia-cuda-toolkit, CUDA 11.8 on bookworm)
# so that build.rs compiles every kernel in kernels/ to PTX and runs ptxas on
# it. No GPU or driver is needed for that; the crate builds without nvcc too
# (the CUDA backend then reports "built without CUDA kernels").
#
# Idempotent: does nothing when nvcc is already on PATH (or in
# $CUDA_HOME/bin); adds the `contrib non-free` components to the Debian apt
# sources only where they are missing. Needs root (or sudo). About 75 s and
# ~2.5 GB on disk.
#
#   scripts/install-nvcc.sh          # install if missing
#   scripts/install-nvcc.sh --check  # exit 1 if nvcc is missing, install nothing
set -euo pipefail

find_nvcc() {
    if command -v nvcc >/dev/null 2>&1; then
        command -v nvcc
    elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
        echo "$CUDA_HOME/bin/nvcc"
    else
        return 1
    fi
}

if nvcc=$(find_nvcc); then
    echo "nvcc already installed: $nvcc"
    "$nvcc" --version | tail -n 2
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "nvcc not found" >&2
    exit 1
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

# deb822 sources (bookworm's default): "Components: main" -> "main contrib non-free".
changed=0
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    grep -q 'debian' "$f" || continue
    if grep -Eq '^Components:' "$f" && ! grep -Eq '^Components:.*\bnon-free\b' "$f"; then
        $SUDO sed -i -E '/^Components:/{
            /\bcontrib\b/! s/$/ contrib/
            /\bnon-free\b/! s/$/ non-free/
        }' "$f"
        changed=1
    fi
done
# One-line sources: "deb URI suite main" -> "... main contrib non-free".
if [[ -f /etc/apt/sources.list ]]; then
    if grep -Eq '^deb .*debian.* main' /etc/apt/sources.list \
        && grep -E '^deb .*debian.* main' /etc/apt/sources.list | grep -Evq '\bnon-free\b'; then
        $SUDO sed -i -E '/^deb .*debian.* main/{
            /\bcontrib\b/! s/$/ contrib/
            /\bnon-free\b/! s/$/ non-free/
        }' /etc/apt/sources.list
        changed=1
    fi
fi
[[ $changed -eq 1 ]] && echo "added contrib non-free to the apt sources"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends nvidia-cuda-toolkit

nvcc=$(find_nvcc) || { echo "nvidia-cuda-toolkit installed but nvcc not found" >&2; exit 1; }
echo "installed: $nvcc"
"$nvcc" --version | tail -n 2
