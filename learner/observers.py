"""Who watches the learner: its Prometheus metrics and experiment trackers
(store -> learner -> judge -> trainer -> publish; learner -> observers).

`Learner` tells each observer, after every round of work, what it reported to the store
(its status: counts, rewards, the adapter serving) and, when the round trained, the step
(a row of the status' ``steps``: outcome, version and name, loss, KL, clip fraction,
tokens/s, ...). Observers only look: one that fails is logged and the learner goes on, as
the status itself is best effort. They run in a thread, off the learner's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger("nextstate.learner.observers")

Report = dict[str, Any]  # the learner's status, as written to the store
Step = dict[str, Any]  # one entry of the status' "steps"


class Observer(Protocol):
    def step(self, step: Step, report: Report) -> None:
        """A step ended (published, skipped, refused by the gate, or failed to load)."""
        ...

    def round(self, report: Report) -> None:
        """A round of work ended; ``report`` is what the learner reported."""
        ...

    def close(self) -> None: ...


def tell(observers: Sequence[Observer], report: Report, step: Step | None) -> None:
    """Each observer hears of the step (if any), then of the round."""
    for observer in observers:
        try:
            if step is not None:
                observer.step(step, report)
            observer.round(report)
        except Exception as exc:  # observing never stops the learner
            log.warning("%s failed: %s: %s", type(observer).__name__, type(exc).__name__, exc)


def close_all(observers: Sequence[Observer]) -> None:
    for observer in observers:
        try:
            observer.close()
        except Exception as exc:
            log.warning("%s did not close: %s", type(observer).__name__, exc)
