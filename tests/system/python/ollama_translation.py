"""Drive the translated paths of a Switchyard sidecar with the official
`ollama` Python client: a sidecar whose only backend speaks the OpenAI API,
so every call here is translated (Ollama API -> OpenAI API -> Ollama API).

Usage: ollama_translation.py HOST MODEL
Environment:
  EXPECT_TEXT           the full reply text the fake backend produces
  EXPECT_THINKING       the full reasoning text it produces
  EXPECT_TOOL           JSON {"name": .., "arguments": {..}} of its one tool call
  EXPECT_PROMPT_TOKENS  prompt tokens it reports
  EXPECT_EVAL_COUNT     completion tokens it reports
  EMBED_INPUTS          JSON list of strings to embed
  EXPECT_EMBEDDINGS     JSON list of the vectors expected for EMBED_INPUTS, in order
  IMAGE_B64             a small image, base64 (sent as bytes; the client encodes it)

Checks: chat not streamed and streamed (content, thinking, the tool call
whole in one chunk with object arguments, final counts and durations),
chat with an image and a tool-call history, generate both ways, embed
with a list (count and order) and a string, show, list and ps. Prints
every failure and exits 1 if there was any.
"""
import base64
import json
import os
import sys

import ollama

from checks import check, run


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}]


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))


def check_final(label, r, prompt_tokens, eval_count):
    """The done:true object: reason, counts, and durations in ns."""
    check(r.done is True, f"{label}: done {r.done!r}")
    check(r.done_reason == "stop", f"{label}: done_reason {r.done_reason!r}")
    check(r.prompt_eval_count == prompt_tokens,
          f"{label}: prompt_eval_count {r.prompt_eval_count!r} != {prompt_tokens}")
    check(r.eval_count == eval_count, f"{label}: eval_count {r.eval_count!r} != {eval_count}")
    total, ev = r.total_duration, r.eval_duration
    check(isinstance(total, int) and isinstance(ev, int) and total > 0 and ev > 0,
          f"{label}: durations must be positive integers (ns): total {total!r}, eval {ev!r}")
    check(isinstance(total, int) and isinstance(ev, int) and total >= ev,
          f"{label}: total_duration {total!r} < eval_duration {ev!r}")


def check_calls(label, calls, tool):
    calls = list(calls or [])
    check(len(calls) == 1, f"{label}: {len(calls)} tool calls, want 1: {calls!r}")
    if calls:
        fn = calls[0].function
        check(fn.name == tool["name"], f"{label}: tool name {fn.name!r}")
        check(dict(fn.arguments) == tool["arguments"],
              f"{label}: tool arguments {fn.arguments!r} != {tool['arguments']!r}")


def main():
    host, model = sys.argv[1], sys.argv[2]
    text = os.environ["EXPECT_TEXT"]
    thinking = os.environ["EXPECT_THINKING"]
    tool = json.loads(os.environ["EXPECT_TOOL"])
    prompt_tokens = int(os.environ["EXPECT_PROMPT_TOKENS"])
    eval_count = int(os.environ["EXPECT_EVAL_COUNT"])
    inputs = json.loads(os.environ["EMBED_INPUTS"])
    expect_vecs = json.loads(os.environ["EXPECT_EMBEDDINGS"])
    image = base64.b64decode(os.environ["IMAGE_B64"])
    client = ollama.Client(host=host, timeout=20)
    messages = [{"role": "user", "content": "weather in Oslo?"}]

    # Chat, not streamed.
    r = client.chat(model=model, messages=messages, tools=TOOLS, think=True, stream=False)
    check(r.message.content == text, f"chat: content {r.message.content!r} != {text!r}")
    check(r.message.thinking == thinking,
          f"chat: thinking {r.message.thinking!r} != {thinking!r}")
    check_calls("chat", r.message.tool_calls, tool)
    check_final("chat", r, prompt_tokens, eval_count)

    # Chat, streamed.
    got_text, got_thinking, n, tool_chunks, calls, last = "", "", 0, 0, [], None
    for part in client.chat(model=model, messages=messages, tools=TOOLS, think=True,
                            stream=True):
        n += 1
        if last is not None:
            check(last.done is False, f"chat stream: chunk {n - 1} of several has done=True")
        got_text += part.message.content or ""
        got_thinking += part.message.thinking or ""
        if part.message.tool_calls:
            tool_chunks += 1
            calls.extend(part.message.tool_calls)
        last = part
    check(n >= 4, f"chat stream: only {n} chunks (not streamed?)")
    check(got_text == text, f"chat stream: text {got_text!r} != {text!r}")
    check(got_thinking == thinking, f"chat stream: thinking {got_thinking!r} != {thinking!r}")
    check(tool_chunks == 1, f"chat stream: tool calls in {tool_chunks} chunks, want 1 (whole)")
    check_calls("chat stream", calls, tool)
    check(last is not None, "chat stream: no chunk at all")
    if last is not None:
        check(last.message.content == "", f"chat stream: final content {last.message.content!r}")
        check_final("chat stream", last, prompt_tokens, eval_count)

    # Chat with an image and a tool-call history (the test inspects what the
    # backend received).
    history = [
        {"role": "user", "content": "what is this?", "images": [image]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": tool["name"], "arguments": tool["arguments"]}}]},
        {"role": "tool", "content": "{\"temp\": 3}", "tool_name": tool["name"]},
        {"role": "user", "content": "and tomorrow?"},
    ]
    r = client.chat(model=model, messages=history, tools=TOOLS, stream=False)
    check(r.message.content == text, f"chat history: content {r.message.content!r}")

    # Generate, not streamed and streamed.
    g = client.generate(model=model, prompt="once upon", think=True, stream=False)
    check(g.response == text, f"generate: {g.response!r} != {text!r}")
    check(g.thinking == thinking, f"generate: thinking {g.thinking!r} != {thinking!r}")
    check_final("generate", g, prompt_tokens, eval_count)
    got_text, got_thinking, n, last = "", "", 0, None
    for part in client.generate(model=model, prompt="once upon", think=True, stream=True):
        n += 1
        got_text += part.response or ""
        got_thinking += part.thinking or ""
        last = part
    check(n >= 3, f"generate stream: only {n} chunks")
    check(got_text == text, f"generate stream: text {got_text!r} != {text!r}")
    check(got_thinking == thinking, f"generate stream: thinking {got_thinking!r}")
    check(last is not None, "generate stream: no chunk at all")
    if last is not None:
        check_final("generate stream", last, prompt_tokens, eval_count)

    # Embeddings: a list (every vector, in order) and a single string.
    e = client.embed(model=model, input=inputs)
    got = [list(v) for v in e.embeddings]
    check(len(got) == len(inputs), f"embed: {len(got)} vectors for {len(inputs)} inputs")
    for i, (a, b) in enumerate(zip(got, expect_vecs)):
        check(close(a, b), f"embed: vector {i} ({inputs[i]!r}) differs: {a} != {b}")
    e = client.embed(model=model, input=inputs[0])
    got = [list(v) for v in e.embeddings]
    check(len(got) == 1 and close(got[0], expect_vecs[0]),
          f"embed one string: {got!r}")

    # Listings.
    s = client.show(model)
    check(s.details is not None, f"show: no details in {s!r}")
    check("completion" in (s.capabilities or []), f"show: capabilities {s.capabilities!r}")
    models = client.list().models
    names = [m.model for m in models]
    want = model if ":" in model else f"{model}:latest"
    check(want in names, f"list: {want} not in {names}")
    item = next((m for m in models if m.model == want), None)
    check(item is not None and item.details is not None, f"list: no details for {want}")
    ps = client.ps()
    check(isinstance(list(ps.models), list), f"ps: {ps!r}")


if __name__ == "__main__":
    run(main, "all translation checks passed")
