#!/usr/bin/env bash
# The cost of releasing before the answer (BENCHMARKS.md, "Release before
# the answer"). Usage: tests/bench/release-wait.sh
# Remote path at c=10: limit 100000 (no lease at its limit) vs limit 1
# (every lease at its limit: each release sent at once and awaited).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin switchyard-control-plane --bin switchyard-sidecar --bin fake-model-server --bin loadgen
BIN=$PWD/target/release
W=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
"$BIN/fake-model-server" --mode ollama --listen 127.0.0.1:0 --models m --loaded m --chunks 1 > $W/fake.out &
PIDS+=($!)
for _ in $(seq 1 50); do grep -q LISTENING $W/fake.out && break; sleep 0.1; done
FAKE=$(awk '/LISTENING/{print $2}' $W/fake.out)
BODY='{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}'
declare -A URL
for lim in 100000 1; do
  printf 'endpoints:\n  - %s\nmax_concurrent_connections: %s\nprobe_interval: 1s\n' "$FAKE" "$lim" > $W/c$lim.yaml
  cp=$(free_port); sc=$(free_port)
  "$BIN/switchyard-control-plane" --config $W/c$lim.yaml --listen 127.0.0.1:$cp > $W/cp$lim.log 2>&1 & PIDS+=($!)
  sleep 1
  "$BIN/switchyard-sidecar" --control-plane http://127.0.0.1:$cp --listen 127.0.0.1:$sc > $W/sc$lim.log 2>&1 & PIDS+=($!)
  URL[$lim]=http://127.0.0.1:$sc/api/chat
done
sleep 3
for round in 1 2 3 4; do
  for lim in 100000 1; do
    "$BIN/loadgen" --url "${URL[$lim]}" --body "$BODY" --concurrency 10 --duration 5 --warmup 0 --label "limit$lim-c10" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["label"], int(r["rps"]), "p50", round(r["p50_us"]), "p99", round(r["p99_us"]), "errors", r["errors"])'
  done
done
