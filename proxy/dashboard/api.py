"""The dashboard's data: the funnel, the learning curves and the adapters
(browser -> proxy -> store, vLLM).

    GET /v1/dashboard/me         who the key is: admin, or which tenant
    GET /v1/dashboard/funnel     the stages and drops (`Funnel`), the learner's state
    GET /v1/dashboard/curves     per version: training numbers, served reward, scores,
                                 as charts (SVG) and as rows; the gate's refusals
    GET /v1/dashboard/adapters   versions, what each learned from, which replicas have it

Sessions and turns are in `sessions`. Rollback is the admin endpoint the CLI's
``adapters rollback`` shares (``POST /v1/adapters/rollback``, `nextstate.core.lora`);
the adapters page only offers it to admin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from nextstate.core.lora import NOT_SERVABLE, PERSONAL, AdapterStatus
from nextstate.core.store.curves import BASE_ADAPTER
from nextstate.core.vllm import VLLMError
from nextstate.proxy.dashboard.charts import Point, Series, line_chart
from nextstate.proxy.dashboard.viewer import (
    in_store,
    json_response,
    policies,
    viewer,
    visible,
)
from nextstate.proxy.deps import Deps

# The curves page: (key, title, the number of a version's row).
CURVES: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("reward", "mean reward of the traffic it served", lambda r: r["served"]["reward_mean"]),
    ("batch_reward", "mean reward of the batch it learned from",
     lambda r: r["stats"].get("reward_mean")),
    ("loss", "loss", lambda r: r["stats"].get("loss")),
    ("kl", "KL of its step (nats/token)", lambda r: r["stats"].get("kl")),
    ("clip_fraction", "clip fraction", lambda r: r["stats"].get("clip_fraction")),
    ("tokens_per_second", "training tokens/s", lambda r: r["stats"].get("tokens_per_second")),
)
REPLICA_TIMEOUT = 3.0


async def me(request: Request) -> Response:
    deps, who = viewer(request)
    return json_response({"object": "nextstate.viewer", "admin": who.admin,
                          "tenant": who.tenant, "policy": deps.settings.policy,
                          "keys": bool(deps.settings.tenants_by_key()
                                       or deps.settings.admin_key)})


async def _report(deps: Deps) -> dict[str, Any]:
    return await in_store(deps.store.status.read) or {}


async def funnel(request: Request) -> Response:
    deps, who = viewer(request)
    report = await _report(deps)
    method = str(report.get("method") or "combined")
    batch = int(report.get("batch_turns") or 16)
    after = report.get("personal_after")
    body = await in_store(deps.store.funnel.read, tenant=who.scope, method=method,
                          batch_turns=batch,
                          personal_after=int(after) if isinstance(after, int) else None)
    learner = {key: report.get(key) for key in ("state", "updated_at", "age_seconds",
                                                "health", "adapter", "judge")}
    return json_response({"object": "nextstate.funnel", "tenant": who.scope, **body,
                          "learner": learner if report else None})


def _label(version: int) -> str:
    return f"v{version}"


def _charts(rows: list[dict[str, Any]], scores: list[dict[str, Any]],
            gate_bound: float | None) -> list[dict[str, str]]:
    """One chart per number; one series per policy; one point per version with it."""
    numbers = sorted({r["version"] for r in rows})
    at = {v: i for i, v in enumerate(numbers)}
    labels = [_label(v) for v in numbers]
    by_name = {r["name"]: r for r in rows}
    charts = []
    for key, title, value in CURVES:
        series: dict[str, list[Point]] = {}
        for row in rows:
            y = value(row)
            if isinstance(y, int | float):
                series.setdefault(row["policy"], []).append(
                    Point(at[row["version"]], float(y), row["name"]))
        reference = (gate_bound, "publish gate") if key == "kl" and gate_bound else None
        svg = line_chart(key, title, labels, [Series(name, tuple(points))
                                              for name, points in series.items()],
                         reference=reference)
        charts.append({"key": key, "title": title, "svg": svg})
    benches: dict[str, dict[str, list[Point]]] = {}
    base: dict[str, float] = {}  # a benchmark's score of the base model, before any step
    for score in scores:
        if score["adapter"].endswith(BASE_ADAPTER):
            base[score["benchmark"]] = float(score["score"])
            benches.setdefault(score["benchmark"], {})
        scored = by_name.get(score["adapter"])
        if scored is not None:
            benches.setdefault(score["benchmark"], {}).setdefault(scored["policy"], []).append(
                Point(at[scored["version"]], float(score["score"]), scored["name"]))
    for bench, series in benches.items():
        key = f"score:{bench}"
        reference = (base[bench], "base model") if bench in base else None
        charts.append({"key": key, "title": f"benchmark score: {bench}", "svg": line_chart(
            key, f"benchmark score: {bench}", labels,
            [Series(name, tuple(points)) for name, points in series.items()],
            reference=reference)})
    return charts


async def curves(request: Request) -> Response:
    deps, who = viewer(request)
    allowed = await policies(deps, who)
    policy = deps.settings.policy
    rows = [r for r in await in_store(deps.store.curves.versions, allowed, tenant=who.scope)
            if visible(r["policy"], allowed, policy)]
    scores = [s for s in await in_store(deps.store.curves.scores, allowed)
              if visible(s["policy"], allowed, policy)]
    served: dict[str, dict[str, Any]] = await in_store(deps.store.curves.served, who.scope)
    report = await _report(deps)
    steps = [s for s in report.get("steps") or []
             if s.get("outcome") == AdapterStatus.REFUSED and (
                 who.admin or s.get("policy") in (allowed or []))]
    kinds: dict[str, dict[str, Any]] = {}
    for row in rows:
        kind = "personal" if PERSONAL in row["policy"] else "shared"
        kinds.setdefault(row["policy"], {"policy": row["policy"], "kind": kind,
                                         "versions": 0})["versions"] += 1
    base = served.get(deps.router.base_model) if deps.router.base_model else None
    return json_response({
        "object": "nextstate.curves", "policies": list(kinds.values()), "versions": rows,
        "base": base, "scores": scores,
        "charts": _charts(rows, scores, report.get("gate_max_kl")),
        "gate": {"bound": report.get("gate_max_kl"),
                 "refusals": [{k: s.get(k) for k in ("at", "policy", "kl", "error")}
                              for s in steps],
                 "refused_total": (report.get("totals") or {}).get("steps", {}).get(
                     AdapterStatus.REFUSED, 0) if who.admin else len(steps),
                 "slowed": [r["name"] for r in rows
                            if (r["stats"].get("extra") or {}).get("lr_scale", 1.0) < 1.0]},
    })


async def _replicas(deps: Deps) -> list[dict[str, Any]]:
    """What each backend has loaded now (None: it does not answer)."""
    async def loaded(vllm: Any) -> list[str] | None:
        try:
            return sorted(await asyncio.wait_for(vllm.models(), REPLICA_TIMEOUT))
        except (VLLMError, TimeoutError):
            return None

    backends = deps.backends.backends
    found = await asyncio.gather(*(loaded(b.vllm) for b in backends))
    return [{"url": b.url, "models": models} for b, models in zip(backends, found,
                                                                   strict=True)]


async def adapters(request: Request) -> Response:
    deps, who = viewer(request)
    allowed = await policies(deps, who)
    rows = [r for r in await in_store(deps.store.adapters.versions)
            if visible(r["policy"], allowed, deps.settings.policy)]
    trained = await in_store(deps.store.judgments.trained_by_version)
    replicas = await _replicas(deps)
    data = []
    for row in reversed(rows):  # newest first
        stats = row.get("stats") or {}
        data.append({
            **{k: row[k] for k in ("version", "name", "policy", "status", "created_at",
                                   "published_at", "retired_at", "error")},
            "stats": {k: stats.get(k) for k in ("turns", "tokens", "loss", "kl",
                                                "reward_mean", "tokens_per_second")},
            "trained_turns": trained.get(row["version"], 0),
            "replicas": [r["url"] for r in replicas if row["name"] in (r["models"] or [])],
            "can_serve_again": row["status"] not in NOT_SERVABLE
            and row["status"] != AdapterStatus.CURRENT,
        })
    return json_response({"object": "list", "can_rollback": who.admin, "data": data,
                          "replicas": [{"url": r["url"], "up": r["models"] is not None}
                                       for r in replicas]})
