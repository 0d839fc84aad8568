"""Teacher logprobs for on-policy distillation (learner -> vLLM).

For a turn with a hindsight hint, the teacher is the same model shown the hint: the hint
is appended to the last user message (`nextstate.core.hints`, the placement the proxy's
memory serves lessons in), the prompt is rebuilt by vLLM's own ``/tokenize`` (same chat
template, tools and generation prompt as the turn had), and vLLM scores the turn's
*recorded* completion tokens under that prompt (``/v1/completions`` with a token-id
prompt and ``prompt_logprobs``). The result is one teacher logprob per completion token,
aligned exactly with what was sampled; nothing is re-tokenized.

A turn the proxy served with lessons is distilled from its context: the teacher's prompt
is the turn as the model saw it, lessons included (with a hint, the hint joins them), the
student's is the client's request without them (`student_prompt_ids`).

A turn with images (a GUI agent's screenshots) cannot go as a token-id prompt: it is
scored through vLLM's render and token-in routes with its images (`image_teacher`), which
needs the model's image token (``image_token``, from a vision-language model's config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nextstate.core.hints import HINT_MARKER, joined, prompt_with_hint, with_hint
from nextstate.core.routing import Router
from nextstate.core.sessions import image_urls
from nextstate.core.vllm import VLLMClient, VLLMError

__all__ = ["HINT_MARKER", "Teacher", "TeacherError", "completion_logprobs", "score",
           "served_hint", "with_hint"]


class TeacherError(Exception):
    """vLLM could not score the turn (down, prompt too long, ...)."""


def served_hint(turn: dict[str, Any]) -> str | None:
    """The lessons the proxy served ``turn`` with, as the one hint they were (None: none)."""
    lessons = turn.get("lessons")
    hint = lessons.get("hint") if isinstance(lessons, dict) else None
    return hint if isinstance(hint, str) and hint else None


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


async def score(vllm: VLLMClient, model: str, prompt: list[int],
                completion: list[int]) -> list[float]:
    """The logprob ``model`` (as vLLM serves it) gives each ``completion`` token after
    ``prompt``: one prefill of the token ids with ``prompt_logprobs`` (the model's own
    log-softmax, no temperature). Raises VLLMError if vLLM can't, TeacherError if its
    answer has no scores."""
    answer = await vllm.completion({
        "model": model, "prompt": prompt + completion, "max_tokens": 1,
        "temperature": 0, "prompt_logprobs": 0})
    try:
        scored = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        scored = None
    if not scored or len(scored) != len(prompt) + len(completion):
        raise TeacherError("vLLM returned no prompt logprobs for the sequence")
    return completion_logprobs(scored, completion, len(prompt))


class Teacher:
    """Scores recorded completions under a hint, with a model served by vLLM.

    The teacher is the frozen base model ``model`` (the paper's choice) or, given a
    ``router`` that follows the learner's adapters, the policy as it serves the turn's
    user now: their personal adapter if they have one, else the shared adapter, else the
    base model. So a user's own adapter learns from itself shown the hint, as the shared
    one does.
    """

    def __init__(self, vllm: VLLMClient, model: str, *, router: Router | None = None,
                 image_token: int | None = None) -> None:
        self.vllm = vllm  # nextstate.core.vllm: with the backend's key, retried
        self.model = model
        self.router = router
        self.image_token = image_token  # None: a text-only model, or not known

    def scores(self, turn: dict[str, Any]) -> bool:
        """Can it score ``turn``? One with images only when it knows the image token."""
        return self.image_token is not None or not image_urls(_messages(turn))

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
        if image_urls(_messages(turn)):
            return await self._with_images(turn, hint, model, list(completion))
        prompt = await self._prompt_ids(turn, hint, model)
        try:
            return await score(self.vllm, model, prompt, list(completion))
        except VLLMError as exc:
            raise TeacherError(f"vLLM could not score the turn: {exc}") from exc

    async def student_prompt_ids(self, turn: dict[str, Any]) -> list[int] | None:
        """For a turn served with lessons, its prompt without them (the client's own
        request), tokenized as vLLM would have; None for any other turn (the recorded
        prompt is the student's)."""
        if served_hint(turn) is None:
            return None
        if image_urls(_messages(turn)):
            from nextstate.learner.image_teacher import render  # (it builds on this module)

            request = turn["request"]
            return (await render(self.vllm, self.model_for(turn), request["messages"],
                                 request.get("tools")))[0]
        return await self._tokenize(turn, None, self.model_for(turn))

    async def _with_images(self, turn: dict[str, Any], hint: str | None, model: str,
                           completion: list[int]) -> list[float]:
        """The teacher's logprobs for a turn with images: its messages (with the lessons
        it was served with, and the hint) rendered and scored with the images."""
        from nextstate.learner.image_teacher import score_with_images  # (see above)

        if self.image_token is None:
            raise TeacherError("a turn with images is scored with the model's image token: "
                               "give the learner the vision-language model (--model-dir)")
        request = turn["request"]
        extra = joined([served_hint(turn), hint])
        messages = request["messages"] if extra is None else with_hint(request["messages"],
                                                                       extra)
        return await score_with_images(self.vllm, model, messages, completion,
                                       self.image_token, request.get("tools"))

    async def _prompt_ids(self, turn: dict[str, Any], hint: str | None,
                          model: str) -> list[int]:
        """The teacher's prompt: the recorded one (what the model saw, lessons included)
        without a hint; with one, the client's request with the lessons and the hint."""
        if hint is None:
            return list(turn["prompt_token_ids"])
        return await self._tokenize(turn, joined([served_hint(turn), hint]), model)

    async def _tokenize(self, turn: dict[str, Any], hint: str | None,
                        model: str) -> list[int]:
        request = turn["request"]
        if turn.get("endpoint") == "completions":
            prompt = str(request.get("prompt", ""))
            body: dict[str, Any] = {"model": model, "prompt": prompt if hint is None
                                    else prompt_with_hint(prompt, hint)}
        else:
            messages = request["messages"]
            body = {"model": model, "add_generation_prompt": True,
                    "messages": messages if hint is None else with_hint(messages, hint)}
            if request.get("tools"):
                body["tools"] = request["tools"]
        try:
            return await self.vllm.tokenize(body)
        except VLLMError as exc:
            raise TeacherError(f"vLLM could not tokenize the hinted prompt: {exc}") from exc


def _messages(turn: dict[str, Any]) -> list[Any]:
    request = turn.get("request")
    messages = request.get("messages") if isinstance(request, dict) else None
    return messages if isinstance(messages, list) else []
