"""An offline judge made of rules over the next state (store -> learner -> judge -> trainer).

For when no capable judge model exists (this machine, CI, the toy model): `RulesJudge`
reads the same recorded turn an LLM judge would and scores it from surface cues, in this
order, first match wins:

1. explicit feedback on the turn (``turn["feedback"]``, the latest entry) outranks all;
2. the user's reply: a correction or complaint (-1), a bare acknowledgement such as "ok"
   (0: it says nothing either way), the same request again in other words (-1), thanks or
   approval (+1), anything else is a user moving on to a new request (+1, configurable);
3. tool results: ``"status": "error"``, a non-zero exit code or an error text (-1), else
   success (+1); an explicit verdict of the user outranks the tools;
4. no next state: 0.

On -1 the user's corrective text is the hint; a hint given with explicit feedback goes
before it. `explicit_feedback` is shared with the LLM judge.

The rules read text only. A next state that is only an image (a GUI agent's screenshot,
nothing said) gets no verdict from them: the judgment has source ``none``, no vote, and
says why, so no step trains on a score the rules made up (explicit feedback still
counts, and `--judge llm` with a vision model judges the screens). A next state with
text and images is judged on its text; the judgment says its images were not read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nextstate.core.sessions import image_urls, only_images, text_of
from nextstate.learner.judgment import JudgeError, Judgment

_COMPLAINTS = ("long", "short", "formal", "casual", "informal", "verbose", "wordy", "vague",
               "generic", "complicated", "complex", "technical", "basic", "simple", "slow")
_CHANGES = ("shorter", "longer", "simpler", "clearer", "more concise", "less formal",
            "more formal", "more detailed", "less verbose")


@dataclass(frozen=True)
class RuleCues:
    """The phrases the rules look for. Matching ignores case, respects word boundaries (so
    "no" never matches "know" or "notice") and lets the user drop a cue's apostrophes."""

    # A correction or complaint anywhere in the user's reply.
    negative: tuple[str, ...] = (
        "not what i", "that's wrong", "that is wrong", "that's not", "that is not right",
        "incorrect", "i meant", "i said", "i asked for", "try again", "redo", "re-do",
        "please fix", "fix it", "fix this", "you forgot", "you missed", "not right",
        "not correct", "not quite", "not helpful", "doesn't work", "does not work",
        "didn't work", "did not work", "not working", "still broken", "still wrong",
        "still not", "still fails", "still failing", "still getting", "wrong answer",
        "that was wrong", "you misunderstood", "misread", "please change", "instead of",
        "i didn't ask", "don't want", "stop doing",
        *(f"too {w}" for w in _COMPLAINTS), *(f"make it {w}" for w in _CHANGES),
        # wishes about the reply: how people correct without saying "wrong"
        "i'd rather", "i would rather", "i'd prefer", "i would prefer", "i prefer",
        "i wanted", "i was hoping", "i expected", "i was expecting", "would be nice",
        "would be better", "would help", "wouldn't hurt", "should have", "should be",
        "should also", "needs to", "needs a", "needs an", "needs more", "needs some",
        "next time", "in future", "in the future", "for future", "going forward",
        "from now on", "instead", "rather than", "not only", "don't just", "i need the",
        "i need more", "i need it", "only need", "do me a favour", "do me a favor",
        "any chance you could", "it would help if", "i'd appreciate it if",
        "i'd appreciate a", "i'd love it if", "i'd like it", "i'd like a", "i'd like more",
        "i'd like the", "i'd like some", "i want it", "i want the", "i want more",
        "i want some", "i want to see", "fewer",
        # not understood, doubted, broken
        "i don't understand", "i don't get", "i'm confused", "i am confused", "i'm lost",
        "got lost", "makes no sense", "doesn't make sense", "how did you get", "where does",
        "where did", "where are the", "where is the", "where's the", "are you sure",
        "i thought it was", "i'm pretty sure", "double-check", "check your", "a mistake",
        "doesn't sound right", "doesn't handle", "does not handle", "crashes", "it fails",
        "fails my", "fails on", "breaks on", "it breaks", "wrong", "is off",
        "again, but", "do it again", "once more", "rewrite", "rephrase", "redo it",
        "friendlier", "warmer", "shorter", "longer", "simpler", "clearer", "softer",
        "politer", "fuller", "briefer", "gentler",
        # preferences stated rather than asked for
        "kindly", "picky", "nitpick", "suits me", "would suit", "matters to me",
        "tells me nothing", "can go", "do without", "go for", "aim for", "comes across",
        "reads way", "reads like", "reads a bit", "quick note", "side note", "sorry to",
        "straight to the",
        "additional",
    )
    # The same as patterns (regular expressions on the lower-cased reply).
    negative_patterns: tuple[str, ...] = (
        # "too terse", "way too dry" (not "too good", "me too")
        r"\btoo (?!good\b|kind\b|bad\b|late\b|early\b|soon\b|much trouble)[a-z]{3,}",
        r"\b(?:a (?:bit|little|lot|tad)|slightly|much|way|far|even) (?:more|less)\b",
        r"\b(?:more|less) (?:formal|casual|friendly|polite|professional|relaxed|serious|"
        r"stiff|stuffy|chatty|wordy|waffle|fluff|text|words|steps|working|detail|detailed|"
        r"explanation|context|encouragement|warm|demanding|blunt|rude|like|playful)\b",
        # an edit asked of the reply, at the start of a sentence
        r"(?:^|[.!?;:,]\s*|\b(?:and|also|but|then|to|please|pls|plz|just|so)\s+)(?:make it|keep it|"
        r"be (?:more|less|a bit|a little|so|very)|sound |lose the|drop the|cut the|"
        r"skip the|leave (?:out|off)|stop (?:after|at|being|with)|tone it|"
        r"show (?:me )?(?:the|your|how|each|all|steps)|explain (?:how|why|it|each|the|more)|"
        r"walk (?:me )?through|spell out|spell it|break it down|expand|elaborate|"
        r"add (?:a|some|more|the|comments|type)|include|remove|get rid of|ditch|omit|"
        r"soften|shorten|simplify|trim|try a|use (?:a|proper|plain)|write it|put in|"
        r"end with|finish with|encourage me|cheer me|motivate me|talk to me|write like|"
        r"don't (?:be so|show|explain|add|include|use|give|make|sound|end))",
        r"\bless (?!than\b)[a-z]{3,}",
        r"\b(?:just|only) (?:give me )?the (?:number|answer|result|solution)\b",
        r"\bno (?:more )?(?:explanation|sign-?off|motivational|pep talk|chit-?chat|fluff|"
        r"cheer\w*|encouragement|steps|working|waffle)",
        r"\bwithout (?:the|all the|any)\b",
        r"\w*error\b",
        r"\bmind \w+ing\b",
    )
    # "could you make it ...", unless the reply asks for something new ("can you do
    # another one next?").
    change_requests: str = (
        r"\b(?:can|could|would|will) (?:you|it|we)(?: please| kindly| maybe)?(?: \w+)? "
        r"(?:make|be|sound|keep|add|show|explain|include|use|rewrite|redo|try|break|spell|"
        r"walk|expand|elaborate|trim|shorten|lose|drop|remove|cut|skip|leave|end|finish|"
        r"soften|mention|change|fix|update|handle|warm|tone|go into|say more|get|"
        r"give me (?:more|less|a fuller|a longer|a shorter|the steps|only|just))\b"
    )
    new_request: str = r"\b(?:next|another|as well|one more|similar|new)\b"
    # Corrections only when they open the reply or a sentence of it: "No, ..." is a
    # correction, "there is no file" is not.
    negative_openers: tuple[str, ...] = ("no", "nope", "nah", "wrong", "ugh", "not that",
                                         "meh", "eh", "almost", "nearly", "actually",
                                         "not really", "close", "one thing")
    # Phrases that look negative but are not; removed before the negative cues are read.
    not_negative: tuple[str, ...] = (
        "no problem", "no problems", "not a problem", "no worries", "no thanks",
        "no thank you", "no need", "no rush", "no doubt", "not bad", "no big deal",
        "nothing wrong", "no issue", "no issues", "no complaints",
    )
    positive: tuple[str, ...] = (
        "thanks", "thank you", "thx", "ty", "great", "perfect", "that works", "it works",
        "works now", "got it", "awesome", "excellent", "nice", "exactly", "looks good",
        "lgtm", "well done", "appreciate it", "that helps", "helpful", "cheers", "brilliant",
        "that's right", "that's correct", "spot on", "love it",
        "appreciated", "wonderful", "lovely", "superb", "fantastic", "amazing", "cool",
        "neat", "love", "that's the one", "did the trick", "just right", "much better",
        "makes sense", "very clear", "so clear", "what i needed", "good to know",
        "interesting", "no notes",
    )
    # A reply made of these alone is ambiguous (0): "ok" after a wrong answer is
    # resignation as often as it is acceptance after a right one.
    acknowledgements: tuple[str, ...] = (
        "ok", "okay", "k", "kk", "hmm", "hmmm", "hm", "mm", "sure", "fine", "alright", "i see",
        "yes", "yeah", "yep", "right", "oh", "ah", "meh", "well", "so",
    )
    tool_errors: tuple[str, ...] = (
        "error:", "traceback (most recent call last)", "exception:", "command not found",
        "no such file or directory", "permission denied", "timed out", "fatal:",
        "segmentation fault",
    )
    # Share of content words two user messages must have in common (Jaccard) for the
    # second to count as the first one asked again.
    rephrase_overlap: float = 0.6

    @cached_property
    def compiled(self) -> _Compiled:
        return _Compiled(self)


class _Compiled:
    def __init__(self, cues: RuleCues) -> None:
        self.negative = _phrases(cues.negative)
        self.patterns = re.compile("|".join(f"(?:{p})" for p in cues.negative_patterns)
                                   or "(?!)")
        self.change_requests = re.compile(cues.change_requests)
        self.new_request = re.compile(cues.new_request)
        self.openers = re.compile(
            r"(?:^|[.!?;\n])\s*(?:(?:hmm+|um+|uh+|well|oh|ah|ok|okay)[\s,]+)?"
            + _alternation(cues.negative_openers) + r"(?!\w)")
        self.not_negative = _phrases(cues.not_negative)
        self.positive = _phrases(cues.positive)
        self.acknowledgements = _phrases(cues.acknowledgements)
        self.tool_errors = _phrases(cues.tool_errors)


_EXIT_CODE = re.compile(r"\bexit (?:code|status)\s*[:=]?\s*(-?\d+|timeout)", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "for", "from",
    "with", "by", "about", "as", "is", "are", "was", "were", "be", "been", "do", "does", "did",
    "can", "could", "would", "should", "will", "shall", "may", "might", "must", "i", "me", "my",
    "you", "your", "it", "its", "this", "that", "these", "those", "what", "which", "who", "whom",
    "whose", "how", "why", "when", "where", "there", "here", "please", "pls", "tell", "show",
    "give", "us", "we", "our", "again", "some", "any", "whats", "thats", "hows", "wheres", "im",
})


def _normal(text: str) -> str:
    return text.lower().replace("\u2019", "'")


def _alternation(phrases: Sequence[str]) -> str:
    # Words in a phrase may be separated by spaces or commas ("no, thanks" is "no thanks"),
    # and apostrophes are optional ("thats wrong" is "that's wrong").
    parts = [r"[\s,]+".join(re.escape(w).replace("'", "'?") for w in _normal(p).split())
             for p in phrases]
    return "(" + "|".join(sorted(parts, key=len, reverse=True)) + ")" if parts else "(?!)"


def _phrases(phrases: Sequence[str]) -> re.Pattern[str]:
    # Lookarounds rather than \b: a cue may start or end with punctuation ("error:").
    return re.compile(r"(?<!\w)" + _alternation(phrases) + r"(?!(?<=\w)\w)")


def _content_words(text: str) -> set[str]:
    words = {w for w in _WORD.findall(_normal(text).replace("'", "")) if w not in _STOPWORDS}
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words}  # crude plural


@dataclass(frozen=True)
class Feedback:
    score: int
    hint: str | None
    source: str | None


def explicit_feedback(turn: Mapping[str, Any]) -> Feedback | None:
    """The turn's explicit feedback: the latest score, with the latest non-empty hint
    (a thumbs-down with a hint followed by a bare thumbs-down keeps the hint)."""
    latest: Feedback | None = None
    hint: str | None = None
    entries = sorted(turn.get("feedback") or [], key=lambda f: f.get("created_at") or 0)
    for entry in entries:
        try:
            score = int(entry.get("score"))
        except (TypeError, ValueError):
            continue
        latest = Feedback((score > 0) - (score < 0), None, entry.get("source"))
        if isinstance(entry.get("hint"), str) and entry["hint"].strip():
            hint = entry["hint"].strip()
    if latest is None:
        return None
    return Feedback(latest.score, hint, latest.source)


@dataclass(frozen=True)
class _Verdict:
    score: int
    # negative | rephrase | acknowledgement | positive | moved_on | tool_* | none |
    # image_only (no verdict: the rules cannot read a screenshot)
    signal: str
    why: str
    hint: str | None = None


class RulesJudge:
    """A `Judge` that needs no model. ``moved_on`` is the score of a user who simply goes
    on to a new request (+1: the reply was good enough to build on)."""

    name = "rules"
    prompt_version = "rules-3"

    def __init__(self, cues: RuleCues | None = None, *, moved_on: int = 1,
                 min_hint_chars: int = 10) -> None:
        self.cues = cues or RuleCues()
        self.moved_on = moved_on
        self.min_hint_chars = min_hint_chars

    async def judge(self, turn: dict[str, Any]) -> Judgment:
        return self.judge_now(turn)

    def judge_now(self, turn: Mapping[str, Any]) -> Judgment:
        """The same judgment, synchronously (the rules never wait on anything)."""
        feedback = explicit_feedback(turn)
        if not turn.get("next_state") and turn.get("next_state_status") == "pending" \
                and feedback is None:
            raise JudgeError("the next state is still pending")
        verdict = self.verdict(turn)
        blind = verdict.signal == "image_only"
        if blind and feedback is None:
            return Judgment(score=0, votes=(None,), texts=(f"no verdict: {verdict.why}",),
                            judge=self.name, prompt_version=self.prompt_version,
                            source="none", extra={"signal": verdict.signal})
        hints = [verdict.hint] if verdict.hint and verdict.score == -1 else []
        score, source, why = verdict.score, "judge", verdict.why
        if feedback is not None:
            score, source = feedback.score, "feedback"
            why = f"explicit feedback {feedback.score:+d} outranks the rules ({verdict.why})"
            hints = [h for h in hints if feedback.score == -1 and h != feedback.hint]
            if feedback.hint:
                hints.insert(0, feedback.hint)
        images = len(image_urls(turn.get("next_state") or []))
        if images and not blind:
            why += f" ({images} image(s) in the next state not read: the rules read text only)"
        return Judgment(score=score, votes=(None if blind else verdict.score,), texts=(why,),
                        hints=tuple(hints),
                        judge=self.name, prompt_version=self.prompt_version, source=source,
                        extra={"signal": verdict.signal})

    def verdict(self, turn: Mapping[str, Any]) -> _Verdict:
        """What the rules make of the next state alone (feedback not considered)."""
        state = [m for m in turn.get("next_state") or [] if isinstance(m, Mapping)]
        if only_images(state):
            return _Verdict(0, "image_only", f"the next state is only {len(image_urls(state))} "
                            "image(s) and the rules judge reads text only (use --judge llm "
                            "with a vision model)")
        users = [_said(m.get("content")) for m in state if m.get("role") == "user"]
        tools = [m for m in state if m.get("role") == "tool"]
        # A message with a new screen is the environment's observation: its words repeat
        # from step to step ("the screen after your action") without asking again.
        previous = "" if image_urls(state) else _previous_request(turn)
        user = self._user_verdict("\n".join(users), previous) if users else None
        if user is not None and user.signal in ("negative", "rephrase", "positive"):
            return user  # the user's own verdict outranks what the tools said
        if tools:
            return self._tool_verdict(tools)
        return user or _Verdict(0, "none", "no next state")

    def _user_verdict(self, text: str, previous: str) -> _Verdict:
        rx, said = self.cues.compiled, _normal(text)
        cleaned = rx.not_negative.sub(" ", said)
        found = rx.negative.search(cleaned) or rx.openers.search(cleaned.lstrip())
        cue = found.group(1).replace(",", "") if found is not None else None
        if cue is None:
            match = rx.patterns.search(cleaned) or (
                rx.change_requests.search(cleaned) if not rx.new_request.search(cleaned)
                else None)
            cue = match.group(0).strip(" .!?;:,") if match is not None else None
        if cue is not None:
            return _Verdict(-1, "negative", f"negative cue '{cue}' in the user's reply",
                            self._hint(text))
        if not _WORD.findall(rx.acknowledgements.sub(" ", said)):
            return _Verdict(0, "acknowledgement", "only an acknowledgement from the user")
        before, after = _content_words(previous), _content_words(text)
        if before and after:
            overlap = len(before & after) / len(before | after)
            if overlap >= self.cues.rephrase_overlap:
                return _Verdict(-1, "rephrase", f"the user asked the same again "
                                f"({overlap:.0%} word overlap)", self._hint(text))
        found = rx.positive.search(said)
        if found is not None:
            return _Verdict(1, "positive", f"positive cue '{found.group(1)}' in the user's reply")
        return _Verdict(self.moved_on, "moved_on", "the user moved on to a new request")

    def _tool_verdict(self, tools: Sequence[Mapping[str, Any]]) -> _Verdict:
        for message in tools:
            if message.get("status") == "error":
                return _Verdict(-1, "tool_error", "a tool result has status 'error'")
            text = _said(message.get("content"))
            code = _EXIT_CODE.search(text)
            if code is not None:
                # The harness's exit code is authoritative: a successful run may well
                # print "error:" (a grep through logs, a test that checks errors).
                if code.group(1) != "0":
                    return _Verdict(-1, "tool_error", f"a tool exited with code {code.group(1)}")
                continue
            found = self.cues.compiled.tool_errors.search(_normal(text))
            if found is not None:
                return _Verdict(-1, "tool_error", f"tool error cue '{found.group(1)}' "
                                "in a tool result")
        return _Verdict(1, "tool_ok", f"{len(tools)} tool result(s) without error")

    def _hint(self, text: str) -> str | None:
        text = text.strip()
        return text if len(text) > self.min_hint_chars else None


def _said(content: Any) -> str:
    """A message's text parts only: an image part says nothing the rules can read."""
    if isinstance(content, list):
        return "".join(str(p["text"]) for p in content
                         if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return text_of(content)


def _previous_request(turn: Mapping[str, Any]) -> str:
    """The user message the reply answered (or the completions prompt)."""
    request = turn.get("request") or {}
    for message in reversed(request.get("messages") or []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return _said(message.get("content"))
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) else ""
