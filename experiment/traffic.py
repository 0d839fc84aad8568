"""How the simulated users talk to the stack (persona -> **traffic** -> proxy -> vLLM):
one conversation per problem, corrected until pleased, over Chat Completions or the
Anthropic Messages SDK, and the persona's rating of first replies to held-out problems
(sent with recording off, so evaluation is never trained on). The learning benchmarks
(run.py, personal.py) drive these.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from typing import TYPE_CHECKING, Protocol

import httpx

from nextstate.core.sessions import MEMORY_HEADER, USER_HEADER
from nextstate.experiment.personas import Persona, SimulatedUser
from nextstate.experiment.styles import Problem, detect

if TYPE_CHECKING:
    from nextstate.experiment.run import BenchConfig


class Speaker(Protocol):
    """How a simulated user sends a conversation and reads the reply's text."""

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str: ...

    async def aclose(self) -> None: ...


class ChatSpeaker:
    """Chat Completions, as any OpenAI-SDK agent (the client names the user)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str:
        answer = await self.client.post(
            "/chat/completions", headers={"X-Session-Id": session},
            json={"model": policy, "messages": messages, "temperature": config.temperature,
                  "max_tokens": config.max_tokens})
        answer.raise_for_status()
        return str(answer.json()["choices"][0]["message"]["content"] or "")

    async def aclose(self) -> None:
        pass  # the client is the caller's


class MessagesSpeaker:
    """Anthropic Messages through the official SDK (``ANTHROPIC_BASE_URL`` at the proxy),
    as Claude Code talks. The SDK retries transient failures itself, by the same policy
    as `RetryingTransport` (it brings its own HTTP client), so its retries go uncounted."""

    def __init__(self, proxy_url: str, user: str | None = None) -> None:
        import anthropic

        self.sdk = anthropic.AsyncAnthropic(
            base_url=proxy_url, api_key="unused", timeout=600,
            default_headers={USER_HEADER: user} if user else None)

    async def reply(self, policy: str, messages: list[dict[str, str]], session: str,
                    config: BenchConfig) -> str:
        # (The SDK has no temperature argument any more: it goes in the body, as vLLM's
        # Messages route and the proxy read it.)
        answer = await self.sdk.messages.create(
            model=policy, messages=messages, max_tokens=config.max_tokens,  # type: ignore[arg-type]
            extra_body={"temperature": config.temperature},
            extra_headers={"X-Session-Id": session})
        return "".join(block.text for block in answer.content if block.type == "text")

    async def aclose(self) -> None:
        await self.sdk.close()


def speaker_for(api: str, client: httpx.AsyncClient, proxy_url: str,
                user: str | None = None) -> Speaker:
    return MessagesSpeaker(proxy_url, user) if api == "messages" else ChatSpeaker(client)


async def conversation(client: httpx.AsyncClient, policy: str, user: SimulatedUser,
                       problem: Problem, config: BenchConfig,
                       speaker: Speaker | None = None) -> int:
    """One problem: the user reads up to ``max_turns`` replies, correcting until pleased.
    Its last answer is sent as the last turn's next state. Returns the turns it made."""
    speaker = speaker or ChatSpeaker(client)
    session = uuid.uuid4().hex
    messages: list[dict[str, str]] = [{"role": "user", "content": problem.question}]
    for turn in range(user.persona.max_turns):
        reply = await speaker.reply(policy, messages, session, config)
        satisfied, said = user.react(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": said}]
        if satisfied or turn == user.persona.max_turns - 1:
            done = await client.post("/next_state", json={
                "session_id": session, "messages": [{"role": "user", "content": said}],
                "done": True, "source": "adapter:bench"})
            done.raise_for_status()
            return turn + 1
    return user.persona.max_turns


async def evaluate(client: httpx.AsyncClient, policy: str, persona: Persona,
                   problems: list[Problem], config: BenchConfig, memory: bool = True,
                   seeded: bool = False) -> tuple[float, dict[str, float]]:
    """The persona's mean rating of first replies to held-out problems (not recorded),
    and how often each of its preferences was met. ``memory`` False: asked with the
    memory off (the adapter alone); ``seeded``: problem i is always sampled with seed i,
    so that two policies are compared on the same draws."""
    gate = asyncio.Semaphore(config.concurrency)
    headers = {"X-NextState-Record": "off"}
    if not memory:
        headers[MEMORY_HEADER] = "off"

    async def read(i: int, problem: Problem) -> list[str]:
        async with gate:
            answer = await client.post(
                "/chat/completions", headers=headers,
                json={"model": policy, "n": config.eval_samples,
                      "temperature": config.temperature, "max_tokens": config.max_tokens,
                      "messages": [{"role": "user", "content": problem.question}],
                      **({"seed": i} if seeded else {})})
            answer.raise_for_status()
            return [c["message"]["content"] or "" for c in answer.json()["choices"]]

    replies = [r for rs in await asyncio.gather(*(read(i, p) for i, p in enumerate(problems)))
               for r in rs]
    found = [detect(r) for r in replies]
    met = {a: statistics.fmean(f[a] == v for f in found) for a, v in persona.prefers.items()}
    return statistics.fmean(persona.score(r) for r in replies), met
