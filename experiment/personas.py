"""Simulated users for the learning benchmark (persona -> proxy -> vLLM; the persona's
answer is the next state the learner judges).

A persona is data (see ``personas.yaml`` for the schema): which value it prefers for each
style attribute, and optionally how it phrases corrections. A `SimulatedUser` reads a
reply with the deterministic detectors of `styles`, and answers like a person: thanks
when every preference is met, otherwise a natural correction naming what is missing.
A persona with a ``wording`` (``train`` or ``held-out``) composes each correction and
thank-you from that part of the `wording` grammar instead of fixed phrases: with
``held-out``, in words the toy model never saw in an instruction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nextstate.experiment import wording as grammar
from nextstate.experiment.styles import ATTRIBUTES, PHRASES, detect

DEFAULT_OPENERS = ("Not quite.", "Hmm, no.", "That's not what I wanted.")
DEFAULT_THANKS = ("Thanks, that's perfect!", "Great, thank you!")


class PersonaError(ValueError):
    """A persona file that does not follow the schema."""


@dataclass(frozen=True)
class Persona:
    name: str
    prefers: dict[str, str]
    description: str = ""
    corrections: dict[str, tuple[str, ...]] = field(default_factory=dict)
    openers: tuple[str, ...] = DEFAULT_OPENERS
    thanks: tuple[str, ...] = DEFAULT_THANKS
    restate: bool = True
    max_turns: int = 3
    wording: str | None = None  # a split of the `wording` grammar; None: fixed phrases

    def phrases(self, attribute: str) -> tuple[str, ...]:
        return self.corrections.get(attribute) or PHRASES[(attribute, self.prefers[attribute])]

    def score(self, reply: str) -> float:
        """The persona's rating of a reply: the share of its preferences it meets."""
        found = detect(reply)
        return sum(found[a] == v for a, v in self.prefers.items()) / len(self.prefers)


def load_personas(path: Path | None = None) -> dict[str, Persona]:
    """Personas from a YAML file (default: the two shipped with nextstate)."""
    if path is None:
        text = resources.files("nextstate.experiment").joinpath(
            "personas.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    entries = data.get("personas") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise PersonaError("a persona file has a top-level `personas:` mapping of names")
    return {name: _persona(str(name), spec) for name, spec in entries.items()}


def _persona(name: str, spec: Any) -> Persona:
    if not isinstance(spec, dict) or not isinstance(spec.get("prefers"), dict):
        raise PersonaError(f"persona {name}: needs a `prefers:` mapping")
    prefers = {str(k): str(v) for k, v in spec["prefers"].items()}
    for attribute, value in prefers.items():
        if attribute not in ATTRIBUTES:
            raise PersonaError(f"persona {name}: unknown attribute {attribute!r} "
                               f"(one of {', '.join(ATTRIBUTES)})")
        if value not in ATTRIBUTES[attribute]:
            raise PersonaError(f"persona {name}: {attribute} is one of "
                               f"{' | '.join(ATTRIBUTES[attribute])}, not {value!r}")
    if not prefers:
        raise PersonaError(f"persona {name}: prefers nothing")
    split = spec.get("wording")
    if split is not None and split not in grammar.SPLITS:
        raise PersonaError(f"persona {name}: wording is one of {' | '.join(grammar.SPLITS)}, "
                           f"not {split!r}")
    corrections = {str(a): tuple(str(p) for p in phrases)
                   for a, phrases in (spec.get("corrections") or {}).items()}
    unknown = set(corrections) - set(prefers)
    if unknown:
        raise PersonaError(f"persona {name}: corrections for attributes it does not prefer: "
                           f"{sorted(unknown)}")
    return Persona(
        name=name, prefers=prefers, description=str(spec.get("description", "")),
        corrections=corrections,
        openers=tuple(spec.get("openers") or DEFAULT_OPENERS),
        thanks=tuple(spec.get("thanks") or DEFAULT_THANKS),
        restate=bool(spec.get("restate", True)), max_turns=int(spec.get("max_turns", 3)),
        wording=split)


class SimulatedUser:
    def __init__(self, persona: Persona, rng: random.Random) -> None:
        self.persona = persona
        self.rng = rng

    def react(self, reply: str) -> tuple[bool, str]:
        """(satisfied, what the user says next)."""
        found = detect(reply)
        unmet = [a for a, v in self.persona.prefers.items() if found[a] != v]
        if not unmet:
            if self.persona.wording is not None:
                return True, grammar.thanks(self.rng, self.persona.wording)
            return True, self.rng.choice(self.persona.thanks)
        return False, self.correction(unmet)

    def correction(self, unmet: list[str]) -> str:
        """Names every unmet preference; with ``restate``, also the met ones ("and keep
        ..."), because a hint naming only what is missing pulls what was right back to
        its default (measured in the prototype)."""
        prefers = self.persona.prefers
        if self.persona.wording is not None:
            met = {a: v for a, v in prefers.items() if a not in unmet}
            return grammar.correction({a: prefers[a] for a in unmet},
                                      met if self.persona.restate else {}, self.rng,
                                      self.persona.wording)
        asks = [self.rng.choice(self.persona.phrases(a)) for a in unmet]
        text = f"{self.rng.choice(self.persona.openers)} {_join(asks).capitalize()}."
        met = [a for a in self.persona.prefers if a not in unmet]
        if self.persona.restate and met:
            keeps = [self.rng.choice(self.persona.phrases(a)) for a in met]
            text += f" And still {_join(keeps)}."
        return text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
