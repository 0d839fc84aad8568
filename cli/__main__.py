"""``python -m nextstate.cli``: the ``nextstate`` command (how ``nextstate up`` starts the
learner as its own process)."""

from __future__ import annotations

from nextstate.cli import main

main()
