"""The learner's configuration (CLI -> LearnerConfig): made once, validated once, with one
sentence for what it refuses; the CLI's defaults are its defaults."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from nextstate.learner.config import LearnerConfig, TrainerConfig, TrainingConfig


def config(**changes: object) -> LearnerConfig:
    return LearnerConfig(**{"store_url": "sqlite://", "backends": ("http://vllm:8000/v1",),
                            "base_model": "toy", **changes})  # type: ignore[arg-type]


def test_several_backends_are_one_tuple_normalised_and_the_first_teaches() -> None:
    made = config(backends=("http://a:1/v1/", "http://b:2"))
    assert made.backends == ("http://a:1", "http://b:2") and made.backend_url == "http://a:1"


@pytest.mark.parametrize(("changes", "says"), [
    ({"backends": ()}, "backends must be a tuple of at least one vLLM URL"),
    ({"backends": "http://a:1"}, "backends must be a tuple of at least one vLLM URL"),
    ({"judge": "vibes"}, "judge must be rules or llm, not 'vibes'"),
    ({"teacher": "oracle"}, "teacher must be base or policy, not 'oracle'"),
    ({"judge_model": "gpt"}, "judge_model and judge_api_base are for the llm judge"),
    ({"poll_seconds": 0}, "poll_seconds must be over 0"),
])
def test_a_configuration_that_cannot_work_is_refused_in_one_sentence(
        changes: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        config(**changes)


@pytest.mark.parametrize(("make", "says"), [
    (lambda: TrainingConfig(personal_min_turns=0), "personal_min_turns must be at least 1"),
    (lambda: TrainingConfig(gate_max_kl=0), "gate_max_kl must be over 0"),
    (lambda: TrainingConfig(stale="keep"), "stale must be drop or downweight"),  # type: ignore[arg-type]
    (lambda: TrainingConfig(keep=0), "keep must be at least 1"),
    (lambda: TrainerConfig(batch_turns=0), "batch_turns must be at least 1"),
    (lambda: TrainerConfig(method="ppo"), "method must be binary, opd or combined"),  # type: ignore[arg-type]
    (lambda: replace(TrainerConfig(), learning_rate=-1.0), "learning_rate must be over 0"),
])
def test_training_settings_are_validated_too(make, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make()


def test_the_cli_reads_its_defaults_from_the_configuration() -> None:
    from nextstate.cli import learn

    options = {p.name: p for p in learn.learn.params}
    assert options["judge"].default == LearnerConfig.__dataclass_fields__["judge"].default
    assert options["teacher"].default == LearnerConfig.__dataclass_fields__["teacher"].default
    assert options["method"].default == TrainerConfig().method
    assert options["batch_turns"].default == TrainerConfig().batch_turns


def test_a_refused_combination_on_the_command_line_is_a_usage_error(tmp_path) -> None:
    from nextstate import cli

    result = CliRunner().invoke(cli.main, [
        "learn", "--backend", "http://127.0.0.1:9", "--no-train", "--once",
        "--judge-model", "gpt-4o", "--store", f"sqlite:///{tmp_path / 's.db'}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "judge_model and judge_api_base are for the llm judge" in result.output
