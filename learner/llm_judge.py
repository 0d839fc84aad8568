"""A judge model behind litellm: process reward and hindsight hints (learner -> judge).

store -> learner -> judge -> trainer. `LLMJudge` shows a judge model (any litellm model
string: a vLLM we run, a hosted API) the recorded turn twice over: the evaluative prompt
asks whether the next state shows the reply worked (+1), failed (-1) or neither (0); the
hint prompt asks whether the next state reveals what would have made the reply better.
Each prompt is sampled ``votes`` times at ``temperature``; `votes.majority` turns the
evaluative answers into the score and `votes.select_hints` picks the hints. Explicit
feedback on the turn outranks the judge's score and its hint goes first.

A GUI agent's turn is judged on its screens: the last image of the prompt (what the
agent saw before it acted) and the next state's last image (what its action led to) go
to the judge as image parts beside the text, so the judge model must be a vision model.
The judging stage hands over turns with their images inline (the store keeps references).

Failures: each call is retried with exponential backoff; the judgment needs one answered
evaluative call with a valid vote, else `JudgeError` (the learner retries the turn later).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from nextstate.core.sessions import image_urls, text_of
from nextstate.learner.judgment import JudgeError, Judgment
from nextstate.learner.rules import Feedback, explicit_feedback
from nextstate.learner.votes import HINT_END, HINT_START, majority, parse_vote, select_hints

Messages = list[dict[str, Any]]

# Values people leave in a key they have not filled in (compared lowercased).
PLACEHOLDER_KEYS = frozenset({"", "sk-...", "sk-xxx", "xxx", "your-api-key", "your_api_key",
                              "your-key", "changeme", "placeholder", "none", "null", "empty",
                              "todo", "<key>", "api-key"})


class JudgeConfigError(ValueError):
    """The judge can't work as configured (a missing or placeholder key): refused at
    start with one sentence, rather than failing every turn later."""


def check_key(model: str, api_base: str | None, api_key: str | None,
              environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a judge whose key is missing or a placeholder. A judge at an ``api_base`` of
    one's own (a vLLM) may need no key; a hosted one needs its provider's."""
    if api_key is not None:
        if api_key.strip().lower() in PLACEHOLDER_KEYS:
            raise JudgeConfigError(f"the judge's API key looks like a placeholder "
                                   f"({api_key!r}): give the real key, or use --judge rules")
        return
    if api_base is not None:
        return
    provider_key = f"{model.split('/')[0].upper()}_API_KEY"
    value = environ.get(provider_key)
    if value is not None and value.strip().lower() in PLACEHOLDER_KEYS:
        raise JudgeConfigError(f"{provider_key} looks like a placeholder ({value!r}): set "
                               f"the real key for the judge model {model}, or use --judge "
                               "rules")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # lazily: importing it takes seconds

    missing = [k for k in litellm.validate_environment(model).get("missing_keys") or []
               if not environ.get(k)]
    if missing:
        raise JudgeConfigError(f"the judge model {model} needs {', '.join(missing)} in the "
                               "environment: set it, or use --judge rules")


Complete = Callable[[Messages], Awaitable[str]]

CONTEXT_MESSAGES = 6  # earlier messages shown; the reply and the next state carry the signal
CONTEXT_CHARS = 1200  # per earlier message
FOCUS_CHARS = 4000  # for the reply and for each next-state message

EVALUATIVE_SYSTEM = """\
You judge one step of an AI assistant's work. You are shown the conversation so far, the \
assistant's reply (with any tool calls it made) and the next state: what came right after \
the reply, either the user's next message or the results of the tools it called. Use the \
next state as evidence of whether the reply did its job.

Answer 1 when the next state shows the reply worked: the user thanks or approves, or simply \
moves on to a next request; the tool calls ran and returned a plain result (an exit code of 0 \
is a success).
Answer -1 when the next state shows the reply failed: the user asks for a redo, corrects it, \
complains about it (too long, wrong format, wrong tone), or repeats or rephrases the same \
request; or a tool reports an error the reply's call caused (an exception, a traceback, \
a non-zero exit code, a wrong argument). A request to change the reply is negative feedback \
about it, not a new instruction.
Answer 0 when the next state tells neither (a bare "ok", an error the reply did not cause, \
too little to tell).

Reason briefly, then end with exactly one of \\boxed{1}, \\boxed{-1} or \\boxed{0}. Only \
your last \\boxed{} counts."""

HINT_SYSTEM = f"""\
You review one step of an AI assistant's work with hindsight. You are shown the \
conversation so far, the assistant's reply (with any tool calls it made) and the next \
state: the user's next message or the results of the tools it called. Decide whether the \
next state reveals something that would have made the reply better: a preference or detail \
the user states, a mistake the user or a tool points out, the right tool, argument or format.

If it does, end with \\boxed{{1}} followed by a hint between {HINT_START} and {HINT_END}: \
1 to 3 sentences, concrete and actionable, addressed to the assistant as an instruction \
for writing that same reply again, understandable without seeing the next state. Example:
\\boxed{{1}}
{HINT_START}Give the distance in kilometres; the user works in metric units.{HINT_END}

If it does not (the reply was already right, or the next state teaches nothing), end with \
\\boxed{{-1}} and no hint. Reason briefly first; only your last \\boxed{{}} counts."""


def _clip(text: str, limit: int) -> str:
    # Keep both ends: a request states its goal first, a tool's error comes last.
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def render_message(message: Mapping[str, Any], limit: int) -> str:
    """One message as the judge reads it: its role, text and tool calls."""
    role = str(message.get("role") or "?")
    if role == "tool":
        name = message.get("name") or message.get("tool_call_id")
        role = f"tool result {name}" if name else "tool result"
        if message.get("status") == "error":
            role += ", status: error"
    parts = [text_of(message.get("content")).strip()]
    for call in message.get("tool_calls") or []:
        fn = (call.get("function") or {}) if isinstance(call, Mapping) else {}
        parts.append(f"-> calls tool {fn.get('name')}({fn.get('arguments') or ''})")
    body = "\n".join(p for p in parts if p) or "(empty)"
    return f"[{role}]\n{_clip(body, limit)}"


def describe_turn(turn: Mapping[str, Any]) -> str:
    """The conversation so far, the reply and the next state, as three sections."""
    request = turn.get("request") or {}
    choices = (turn.get("response") or {}).get("choices") or [{}]
    history: Sequence[Mapping[str, Any]] = request.get("messages") or []
    if not history and isinstance(request.get("prompt"), str):  # completions endpoint
        history = [{"role": "prompt", "content": request["prompt"]}]
    reply = choices[0].get("message") or {"role": "assistant", "content": choices[0].get("text")}
    shown = history[-CONTEXT_MESSAGES:]
    lines = ["## Conversation so far"]
    if len(history) > len(shown):
        lines.append(f"({len(history) - len(shown)} earlier messages not shown)")
    lines += [render_message(m, CONTEXT_CHARS) for m in shown]
    lines += ["", "## The assistant's reply", render_message(reply, FOCUS_CHARS)]
    lines += ["", "## Next state"]
    lines += [render_message(m, FOCUS_CHARS) for m in turn.get("next_state") or []]
    return "\n".join(lines)


def screens(turn: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(before, after): the last image of the turn's prompt and of its next state (their
    URLs), None where there is none. Raises JudgeError for an image still referenced
    rather than inline: a provider could not read it."""
    before = image_urls((turn.get("request") or {}).get("messages") or [])
    after = image_urls(turn.get("next_state") or [])
    shown = (before[-1] if before else None, after[-1] if after else None)
    if any(url is not None and url.startswith("nextstate-image:") for url in shown):
        raise JudgeError("the turn's images are store references, not inline: read it "
                         "with its images (Images.inline) before judging")
    return shown


def _content(turn: Mapping[str, Any], ask: str) -> str | list[dict[str, Any]]:
    """The user message's content: the text, then the screens as image parts, if any."""
    text = describe_turn(turn) + "\n\n" + ask
    before, after = screens(turn)
    if before is None and after is None:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for label, url in (("The screen before the reply (the last image of the conversation "
                        "so far):", before),
                       ("The screen after the reply (the next state's image):", after)):
        if url is not None:
            parts += [{"type": "text", "text": label},
                      {"type": "image_url", "image_url": {"url": url}}]
    return parts


def evaluative_prompt(turn: Mapping[str, Any]) -> Messages:
    """The process-reward prompt: did the reply work, judging by the next state?"""
    return [{"role": "system", "content": EVALUATIVE_SYSTEM},
            {"role": "user", "content": _content(
                turn, "Did the reply work? End with \\boxed{1}, \\boxed{-1} or \\boxed{0}.")}]


def hint_prompt(turn: Mapping[str, Any]) -> Messages:
    """The hindsight prompt: does the next state show how the reply could be better?"""
    return [{"role": "system", "content": HINT_SYSTEM},
            {"role": "user", "content": _content(
                turn, "Does the next state reveal how the reply could have been better?")}]


class _CallFailed(Exception):
    """One judge call failed for good (after its retries); the reason is the message."""


def _retryable(exc: BaseException) -> bool:
    # Bad request, auth, unknown model: the same call fails again; anything else (time
    # out, rate limit, connection, 5xx) may pass on the next try.
    return getattr(exc, "status_code", None) not in (400, 401, 403, 404, 422)


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"


class LLMJudge:
    """A `Judge` backed by any litellm model. ``complete`` replaces the model call (an
    async function from chat messages to the answer text), for tests and custom clients.
    ``retries`` is how many times a failed call is tried again, after ``backoff``,
    ``2 * backoff``, ... seconds."""

    prompt_version = "prm-1"

    def __init__(self, model: str, *, api_base: str | None = None, api_key: str | None = None,
                 votes: int = 3, temperature: float = 0.6, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_concurrency: int = 8,
                 max_tokens: int = 1024, complete: Complete | None = None) -> None:
        if votes < 1:
            raise ValueError("votes must be at least 1")
        self.model = model
        self.name = f"llm:{model}"
        self.api_base, self.api_key = api_base, api_key
        self.votes, self.temperature, self.max_tokens = votes, temperature, max_tokens
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._complete: Complete = complete or self._litellm
        # Shared by all the turns judged concurrently, so the judge server sees at most
        # this many requests from us however many turns the learner has in flight.
        self._slots = asyncio.Semaphore(max_concurrency)

    async def _litellm(self, messages: Messages) -> str:
        # litellm downloads a price list when imported unless told not to; the learner
        # makes no network call but the judge's own.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm  # lazily: importing it takes seconds

        response = await litellm.acompletion(
            model=self.model, messages=messages, api_base=self.api_base,
            api_key=self.api_key, temperature=self.temperature, max_tokens=self.max_tokens,
            timeout=self.timeout, num_retries=0, drop_params=True)
        return str(response.choices[0].message.content or "")

    async def _call(self, messages: Messages) -> str:
        """One judge answer, retried with exponential backoff; raises _CallFailed."""
        error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
            try:
                async with self._slots:  # not held while backing off
                    return await asyncio.wait_for(self._complete(messages), self.timeout)
            except Exception as exc:  # CancelledError is not an Exception: it propagates
                error = exc
                if not _retryable(exc):
                    break
        assert error is not None
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        raise _CallFailed(f"{_reason(error, self.timeout)} ({tries})") from error

    async def _ask(self, messages: Messages) -> tuple[list[str], list[str]]:
        """``votes`` answers to one prompt, concurrently: (answers, failure reasons)."""
        results = await asyncio.gather(*(self._call(messages) for _ in range(self.votes)),
                                       return_exceptions=True)
        answers, failures = [], []
        for result in results:
            if isinstance(result, _CallFailed):
                failures.append(str(result))
            elif isinstance(result, BaseException):
                raise result  # a bug, not a judge failure
            else:
                answers.append(result)
        return answers, failures

    async def judge(self, turn: dict[str, Any]) -> Judgment:
        feedback = explicit_feedback(turn)
        if not turn.get("next_state"):
            if turn.get("next_state_status") == "pending" and feedback is None:
                raise JudgeError("the next state is still pending")
            return self._judgment(0, (), (), (), feedback, {"reason": "no next state"})
        (answers, failed), (hint_answers, hint_failed) = await asyncio.gather(
            self._ask(evaluative_prompt(turn)), self._ask(hint_prompt(turn)))
        votes = tuple(parse_vote(a) for a in answers)
        if feedback is None and not answers:
            which = "every judge call" if not hint_answers else "every evaluative judge call"
            raise JudgeError(f"{which} failed: {failed[-1]}")
        if feedback is None and all(v is None for v in votes):
            raise JudgeError(f"all {len(votes)} evaluative answers were malformed "
                             "(no final \\boxed{1}, \\boxed{0} or \\boxed{-1})")
        extra: dict[str, Any] = {"hint_texts": list(hint_answers)}
        if failed or hint_failed:
            extra["errors"] = failed + hint_failed
        return self._judgment(majority(votes), votes, tuple(answers),
                              select_hints(hint_answers), feedback, extra)

    def _judgment(self, score: int, votes: tuple[int | None, ...], texts: tuple[str, ...],
                  hints: tuple[str, ...], feedback: Feedback | None,
                  extra: dict[str, Any]) -> Judgment:
        source = "judge"
        if feedback is not None:
            # The person (or test harness) who gave feedback knows better than the judge;
            # the judge's own score is kept for comparison.
            extra["judge_score"], score, source = score, feedback.score, "feedback"
            if feedback.hint:
                hints = (feedback.hint, *(h for h in hints if h != feedback.hint))
        return Judgment(score=score, votes=votes, texts=texts, hints=hints, judge=self.name,
                        prompt_version=self.prompt_version, source=source, extra=extra)
