"""Fixtures shared by the learner's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nextstate.learner import process
from tests.proxy.fake_vllm import FakeVLLM


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVLLM]:
    """Every client to vLLM the learner makes talks to one fake vLLM, which wants the
    backend's key ("k") on every call."""
    fake = FakeVLLM(api_key="k")
    monkeypatch.setattr(process, "VLLMClient", lambda url, key, **_: fake.client(url, key))
    yield fake
    assert fake.unauthorized == []
