#!/usr/bin/env bash
# Switchyard benchmarks (not tests). Builds release binaries, then measures:
#   1. the selection policy in-process (ns/decision at 10/100/1000 endpoints);
#   2. choose+release pairs/s over gRPC against a control-plane process;
#   3. /api/chat through: the fake backend directly, a standalone sidecar, and
#      sidecar + control plane — closed-loop throughput (concurrency 10, and
#      64 to find each path's saturated rate: under load the Route stream
#      batches chooses, so the routed paths gain from concurrency while the
#      backend alone is already saturated at 10) and open-loop latency at a
#      fixed rate (added p50/p99 vs direct), CPU time per request of each
#      process, wake-ups (voluntary context switches) per request of each
#      process at the fixed rate, hypervisor steal during each run, and
#      throughput again with wrk (concurrency 10) if present.
#      Client, sidecar, control plane and backend share the machine's cores,
#      and single runs of the same path differ by up to ±25 % here, so the
#      three paths run in ROUNDS interleaved rounds (direct, standalone,
#      remote, direct, ...): each round's ratio compares runs seconds apart,
#      and the summary reports the median over rounds;
#   4. sidecar RSS idle and after load.
# When nginx is installed (apt install nginx-light), a fourth path runs in
# every round of 3: nginx as a plain reverse proxy in front of the same
# backend (one worker per core, like the sidecar's server threads; upstream
# keep-alive; no buffering, so streams pass through as the sidecar's do).
# It reads no body and asks no one where to send it, so it shows what
# forwarding alone costs on this machine; its CPU is reported as "sidecar".
# Results (JSON lines) go to stdout and to $OUT (default target/bench-results.jsonl);
# the last line is the summary (medians).
# Usage: tests/bench/run.sh [seconds-per-run (default 10)] [fixed rate (default 500)]
# Environment: ROUNDS (default 5), CONCURRENCY (closed-loop levels, default "10 64").
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-10}
RATE=${2:-500}
ROUNDS=${ROUNDS:-5}
CONCURRENCY=${CONCURRENCY:-10 64}
OUT=${OUT:-$ROOT/target/bench-results.jsonl}
: > "$OUT"

cargo build --release --quiet --bin switchyard-control-plane --bin switchyard-sidecar \
  --bin fake-model-server --bin loadgen --bin grpc-bench
BIN=$ROOT/target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; return 1; }
record() { echo "$1" | tee -a "$OUT"; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

echo "# machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"

# 1. policy
cargo run --release --quiet -p switchyard-control-plane --example policy_bench | tee -a "$WORK/policy.txt"

# Fake backend: Ollama mode, one model, answers immediately.
"$BIN/fake-model-server" --mode ollama --listen 127.0.0.1:0 --models m --loaded m --chunks 1 > "$WORK/fake.out" &
PIDS+=($!)
for _ in $(seq 1 50); do grep -q LISTENING "$WORK/fake.out" && break; sleep 0.1; done
FAKE=$(awk '/LISTENING/{print $2}' "$WORK/fake.out")

cat > "$WORK/config.yaml" <<YAML
endpoints:
  - $FAKE
max_concurrent_connections: 100000
probe_interval: 1s
YAML

# 2. control plane + gRPC pairs
CP_PORT=$(free_port)
"$BIN/switchyard-control-plane" --config "$WORK/config.yaml" --listen "127.0.0.1:$CP_PORT" > "$WORK/cp.log" 2>&1 &
CP_PID=$!; PIDS+=($CP_PID)
sleep 1.5
record "$("$BIN/grpc-bench" --target "http://127.0.0.1:$CP_PORT" --model m --concurrency 64 --channels 4 --duration "$SECS")"

# 3. HTTP paths
BODY='{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}'
SA_PORT=$(free_port)
"$BIN/switchyard-sidecar" --standalone --config "$WORK/config.yaml" --listen "127.0.0.1:$SA_PORT" > "$WORK/sa.log" 2>&1 &
SA_PID=$!; PIDS+=($SA_PID)
RM_PORT=$(free_port)
"$BIN/switchyard-sidecar" --control-plane "http://127.0.0.1:$CP_PORT" --listen "127.0.0.1:$RM_PORT" > "$WORK/rm.log" 2>&1 &
RM_PID=$!; PIDS+=($RM_PID)
wait_http "http://127.0.0.1:$SA_PORT/health"; wait_http "http://127.0.0.1:$RM_PORT/health"
sleep 2
record "{\"label\":\"sidecar_rss_idle_kb\",\"standalone\":$(rss_kb $SA_PID),\"remote\":$(rss_kb $RM_PID)}"

NGINX_PATH=()
if command -v nginx > /dev/null; then
  NG_PORT=$(free_port)
  mkdir -p "$WORK/nginx"
  cat > "$WORK/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream backend { server ${FAKE#http://}; keepalive 256; }
  server {
    listen 127.0.0.1:$NG_PORT;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
NGINX
  nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2> "$WORK/nginx/stderr.log" &
  NG_MASTER=$!; PIDS+=($NG_MASTER)
  wait_http "http://127.0.0.1:$NG_PORT/api/tags"
  # Its workers' PIDs, comma-separated: ticks and wakes sum over them.
  NG_WORKERS=$(pgrep -P "$NG_MASTER" | paste -sd,)
  NGINX_PATH=("nginx http://127.0.0.1:$NG_PORT $NG_WORKERS")
  echo "# reference proxy: $(nginx -v 2>&1), workers $NG_WORKERS (one per core)"
else
  echo "# nginx not installed: skipping the reference-proxy path"
fi

FAKE_PID=${PIDS[0]}
# ticks and wakes take one PID or several, comma-separated (nginx's workers).
ticks() { local p; for p in ${1//,/ }; do cat "/proc/$p/stat"; done | awk '{n+=$14+$15} END{print n}'; }
# Hypervisor steal (all CPUs, 10 ms ticks): time this VM's vCPUs were ready
# to run but the host ran something else. Recorded per run as steal_ms, so
# a slow round can be told apart from a slow path.
steal() { awk '/^cpu /{print $9}' /proc/stat; }
# Voluntary context switches of all a process's threads: each is a sleep,
# so the count per request at the fixed rate is the wake-ups it costs.
wakes() { [ "$1" = 0 ] && { echo 0; return; }; local p; for p in ${1//,/ }; do cat /proc/$p/task/*/status; done | awk '/^voluntary_ctxt_switches/{n+=$2} END{print n}'; }
per_req() { python3 -c "print(round(($2 - $1) / max(1, $3), 2))"; }
# CPU time each process spent per request during a run (utime+stime ticks
# of 10 ms, read before and after), so the cost of each hop is visible
# independently of how the 2 cores were shared.
us_per_req() { echo $(( ($2 - $1) * 10000 / $3 )); }
PATHS=("direct $FAKE 0" "standalone http://127.0.0.1:$SA_PORT $SA_PID" "remote http://127.0.0.1:$RM_PORT $RM_PID" "${NGINX_PATH[@]}")
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    for target in "${PATHS[@]}"; do
      set -- $target
      SC_PID=$3
      f0=$(ticks $FAKE_PID); c0=$(ticks $CP_PID); s0=0; [ "$SC_PID" != 0 ] && s0=$(ticks $SC_PID); st0=$(steal)
      line=$("$BIN/loadgen" --url "$2/api/chat" --body "$BODY" --concurrency "$c" --duration "$SECS" --warmup 0 --label "$1-throughput-c$c")
      f1=$(ticks $FAKE_PID); c1=$(ticks $CP_PID); s1=0; [ "$SC_PID" != 0 ] && s1=$(ticks $SC_PID)
      record "${line%\}},\"round\":$round,\"steal_ms\":$(( ($(steal) - st0) * 10 ))}"
      n=$(echo "$line" | python3 -c 'import json,sys; print(max(1, json.load(sys.stdin)["requests"]))')
      record "{\"label\":\"$1-cpu-us-per-request-c$c\",\"round\":$round,\"sidecar\":$(us_per_req $s0 $s1 $n),\"fake_backend\":$(us_per_req $f0 $f1 $n),\"control_plane\":$(us_per_req $c0 $c1 $n)}"
    done
  done
done
for round in $(seq 1 "$ROUNDS"); do
  for target in "${PATHS[@]}"; do
    set -- $target
    SC_PID=$3
    st0=$(steal); w0=$(wakes $SC_PID); wc0=$(wakes $CP_PID); wf0=$(wakes $FAKE_PID)
    line=$("$BIN/loadgen" --url "$2/api/chat" --body "$BODY" --rate "$RATE" --duration "$SECS" --label "$1-latency-r$RATE")
    w1=$(wakes $SC_PID); wc1=$(wakes $CP_PID); wf1=$(wakes $FAKE_PID)
    record "${line%\}},\"round\":$round,\"steal_ms\":$(( ($(steal) - st0) * 10 ))}"
    n=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
    record "{\"label\":\"$1-wakeups-per-request-r$RATE\",\"round\":$round,\"sidecar\":$(per_req $w0 $w1 $n),\"control_plane\":$(per_req $wc0 $wc1 $n),\"fake_backend\":$(per_req $wf0 $wf1 $n)}"
  done
done

# Throughput again with wrk (C, far cheaper per request than loadgen): the
# client's own CPU cost is shared by every path, so a cheaper client makes
# the comparison stricter. Skipped when wrk is not installed (apt install wrk).
if command -v wrk > /dev/null; then
  cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
LUA
  for round in $(seq 1 "$ROUNDS"); do
    for target in "${PATHS[@]}"; do
      set -- $target
      rps=$(wrk -t1 -c10 -d"${SECS}s" -s "$WORK/post.lua" "$2/api/chat" | awk '/Requests\/sec/{print $2}')
      record "{\"label\":\"$1-throughput-wrk-c10\",\"round\":$round,\"rps\":$rps}"
    done
  done
else
  echo "# wrk not installed: skipping the wrk throughput runs"
fi
record "{\"label\":\"sidecar_rss_after_load_kb\",\"standalone\":$(rss_kb $SA_PID),\"remote\":$(rss_kb $RM_PID)}"
python3 "$ROOT/tests/bench/summary.py" "$OUT" | tee -a "$OUT"
echo "# results in $OUT"
