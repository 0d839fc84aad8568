"""What the learner is told (CLI -> ``LearnerConfig`` -> learner -> judge, trainer,
publish, memory): one frozen dataclass per part, each validated once, when it is made,
with a one-sentence message. torch-free, so that the CLI reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from nextstate.core.paths import backend_root

Method = Literal["binary", "opd", "combined"]
JudgeKind = Literal["rules", "llm"]  # offline cues | a judge model via litellm
# Whose logprobs teach under a hint: the base model | the adapter serving the turn's user.
TeacherKind = Literal["base", "policy"]
Stale = Literal["drop", "downweight"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainerConfig:
    method: Method = "combined"
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = LORA_TARGETS
    # None: 1e-3 for models under 100M parameters (the toy model needs it to move in a
    # few steps), 2e-5 above (a usual LoRA rate for 4-8B models).
    learning_rate: float | None = None
    batch_turns: int = 16  # turns per optimizer step
    passes: int = 2  # optimizer updates per batch (measured: 2 learns faster than 1)
    max_tokens_per_microbatch: int = 8192
    eps_low: float = 0.2
    eps_high: float = 0.28
    importance_cap: float = 2.0
    opd_clip: float = 1.0
    w_opd: float = 1.0
    w_rl: float = 1.0
    kl_coef: float = 0.0  # KL to the base model (adapter off); 0: off
    max_grad_norm: float = 1.0
    seed: int = 0
    # FSDP: with N processes, each holds 1/N of the weights (for a base model that does
    # not fit one GPU). Off: each holds the whole model, which is faster when it fits.
    shard: bool = False

    def __post_init__(self) -> None:
        if self.method not in get_args(Method):
            raise ValueError(f"method must be binary, opd or combined, not {self.method!r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be over 0, not {self.learning_rate}")
        for name in ("lora_rank", "batch_turns", "passes", "max_tokens_per_microbatch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class JudgingConfig:
    batch: int = 32  # turns taken from the store per round
    concurrency: int = 4  # turns judged at once
    max_attempts: int = 5  # a turn the judge keeps failing on is given up after this
    retry_after: float = 30.0  # seconds before a failed turn is tried again
    max_hints: int = 3  # teacher logprobs are computed for at most this many hints


@dataclass(frozen=True)
class TrainingConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # A turn served by an adapter more than this many versions older than the current
    # one is dropped ("drop") or weighted 1/(1 + extra versions) ("downweight").
    max_staleness: int = 4
    stale: Stale = "drop"
    gate: bool = True
    gate_max_kl: float = 1.0  # nats per token on the step's own batch
    # A step over the bound is taken again from where it started, at half the learning
    # rate, up to this many times; then it is refused and its turns are skipped.
    gate_retries: int = 2
    # A hinted turn whose teacher scores the reply within this many nats per token of the
    # sampler (mean |logπ_teacher − logπ_sampler|) is taken as a hint the model did not
    # understand: under distillation (opd, combined) the turn teaches nothing (its −1 is
    # the same judgment, and alone it would push down every token). 0: every hint
    # counts. See `training.weak_hints`.
    min_teacher_change: float = 0.0
    keep: int = 5  # adapter directories kept per policy (loaded ones are never deleted)
    unload_grace: float = 120.0  # seconds an old version stays loaded for in-flight requests
    # Personal adapters: a user with this many judged turns carrying a signal gets their
    # own adapter, trained on their turns from then on. None: one adapter for everyone.
    personal_min_turns: int | None = None

    def __post_init__(self) -> None:
        if self.stale not in get_args(Stale):
            raise ValueError(f"stale must be drop or downweight, not {self.stale!r}")
        if self.gate_max_kl <= 0:
            raise ValueError(f"gate_max_kl must be over 0, not {self.gate_max_kl}")
        for name in ("max_staleness", "gate_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, not {self.keep}")
        if self.personal_min_turns is not None and self.personal_min_turns < 1:
            raise ValueError("personal_min_turns must be at least 1 (None: no personal "
                             f"adapters), not {self.personal_min_turns}")


@dataclass(frozen=True)
class MemoryConfig:
    """Lessons: hints remembered and served by the proxy's memory until the weights have
    learned them (learner/lessons.py, learner/retirement.py)."""

    learn: bool = False  # every judged turn's hint becomes (or joins) a lesson
    lessons_per_turn: int = 1  # hints of one turn kept as lessons (feedback's first)
    # A lesson whose last this many served turns were all corrected (-1) is dropped.
    drop_after: int = 3
    # After each new adapter, check its users' lessons (served or waiting): one the
    # adapter follows without being told is retired (no longer served).
    retire: bool = True
    # Retired when the lesson changes the adapter's own replies to held-out prompts by at
    # most this much: KL(adapter || adapter shown the lesson), mean nats per token.
    retire_kl: float = 0.05
    # ... unless the base model, told, changes its own replies by at most this much too:
    # then the lesson never changed anything and is dropped as ignored (0: never).
    ignore_kl: float = 0.05
    check_prompts: int = 4  # held-out prompts (the user's latest untrained requests)
    check_samples: int = 4  # replies sampled per prompt (16 replies: measured, bench/README.md)
    check_max_tokens: int = 256
    checks_per_round: int = 8  # lessons checked per learner round at most
    # Hand an asker's lessons over to the weights once the turns the proxy served without
    # them (its control share) score as well as those served with them, and back once
    # lessons score clearly better again; decided on at least this many judged turns in
    # each arm since the asker's mode began (learner/handover.py). 0: never.
    hand_over_after: int = 8

    def __post_init__(self) -> None:
        for name in ("lessons_per_turn", "drop_after", "check_prompts", "check_samples",
                     "check_max_tokens", "checks_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.retire_kl <= 0:
            raise ValueError(f"retire_kl must be over 0, not {self.retire_kl}")
        if self.ignore_kl < 0:
            raise ValueError(f"ignore_kl must be at least 0 (0: never), not {self.ignore_kl}")
        if self.hand_over_after < 0:
            raise ValueError("hand_over_after must be at least 0 (0: never), not "
                             f"{self.hand_over_after}")


@dataclass(frozen=True)
class LearnerConfig:
    store_url: str
    # Every vLLM serving the policy; adapters go to all of them. The teacher and the
    # judge use the first.
    backends: tuple[str, ...]
    base_model: str  # vLLM's name for the base model
    policy: str | None = None  # the name clients use; adapters are <policy>@<version>
    # The key every vLLM wants (its --api-key / VLLM_API_KEY); sent on every call.
    backend_api_key: str | None = None
    model_dir: Path | None = None  # the base model's weights; None: judge only, no training
    adapters_dir: Path | None = None  # where adapter versions are written
    judge: JudgeKind = "rules"
    judge_model: str | None = None  # for llm: a litellm model string
    judge_api_base: str | None = None
    judge_api_key: str | None = None
    # Whose logprobs teach: base (the paper's choice) | policy (the adapter serving the
    # turn's user: their own, else the shared one).
    teacher: TeacherKind = "base"
    poll_seconds: float = 1.0
    judging: JudgingConfig = field(default_factory=JudgingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.backends, str) or not self.backends:
            raise ValueError("backends must be a tuple of at least one vLLM URL")
        # Accept the URLs as users write them (http://host:8000/v1 as well).
        object.__setattr__(self, "backends", tuple(backend_root(u) for u in self.backends))
        if self.judge not in get_args(JudgeKind):
            raise ValueError(f"judge must be rules or llm, not {self.judge!r}")
        if self.teacher not in get_args(TeacherKind):
            raise ValueError(f"teacher must be base or policy, not {self.teacher!r}")
        if self.judge != "llm" and (self.judge_model or self.judge_api_base):
            raise ValueError("judge_model and judge_api_base are for the llm judge: "
                             "give judge='llm' too")
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be over 0, not {self.poll_seconds}")

    @property
    def backend_url(self) -> str:
        """The backend the teacher and the judge use (the first)."""
        return self.backends[0]
