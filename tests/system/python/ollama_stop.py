"""`ollama stop MODEL` through a Switchyard sidecar with the official `ollama`
Python client: the CLI's stop is `generate(model, keep_alive=0)` with no
prompt, then `ps` must no longer list the model.

Usage: ollama_stop.py HOST MODEL
Environment: ROUTER_KEY (optional) sent as a Bearer token.
Prints every failure and exits 1 if there was any.
"""
import os
import sys

import ollama

from checks import check, run


def main():
    host, model = sys.argv[1], sys.argv[2]
    key = os.environ.get("ROUTER_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    client = ollama.Client(host=host, timeout=20, headers=headers)

    before = [m.model for m in client.ps().models]
    check(any(m.startswith(model) for m in before), f"ps before: lists {model}, got {before!r}")
    r = client.generate(model=model, keep_alive=0)
    check(r.done and r.done_reason == "unload", f"stop: done_reason unload, got {r!r}")
    after = [m.model for m in client.ps().models]
    check(not any(m.startswith(model) for m in after), f"ps after: {model} gone, got {after!r}")


if __name__ == "__main__":
    run(main, "all checks passed")
