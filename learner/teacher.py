"""Teacher logprobs for on-policy distillation (learner -> vLLM).

For a turn with a hindsight hint, the teacher is the same model shown the hint: the hint
is appended to the last user message, the prompt is rebuilt by vLLM's own ``/tokenize``
(same chat template, tools and generation prompt as the turn had), and vLLM scores the
turn's *recorded* completion tokens under that prompt (``/v1/completions`` with a
token-id prompt and ``prompt_logprobs``). The result is one teacher logprob per
completion token, aligned exactly with what was sampled; nothing is re-tokenized.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from nextstate.core.routing import Router
from nextstate.core.vllm import VLLMClient, VLLMError

HINT_MARKER = "\n\n[user's hint / instruction]\n"


class TeacherError(Exception):
    """vLLM could not score the turn (down, prompt too long, ...)."""


def with_hint(messages: Sequence[dict[str, Any]], hint: str) -> list[dict[str, Any]]:
    """The messages with ``hint`` appended to the last user message (or added as one)."""
    out = copy.deepcopy(list(messages))
    for message in reversed(out):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                message["content"] = [*content, {"type": "text", "text": HINT_MARKER + hint}]
            else:
                message["content"] = f"{content or ''}{HINT_MARKER}{hint}"
            return out
    return [*out, {"role": "user", "content": HINT_MARKER.lstrip("\n") + hint}]


def completion_logprobs(prompt_logprobs: Sequence[Any], completion_ids: Sequence[int],
                        prompt_len: int) -> list[float]:
    """Pick the logprob of each completion token out of vLLM's ``prompt_logprobs`` for the
    sequence prompt + completion (entry i scores token i; entry 0 is null)."""
    out = []
    for position, token in enumerate(completion_ids, start=prompt_len):
        entry = prompt_logprobs[position]
        if not entry or str(token) not in entry:
            raise TeacherError(f"no logprob for token {token} at position {position}")
        out.append(float(entry[str(token)]["logprob"]))
    return out


class Teacher:
    """Scores recorded completions under a hint, with a model served by vLLM.

    The teacher is the frozen base model ``model`` (the paper's choice) or, given a
    ``router`` that follows the learner's adapters, the policy as it serves the turn's
    user now: their personal adapter if they have one, else the shared adapter, else the
    base model. So a user's own adapter learns from itself shown the hint, as the shared
    one does.
    """

    def __init__(self, vllm: VLLMClient, model: str, *, router: Router | None = None,
                 ) -> None:
        self.vllm = vllm  # nextstate.core.vllm: with the backend's key, retried
        self.model = model
        self.router = router

    async def close(self) -> None:
        await self.vllm.aclose()

    def model_for(self, turn: dict[str, Any]) -> str:
        """The served name of ``turn``'s teacher."""
        if self.router is None or self.router.policy is None:
            return self.model
        return self.router.route(self.router.policy, turn.get("user")) or self.model

    async def logprobs(self, turn: dict[str, Any], hint: str | None) -> list[float]:
        """Teacher logprobs of ``turn``'s completion tokens; ``hint=None`` scores the
        original prompt (which reproduces the sampler's logprobs)."""
        completion = turn.get("completion_token_ids") or []
        if not completion:
            raise TeacherError("the turn has no completion tokens")
        model = self.model_for(turn)
        prompt = await self._prompt_ids(turn, hint, model)
        try:
            answer = await self.vllm.completion({
                "model": model, "prompt": prompt + list(completion), "max_tokens": 1,
                "temperature": 0, "prompt_logprobs": 0})
        except VLLMError as exc:
            raise TeacherError(f"vLLM could not score the turn: {exc}") from exc
        try:
            scored = answer["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            scored = None
        if not scored or len(scored) != len(prompt) + len(completion):
            raise TeacherError("vLLM returned no prompt logprobs for the sequence")
        return completion_logprobs(scored, completion, len(prompt))

    async def _prompt_ids(self, turn: dict[str, Any], hint: str | None,
                          model: str) -> list[int]:
        request = turn["request"]
        if turn.get("endpoint") == "completions":
            if hint is None:
                return list(turn["prompt_token_ids"])
            prompt = f"{request.get('prompt', '')}{HINT_MARKER}{hint}"
            body: dict[str, Any] = {"model": model, "prompt": prompt}
        else:
            if hint is None:
                return list(turn["prompt_token_ids"])
            body = {"model": model, "add_generation_prompt": True,
                    "messages": with_hint(request["messages"], hint)}
            if request.get("tools"):
                body["tools"] = request["tools"]
        try:
            return await self.vllm.tokenize(body)
        except VLLMError as exc:
            raise TeacherError(f"vLLM could not tokenize the hinted prompt: {exc}") from exc
