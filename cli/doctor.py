"""``nextstate doctor``: why isn't it learning? (doctor -> proxy, vLLM, store).

Checks the whole loop the way a person would and prints one line per finding: what is
wrong, why it matters, and the exact fix. The live checks (vLLM's flags, a round trip
with token ids, the proxy's recorder, every replica's adapters) are in
`nextstate.core.doctor`; what the store shows (sessions, lost tokens, the judge, the
publish gate, the learner itself) in `nextstate.core.health`. The exit code is 1 when
something blocks learning, else 0; ``--json`` gives the same for machines.

With no options it looks where ``nextstate up`` puts things: the proxy on port 8400,
the store in the data dir, the backends the proxy (or the learner) names.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import click
import orjson

from nextstate.cli.options import DEFAULT_PORT, backend_key_option, backend_option, store_option
from nextstate.core.doctor import check_backend, check_proxy
from nextstate.core.health import Finding, LoopFacts, learning_health, store_findings
from nextstate.core.paths import default_store_url
from nextstate.core.store.locate import StoreNotFound, require_store

DEFAULT_LORA_RANK = 16  # the learner's (TrainerConfig.lora_rank) when it hasn't reported
RECENT_HOURS = 24.0
MARK = {"ok": "ok   ", "warn": "warn ", "block": "BLOCK"}


@click.command()
@click.option("--proxy", default=f"http://127.0.0.1:{DEFAULT_PORT}", show_default=True,
              help="URL of the nextstate proxy ('' to skip it).")
@backend_option(multiple=True, help="A vLLM server to check (repeatable; default: the "
                "proxy's backends, else the learner's).")
@backend_key_option
@store_option
@click.option("--model", default=None, help="The model the agents ask for (default: the "
              "learner's policy, else the first vLLM serves).")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=RECENT_HOURS,
              show_default=True, help="Judge the traffic of the last this many hours.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(proxy: str, backends: tuple[str, ...], backend_api_key: str | None,
           store: str | None, model: str | None, hours: float, as_json: bool) -> None:
    """Why isn't it learning? Check vLLM, the proxy, the store and the learner; one line
    per finding with its fix; exit code 1 if something blocks learning."""
    findings, report = asyncio.run(diagnose(proxy, backends, backend_api_key,
                                            store or default_store_url(), model, hours))
    health = learning_health(findings, report)
    if as_json:
        click.echo(orjson.dumps({"object": "nextstate.doctor", "health": health,
                                 "findings": [f.as_dict() for f in findings]},
                                option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render(findings, health))
    sys.exit(1 if any(f.level == "block" for f in findings) else 0)


async def diagnose(proxy: str, backends: tuple[str, ...], api_key: str | None,
                   store_url: str, model: str | None, hours: float
                   ) -> tuple[list[Finding], dict[str, Any] | None]:
    findings: list[Finding] = []
    facts, report = _read_store(store_url, time.time() - hours * 3600, findings)
    health: dict[str, Any] = {}
    if proxy:
        found, health = await check_proxy(proxy)
        findings += found
    urls = list(backends) or [b["url"] for b in health.get("backends", [])] or list(
        (report or {}).get("backends") or [])
    if not urls:
        findings.append(Finding("vllm.reachable", "block", "no vLLM to check: the proxy "
                                "didn't answer and no learner named its backends", "",
                                "give doctor --backend http://HOST:PORT"))
    rank = int((report or {}).get("lora_rank") or DEFAULT_LORA_RANK)
    model = model or (report or {}).get("policy")
    for url in urls:
        findings += await check_backend(url, api_key=api_key, model=model, lora_rank=rank,
                                        current=facts.current if facts else ())
    if facts is not None:
        findings += store_findings(facts, report)
    return findings, report


def _read_store(url: str, since: float, findings: list[Finding]
                ) -> tuple[LoopFacts | None, dict[str, Any] | None]:
    from nextstate.core.store import Store
    from nextstate.core.store.facts import loop_facts

    try:
        require_store(url)
    except StoreNotFound as exc:
        findings.append(Finding("store", "block", str(exc), "nothing has been recorded "
                                "there", "give doctor the --store the proxy writes to"))
        return None, None
    db = Store(url)
    try:
        db.db.ensure_schema()
        facts = loop_facts(db.db.engine, since)
        report = db.status.read()
    except Exception as exc:  # a store that can't be read is the finding
        findings.append(Finding("store", "block", f"the store at {url} can't be read "
                                f"({type(exc).__name__}: {exc})"[:300], "",
                                "check the database is up and the URL is right"))
        return None, None
    finally:
        db.close()
    findings.append(Finding("store", "ok", f"the store at {url}: {facts.turns} turns in "
                            "the checked hours"))
    return facts, report


def render(findings: list[Finding], health: dict[str, Any]) -> str:
    order = {"block": 0, "warn": 1, "ok": 2}
    lines = []
    for f in sorted(findings, key=lambda f: order[f.level]):
        line = f"{MARK[f.level]} {f.what}"
        if f.why:
            line += f": {f.why}"
        if f.fix and f.level != "ok":
            line += f". Fix: {f.fix}"
        lines.append(line)
    lines += ["", f"health: {health['state']}"
              + (f" ({'; '.join(health['why'])})" if health["why"] else "")]
    return "\n".join(lines)
