"""Scripted traffic for the learner (client -> proxy -> vLLM; proxy -> store -> learner):
sessions of a question, the model's reply and a correction, some with explicit feedback.
The vLLM benchmark and the integration tests drive a real proxy with it.
"""

from __future__ import annotations

import httpx

TOY = "nextstate-toy"
CORRECTIONS = ["No, that's wrong. Give me just the number.",
               "Try again, and keep it short please.",
               "That's not what I asked. Answer in one sentence.",
               "I meant the total, not each part."]


def converse(base_url: str, sessions: int, offset: int = 0, user: str | None = None,
             feedback: bool = True, api_key: str | None = None) -> None:
    """The learner's material: sessions of two turns, a question, a reply and a correction
    (with ``feedback``, every third one also carries a -1 and a hint), as ``user`` when
    given, with the proxy's client key ``api_key`` when given."""
    ask = {"model": TOY, "temperature": 1.0, "max_tokens": 12}
    headers = {"X-NextState-User": user} if user else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as client:
        for i in range(offset, offset + sessions):
            question = [{"role": "user", "content": f"What is {i} plus {i + 3}?"}]
            first = client.post("/chat/completions", json={**ask, "messages": question})
            first.raise_for_status()
            reply = first.json()["choices"][0]["message"]["content"]
            follow = [*question, {"role": "assistant", "content": reply},
                      {"role": "user", "content": CORRECTIONS[i % len(CORRECTIONS)]}]
            done = {"X-Session-Done": "1"}
            if feedback and i % 3 == 0:
                done |= {"X-NextState-Feedback": "-1",
                         "X-NextState-Hint": "State only the final number."}
            client.post("/chat/completions", json={**ask, "messages": follow},
                        headers=done).raise_for_status()
