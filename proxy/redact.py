"""Redaction of secrets and personal data before a turn is stored (proxy -> store).

Runs in the writer, never on the request path. Credentials in headers are never recorded
at all (the proxy stores no headers); this scrubs what clients put in message text:
API keys, bearer tokens and e-mail addresses by default, or any patterns configured.
A turn where something was redacted also loses its token ids and logprobs, which would
spell the secret out again; it is kept for the record but never trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

DEFAULT_PATTERNS: tuple[str, ...] = (
    r"\bsk-[A-Za-z0-9_-]{16,}",                          # OpenAI-style keys
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",                    # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",                     # GitHub tokens
    r"\bxox[abpr]-[A-Za-z0-9-]{10,}",                    # Slack tokens
    r"\b(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}",           # bearer tokens pasted in text
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",   # e-mail addresses
)
MASK = "[REDACTED]"


class Redactor:
    def __init__(self, patterns: Sequence[str] = DEFAULT_PATTERNS) -> None:
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def text(self, value: str) -> tuple[str, int]:
        if self.pattern is None:
            return value, 0
        return self.pattern.subn(MASK, value)

    def scrub(self, value: Any) -> tuple[Any, int]:
        """A copy of a JSON value with every string scrubbed, and how many hits."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            items = [self.scrub(v) for v in value]
            return [v for v, _ in items], sum(n for _, n in items)
        if isinstance(value, dict):
            pairs = {k: self.scrub(v) for k, v in value.items()}
            return {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
        return value, 0
