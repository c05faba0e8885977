"""Drive a Switchyard sidecar with the official `ollama` Python client.

Usage: ollama_client.py HOST CHAT_MODEL EMBED_MODEL
Environment:
  EXPECT_TEXT        the full reply text the fake backend produces
  EXPECT_EMBEDDINGS  JSON list of the vectors expected for EMBED_INPUTS, in order
  EMBED_INPUTS       JSON list of strings to embed
  EXPECT_BACKEND_ITEMS  set when the backend is Ollama: list must show its
                     own size, digest and details for CHAT_MODEL

Checks chat (streamed and not; the stream ends with done=True), generate
(both), embed with a list input (every vector, in order), list (tags) and
show. Prints every failure and exits 1 if there was any.
"""
import json
import os
import sys

import ollama

from checks import check, run


def main():
    host, chat_model, embed_model = sys.argv[1], sys.argv[2], sys.argv[3]
    expect_text = os.environ["EXPECT_TEXT"]
    inputs = json.loads(os.environ["EMBED_INPUTS"])
    expect_vecs = json.loads(os.environ["EXPECT_EMBEDDINGS"])
    client = ollama.Client(host=host, timeout=20)
    messages = [{"role": "user", "content": "hi"}]

    r = client.chat(model=chat_model, messages=messages, stream=False)
    check(r.message.content == expect_text,
          f"chat non-stream: content {r.message.content!r} != {expect_text!r}")
    check(r.done is True, f"chat non-stream: done {r.done!r}")

    text, last, n = "", None, 0
    for part in client.chat(model=chat_model, messages=messages, stream=True):
        n += 1
        text += part.message.content or ""
        last = part
    check(text == expect_text, f"chat stream: text {text!r} != {expect_text!r}")
    check(last is not None and last.done is True,
          f"chat stream: last of {n} chunks has done={getattr(last, 'done', None)!r}")
    check(last is not None and last.done_reason == "stop",
          f"chat stream: done_reason {getattr(last, 'done_reason', None)!r}")

    g = client.generate(model=chat_model, prompt="once upon", stream=False)
    check(g.response == expect_text, f"generate non-stream: {g.response!r} != {expect_text!r}")
    text, last = "", None
    for part in client.generate(model=chat_model, prompt="once upon", stream=True):
        text += part.response or ""
        last = part
    check(text == expect_text, f"generate stream: text {text!r} != {expect_text!r}")
    check(last is not None and last.done is True,
          f"generate stream: last chunk done={getattr(last, 'done', None)!r}")

    e = client.embed(model=embed_model, input=inputs)
    got = list(e.embeddings)
    check(len(got) == len(expect_vecs), f"embed: {len(got)} vectors for {len(inputs)} inputs")
    same = len(got) == len(expect_vecs) and all(
        len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))
        for a, b in zip(got, expect_vecs))
    check(same, f"embed: vectors differ from the expected ones in order: {got}")

    listed = client.list().models
    names = [m.model for m in listed]
    check(any(n.split(":")[0] == chat_model.split(":")[0] for n in names),
          f"list: {chat_model} not in {names}")
    if os.environ.get("EXPECT_BACKEND_ITEMS"):
        item = next((m for m in listed
                     if m.model.split(":")[0] == chat_model.split(":")[0]), None)
        check(item is not None and (item.size or 0) > 0 and bool(item.digest)
              and item.details is not None and bool(item.details.quantization_level),
              f"list items: the backend's own size, digest and details, got {item!r}")

    s = client.show(chat_model)
    check(s is not None and (s.details is not None or s.modelinfo is not None),
          f"show: no details in {s!r}")

    try:
        client.chat(model="no-such-model", messages=messages, stream=False)
        check(False, "unknown model: no error raised")
    except ollama.ResponseError as err:
        check(err.status_code == 404 and "no-such-model" in str(err.error),
              f"unknown model: status {err.status_code}, error {err.error!r}")


if __name__ == "__main__":
    run(main, "all ollama checks passed")
