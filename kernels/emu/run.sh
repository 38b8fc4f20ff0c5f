#!/usr/bin/env bash
# Builds kernels/emu/check.cpp (every kernel run on the CPU through
# cuda_emu.h, with AddressSanitizer) and runs it. Needs only g++ >= 11.
set -euo pipefail
cd "$(dirname "$0")"
out="${TMPDIR:-/tmp}/bertrt-kernel-emu"
g++ -std=c++20 -O1 -g -pthread -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Wno-unknown-pragmas -o "$out" check.cpp
"$out"
