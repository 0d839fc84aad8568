"""The trainer's input (store -> learner -> **items** -> trainer): judged turns as
`TrainItem`s with their signals, and how they are cut into micro-batches.

- `to_item`: a store row as the trainer sees it: the recorded ids and sampler logprobs,
  the reward (judge, episode outcome), the teacher's logprobs under the hints, the
  prompt without served lessons (context distillation), the images.
- `images_of`: a turn's screenshots back inline from the store (kept once, by hash). One
  the trainer cannot have (an image the client gave by http URL, which the learner never
  fetches; one forgotten since) makes the turn `Unreadable`: skipped, with the reason.
- `informative`, `normalise_steps`, `weak_hints`: which items carry a signal for the
  method, episode steps made relative to each other, and what the hints did (how many
  turns had one, how often the hinted teacher was no more confident about the sampled
  tokens than the student, how far the hint moved it; a hint that barely moved it can be
  dropped: a vague hint, or one the model does not understand).
- `microbatches`, `rank_microbatches`: indices grouped under a token budget, per rank.

Pure Python: the training stage (training.py) reads the store, the trainer (trainer.py)
holds the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from nextstate.core.sessions import image_urls
from nextstate.core.store import Store
from nextstate.core.store.images import ImageMissing
from nextstate.learner.config import TrainerConfig


@dataclass
class TrainItem:
    """A recorded turn exactly as vLLM produced it, with its signals."""

    turn_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    reward: float | None = None  # judge score (+ episode outcome); None: no evaluative signal
    teacher_logprobs: list[float] | None = None  # None: no hint
    weight: float = 1.0  # < 1 for stale turns when down-weighting
    group: str | None = None  # the episode (session) a step belongs to, when it has one
    # Served with lessons, trained without them (context distillation): the tokens were
    # sampled under the teacher's context, not the student's, so no importance weight
    # corrects toward the sampler (it would cancel exactly what the lessons changed).
    context: bool = False
    # The prompt's images in prompt order, as ``data:`` URLs (a vision-language model).
    images: list[str] = field(default_factory=list)


class Unreadable(Exception):
    """A turn's images the trainer cannot have (given by URL, or forgotten since)."""


def to_item(row: dict[str, Any], weight: float = 1.0, images: list[str] | None = None,
            ) -> TrainItem:
    """A store row as the trainer's input.

    Reward: the judge's score (+1/-1); for a step of an episode with an outcome (feedback
    for the whole session, a test verdict), the outcome plus the step's mean judge vote.
    Several hints: their teacher logprobs are averaged token by token (a smoother target
    than any single hint's). A turn served with lessons trains on its prompt without them
    (context distillation: its teacher logprobs were taken with them)."""
    teachers = [t for t in row.get("teacher_logprobs") or [] if t]
    teacher = [sum(col) / len(col) for col in zip(*teachers, strict=True)] if teachers else None
    score = row.get("score")
    reward = float(score) if score in (1, -1) else None
    if row.get("outcome") is not None:
        votes = [v for v in row.get("votes") or [] if v is not None]
        reward = float(row["outcome"]) + (sum(votes) / len(votes) if votes else 0.0)
    student = row.get("student_prompt_ids")
    prompt = student if student else row["prompt_token_ids"]
    return TrainItem(turn_id=row["id"], prompt_ids=list(prompt), context=bool(student),
                     completion_ids=list(row["completion_token_ids"]),
                     sampler_logprobs=[float(x) for x in row["logprobs"]], reward=reward,
                     teacher_logprobs=teacher, weight=weight,
                     group=row["session_id"] if row.get("outcome") is not None else None,
                     images=images or [])


def informative(items: list[TrainItem], config: TrainerConfig) -> list[TrainItem]:
    """The batch's items that can move the policy under ``config.method``: a hint for
    distillation, a reward for RL, either for both. (An update from zero advantages is
    not a no-op: Adam's momentum would still move the weights.)"""
    rewarded = {id(i) for i in items if i.reward is not None}
    hinted = {id(i) for i in items if i.teacher_logprobs}
    keep = {"binary": rewarded, "opd": hinted}.get(config.method, rewarded | hinted)
    return [i for i in items if id(i) in keep]


def normalise_steps(items: list[TrainItem]) -> None:
    """Rewards of the steps of one episode, made relative to each other (mean 0, std 1)
    where the batch holds several steps of it: which step helped the outcome most."""
    groups: dict[str, list[TrainItem]] = {}
    for item in items:
        if item.group is not None and item.reward is not None:
            groups.setdefault(item.group, []).append(item)
    for steps in groups.values():
        if len(steps) < 2:
            continue
        rewards = [s.reward for s in steps if s.reward is not None]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        for step in steps:
            assert step.reward is not None
            step.reward = (step.reward - mean) / (std + 1e-6) if std > 1e-6 else 0.0


def teacher_change(item: TrainItem) -> tuple[float, float] | None:
    """How the hint changed the model's view of the reply, per token on average:
    (mean logπ_teacher − logπ_sampler, mean |logπ_teacher − logπ_sampler|); None without
    a hint. The first ≤ 0 is a teacher no more confident about the sampled tokens than
    the student, the second near 0 a hint that changed nothing."""
    if not item.teacher_logprobs or not item.sampler_logprobs:
        return None
    diffs = [t - s for t, s in zip(item.teacher_logprobs, item.sampler_logprobs, strict=False)]
    return sum(diffs) / len(diffs), sum(abs(d) for d in diffs) / len(diffs)


def weak_hints(items: list[TrainItem], min_change: float) -> dict[str, float]:
    """Drops the signals (hint and reward) of turns whose hint moved the teacher less than
    ``min_change`` (mean nats/token; 0: none are dropped), in place; returns what the
    hints did, for the step's stats: hinted turns, the share whose teacher was no more
    confident than the sampler, the mean change, and the hints dropped."""
    changes = [(item, c) for item in items if (c := teacher_change(item)) is not None]
    dropped = 0
    for item, (_, change) in changes:
        if change < min_change:
            item.teacher_logprobs, item.reward = None, None
            dropped += 1
    if not changes:
        return {"hinted": 0.0}
    return {"hinted": float(len(changes)),
            "teacher_no_gain": sum(gain <= 0 for _, (gain, _) in changes) / len(changes),
            "teacher_change": sum(c for _, (_, c) in changes) / len(changes),
            "hints_dropped": float(dropped)}


def images_of(store: Store, row: dict[str, Any], image_token: int | None) -> list[str]:
    """A judged turn's images as ``data:`` URLs, in prompt order (none for most turns),
    read back inline from ``store``. Raises Unreadable for one the trainer cannot have;
    with ``image_token`` (a vision-language model's), also for a prompt that holds image
    placeholders and no image."""
    request = row.get("request")
    messages = request.get("messages") if isinstance(request, dict) else None
    urls = image_urls(messages) if isinstance(messages, list) else []
    if not urls:
        if image_token is not None and image_token in row["prompt_token_ids"]:
            raise Unreadable("its prompt holds image placeholders, and its request "
                             "no image the learner can read")
        return []
    try:
        urls = store.turns.images.inline(urls)
    except ImageMissing as exc:
        raise Unreadable(str(exc)) from exc
    if any(not url.startswith("data:") for url in urls):
        raise Unreadable("an image given by URL, which the learner does not fetch "
                         "(send screenshots as data: URLs to train on them)")
    return list(urls)


def rank_microbatches(items: Sequence[TrainItem], rank: int, world: int, budget: int,
                      sharded: bool) -> list[list[int]]:
    """One rank's micro-batches (indices into ``items``): every ``world``-th item from
    ``rank`` on. Sharded, every rank gets as many (padded with empty ones), since each
    forward and backward pass is a collective operation."""
    def of(r: int) -> list[list[int]]:
        mine = list(range(r, len(items), world))
        return [[mine[i] for i in local]
                for local in microbatches([items[i] for i in mine], budget)]

    groups = of(rank)
    if sharded:
        most = max(len(of(r)) for r in range(world))
        groups += [[] for _ in range(most - len(groups))]
    return groups


def microbatches(items: Sequence[TrainItem], budget: int) -> Iterator[list[int]]:
    """Indices of items grouped so that each padded group fits the token ``budget``
    (an item longer than the budget goes alone, as does one with images: its pixel
    inputs are shaped by its own screens)."""
    batch: list[int] = []
    longest = 0
    for i, item in enumerate(items):
        n = len(item.prompt_ids) + len(item.completion_ids)
        if batch and (item.images or items[batch[-1]].images
                      or max(longest, n) * (len(batch) + 1) > budget):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch
