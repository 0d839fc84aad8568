"""A judge's verdict as the store's `Judgments.save` reads it, for tests that judge
turns by hand."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    score: int
    hints: tuple[str, ...] = ()
    source: str = "judge"
    votes: tuple[int | None, ...] = ()
    texts: tuple[str, ...] = ()
    judge: str = "rules"
    prompt_version: str = "1"
