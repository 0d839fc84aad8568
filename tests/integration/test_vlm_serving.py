"""The vision-language toy on the real vLLM: images answered, token ids, scoring, LoRA.

One vLLM start for the test session (the VLM toy, ``--enable-scale-out`` for the image
teacher's token-in route: the ``vlm`` fixture in tests/conftest.py). Screens are PNGs
drawn with Pillow and sent as ``data:`` URLs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextstate.core.vllm import VLLMClient
from nextstate.core.vllm_server import VLLMProcess
from nextstate.learner.image_teacher import score_with_images
from nextstate.learner.multimodal import (
    LANGUAGE_LORA_TARGETS,
    completion_logprobs,
    decode_image,
    pixel_inputs,
)
from nextstate.learner.teacher import with_hint
from tests.conftest import VLM_MODEL_NAME, ProxyServer
from tests.integration.test_proxy_with_vllm import _events, _without_ids
from tests.learner.test_multimodal import data_url
from tests.learner.test_vlm_toy_model import screen

pytestmark = pytest.mark.integration
MODEL = VLM_MODEL_NAME
WIDE, TALL = data_url(screen(160, 90)), data_url(screen(300, 600, (200, 40, 40)))
# Temperature 1 and top-p 1: the sampling distribution is the model's own, so the sampled
# (processed) logprobs and the prompt logprobs of a prefill are the same quantity.
SAMPLE = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 7,
          "return_token_ids": True, "logprobs": True}


def ask(*urls: str, text: str = "Click the blue button.") -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def processor(vlm_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm_dir)


@pytest.fixture(scope="module")
def image_token(vlm_dir: Path) -> int:
    return int(json.loads((vlm_dir / "config.json").read_text())["image_token_id"])


def chat(vlm: VLLMProcess, messages: list[dict[str, Any]], model: str = MODEL,
         **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{vlm.url}/v1/chat/completions", timeout=120,
                        json={"model": model, "messages": messages, **body})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def stream(vlm: VLLMProcess, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    prompt, ids, text = None, [], ""
    with httpx.stream("POST", f"{vlm.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": messages, "stream": True, **body}) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            prompt = prompt or chunk.get("prompt_token_ids")
            for choice in chunk["choices"]:
                ids += choice.get("token_ids") or []
                text += choice["delta"].get("content") or ""
    return {"prompt_token_ids": prompt, "token_ids": ids, "text": text}


def processor_ids(processor: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt transformers' own processor builds for these messages and images."""
    images = [decode_image(part["image_url"]["url"]) for part in messages[-1]["content"]
              if part["type"] == "image_url"]
    # (apply_chat_template rewrites image_url parts in place, so the images come first)
    text = processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True,
                                         tokenize=False)
    return [int(t) for t in processor(text=[text], images=[images])["input_ids"][0]]


def test_an_image_request_is_answered_whole_and_streamed_with_its_placeholders(
    vlm: VLLMProcess, processor: Any, image_token: int,
) -> None:
    body = {"temperature": 0, "max_tokens": 8, "return_token_ids": True}
    whole = chat(vlm, ask(WIDE), **body)
    prompt = whole["prompt_token_ids"]
    assert prompt == processor_ids(processor, ask(WIDE))
    assert prompt.count(image_token) == 80  # 2x2 tiles + the global view, 16 tokens each
    assert len(whole["choices"][0]["token_ids"]) > 0

    streamed = stream(vlm, ask(WIDE), **body)
    assert streamed["prompt_token_ids"] == prompt
    assert streamed["token_ids"] == whole["choices"][0]["token_ids"]
    assert streamed["text"] == whole["choices"][0]["message"]["content"]


def test_an_image_request_through_the_proxy_is_answered_as_vllm_answers_it_and_recorded(
    vlm: VLLMProcess, start_proxy: Callable[..., ProxyServer],
) -> None:
    proxy = start_proxy(vlm.url)
    body = {"model": MODEL, "messages": ask(WIDE), "temperature": 0, "max_tokens": 8}
    direct = httpx.post(f"{vlm.url}/v1/chat/completions", json=body, timeout=120)
    proxied = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=120)
    assert direct.status_code == proxied.status_code == 200
    assert _without_ids(proxied.json()) == _without_ids(direct.json())
    used = chat(vlm, ask(WIDE), temperature=0, max_tokens=8, return_token_ids=True)
    streamed = {**body, "stream": True}
    assert _events(httpx.post(f"{proxy.base_url}/chat/completions", json=streamed,
                              timeout=120).content) == _events(httpx.post(
        f"{vlm.url}/v1/chat/completions", json=streamed, timeout=120).content)
    turns = proxy.turns(2)
    assert len(turns) == 2
    for turn in turns:  # placeholders included, exactly as vLLM used them
        assert turn["prompt_token_ids"] == used["prompt_token_ids"]
        assert turn["completion_token_ids"] == used["choices"][0]["token_ids"]


def test_two_screens_of_different_shapes_expand_as_the_processor_expands_them(
    vlm: VLLMProcess, processor: Any, image_token: int,
) -> None:
    prompt = chat(vlm, ask(WIDE, TALL), temperature=0, max_tokens=1,
                  return_token_ids=True)["prompt_token_ids"]
    assert prompt == processor_ids(processor, ask(WIDE, TALL))
    assert prompt.count(image_token) == 80 + 48


async def test_the_image_teacher_reproduces_the_sampled_logprobs_and_moves_under_a_hint(
    vlm: VLLMProcess, image_token: int,
) -> None:
    answer = chat(vlm, ask(WIDE), **SAMPLE)
    completion = answer["choices"][0]["token_ids"]
    sampled = [t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]]
    http = VLLMClient(vlm.url, timeout=120)
    try:
        same = await score_with_images(http, MODEL, ask(WIDE), completion, image_token)
        hinted = await score_with_images(http, MODEL, with_hint(ask(WIDE), "Press OK."),
                                         completion, image_token)
        other_screen = await score_with_images(http, MODEL, ask(TALL), completion, image_token)
    finally:
        await http.aclose()
    assert same == pytest.approx(sampled, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(same, hinted, strict=True)) > 1e-3
    assert max(abs(a - b) for a, b in zip(same, other_screen, strict=True)) > 1e-3


def test_transformers_reproduces_vllms_logprobs_from_the_recorded_ids_and_image(
    vlm: VLLMProcess, vlm_dir: Path, processor: Any,
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    answer = chat(vlm, ask(WIDE, TALL), **SAMPLE)
    choice = answer["choices"][0]
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    pixels = pixel_inputs(processor, [decode_image(WIDE), decode_image(TALL)])
    with torch.no_grad():
        mine = completion_logprobs(model, answer["prompt_token_ids"], choice["token_ids"],
                                   pixels)
    assert mine.tolist() == pytest.approx([t["logprob"] for t in choice["logprobs"]["content"]],
                                          abs=1e-4)


async def test_a_lora_adapter_on_the_language_part_serves_images(
    vlm: VLLMProcess, vlm_dir: Path, processor: Any, image_token: int, tmp_path: Path,
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(vlm_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=LANGUAGE_LORA_TARGETS, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    loaded = httpx.post(f"{vlm.url}/v1/load_lora_adapter", timeout=120, json={
        "lora_name": "gui@1", "lora_path": str(tmp_path / "adapter")})
    assert loaded.status_code == 200, loaded.text
    try:
        base = chat(vlm, ask(WIDE), **SAMPLE)["choices"][0]
        answer = chat(vlm, ask(WIDE), model="gui@1", **SAMPLE)
        choice = answer["choices"][0]
        sampled = [t["logprob"] for t in choice["logprobs"]["content"]]
        assert sampled != [t["logprob"] for t in base["logprobs"]["content"]]
        http = VLLMClient(vlm.url, timeout=120)
        try:
            scored = await score_with_images(http, "gui@1", ask(WIDE), choice["token_ids"],
                                             image_token)
        finally:
            await http.aclose()
        assert scored == pytest.approx(sampled, abs=2e-3)
        with torch.no_grad():
            mine = completion_logprobs(model.eval(), answer["prompt_token_ids"],
                                       choice["token_ids"],
                                       pixel_inputs(processor, [decode_image(WIDE)]))
        assert mine.tolist() == pytest.approx(sampled, abs=1e-4)
    finally:
        httpx.post(f"{vlm.url}/v1/unload_lora_adapter", json={"lora_name": "gui@1"}, timeout=30)
