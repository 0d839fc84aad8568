"""The vision-language toy model: deterministic build, cache, processor, template, forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")  # the learner extra; the proxy-only install lacks it

from PIL import Image, ImageDraw  # noqa: E402

from nextstate.learner.vlm_toy_model import (  # noqa: E402
    BUILDER_VERSION,
    IMAGE_TOKEN,
    VLMToyRecipe,
    build_vlm_toy_model,
    chat_template,
    ensure_vlm_toy_model,
)

ASK = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Click OK."}]}]


def screen(width: int, height: int, color: tuple[int, int, int] = (30, 90, 200)) -> Image.Image:
    image = Image.new("RGB", (width, height), (240, 240, 240))
    ImageDraw.Draw(image).rectangle([width // 8, height // 8, width // 2, height // 3],
                                    fill=color)
    return image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def model_dir(data_dir: Path) -> Path:
    return ensure_vlm_toy_model(data_dir)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def test_ensure_reuses_the_cache_and_names_it_by_the_recipe(data_dir: Path,
                                                            model_dir: Path) -> None:
    assert model_dir == data_dir / "models" / f"vlm-toy-{VLMToyRecipe().digest()}"
    lines: list[str] = []
    assert ensure_vlm_toy_model(data_dir, progress=lines.append) == model_dir
    assert lines == []
    recipe = json.loads((model_dir / "recipe.json").read_text())
    assert recipe["builder_version"] == BUILDER_VERSION


def test_a_build_in_another_process_is_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    script = "import sys; from pathlib import Path; " \
        "from nextstate.learner.vlm_toy_model import build_vlm_toy_model; " \
        "build_vlm_toy_model(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], check=True, env=env)
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "other").iterdir())
    assert {"model.safetensors", "processor_config.json", "tokenizer.json"} <= set(names)
    for name in names:
        assert (model_dir / name).read_bytes() == (tmp_path / "other" / name).read_bytes(), name


def test_build_refuses_a_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_vlm_toy_model(tmp_path / "model")


def test_digest_changes_with_the_recipe() -> None:
    assert VLMToyRecipe().digest() == VLMToyRecipe().digest()
    assert VLMToyRecipe(longest_edge=336).digest() != VLMToyRecipe().digest()
    with pytest.raises(ValueError, match="tiles"):
        VLMToyRecipe(longest_edge=1000)


def test_saved_config_is_a_tiny_idefics3_with_head_dim_64(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["model_type"] == "llama"
    assert text["head_dim"] == text["hidden_size"] // text["num_attention_heads"] == 64
    assert vision["hidden_size"] // vision["num_attention_heads"] == 64
    assert (vision["image_size"], vision["patch_size"]) == (112, 14)


def test_processor_loads_offline_with_the_image_tokens(model_dir: Path, processor: Any) -> None:
    assert type(processor).__name__ == "Idefics3Processor"
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    config = json.loads((model_dir / "config.json").read_text())
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == config["image_token_id"]
    assert processor.image_seq_len == VLMToyRecipe().image_seq_len == 16
    # "<image>" in text is the one special token, never pieces of it.
    assert processor.tokenizer.encode("a <image> b").count(config["image_token_id"]) == 1


def test_template_puts_each_image_where_its_part_is(processor: Any) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Before:"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "After:"}, {"type": "image"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False) == (
        "<|im_start|>user\nBefore:\n<image>\nAfter:\n<image><|im_end|>\n<|im_start|>assistant\n")
    assert processor.tokenizer.chat_template == chat_template()


@pytest.mark.parametrize(("size", "tokens"), [
    ((160, 90), 80),    # wide: 2x2 tiles of 112 px + a global view, 16 tokens each
    ((640, 480), 80),
    ((28, 28), 80),     # small images are scaled up to the longest edge first
    ((300, 600), 48),   # tall: 1x2 tiles + the global view
])
def test_image_tokens_depend_on_the_aspect_ratio(processor: Any, size: tuple[int, int],
                                                 tokens: int) -> None:
    text = processor.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[[screen(*size)]], return_tensors="pt")["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == tokens


def test_forward_pass_sees_the_pixels(model_dir: Path, processor: Any) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    text = processor.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    logits = []
    for color in [(30, 90, 200), (200, 40, 40)]:
        batch = processor(text=[text], images=[[screen(160, 90, color)]], return_tensors="pt")
        assert batch["pixel_values"].shape == (1, 5, 3, 112, 112)
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1])
    assert logits[0].shape == (len(processor.tokenizer),)
    assert torch.isfinite(logits[0]).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-4  # another screen, another next token


def test_the_cli_prints_the_cached_vision_model(data_dir: Path, model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from nextstate import cli

    monkeypatch.setenv("NEXTSTATE_HOME", str(data_dir))
    result = CliRunner().invoke(cli.main, ["toy-model", "--vision"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(model_dir)
    both = CliRunner().invoke(cli.main, ["toy-model", "--vision", "--trained"])
    assert both.exit_code == 2 and "pick one" in both.output
