#!/usr/bin/env bash
# The race release-before-answer leaves open (README, "Sidecar API"): a fast
# endpoint allowing 2 requests, a slow one full (1 held request), and two
# sequential clients alternating between two sidecars, each request sent the
# instant the previous answer arrived (3 ms each). Counts the requests that
# found the fast endpoint full (saturated decisions; they go to the slow one
# and time out). Needs the .venv of tests/run.sh (httpx). Ports 19921-19941.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin switchyard-control-plane --bin switchyard-sidecar --bin switchyard --bin fake-model-server
BIN=$PWD/target/release
PY=${PY:-$PWD/.venv/bin/python}
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
start_fake() { "$BIN/fake-model-server" --mode ollama --listen 127.0.0.1:$1 --models m --loaded m --chunks 1 --delay-ms $2 > $W/fake$1.out & PIDS+=($!); }
start_fake 19921 300000
start_fake 19922 3
sleep 0.5
cat > $W/c.yaml <<YAML
endpoints:
  - http://127.0.0.1:19921
  - http://127.0.0.1:19922
max_concurrent_connections: 2
endpoint_config:
  "http://127.0.0.1:19921":
    max_concurrent_connections: 1
probe_interval: 1s
YAML
"$BIN/switchyard-control-plane" --config $W/c.yaml --listen 127.0.0.1:19930 --metrics-listen 127.0.0.1:19931 > $W/cp.log 2>&1 & PIDS+=($!)
sleep 1
for p in 19940 19941; do "$BIN/switchyard-sidecar" --control-plane http://127.0.0.1:19930 --config $W/c.yaml --listen 127.0.0.1:$p > $W/sc$p.log 2>&1 & PIDS+=($!); done
sleep 2
"$BIN/switchyard" --control-plane http://127.0.0.1:19930 drain http://127.0.0.1:19922 > /dev/null
curl -s -o /dev/null http://127.0.0.1:19940/api/chat -d '{"model":"m","stream":false,"messages":[{"role":"user","content":"hold"}]}' & PIDS+=($!); sleep 0.5
"$BIN/switchyard" --control-plane http://127.0.0.1:19930 undrain http://127.0.0.1:19922 > /dev/null
"$BIN/switchyard" --control-plane http://127.0.0.1:19930 endpoints | head -5
sleep 1.5
before=$(curl -s http://127.0.0.1:19931/metrics | grep -E "^switchyard_cp_decisions_total.*saturated" | awk "{print \$2}")
"$PY" - <<'PY'
import threading, httpx
body={"model":"m","stream":False,"messages":[{"role":"user","content":"hi"}]}
res={"ok":0,"timeout":0}
lock=threading.Lock()
def client(first):
    with httpx.Client(timeout=1.5) as c:
        for i in range(1000):
            port = 19940 + ((first + i) % 2)
            try:
                r=c.post(f"http://127.0.0.1:{port}/api/chat", json=body)
                k="ok" if r.status_code==200 else "err"
            except httpx.TimeoutException:
                k="timeout"
            with lock: res[k]=res.get(k,0)+1
ts=[threading.Thread(target=client,args=(f,)) for f in (0,1)]
[t.start() for t in ts]; [t.join() for t in ts]
print(res)
PY
after=$(curl -s http://127.0.0.1:19931/metrics | grep -E "^switchyard_cp_decisions_total.*saturated" | awk "{print \$2}")
echo "saturated decisions: ${before:-0} -> ${after:-0} (the held request's own decision may count)"
