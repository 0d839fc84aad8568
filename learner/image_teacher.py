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

import httpx

from nextstate.learner.teacher import TeacherError, completion_logprobs

RENDER = "/v1/chat/completions/render"
GENERATE = "/inference/v1/generate"


def image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The URLs (``data:`` or http) of the ``image_url`` parts, in prompt order."""
    urls = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                if not isinstance(url, str):
                    raise TeacherError("an image_url part without a URL")
                urls.append(url)
    return urls


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


async def score_with_images(
    http: httpx.AsyncClient, model: str, messages: Sequence[Mapping[str, Any]],
    completion_ids: Sequence[int], placeholder_id: int, *,
    headers: Mapping[str, str] | None = None,
) -> list[float]:
    """One logprob per token of ``completion_ids`` under ``messages`` (with their images
    and a generation prompt), scored by ``model`` (the base model or an adapter) on the
    vLLM that ``http`` points at."""
    urls = image_urls(messages)
    rendered = await _post(http, RENDER, headers, {
        "model": model, "messages": list(messages), "add_generation_prompt": True,
        "mm_payload": "none"})
    prompt_ids = rendered.get("token_ids")
    ranges = ((rendered.get("features") or {}).get("mm_placeholders") or {}).get("image", [])
    if not isinstance(prompt_ids, list) or len(ranges) != len(urls):
        raise TeacherError(f"vLLM rendered {len(ranges)} images for {len(urls)} image parts")
    scored = await _post(http, GENERATE, headers, {
        "model": model,
        "token_ids": collapse_placeholders(prompt_ids, ranges, placeholder_id)
        + list(completion_ids),
        "content_parts": [{"type": "image_url", "url": url} for url in urls],
        "return_token_ids": True,
        "sampling_params": {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0},
    })
    if scored.get("prompt_token_ids") != [*prompt_ids, *completion_ids]:
        raise TeacherError("vLLM expanded the images differently when scoring than when "
                           "rendering; the completion's positions would not line up")
    return completion_logprobs(scored.get("prompt_logprobs") or [], completion_ids,
                               len(prompt_ids))


async def _post(http: httpx.AsyncClient, path: str, headers: Mapping[str, str] | None,
                body: dict[str, Any]) -> dict[str, Any]:
    try:
        answer = await http.post(path, json=body, headers=dict(headers or {}))
    except httpx.HTTPError as exc:
        raise TeacherError(f"vLLM did not answer {path}: {exc}") from exc
    if answer.status_code != 200:
        hint = " (is vLLM started with --enable-scale-out?)" if answer.status_code in (
            403, 404) else ""
        raise TeacherError(f"vLLM refused {path}: {answer.status_code} "
                           f"{answer.text[:300]}{hint}")
    found = answer.json()
    if not isinstance(found, dict):
        raise TeacherError(f"vLLM answered {path} with something that is not an object")
    return found
