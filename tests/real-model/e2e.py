"""Drive a standalone Switchyard sidecar in front of a real llama.cpp server
with the official `ollama` Python client. Exits non-zero on any failure."""

import os
import sys

import ollama

client = ollama.Client(host=os.environ["SWITCHYARD_URL"], timeout=120)
MODEL = "smollm2"
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
    if not cond:
        failures.append(name)


msgs = [{"role": "user", "content": "Say hello in one short sentence."}]
opts = {"num_predict": 24, "temperature": 0}

r = client.chat(model=MODEL, messages=msgs, options=opts, stream=False)
check("chat non-stream has content", bool(r.message.content), repr(r))
check("chat non-stream done", r.done is True, repr(r))
check("chat non-stream counts", (r.eval_count or 0) > 0 and (r.prompt_eval_count or 0) > 0, repr(r))
check("chat non-stream durations", (r.total_duration or 0) > 0, repr(r))

chunks = list(client.chat(model=MODEL, messages=msgs, options=opts, stream=True))
text = "".join(c.message.content or "" for c in chunks)
check("chat stream several chunks", len(chunks) > 2, str(len(chunks)))
check("chat stream has text", bool(text))
check("chat stream ends with done", chunks[-1].done is True, repr(chunks[-1]))
check("chat stream final counts", (chunks[-1].eval_count or 0) > 0, repr(chunks[-1]))
check("chat stream done_reason", chunks[-1].done_reason in ("stop", "length"), repr(chunks[-1]))

g = client.generate(model=MODEL, prompt="The capital of France is", options=opts, stream=False)
check("generate non-stream has response", bool(g.response), repr(g))
check("generate non-stream done", g.done is True, repr(g))

gchunks = list(client.generate(model=MODEL, prompt="Count: one, two,", options=opts, stream=True))
check("generate stream ends with done", gchunks[-1].done is True, repr(gchunks[-1]))
check("generate stream has text", bool("".join(c.response or "" for c in gchunks)))

tags = client.list()
check("tags list the model", any(m.model.startswith(MODEL) for m in tags.models), repr(tags))

if failures:
    print(f"{len(failures)} failed: {failures}")
    sys.exit(1)
print("real-model e2e: all checks passed")
