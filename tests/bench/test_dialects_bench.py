"""The dialects benchmark's own parts: its workloads translate, its measurement runs."""

from __future__ import annotations

from bench.dialects_bench import measure_dialect, messages_request, report, responses_request
from nextstate.proxy.dialects import anthropic, responses
from nextstate.proxy.dialects.conversation import expand


def test_the_workloads_are_valid_coding_agent_requests():
    chat = anthropic.to_chat(messages_request(False))
    assert chat["messages"][0]["role"] == "system" and len(chat["tools"]) == 8
    assert "billing" not in chat["messages"][0]["content"]
    assert sum(m["role"] == "tool" for m in chat["messages"]) == 11
    chat = responses.to_chat(expand(responses_request(False), lambda _: None))
    assert sum(m["role"] == "tool" for m in chat["messages"]) == 11


def test_each_dialect_is_measured_beside_chat():
    rows = [measure_dialect(name, 2) for name in ("messages", "responses")]
    for row in rows:
        assert row["chat_request_us"] > 0 and row["dialect_request_us"] > 0
        assert row["chunks"] > 30 and row["chunk_ratio"] > 0
    assert report(rows).count("\n") == 4
