"""Pixel inputs for recorded images, completion logprobs, and a LoRA step on an image turn."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")  # the learner extra; the proxy-only install lacks it

import torch  # noqa: E402

from nextstate.learner.multimodal import (  # noqa: E402
    LANGUAGE_LORA_TARGETS,
    ImageError,
    completion_logprobs,
    decode_image,
    pixel_inputs,
)
from nextstate.learner.vlm_toy_model import ensure_vlm_toy_model  # noqa: E402
from tests.learner.test_vlm_toy_model import screen  # noqa: E402


def data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_vlm_toy_model(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def turn(processor: Any, images: list[Any]) -> tuple[list[int], list[int]]:
    """Prompt ids with the images expanded, as vLLM records them, and a completion."""
    parts = [*({"type": "image"} for _ in images), {"type": "text", "text": "Where is OK?"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = processor(text=[text], images=[images] if images else None)["input_ids"][0]
    return [int(t) for t in prompt], processor.tokenizer.encode("click(40, 20)<|im_end|>")


def test_decode_image_reads_a_data_url_and_refuses_anything_else() -> None:
    image = decode_image(data_url(screen(160, 90)))
    assert image.size == (160, 90) and image.mode == "RGB"
    for bad in ["http://example.com/a.png", "data:image/png;base64,!!!",
                "data:image/png;base64," + base64.b64encode(b"not a png").decode()]:
        with pytest.raises(ImageError):
            decode_image(bad)


def test_pixel_inputs_follow_the_images_in_prompt_order(processor: Any) -> None:
    assert pixel_inputs(processor, []) == {}
    one = pixel_inputs(processor, [screen(160, 90)])
    two = pixel_inputs(processor, [screen(160, 90), screen(300, 600)])
    assert one["pixel_values"].shape == (1, 5, 3, 112, 112)
    assert two["pixel_values"].shape == (1, 8, 3, 112, 112)  # 5 tiles + 3 tiles
    assert torch.equal(two["pixel_values"][0, :5], one["pixel_values"][0])


def test_pixel_inputs_are_what_the_whole_processor_gives(processor: Any) -> None:
    images = [screen(160, 90), screen(300, 600, (200, 40, 40))]
    prompt, _ = turn(processor, images)
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where is OK?"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}],
                                         add_generation_prompt=True, tokenize=False)
    whole = processor(text=[text], images=[images], return_tensors="pt")
    mine = pixel_inputs(processor, images)
    assert sorted(mine) == ["pixel_attention_mask", "pixel_values"]
    for key, value in mine.items():
        assert torch.equal(value, whole[key]), key
    assert whole["input_ids"][0].tolist() == prompt


def test_completion_logprobs_are_the_next_token_logprobs(model_dir: Path, processor: Any) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    image = screen(160, 90)
    prompt, completion = turn(processor, [image])
    pixels = pixel_inputs(processor, [image])
    with torch.no_grad():
        mine = completion_logprobs(model, prompt, completion, pixels)
        # Token by token: the prompt (and each longer prefix) alone predicts the next one.
        want = [torch.log_softmax(model(input_ids=torch.tensor([prompt + completion[:t]]),
                                        **pixels).logits[0, -1], -1)[token]
                for t, token in enumerate(completion)]
    assert mine.shape == (len(completion),)
    assert torch.allclose(mine, torch.stack(want), atol=1e-5)


def test_a_lora_step_on_an_image_turn_trains_only_the_language_model(
    model_dir: Path, processor: Any,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(model_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=LANGUAGE_LORA_TARGETS, init_lora_weights=False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".text_model.layers." in name and "lora_" in name
                             for name in trainable)
    assert any("mlp.down_proj" in name for name in trainable)

    image = screen(160, 90)
    prompt, completion = turn(processor, [image])
    pixels = pixel_inputs(processor, [image])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = completion_logprobs(model, prompt, completion, pixels)
    loss = -before.mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    with torch.no_grad():
        after = completion_logprobs(model, prompt, completion, pixels)
    assert after.mean() > before.mean().detach()  # the step raised the completion's likelihood


def test_the_trainer_steps_on_a_turn_with_screens_beside_a_text_turn(
    model_dir: Path, processor: Any,
) -> None:
    """`Trainer` on the VLM toy: LoRA on the language model only, the recorded ids and
    the images' pixels in, so it scores the turn as the model does before a step; a +1
    raises the turn's likelihood, a text-only turn trains in the same step."""
    from nextstate.learner.items import TrainItem
    from nextstate.learner.trainer import Trainer, TrainerConfig

    trainer = Trainer(model_dir, TrainerConfig(method="binary", lora_rank=8, lora_alpha=16,
                                               learning_rate=1e-2))
    assert trainer.processor is not None
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".text_model.layers." in n and "lora_" in n for n in trainable)
    images = [screen(160, 90), screen(300, 600, (200, 40, 40))]
    prompt, completion = turn(processor, images)
    with torch.no_grad(), trainer.model.disable_adapter():
        want = completion_logprobs(trainer.model, prompt, completion,
                                   pixel_inputs(processor, images))
    gui = TrainItem(turn_id="gui", prompt_ids=prompt, completion_ids=completion,
                    sampler_logprobs=want.tolist(), reward=1.0,
                    images=[data_url(image) for image in images])
    text_prompt, text_completion = turn(processor, [])
    chat = TrainItem(turn_id="chat", prompt_ids=text_prompt, completion_ids=text_completion,
                     sampler_logprobs=[-5.0] * len(text_completion), reward=-1.0)
    [before, text_before] = trainer.logprobs([gui, chat])
    assert torch.allclose(before, want, atol=1e-5)  # the pixels went in with the ids
    stats = trainer.step([gui, chat])
    [after, text_after] = trainer.logprobs([gui, chat])
    assert after.mean() > before.mean() + 0.01 and text_after.mean() < text_before.mean()
    assert stats.turns == 2 and stats.tokens == len(completion) + len(text_completion)
