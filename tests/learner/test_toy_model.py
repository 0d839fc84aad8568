"""The embedded toy model: deterministic build, cache, chat template, tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")  # the learner extra; the proxy-only install lacks it

from nextstate.experiment.pretrain import TRAINED_TOY, PretrainConfig  # noqa: E402
from nextstate.learner.toy_model import (  # noqa: E402
    BUILDER_VERSION,
    ToyModelRecipe,
    build_tokenizer,
    build_toy_model,
    chat_template,
    ensure_toy_model,
)

# A recipe with a pretraining stage that runs in seconds (the real one takes minutes).
TINY_TRAINED = ToyModelRecipe(
    hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
    intermediate_size=128, vocab_size=600, corpus_documents=300,
    pretrain=PretrainConfig(steps=12, batch_size=4, warmup_steps=2,
                            tokenizer_conversations=200, log_every=6),
)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def test_two_builds_in_separate_processes_are_byte_identical(
    model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    script = "import sys; from pathlib import Path; " \
        "from nextstate.learner.toy_model import build_toy_model; " \
        "build_toy_model(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(other)], check=True, env=env)

    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (model_dir / name).read_bytes() == (other / name).read_bytes(), name


def test_ensure_builds_once_then_reuses_the_cache(tmp_path: Path) -> None:
    first: list[str] = []
    path = ensure_toy_model(tmp_path, progress=first.append)
    assert path == tmp_path / "models" / f"toy-{ToyModelRecipe().digest()}"
    assert any("building" in line for line in first)
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    second: list[str] = []
    assert ensure_toy_model(tmp_path, progress=second.append) == path
    assert second == []
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".toy-")] == [
        f".{path.name}.lock"
    ]


def test_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    lines: list[str] = []
    paths: list[Path] = []

    def call() -> None:
        paths.append(ensure_toy_model(tmp_path, progress=lines.append))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert sum("building toy model" in line for line in lines) == 1


def test_build_refuses_a_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_toy_model(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_digest_is_stable_and_changes_with_every_field() -> None:
    recipe = ToyModelRecipe()
    assert recipe.digest() == ToyModelRecipe().digest()
    assert len(recipe.digest()) == 12
    digests = {recipe.digest()}
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        if isinstance(value, bool):
            changed = not value
        elif field.name == "pretrain":
            changed = PretrainConfig()
        elif field.name == "num_key_value_heads":
            changed = 1  # must still divide num_attention_heads
        else:
            changed = value * 2 if value else 1
        digests.add(dataclasses.replace(recipe, **{field.name: changed}).digest())
    assert len(digests) == len(dataclasses.fields(recipe)) + 1


def test_saved_config_is_a_tiny_qwen2_with_head_dim_64(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 1024
    recipe = json.loads((model_dir / "recipe.json").read_text())
    assert recipe["builder_version"] == BUILDER_VERSION


def test_special_token_ids_are_consistent(model_dir: Path, tokenizer: Any) -> None:
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2]
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    for source in (config, generation):
        assert (source["bos_token_id"], source["eos_token_id"], source["pad_token_id"]) == (0, 2, 0)
    assert len(tokenizer.encode("<tool_call>")) == 1


def test_tokenizer_round_trips_ordinary_text(tokenizer: Any) -> None:
    for text in [
        "Hello! How can I help you today?",
        "Maya has 17 apples and buys 25 more. How many apples does Maya have now?",
        'def add(a, b):\n    return a + b\n\n{"name": "get_weather", "arguments": {}}',
        "Unicode survives too: café, naïve, 東京, 🙂",
    ]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("Hello! How can I help you today?")) <= 12


def test_template_renders_a_plain_conversation_exactly(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not render(tokenizer, messages[:2]).endswith("<|im_start|>assistant\n")


def test_template_lists_tools_in_the_first_system_turn(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tool_json = json.dumps(TOOLS[0]["function"])
    assert render(tokenizer, messages, tools=TOOLS) == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou can call these tools:\n<tools>\n"
        f"{tool_json}\n</tools>\n\nTo call a tool, reply with one block per call:\n"
        '<tool_call>\n{"name": <tool name>, "arguments": <JSON object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    without_system = render(tokenizer, messages[1:], tools=TOOLS)
    assert without_system.startswith("<|im_start|>system\n# Tools\n")
    assert without_system.endswith("</tool_call><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_template_renders_tool_calls_and_tool_results(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25 C"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": {}}},
        ]},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>tool\n<tool_response id="call_1" name="get_weather">\n21 C\n'
        "</tool_response><|im_end|>\n"
        '<|im_start|>tool\n<tool_response id="call_2">\n25 C\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_saved_template_is_the_packaged_one(model_dir: Path) -> None:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template()
    assert "<|im_start|>" in chat_template()


def test_untrained_recipes_keep_the_digest_they_had_before_the_pretrain_field() -> None:
    recipe = ToyModelRecipe()
    payload = {"builder_version": BUILDER_VERSION, **dataclasses.asdict(recipe)}
    del payload["pretrain"]
    encoded = json.dumps(payload, sort_keys=True).encode()
    assert recipe.digest() == hashlib.sha256(encoded).hexdigest()[:12]


def test_digest_changes_with_the_pretrain_config() -> None:
    digests = {dataclasses.replace(TINY_TRAINED, pretrain=dataclasses.replace(
        TINY_TRAINED.pretrain, **{name: value})).digest()  # type: ignore[arg-type]
        for name, value in [("steps", 13), ("seed", 1), ("learning_rate", 1e-3),
                            ("mix", (("plain", 1.0),)), ("threads", 2), ("data_version", 2)]}
    assert len(digests | {TINY_TRAINED.digest()}) == 7


def test_trained_toy_is_the_feasibility_notes_recipe() -> None:
    assert TRAINED_TOY.pretrain is not None
    assert TRAINED_TOY.num_hidden_layers == 4 and TRAINED_TOY.head_dim == 64
    assert TRAINED_TOY.hidden_size == 128 and TRAINED_TOY.tie_word_embeddings
    assert TRAINED_TOY.pretrain.steps >= 1000 and TRAINED_TOY.pretrain.batch_size == 32
    assert TRAINED_TOY.digest() != ToyModelRecipe().digest()


def test_a_pretrain_stage_reports_progress_and_builds_byte_identical_files(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    first = ensure_toy_model(tmp_path / "a", TINY_TRAINED, progress=lines.append)
    # The same recipe in another process (another hash seed) gives the same bytes.
    script = "import sys; from pathlib import Path; " \
        "from nextstate.experiment.pretrain import PretrainConfig; " \
        "from nextstate.learner.toy_model import ToyModelRecipe, ensure_toy_model; " \
        f"print(ensure_toy_model(Path(sys.argv[1]), {TINY_TRAINED!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "54321"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True,
                         env=env, capture_output=True, text=True)
    second = Path(out.stdout.strip())
    assert second.name == first.name
    assert any("running stage pretrain_stage" in line for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [
        "step 6/12", "step 12/12"]
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["pretrain"]["steps"] == 12


def test_the_trained_tokenizer_fits_the_conversations() -> None:
    reply = "Sure thing!\nStep 1: start with 12.\nStep 2: 12 + 5 = 17.\n" \
        "So it's 17, easy! In other words, the count comes to 17. Keep up the great work!"
    fitted = build_tokenizer(TRAINED_TOY)
    generic = build_tokenizer(dataclasses.replace(TRAINED_TOY, pretrain=None))
    # (A 2,048-token vocabulary fits English well already; the fitted one also spends
    # merges on the instruction grammar's words, each a whole token, see below.)
    assert len(fitted.encode(reply)) < 0.9 * len(generic.encode(reply))


def test_every_word_of_the_instruction_grammar_is_one_token() -> None:
    """Held-out synonyms are read only in the reading documents; as whole tokens (as
    common words are in a real vocabulary) their meaning can be learned there."""
    from nextstate.experiment import wording

    tokenizer = build_tokenizer(TRAINED_TOY)
    words = {w for lexeme in wording.lexicon() for w in lexeme.split()}
    split = [w for w in sorted(words) if len(tokenizer.encode(" " + w)) != 1]
    assert not split
