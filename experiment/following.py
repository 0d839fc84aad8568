"""How well a model follows instructions worded one way or another, per attribute
(``wording`` -> prompts -> a model, via transformers or a vLLM server -> ``styles.detect``).

It measures what the learner's distillation rests on: shown a hint, does the teacher (the
base model) produce the asked-for style? A probe is a word problem and preferences; its
prompt carries them in one ``form``:

    none      the bare problem (the model's defaults)
    hint      the problem, then the hint exactly as the learner appends it for its
              teacher (``teacher.with_hint``), worded as a user's ``instruction``
    natural   the instruction typed by the user in the same message

The rate per preference (attribute and value) is the share of replies to probes asking
for it that show it (``none``: the share of all replies that show it). Instructions
name 1-4 attributes, drawn as pretraining draws them. ``by_template`` asks each template
of the grammar alone, to find the ones the model misreads; ``tone_readings`` reads how
formal the reply to a hint will be off the model's first reply token, without sampling.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextstate.experiment import wording
from nextstate.experiment.styles import ATTRIBUTES, OPENERS, detect, make_problem
from nextstate.learner.teacher import with_hint

FORMS = ("none", "hint", "natural")
Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]


@dataclass(frozen=True)
class Probe:
    messages: Messages
    prefs: dict[str, str]


def probes(split: str, form: str, count: int, seed: int = 0) -> list[Probe]:
    """``count`` probes, the same for the same arguments."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r} (one of {', '.join(FORMS)})")
    rng = random.Random(f"following-{split}-{form}-{seed}")
    out = []
    for _ in range(count):
        question = make_problem(rng).question
        prefs = {} if form == "none" else wording.sample_prefs(rng)
        if form == "none":
            messages = [{"role": "user", "content": question}]
        elif form == "hint":
            text = wording.instruction(prefs, rng, split)
            messages = with_hint([{"role": "user", "content": question}], text)
        else:
            text = wording.instruction(prefs, rng, split)
            messages = [{"role": "user", "content": f"{question} {text}"}]
        out.append(Probe(messages, prefs))
    return out


def tally(replies: Sequence[str], asked: Sequence[Probe]) -> dict[str, list[int]]:
    """[hits, asked] per "attribute=value": how often a reply showed a value its probe
    asked for; a probe asking nothing counts toward every value it shows."""
    counts = {f"{a}={v}": [0, 0] for a, values in ATTRIBUTES.items() for v in values}
    for reply, probe in zip(replies, asked, strict=True):
        found = detect(reply)
        if not probe.prefs:
            for attribute, values in ATTRIBUTES.items():
                for value in values:
                    counts[f"{attribute}={value}"][0] += found[attribute] == value
                    counts[f"{attribute}={value}"][1] += 1
        for attribute, value in probe.prefs.items():
            counts[f"{attribute}={value}"][0] += found[attribute] == value
            counts[f"{attribute}={value}"][1] += 1
    return counts


def measure(generate: Generate, count: int = 200, seed: int = 0,
            splits: Sequence[str] = wording.SPLITS,
            forms: Sequence[str] = FORMS) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{split: {form: tally}} (the ``none`` form is the same for both splits: measured
    once, under the first)."""
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for split in splits:
        out[split] = {}
        for form in forms:
            if form == "none" and split != splits[0]:
                continue
            asked = probes(split, form, count, seed)
            out[split][form] = tally(generate([p.messages for p in asked]), asked)
    return out


def by_template(generate: Generate, count: int = 64, seed: int = 0,
                splits: Sequence[str] = wording.SPLITS) -> list[dict[str, Any]]:
    """Each ask template of the grammar alone as the teacher's hint (its slots filled with
    words of its own split), ``count`` probes each: one row per template, with how many
    replies showed the value it asks for. Tells a template the model reads from one it
    misreads ("too {casual}" read as asking for casual), which the per-attribute rates
    of ``measure`` average away."""
    asks, conversations = [], []
    for split in splits:
        for (attribute, value), templates in wording.ASKS.items():
            for template in templates[split]:
                rng = random.Random(f"template-{split}-{template}-{seed}")
                body = template.split(":", 1)[1]
                for _ in range(count):
                    question = [{"role": "user", "content": make_problem(rng).question}]
                    conversations.append(with_hint(question, wording.fill(body, rng, split)))
                asks.append((attribute, value, split, body))
    replies = generate(conversations)  # one call: a server sees every probe at once
    return [{"attribute": attribute, "value": value, "split": split, "template": body,
             "hits": sum(detect(reply)[attribute] == value
                         for reply in replies[i * count:(i + 1) * count]),
             "asked": count}
            for i, (attribute, value, split, body) in enumerate(asks)]


def template_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per template, by attribute, value and wording."""
    lines = ["| attribute | asks for | wording | template | rate |", "|---|---|---|---|---:|"]
    for row in rows:
        lines.append(f"| {row['attribute']} | {row['value']} | {row['split']} | "
                     f"{row['template']} | {row['hits'] / row['asked']:.2f} |")
    return "\n".join(lines) + "\n"


# A tone word in frames that ask for it ("Be chill.") and for the other tone ("Too chill.").
TONE_FRAMES = ("Be {}.", "Too {}.", "Don't be so {}.", "Less {}.")


def tone_readings(model_dir: Path, hints: Sequence[str | None], problems: int = 16,
                  seed: int = 0) -> list[float]:
    """How formal the model's reply to a problem with each hint is, exactly: the mean over
    ``problems`` word problems of p(formal) / (p(formal) + p(casual)) at the reply's first
    token, where p(tone) sums the probabilities of the first tokens of that tone's
    ``OPENERS``; the hint is shown as the learner shows it to its teacher (None: none).

    Exact because a reply's first token decides its tone (pretraining's replies never mix
    the two, and no opener's first token starts an opener of the other tone: checked here),
    so a word's reading has no sampling noise: other sets of 16 problems move it by about
    0.01, where 64 sampled replies give ±0.12. Needs torch and transformers (the learner
    extra)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    first = {tone: sorted({tokenizer(o, add_special_tokens=False)["input_ids"][0]
                           for o in openers}) for tone, openers in OPENERS.items()}
    if set(first["formal"]) & set(first["casual"]):
        raise ValueError(f"{model_dir}: a formal and a casual opener start with the same "
                         "token, so the first token does not decide the tone")
    rng = random.Random(f"tone-readings-{seed}")
    questions = [make_problem(rng).question for _ in range(problems)]
    readings = []
    for hint in hints:
        formal = []
        for question in questions:
            messages = [{"role": "user", "content": question}]
            text = tokenizer.apply_chat_template(
                messages if hint is None else with_hint(messages, hint), tokenize=False,
                add_generation_prompt=True)
            ids_1_T = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                probs_V = model(ids_1_T).logits[0, -1].softmax(-1)
            p_formal = float(probs_V[first["formal"]].sum())
            p_casual = float(probs_V[first["casual"]].sum())
            formal.append(p_formal / (p_formal + p_casual))
        readings.append(sum(formal) / len(formal))
    return readings


def tone_words(model_dir: Path, problems: int = 16) -> list[dict[str, Any]]:
    """Every tone word of the grammar (``wording.LEXEMES`` casual and formal, both splits)
    in each of ``TONE_FRAMES``: how formal the reply is (``tone_readings``). One row per
    word, and first a row for no hint at all. Tells a model that reads the negation ("Too
    chill." asks for formal) from one that reads only the word."""
    words = [(tone, split, word) for tone in ("casual", "formal") for split in wording.SPLITS
             for word in wording.LEXEMES[tone][split]]
    hints: list[str | None] = [None]
    hints += [frame.format(word) for _, _, word in words for frame in TONE_FRAMES]
    readings = tone_readings(model_dir, hints, problems)
    rows: list[dict[str, Any]] = [{"tone": None, "split": None, "word": None,
                                   "formal": {"(no hint)": readings[0]}}]
    for i, (tone, split, word) in enumerate(words):
        start = 1 + i * len(TONE_FRAMES)
        rows.append({"tone": tone, "split": split, "word": word, "formal": dict(zip(
            TONE_FRAMES, readings[start:start + len(TONE_FRAMES)], strict=True))})
    return rows


def tone_words_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """How formal the reply is per tone word and frame (the first row: no hint)."""
    lines = ["| word | tone | wording | " + " | ".join(f'"{f.format("X")}"'
                                                      for f in TONE_FRAMES) + " |",
             "|---|---|---|" + "---:|" * len(TONE_FRAMES)]
    for row in rows:
        if row["word"] is None:
            lines.append(f"| (no hint) | | | {row['formal']['(no hint)']:.2f} |"
                         + " |" * (len(TONE_FRAMES) - 1))
            continue
        cells = " | ".join(f"{row['formal'][f]:.2f}" for f in TONE_FRAMES)
        lines.append(f"| {row['word']} | {row['tone']} | {row['split']} | {cells} |")
    return "\n".join(lines) + "\n"


def rates(counts: dict[str, list[int]]) -> dict[str, float]:
    return {key: hits / n for key, (hits, n) in counts.items() if n}


def markdown(results: dict[str, dict[str, dict[str, list[int]]]]) -> str:
    """One row per split and form, one column per asked-for value."""
    keys = [f"{a}={v}" for a, values in ATTRIBUTES.items() for v in values]
    lines = ["| wording | form | " + " | ".join(keys) + " | mean |",
             "|---|---|" + "---:|" * (len(keys) + 1)]
    for split, forms in results.items():
        for form, counts in forms.items():
            r = rates(counts)
            mean = sum(r.values()) / len(r) if r else 0.0
            cells = [f"{r[k]:.2f}" if k in r else "–" for k in keys]
            name = "(no instruction)" if form == "none" else split
            lines.append(f"| {name} | {form} | " + " | ".join(cells) + f" | {mean:.2f} |")
    return "\n".join(lines) + "\n"


# --- generators --------------------------------------------------------------------------------


def transformers_generator(model_dir: Path, *, temperature: float = 1.0,
                           max_tokens: int = 160, batch: int = 64, seed: int = 0,
                           threads: int | None = None) -> Generate:
    """Sample replies with transformers (quick, no server), as vLLM would sample them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(seed)

    def generate(conversations: list[Messages]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(conversations), batch):
            texts = [tokenizer.apply_chat_template(m, tokenize=False,
                                                   add_generation_prompt=True)
                     for m in conversations[start:start + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=False)
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=temperature,
                                     top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
        return out

    return generate


def vllm_generator(base_url: str, model: str, *, temperature: float = 1.0,
                   max_tokens: int = 160, concurrency: int = 8) -> Generate:
    """Sample replies from a running vLLM (or a proxy in front of it), through its chat
    endpoint, as the benchmark's users are answered."""
    import httpx

    async def run(conversations: list[Messages]) -> list[str]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=600) as client:
            async def one(messages: Messages) -> str:
                async with gate:
                    answer = await client.post("/v1/chat/completions", json={
                        "model": model, "messages": messages, "temperature": temperature,
                        "max_tokens": max_tokens})
                    answer.raise_for_status()
                    content: Any = answer.json()["choices"][0]["message"]["content"]
                    return str(content or "")
            return list(await asyncio.gather(*(one(m) for m in conversations)))

    def generate(conversations: list[Messages]) -> list[str]:
        return asyncio.run(run(conversations))

    return generate
