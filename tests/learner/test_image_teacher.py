"""The image teacher: placeholder ranges collapsed; its route through vLLM, faked."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.learner.image_teacher import GENERATE, RENDER, collapse_placeholders
from nextstate.learner.teacher import Teacher, TeacherError

IMG = 9


def test_each_expanded_range_becomes_one_placeholder() -> None:
    ids = [1, 2, 5, IMG, IMG, 6, 3, 5, IMG, 6, 4]
    ranges = [{"offset": 7, "length": 3}, {"offset": 2, "length": 4}]  # any order
    assert collapse_placeholders(ids, ranges, IMG) == [1, 2, IMG, 3, IMG, 4]
    assert collapse_placeholders(ids, [], IMG) == ids


@pytest.mark.parametrize("ranges", [
    [{"offset": 2, "length": 4}, {"offset": 4, "length": 2}],  # overlapping
    [{"offset": 10, "length": 5}],                             # past the end
    [{"offset": 1, "length": 0}],                              # empty
])
def test_ranges_out_of_place_are_refused(ranges: list[dict[str, int]]) -> None:
    with pytest.raises(TeacherError, match="out of place"):
        collapse_placeholders(list(range(11)), ranges, IMG)


def rendering_vllm(seen: list[tuple[str, dict[str, Any]]]) -> httpx.MockTransport:
    """vLLM's render and token-in routes for one image: the rendered prompt is [1, 2, IMG,
    IMG, IMG, 3] (the image at 2..4) plus a token per hint line; generate expands the
    single placeholder again and scores token i at -i."""

    def vllm(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == RENDER:
            text = json.dumps(body["messages"])
            return httpx.Response(200, json={
                "token_ids": [1, 2, IMG, IMG, IMG, 3] + [4] * text.count("\\n"),
                "features": {"mm_placeholders": {"image": [{"offset": 2, "length": 3}]}}})
        assert request.url.path == GENERATE
        ids = body["token_ids"]
        at = ids.index(IMG)
        expanded = [*ids[:at], IMG, IMG, IMG, *ids[at + 1:]]
        return httpx.Response(200, json={
            "prompt_token_ids": expanded,
            "prompt_logprobs": [None] + [{str(t): {"logprob": -float(i)}}
                                         for i, t in enumerate(expanded[1:], 1)]})

    return httpx.MockTransport(vllm)


def image_turn(**extra: Any) -> dict[str, Any]:
    return {"endpoint": "chat", "prompt_token_ids": [1, 2, IMG, IMG, IMG, 3],
            "completion_token_ids": [7, 8], "request": {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Click OK."}]}]}, **extra}


async def test_a_turn_with_images_is_scored_with_them_through_render_and_generate() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    http = httpx.AsyncClient(transport=rendering_vllm(seen))
    teacher = Teacher(VLLMClient("http://vllm", http=http), "base", image_token=IMG)
    assert teacher.scores(image_turn())
    # No hint: the recorded prompt, rendered again; the completion after it.
    assert await teacher.logprobs(image_turn(), None) == [-6.0, -7.0]
    (render_path, render), (generate_path, generate) = seen
    assert render_path == RENDER and render["messages"] == image_turn()["request"]["messages"]
    assert generate_path == GENERATE
    assert generate["token_ids"] == [1, 2, IMG, 3, 7, 8]  # one placeholder, then the reply
    assert generate["content_parts"] == [{"type": "image_url",
                                          "url": "data:image/png;base64,AAAA"}]
    # A hint joins the last user message beside the image; the reply keeps its tokens.
    seen.clear()
    hinted = await teacher.logprobs(image_turn(), "Press the blue button.")
    assert seen[0][1]["messages"][0]["content"][-1]["text"].endswith("Press the blue button.")
    assert seen[1][1]["token_ids"][-2:] == [7, 8] and len(hinted) == 2
    # Served with lessons: the student's prompt is the request without them, rendered.
    served = image_turn(lessons={"hint": "Use the keyboard."})
    assert await teacher.student_prompt_ids(served) == [1, 2, IMG, IMG, IMG, 3]
    await teacher.close()


async def test_without_the_image_token_a_turn_with_images_is_not_scored() -> None:
    teacher = Teacher(VLLMClient("http://vllm"), "base")
    assert not teacher.scores(image_turn())
    assert teacher.scores({"request": {"messages": [{"role": "user", "content": "hi"}]}})
    with pytest.raises(TeacherError, match="vision-language model"):
        await teacher.logprobs(image_turn(), "hint")
    await teacher.close()


async def test_a_vllm_without_the_token_in_route_is_named_in_the_error() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(
        lambda request: httpx.Response(404, json={"detail": "Not Found"})))
    teacher = Teacher(VLLMClient("http://vllm", http=http), "base", image_token=IMG)
    with pytest.raises(TeacherError, match="--enable-scale-out"):
        await teacher.logprobs(image_turn(), "hint")
    await teacher.close()
