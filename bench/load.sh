#!/usr/bin/env bash
# Load test of `bertrt serve` on loopback.
#
# Starts the release server, drives POST /embed with `hey` (a real HTTP load
# tool; fixed request counts, keep-alive connections) at several concurrency
# levels, and prints throughput and p50/p95/p99 per level. Then:
#   - concurrency 1 at microsecond resolution with `wrk` (hey reports whole
#     tenths of a millisecond): GET /health, the client + HTTP floor, and
#     POST /embed;
#   - the in-process numbers for the same text (examples/serve_baseline.rs:
#     the server's own model replica and tokenizer, no HTTP), and the server
#     overhead: wrk's /embed p50 minus the in-process one-text p50;
#   - an overload run against a small queue: excess requests must get 429
#     and accepted ones keep a bounded p99;
#   - RSS of the server at the start and end of the run (and of an optional
#     soak at steady load, SOAK_SECS).
# Each run is fp32, then --int8 (the model quantized on load), and the
# in-process baseline and overhead line are given for both.
#
# Environment: MODEL (default MiniLM), MODES ("fp32 int8"), LEVELS ("1 4 16 32 64"), REQUESTS
# (2000 per level), TEXT (16 MiniLM tokens), THREADS (0: all cores),
# LATENCY_SECS (5: each wrk run), SOAK_SECS (0: no soak), SERVE_ARGS (extra
# `bertrt serve` flags).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-assets/models/all-MiniLM-L6-v2}
LEVELS=${LEVELS:-"1 4 16 32 64"}
REQUESTS=${REQUESTS:-2000}
TEXT=${TEXT:-"the quick brown fox jumps over the lazy dog and then runs far away"}
THREADS=${THREADS:-0}
LATENCY_SECS=${LATENCY_SECS:-5}
SOAK_SECS=${SOAK_SECS:-0}
MODES=${MODES:-"fp32 int8"}
SERVE_ARGS=${SERVE_ARGS:-}

for tool in hey wrk curl; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench/load.sh needs $tool (Debian: apt-get install -y $tool)" >&2
        exit 1
    fi
done

cargo build --release --quiet --bin bertrt --example serve_baseline
BIN=target/release/bertrt

work=$(mktemp -d)
pid=
cleanup() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

printf '{"inputs": "%s"}' "$TEXT" >"$work/body.json"
# wrk: the /embed request, and a report of p50/p95/p99 in milliseconds.
report='done = function(summary, latency, requests)
  io.write(string.format("%8d %9.3f %9.3f %9.3f\n", summary.requests,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000))
end'
printf '%s\n' "$report" >"$work/get.lua"
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[%s]==]\n%s\n' \
    "$(cat "$work/body.json")" "$report" >"$work/post.lua"

# start_server FLAGS...: starts the server, sets pid and addr; fails (status
# 1, log in $work/server.log) when the server refuses to start.
start_server() {
    : >"$work/server.log"
    # shellcheck disable=SC2086
    "$BIN" serve --model "$MODEL" --port 0 --threads "$THREADS" $SERVE_ARGS "$@" \
        2>"$work/server.log" &
    pid=$!
    addr=
    for _ in $(seq 600); do
        addr=$(sed -n 's/^listening on //p' "$work/server.log")
        [[ -n $addr ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
            pid=
            return 1
        fi
        sleep 0.1
    done
    [[ -n $addr ]] || { echo "server did not start" >&2; exit 1; }
    until curl -fs "http://$addr/health" >/dev/null; do sleep 0.05; done
}

stop_server() {
    kill -TERM "$pid"
    wait "$pid"
    pid=
}

rss_kib() { ps -o rss= -p "$pid" | tr -d ' '; }

# drive CONCURRENCY REQUESTS: one hey run; prints a table row.
drive() {
    local c=$1 n=$2
    hey -n "$n" -c "$c" -m POST -T application/json -D "$work/body.json" \
        -o csv "http://$addr/embed" >"$work/run.csv"
    # CSV: response-time,DNS+dialup,DNS,Request-write,Response-delay,
    # Response-read,status-code,offset (seconds since the run started).
    awk -F, 'NR > 1 && $7 == 200 { print $1 * 1000 }' "$work/run.csv" | sort -g >"$work/ok.txt"
    local counts
    counts=$(awk -F, '
        NR == 1 { next }
        { end = $8 + $1; if (end > wall) wall = end }
        $7 == 200 { ok++ } $7 == 429 { busy++ } $7 != 200 && $7 != 429 { other++ }
        END { printf "%d %d %d %d %.6f", NR - 1, ok, busy, other, wall }' "$work/run.csv")
    awk -v c="$c" -v counts="$counts" '
        { lat[NR] = $1 }
        function pct(p) { return NR ? lat[int(p / 100 * (NR - 1) + 0.5) + 1] : 0 }
        END {
            split(counts, k, " ")
            printf "%6d %8d %6d %6d %6d %10.1f %9.3f %9.3f %9.3f\n",
                c, k[1], k[2], k[3], k[4], k[2] / k[5], pct(50), pct(95), pct(99)
        }' "$work/ok.txt"
}

header() {
    printf "%6s %8s %6s %6s %6s %10s %9s %9s %9s\n" \
        conc requests ok 429 other "ok req/s" "p50 ms" "p95 ms" "p99 ms"
}

declare -A embed_p50
for mode in $MODES; do
    flags=()
    [[ $mode == int8 ]] && flags=(--int8)
    echo "== bertrt serve ($mode): POST /embed, 1 text of \"$TEXT\""
    if ! start_server "${flags[@]}"; then
        echo "   not available: $(grep -m1 error "$work/server.log")"
        continue
    fi
    echo "   $(sed -n 's/^serving //p' "$work/server.log")"
    rss_start=$(rss_kib)
    drive 4 200 >/dev/null # warm-up
    header
    for c in $LEVELS; do
        drive "$c" "$REQUESTS"
    done
    echo "   concurrency 1, wrk (1 connection, ${LATENCY_SECS}s each):"
    printf "   %-14s %8s %9s %9s %9s\n" "" requests "p50 ms" "p95 ms" "p99 ms"
    printf "   %-14s %s\n" "GET /health" \
        "$(wrk -t1 -c1 -d"${LATENCY_SECS}s" -s "$work/get.lua" "http://$addr/health" | tail -1)"
    embed_row=$(wrk -t1 -c1 -d"${LATENCY_SECS}s" -s "$work/post.lua" "http://$addr/embed" | tail -1)
    printf "   %-14s %s\n" "POST /embed" "$embed_row"
    embed_p50[$mode]=$(awk '{ print $2 }' <<<"$embed_row")
    if ((SOAK_SECS > 0)); then
        soak_start=$(rss_kib)
        hey -z "${SOAK_SECS}s" -c 16 -m POST -T application/json -D "$work/body.json" \
            "http://$addr/embed" >/dev/null
        echo "   soak: ${SOAK_SECS}s at concurrency 16, RSS $soak_start KiB -> $(rss_kib) KiB"
    fi
    echo "   RSS: $rss_start KiB at start, $(rss_kib) KiB at end"
    stop_server

    echo "== overload ($mode): --max-queue 16, concurrency 128"
    start_server "${flags[@]}" --max-queue 16
    drive 4 200 >/dev/null
    header
    drive 128 $((REQUESTS * 2))
    stop_server
done

for mode in $MODES; do
    [[ -n ${embed_p50[$mode]:-} ]] || continue
    precision=float32
    [[ $mode == int8 ]] && precision=int8
    echo "== in-process ($mode: same text, same threads, no HTTP)"
    target/release/examples/serve_baseline "$MODEL" "$TEXT" "$REQUESTS" "$THREADS" "$precision" \
        | tee "$work/baseline.txt"
    inprocess_p50=$(awk '/^embed 1 text/ { print $(NF - 2) }' "$work/baseline.txt")
    awk -v served="${embed_p50[$mode]}" -v alone="$inprocess_p50" -v mode="$mode" 'BEGIN {
        printf "server overhead at concurrency 1 (%s): %.3f ms p50 (wrk /embed %.3f - in-process %.3f)\n",
            mode, served - alone, served, alone }'
done
