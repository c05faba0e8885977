#!/usr/bin/env bash
# Memory a burst of concurrent streams leaves in an idle sidecar (a benchmark,
# not a test): a fake Ollama backend streaming 100 chunks 50 ms apart, a fresh
# standalone sidecar, then BURSTS bursts of STREAMS concurrent streaming
# /api/chat requests, each read to its final chunk; prints the sidecar's RSS
# at start and 5 s after each burst.
# Usage: tests/bench/stream-burst-rss.sh [streams (default 500)] [bursts (default 2)]
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${1:-500}
BURSTS=${2:-2}
cargo build --release --quiet --bin switchyard-sidecar --bin fake-model-server
BIN=$PWD/target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN/fake-model-server" --mode ollama --listen 127.0.0.1:0 --models streamy --loaded streamy \
  --chunks 100 --chunk-delay-ms 50 > "$WORK/fake.out" &
PIDS+=($!)
for _ in $(seq 1 50); do grep -q LISTENING "$WORK/fake.out" && break; sleep 0.1; done
FAKE=$(awk '/LISTENING/{print $2}' "$WORK/fake.out")
printf 'endpoints:\n  - %s\nmax_concurrent_connections: 100000\n' "$FAKE" > "$WORK/config.yaml"
PORT=$(free_port)
"$BIN/switchyard-sidecar" --standalone --config "$WORK/config.yaml" --listen "127.0.0.1:$PORT" > "$WORK/sidecar.log" 2>&1 &
SC=$!; PIDS+=($SC)
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break; sleep 0.1; done
sleep 2
rss() { awk '/VmRSS/{printf "%.1f MB", $2/1024}' "/proc/$SC/status"; }
echo "streams per burst: $STREAMS; idle RSS at start: $(rss)"
for burst in $(seq 1 "$BURSTS"); do
  python3 - "$PORT" "$STREAMS" <<'PY'
import asyncio, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
body = json.dumps({"model": "streamy", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
req = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n" % len(body)) + body
async def one():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(req); await w.drain()
    data = await r.read(); w.close()
    return b'"done":true' in data
async def main():
    res = await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
    ok = sum(1 for x in res if x is True)
    if ok != n:
        sys.exit(f"only {ok} of {n} streams ended with their final chunk")
asyncio.run(main())
PY
  sleep 5
  echo "after burst $burst, idle 5 s: $(rss)"
done
