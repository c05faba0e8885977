"""Drive a standalone Switchyard sidecar in front of a real llama.cpp server
with the official `ollama` and `openai` Python clients, then check that the
cluster-wide accounting came back to zero in flight with the tokens counted.
Exits non-zero on any failure."""

import json
import os
import sys
import time
import urllib.request

import ollama
import openai

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

# A JSON schema as `format` reaches llama.cpp as a grammar constraint.
schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
try:
    f = client.chat(model=MODEL, messages=[{"role": "user", "content": "How old is a 5 year old? JSON."}],
                    format=schema, options=opts, stream=False)
    content = f.message.content
    parsed = json.loads(content)
except (ValueError, ollama.ResponseError) as e:
    content, parsed = repr(e), None
check("chat format schema is followed", isinstance(parsed, dict) and isinstance(parsed.get("age"), int),
      content)

g = client.generate(model=MODEL, prompt="The capital of France is", options=opts, stream=False)
check("generate non-stream has response", bool(g.response), repr(g))
check("generate non-stream done", g.done is True, repr(g))

gchunks = list(client.generate(model=MODEL, prompt="Count: one, two,", options=opts, stream=True))
check("generate stream ends with done", gchunks[-1].done is True, repr(gchunks[-1]))
check("generate stream has text", bool("".join(c.response or "" for c in gchunks)))

tags = client.list()
check("tags list the model", any(m.model.startswith(MODEL) for m in tags.models), repr(tags))

# The OpenAI API goes to llama.cpp's own /v1 routes, untranslated.
oai = openai.OpenAI(base_url=os.environ["SWITCHYARD_URL"] + "/v1", api_key="unused", timeout=120)
c = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
check("openai chat has content", bool(c.choices[0].message.content), repr(c))
check("openai chat finish_reason", c.choices[0].finish_reason in ("stop", "length"), repr(c))
check("openai chat usage", c.usage is not None and c.usage.completion_tokens > 0, repr(c))

# llama-cpp-python's server ignores `stream_options.include_usage`; the usage
# check is the tokens counted at the end.
# Several, while the discovery probes run: every one ends with its finish
# chunk (with llama_cpp.server's default `--interrupt_requests`, the probes
# cut some short).
for attempt in range(4):
    stream = oai.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    ochunks = list(stream)
    otext = "".join(ch.choices[0].delta.content or "" for ch in ochunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in ochunks if ch.choices and ch.choices[0].finish_reason]
    check(f"openai chat stream {attempt} has text", bool(otext))
    check(f"openai chat stream {attempt} has its finish_reason chunk", finishes in (["stop"], ["length"]),
          repr(finishes))

t = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
check("openai completion has text", bool(t.choices[0].text), repr(t))

models = [m.id for m in oai.models.list()]
check("openai models list the model", MODEL in models, repr(models))

# Accounting: every request above released, with its tokens counted.
def usage():
    with urllib.request.urlopen(os.environ["SWITCHYARD_URL"] + "/api/usage", timeout=10) as r:
        return json.load(r)

deadline = time.time() + 10
u = usage()
while time.time() < deadline and any(n for models in u["usage_counts"].values() for n in models.values()):
    time.sleep(0.1)
    u = usage()
in_flight = sum(n for models in u["usage_counts"].values() for n in models.values())
tokens = sum(n for models in u["token_usage_counts"].values() for n in models.values())
check("nothing left in flight", in_flight == 0, json.dumps(u))
check("tokens counted", tokens > 0, json.dumps(u))

if failures:
    print(f"{len(failures)} failed: {failures}")
    sys.exit(1)
print("real-model e2e: all checks passed")
