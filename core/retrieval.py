"""Which lessons fit a request: BM25 over lessons, scoped to who asks (store -> proxy's
memory index -> the request path; the store uses `terms` to merge near-duplicates).

Each lesson is indexed under its scope, (tenant, user): a user's own lessons, their
tenant's (user None), and the shared ones (tenant and user None). A request of user U in
tenant T is matched against those three scopes only, so one tenant's lessons are never
even scored for another. A lesson's document is its text and the situation it was learned
in (the message it corrected), so a request like that one finds it even when the
lesson's own words are not in it.

BM25 (Robertson & Zaragoza's Okapi form, k1 1.2, b 0.75) is computed here rather than by a
library: the request path scores only the few dozen lessons in scope, from an inverted
index over term -> lessons built off the request path. `rank_bm25` loops over every
document of the corpus per query term, and `bm25s` brings numpy and scipy into the proxy
for a sparse matrix over the whole corpus (all tenants' lessons), to be filtered by scope
afterwards; both were measured against this (`bench/memory_bench.py`, bench/README.md).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Scope = tuple[str | None, str | None]  # (tenant, user); user None: the tenant's own
_WORD = re.compile(r"[a-z0-9]+")
# Words too common to say anything about a request (a short English list).
_COMMON = ("a an and are as at be but by do does for from had has have he her his how i if "
           "in is it its me my no not of on or our she so that the their them then there "
           "these they this to was we were what when which who will with you your")
STOPWORDS = frozenset(_COMMON.split())
K1 = 1.2
B = 0.75
MAX_QUERY_TERMS = 24


def terms(text: str, limit: int = 4000) -> list[str]:
    """The words of ``text`` (its first ``limit`` characters) that BM25 counts: lower
    case, letters and digits, no stop words, a plural's ``s`` dropped."""
    out = []
    for word in _WORD.findall(text[:limit].lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def similarity(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard overlap of two bags of terms (as sets): 1 for the same words."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa and sb else 0.0


@dataclass(frozen=True, slots=True)
class Doc:
    """A lesson as the index holds it."""

    id: str
    scope: Scope
    text: str
    pinned: bool = False
    support: int = 1  # hints merged into it
    context: str = ""


@dataclass
class _Scoped:
    docs: list[Doc] = field(default_factory=list)
    # term -> [(doc, its BM25 weight for the term)], weights computed once, at build
    postings: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class LessonIndex:
    """An immutable BM25 index of lessons, per scope. Built off the request path (a few
    ms for thousands of lessons); `search` is what a request pays: about a posting per
    query word and lesson in the request's scopes, so ``per_scope`` (the newest lessons a
    scope keeps here) and `MAX_QUERY_TERMS` bound it."""

    def __init__(self, docs: Sequence[Doc], version: object = None,
                 per_scope: int | None = None) -> None:
        self.version = version  # what the store said when this was built
        if per_scope is not None:  # each scope's first (newest) lessons, pinned ones first
            kept: Counter[Scope] = Counter()
            chosen = []
            for doc in sorted(docs, key=lambda d: not d.pinned):
                kept[doc.scope] += 1
                if kept[doc.scope] <= per_scope:
                    chosen.append(doc)
            docs = chosen
        self.size = len(docs)
        self._scopes: dict[Scope, _Scoped] = {}
        counted = [Counter(terms(f"{doc.text} {doc.context}")) for doc in docs]
        df: Counter[str] = Counter()
        for counts in counted:
            df.update(counts.keys())
        n = len(docs)
        avgdl = sum(sum(c.values()) for c in counted) / n if n else 1.0
        # Okapi's idf, floored at a small positive value so a word in most lessons still
        # counts a little rather than against them.
        self._idf = {t: max(math.log((n - f + 0.5) / (f + 0.5) + 1.0), 1e-3)
                     for t, f in df.items()}
        for doc, counts in zip(docs, counted, strict=True):
            scoped = self._scopes.setdefault(doc.scope, _Scoped())
            position = len(scoped.docs)
            scoped.docs.append(doc)
            norm = K1 * (1 - B + B * sum(counts.values()) / avgdl)
            for term, tf in counts.items():
                weight = self._idf[term] * tf * (K1 + 1) / (tf + norm)
                scoped.postings.setdefault(term, []).append((position, weight))

    def scopes_of(self, tenant: str | None, user: str | None) -> list[Scope]:
        """The scopes a request of ``user`` in ``tenant`` sees, own first."""
        out: list[Scope] = []
        if user is not None and user != tenant:
            out.append((tenant, user))
        out.append((tenant, None))
        if tenant is not None:
            out.append((None, None))
        return out

    def search(self, query: str, tenant: str | None, user: str | None, *, k: int = 3,
               min_score: float = 0.0) -> list[Doc]:
        """The ``k`` lessons in the request's scopes that fit ``query`` best: pinned
        lessons first (always, within ``k``), then by BM25 score over ``min_score`` (ties:
        the better supported). A lesson matching no word of the query is not returned."""
        # The query's rarest words, at most MAX_QUERY_TERMS of them: they decide the
        # ranking, and they bound the work a long message costs.
        words = Counter(t for t in terms(query) if t in self._idf)
        if len(words) > MAX_QUERY_TERMS:
            rare = sorted(words, key=self._idf.__getitem__, reverse=True)[:MAX_QUERY_TERMS]
            words = Counter({t: words[t] for t in rare})
        pinned: list[Doc] = []
        scored: list[tuple[float, int, Doc]] = []
        for scope in self.scopes_of(tenant, user):
            scoped = self._scopes.get(scope)
            if scoped is None:
                continue
            pinned.extend(d for d in scoped.docs if d.pinned)
            sums: dict[int, float] = {}
            get = sums.get
            for term, qtf in words.items():
                for position, weight in scoped.postings.get(term, ()):
                    sums[position] = get(position, 0.0) + qtf * weight
            scored.extend((s, scoped.docs[p].support, scoped.docs[p])
                          for p, s in sums.items()
                          if s > min_score and not scoped.docs[p].pinned)
        scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return (pinned + [doc for _, _, doc in scored])[:k]
