"""Drive a Switchyard sidecar with the official `openai` Python client.

Usage: openai_client.py BASE_URL CHAT_MODEL EMBED_MODEL
Environment:
  EXPECT_TEXT        the full reply text the fake backend produces
  EXPECT_EMBEDDINGS  JSON list of the vectors expected for EMBED_INPUTS, in order
  EMBED_INPUTS       JSON list of strings to embed
  API_KEY            key to send (default "unused")
  EXPECT_RETRIEVE    set when BASE_URL is a sidecar: models.retrieve is
                     checked too (the fakes do not serve /v1/models/{id})

Checks chat (non-stream and stream, the final chunk carries finish_reason),
completions, embeddings with a list input (every vector, in order) and the
model list. Prints every failure and exits 1 if there was any.
"""
import json
import os
import sys

import openai

from checks import check, run


def main():
    base, chat_model, embed_model = sys.argv[1], sys.argv[2], sys.argv[3]
    expect_text = os.environ["EXPECT_TEXT"]
    inputs = json.loads(os.environ["EMBED_INPUTS"])
    expect_vecs = json.loads(os.environ["EXPECT_EMBEDDINGS"])
    client = openai.OpenAI(base_url=base + "/v1", api_key=os.environ.get("API_KEY", "unused"),
                           max_retries=0, timeout=20)

    # Chat, not streamed.
    r = client.chat.completions.create(model=chat_model,
                                       messages=[{"role": "user", "content": "hi"}])
    check(r.choices[0].message.content == expect_text,
          f"chat non-stream: content {r.choices[0].message.content!r} != {expect_text!r}")
    check(r.choices[0].finish_reason == "stop",
          f"chat non-stream: finish_reason {r.choices[0].finish_reason!r}")

    # Chat, streamed: every delta, then a chunk with finish_reason.
    text, finish, chunks = "", None, 0
    stream = client.chat.completions.create(model=chat_model, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                text += choice.delta.content
            if choice.finish_reason:
                finish = choice.finish_reason
    check(text == expect_text, f"chat stream: text {text!r} != {expect_text!r}")
    check(finish == "stop", f"chat stream: final finish_reason {finish!r} (chunks: {chunks})")

    # Legacy completions.
    c = client.completions.create(model=chat_model, prompt="once upon", max_tokens=8)
    check(c.choices[0].text == expect_text,
          f"completions: text {c.choices[0].text!r} != {expect_text!r}")

    # Embeddings with a list input: all of them, in order.
    e = client.embeddings.create(model=embed_model, input=inputs)
    got = [d.embedding for d in sorted(e.data, key=lambda d: d.index)]
    check(len(got) == len(expect_vecs),
          f"embeddings: {len(got)} vectors for {len(inputs)} inputs")
    same = len(got) == len(expect_vecs) and all(
        len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))
        for a, b in zip(got, expect_vecs))
    check(same, f"embeddings: vectors differ from the expected ones in order: {got}")

    # Responses API, not streamed and streamed (typed events ending with
    # response.completed, no [DONE]).
    r = client.responses.create(model=chat_model, input="hi")
    check(r.output_text == expect_text,
          f"responses non-stream: output_text {r.output_text!r} != {expect_text!r}")
    # The stored response: retrieved, deleted, then gone (through a
    # sidecar, from the backend that holds it).
    got = client.responses.retrieve(r.id)
    check(got.id == r.id and got.output_text == expect_text, f"responses.retrieve: {got!r}")
    client.responses.delete(r.id)
    try:
        client.responses.retrieve(r.id)
        check(False, "responses.retrieve after delete: no error raised")
    except openai.NotFoundError as err:
        check(r.id in str(err), f"responses.retrieve after delete: message {err}")
    text, completed, kinds = "", None, []
    for event in client.responses.create(model=chat_model, input="hi", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            completed = event.response
    check(text == expect_text, f"responses stream: text {text!r} != {expect_text!r}")
    check(completed is not None and completed.usage is not None
          and completed.usage.output_tokens > 0,
          f"responses stream: no response.completed with usage (events: {kinds})")

    # Model list.
    ids = [m.id for m in client.models.list()]
    check(any(i.split(":")[0] == chat_model.split(":")[0] for i in ids),
          f"models: {chat_model} not in {ids}")

    if os.environ.get("EXPECT_RETRIEVE"):
        got = client.models.retrieve(chat_model)
        check(got.id.split(":")[0] == chat_model.split(":")[0] and got.object == "model",
              f"models.retrieve: {got!r}")
        try:
            client.models.retrieve("no-such-model")
            check(False, "models.retrieve unknown: no error raised")
        except openai.NotFoundError as err:
            check("no-such-model" in str(err), f"models.retrieve unknown: message {err}")

    # Unknown model: the SDK raises NotFoundError (404) with a message.
    try:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
        check(False, "unknown model: no error raised")
    except openai.NotFoundError as err:
        check("no-such-model" in str(err), f"unknown model: message {err}")


if __name__ == "__main__":
    run(main, "all openai checks passed")
