"""A chat loop with the OpenAI SDK through nextstate, with feedback.

Run `make run` in another terminal, then:

    OPENAI_BASE_URL=http://127.0.0.1:8400/v1 python examples/openai_chat_loop.py

Type a message to chat. Type `+1` or `-1` (optionally followed by a hint, e.g.
`-1 answer in one sentence`) to rate the last reply. An empty line quits. Every turn is
recorded by the proxy with its next state: your following message.
"""

from __future__ import annotations

import argparse
import sys

from nextstate.adapters.openai import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nextstate-toy")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    session = Session()
    client = session.client()
    messages: list[dict[str, str]] = []
    print(f"session {session.id}; +1/-1 [hint] rates the last reply, empty line quits")
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        if text.split()[0] in ("+1", "-1", "0"):
            score, _, hint = text.partition(" ")
            session.feedback(int(score), hint=hint or None)
            print(f"[feedback {score} recorded for turn {session.last_turn_id}]")
            continue
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(model=args.model, messages=messages,
                                               max_tokens=args.max_tokens)
        content = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": content})
        print(f"assistant: {content}")


if __name__ == "__main__":
    main()
