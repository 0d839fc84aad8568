"""Teacher logprobs for a prompt with images (learner -> vLLM): the exact path, measured.

The text teacher (`nextstate.learner.teacher`) rebuilds the hinted prompt with ``/tokenize``
and scores the recorded completion with ``/v1/completions`` and a token-id prompt. A
token-id prompt cannot carry an image, so for a turn with screenshots the teacher takes
vLLM's token-in route instead (vLLM started with ``--enable-scale-out``):

    POST /v1/chat/completions/render     the hinted messages, images included ->
                                         token ids with each image's placeholders
                                         expanded, and where each image lies
    collapse_placeholders                each image's range back to the one placeholder
                                         token the chat template writes
    POST /inference/v1/generate          those ids + the recorded completion ids, the
                                         images as content parts, prompt_logprobs: vLLM
                                         expands the images again, the same way
    check + pick                         the prompt vLLM scored must be the rendered one
                                         plus the completion, token for token

The completion's tokens are never re-tokenized. On the VLM toy this reproduces the
sampled logprobs exactly (difference 0.0), through a LoRA adapter too. What does not work
on vLLM 0.32, measured (docs/vlm-on-cpu.md): ``/inference/v1/generate`` with the rendered
``features`` (500: Idefics3's placeholders are sparse, the encoder cache holds 80
embeddings where the range has 93 tokens); already-expanded ids with the images (vLLM
expands the first placeholder token a second time); chat completions with the completion
as a final assistant message (``continue_final_message``: the text is re-tokenized, the
ids differ); ``/v1/completions`` with ``multi_modal_data`` (ignored: scored without the
image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nextstate.core.sessions import image_urls
from nextstate.core.vllm import VLLMClient, VLLMError, VLLMRefused
from nextstate.learner.teacher import TeacherError, completion_logprobs

RENDER = "/v1/chat/completions/render"
GENERATE = "/inference/v1/generate"


def collapse_placeholders(token_ids: Sequence[int], ranges: Sequence[Mapping[str, int]],
                          placeholder_id: int) -> list[int]:
    """``token_ids`` with each image's expanded range (``offset``, ``length``) replaced by
    the single ``placeholder_id`` that vLLM expands when it processes the image."""
    out: list[int] = []
    position = 0
    for span in sorted(ranges, key=lambda r: r["offset"]):
        offset, length = span["offset"], span["length"]
        if offset < position or length < 1 or offset + length > len(token_ids):
            raise TeacherError(f"an image placeholder range out of place: {dict(span)}")
        out += [*token_ids[position:offset], placeholder_id]
        position = offset + length
    return [*out, *token_ids[position:]]


async def render(vllm: VLLMClient, model: str, messages: Sequence[Mapping[str, Any]],
                 tools: Sequence[Any] | None = None,
                 ) -> tuple[list[int], list[Mapping[str, int]]]:
    """The prompt ids vLLM builds for ``messages`` (and ``tools``, with a generation
    prompt), each image expanded into its placeholders, as it records them; and where
    each image lies."""
    body: dict[str, Any] = {"model": model, "messages": list(messages),
                            "add_generation_prompt": True, "mm_payload": "none"}
    if tools:
        body["tools"] = list(tools)
    rendered = await _post(vllm, RENDER, body)
    prompt_ids = rendered.get("token_ids")
    ranges = ((rendered.get("features") or {}).get("mm_placeholders") or {}).get("image", [])
    n = len(image_urls(messages))
    if not isinstance(prompt_ids, list) or not isinstance(ranges, list) or len(ranges) != n:
        raise TeacherError(f"vLLM rendered {len(ranges)} images for {n} image parts")
    return [int(t) for t in prompt_ids], ranges


async def score_with_images(vllm: VLLMClient, model: str,
                            messages: Sequence[Mapping[str, Any]],
                            completion_ids: Sequence[int], placeholder_id: int,
                            tools: Sequence[Any] | None = None) -> list[float]:
    """One logprob per token of ``completion_ids`` under ``messages`` (with their images,
    ``tools`` and a generation prompt), scored by ``model`` (the base model or an adapter)
    on the vLLM that ``vllm`` calls."""
    prompt_ids, ranges = await render(vllm, model, messages, tools)
    scored = await _post(vllm, GENERATE, {
        "model": model,
        "token_ids": collapse_placeholders(prompt_ids, ranges, placeholder_id)
        + list(completion_ids),
        "content_parts": [{"type": "image_url", "url": url} for url in image_urls(messages)],
        "return_token_ids": True,
        "sampling_params": {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0},
    })
    if scored.get("prompt_token_ids") != [*prompt_ids, *completion_ids]:
        raise TeacherError("vLLM expanded the images differently when scoring than when "
                           "rendering; the completion's positions would not line up")
    return completion_logprobs(scored.get("prompt_logprobs") or [], completion_ids,
                               len(prompt_ids))


async def _post(vllm: VLLMClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return await vllm.post(path, body)
    except VLLMRefused as exc:
        hint = " (is vLLM started with --enable-scale-out?)" if exc.status in (
            403, 404) else ""
        raise TeacherError(f"{exc}{hint}") from exc
    except VLLMError as exc:
        raise TeacherError(str(exc)) from exc
