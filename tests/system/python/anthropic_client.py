"""Drive a Switchyard sidecar with the official `anthropic` Python client
(the Messages API that Claude Code speaks).

Usage: anthropic_client.py BASE_URL MODEL
Environment:
  EXPECT_TEXT  the full reply text the fake backend produces
  API_KEY      key to send as `x-api-key` (default "unused")
  EXPECT_INPUT_TOKENS  when set, messages.count_tokens must answer this count

Checks messages.create (the text and the usage), the streaming helper (every
text delta, then the final message with its usage), and that an unknown
model raises NotFoundError naming it. Prints every failure and exits 1 if
there was any.
"""
import os
import sys

import anthropic

from checks import check, run


def main():
    base, model = sys.argv[1], sys.argv[2]
    expect_text = os.environ["EXPECT_TEXT"]
    client = anthropic.Anthropic(base_url=base, api_key=os.environ.get("API_KEY", "unused"),
                                 max_retries=0, timeout=20)
    ask = [{"role": "user", "content": "hi"}]

    m = client.messages.create(model=model, max_tokens=64, messages=ask)
    text = "".join(b.text for b in m.content if b.type == "text")
    check(text == expect_text, f"messages: text {text!r} != {expect_text!r}")
    check(m.stop_reason == "end_turn", f"messages: stop_reason {m.stop_reason!r}")
    check(m.usage.output_tokens > 0, f"messages: usage {m.usage!r}")

    with client.messages.stream(model=model, max_tokens=64, messages=ask) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(streamed == expect_text, f"messages stream: text {streamed!r} != {expect_text!r}")
    check(final.stop_reason == "end_turn" and final.usage.output_tokens > 0,
          f"messages stream: final message {final!r}")

    expect_count = os.environ.get("EXPECT_INPUT_TOKENS")
    if expect_count is not None:
        for _ in range(4):
            n = client.messages.count_tokens(model=model, messages=ask)
            check(n.input_tokens == int(expect_count), f"count_tokens: {n!r}")

    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=ask)
        check(False, "unknown model: no error raised")
    except anthropic.NotFoundError as err:
        check("no-such-model" in str(err), f"unknown model: message {err}")


if __name__ == "__main__":
    run(main, "all anthropic checks passed")
