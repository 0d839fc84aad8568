"""From runs to the markdown report: medians over rounds, ratios, and the targets.

load generator -> runs (one per target, scenario and round) -> **report** ->
``bench/results/proxy.md``. Every figure is the median over the interleaved rounds, so
a burst of load from elsewhere on the machine moves one round, not the result; ratios
(added latency, CPU, throughput against LiteLLM) are taken within the same session.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DIRECT, NEXTSTATE, LITELLM = "direct", "nextstate", "litellm"
BEFORE = "nextstate-before"  # the proxy as it was before a change (--baseline)
MEMORY = "nextstate+memory"  # the proxy with its memory serving lessons (--memory N)


@dataclass
class Run:
    """One measured run: one target, one scenario, one round."""

    target: str
    stream: bool
    concurrency: int
    round: int
    ok: int
    failed: int
    rps: float
    p50: float  # milliseconds from here on
    p90: float
    p99: float
    ttfb_p50: float
    ttfc_p50: float
    cpu_ms: float  # the server's CPU per successful request (direct: the upstream's)
    upstream_cpu_ms: float
    peak_rss_mb: float
    backlog_max: int | None = None  # nextstate: records submitted but not yet stored
    drain_s: float | None = None  # nextstate: time to store the backlog after the run
    errors: dict[str, int] = field(default_factory=dict)


def _median(values: Iterable[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


@dataclass
class Cell:
    """The median of a target's runs in one scenario."""

    runs: list[Run]

    def __getattr__(self, name: str) -> Any:
        if name in ("ok", "failed"):
            return sum(getattr(r, name) for r in self.runs)
        if name == "backlog_max":
            values = [r.backlog_max for r in self.runs if r.backlog_max is not None]
            return max(values) if values else None
        return _median(getattr(r, name) for r in self.runs)


def cells(runs: list[Run]) -> dict[tuple[str, bool, int], Cell]:
    out: dict[tuple[str, bool, int], Cell] = {}
    for run in runs:
        out.setdefault((run.target, run.stream, run.concurrency), Cell([])).runs.append(run)
    return out


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def scenario_table(runs: list[Run]) -> str:
    rows = ["| mode | conc. | target | req/s | p50 ms | p90 ms | p99 ms | TTFB p50 | "
            "first content p50 | CPU ms/req | peak RSS MB | failed |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (target, stream, conc), cell in sorted(cells(runs).items(),
                                               key=lambda kv: (kv[0][1], kv[0][2],
                                                               _order(kv[0][0]))):
        rows.append(
            f"| {'stream' if stream else 'whole'} | {conc} | {target} | {_f(cell.rps, 0)} | "
            f"{_f(cell.p50)} | {_f(cell.p90)} | {_f(cell.p99)} | {_f(cell.ttfb_p50)} | "
            f"{_f(cell.ttfc_p50) if stream else '–'} | {_f(cell.cpu_ms)} | "
            f"{_f(cell.peak_rss_mb, 0)} | {cell.failed} |")
    return "\n".join(rows)


def _order(target: str) -> int:
    return {DIRECT: 0, BEFORE: 1, NEXTSTATE: 2, MEMORY: 3, LITELLM: 4}.get(target, 5)


def _added(runs: list[Run], target: str, stream: bool, conc: int, metric: str) -> float:
    """Median over rounds of (target - direct) for a metric, paired within each round."""
    by_round: dict[int, dict[str, Run]] = {}
    for r in runs:
        if r.stream == stream and r.concurrency == conc:
            by_round.setdefault(r.round, {})[r.target] = r
    diffs = [getattr(pair[target], metric) - getattr(pair[DIRECT], metric)
             for pair in by_round.values() if target in pair and DIRECT in pair]
    return _median(diffs)


def ratio_table(runs: list[Run]) -> str:
    table = cells(runs)
    scenarios = sorted({(r.stream, r.concurrency) for r in runs})
    has_litellm = any(r.target == LITELLM for r in runs)
    head = "| mode | conc. | nextstate: added p50 ms | added TTFB p50 ms |"
    line = "|---|---:|---:|---:|"
    if has_litellm:
        head += (" LiteLLM: added p50 ms | added TTFB p50 ms | throughput nextstate÷LiteLLM |"
                 " CPU/req LiteLLM÷nextstate |")
        line += "---:|---:|---:|---:|"
    rows = [head, line]
    for stream, conc in scenarios:
        row = (f"| {'stream' if stream else 'whole'} | {conc} | "
               f"{_f(_added(runs, NEXTSTATE, stream, conc, 'p50'))} | "
               f"{_f(_added(runs, NEXTSTATE, stream, conc, 'ttfb_p50'))} |")
        ns, ll = table.get((NEXTSTATE, stream, conc)), table.get((LITELLM, stream, conc))
        if has_litellm:
            row += (f" {_f(_added(runs, LITELLM, stream, conc, 'p50'))} | "
                    f"{_f(_added(runs, LITELLM, stream, conc, 'ttfb_p50'))} | ")
            if ns is not None and ll is not None:
                row += f"{_f(ns.rps / ll.rps, 1)}× | {_f(ll.cpu_ms / ns.cpu_ms, 1)}× |"
            else:
                row += "– | – |"
        rows.append(row)
    return "\n".join(rows)


@dataclass
class Check:
    goal: str
    measured: str
    met: bool | None  # None: not measured in this session


def checks(runs: list[Run], soak: dict[str, Any] | None) -> list[Check]:
    table = cells(runs)
    out: list[Check] = []
    concs = sorted({r.concurrency for r in runs})
    top = concs[-1] if concs else 0

    def cell(target: str, stream: bool, conc: int) -> Cell | None:
        return table.get((target, stream, conc))

    if 1 in concs:
        added = _added(runs, NEXTSTATE, False, 1, "p50")
        out.append(Check("added p50 latency, whole, concurrency 1 ≤ 1 ms",
                         f"{_f(added)} ms", added <= 1.0))
        added = _added(runs, NEXTSTATE, True, 1, "ttfb_p50")
        out.append(Check("added time to first byte, stream, concurrency 1 ≤ 1 ms",
                         f"{_f(added)} ms", added <= 1.0))
    for stream, limit in ((False, 1.0), (True, 2.0)):
        worst = max((c.cpu_ms for (t, s, _), c in table.items()
                     if t == NEXTSTATE and s == stream), default=math.nan)
        out.append(Check(f"CPU per request, {'32-chunk stream' if stream else 'whole'} ≤ "
                         f"{limit:g} ms (worst concurrency)", f"{_f(worst)} ms",
                         worst <= limit))
    for stream in (False, True):
        ns, ll = cell(NEXTSTATE, stream, top), cell(LITELLM, stream, top)
        if ns is not None and ll is not None:
            ratio = ns.rps / ll.rps
            out.append(Check(f"throughput ≥ 10× LiteLLM at concurrency {top}, "
                             f"{'stream' if stream else 'whole'}", f"{_f(ratio, 1)}×",
                             ratio >= 10))
    peaks = [c.peak_rss_mb for (t, _, _), c in table.items() if t == NEXTSTATE]
    if peaks:
        out.append(Check("peak RSS under load ≤ 150 MB", f"{_f(max(peaks), 0)} MB",
                         max(peaks) <= 150))
    backlogs = [c.backlog_max for (t, _, _), c in table.items()
                if t == NEXTSTATE and c.backlog_max is not None]
    drains = [r.drain_s for r in runs if r.target == NEXTSTATE and r.drain_s is not None]
    if backlogs:
        worst_drain = max(drains) if drains else math.nan
        out.append(Check("recording keeps up: backlog bounded, drained after each run",
                         f"max backlog {max(backlogs)} records, drained within "
                         f"{_f(worst_drain, 1)} s", max(backlogs) < 2048 and
                         worst_drain < 5.0))
    if soak:
        growth = soak["rss_growth_mb"]
        out.append(Check(f"memory flat over a {soak['seconds']:.0f} s soak at concurrency "
                         f"{soak['concurrency']}",
                         f"RSS {_f(soak['rss_start_mb'], 0)} → {_f(soak['rss_end_mb'], 0)} MB "
                         f"(second half {growth:+.1f} MB), backlog max "
                         f"{soak['backlog_max']}, {soak['failed']} failed",
                         abs(growth) <= 5 and soak["failed"] == 0))
    return out


def checks_table(items: list[Check]) -> str:
    rows = ["| target | measured | met |", "|---|---|---|"]
    for c in items:
        mark = "–" if c.met is None else ("yes" if c.met else "**no**")
        rows.append(f"| {c.goal} | {c.measured} | {mark} |")
    return "\n".join(rows)


def before_after_table(runs: list[Run], before: str = BEFORE, after: str = NEXTSTATE) -> str:
    """nextstate against its own earlier version (or without its memory against with it),
    measured in the same session."""
    table = cells(runs)
    rows = ["| mode | conc. | CPU ms/req before → after | req/s before → after | "
            "added p50 ms before → after |", "|---|---:|---|---|---|"]
    for stream, conc in sorted({(r.stream, r.concurrency) for r in runs}):
        was, now = table.get((before, stream, conc)), table.get((after, stream, conc))
        if was is None or now is None:
            continue
        rows.append(
            f"| {'stream' if stream else 'whole'} | {conc} | {_f(was.cpu_ms)} → "
            f"{_f(now.cpu_ms)} | {_f(was.rps, 0)} → {_f(now.rps, 0)} | "
            f"{_f(_added(runs, before, stream, conc, 'p50'))} → "
            f"{_f(_added(runs, after, stream, conc, 'p50'))} |")
    return "\n".join(rows) if len(rows) > 2 else ""
