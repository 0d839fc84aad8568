"""``nextstate export`` and ``nextstate forget``: the recorded data, read out or deleted
(store -> CLI; forgetting also unloads personal adapters from vLLM via core.lora)."""

from __future__ import annotations

from typing import IO

import click
import orjson

from nextstate.cli.options import (
    backend_key_option,
    backend_option,
    existing_store,
    store_option,
)
from nextstate.core import lora


@click.command()
@store_option
@click.option("--session", default=None, help="Forget this session.")
@click.option("--user", default=None,
              help="Forget this user (as `nextstate export` shows it: tenant:id, the "
              "tenant, or the id): their turns and their personal adapters.")
@click.option("--tenant", default=None,
              help="Forget everything of this tenant, its users' personal adapters included.")
@click.option("--older-than-days", type=float, default=None,
              help="Forget turns older than this many days.")
@backend_option(multiple=True, help="A vLLM serving the adapters (repeatable): forgotten "
                "personal adapters are unloaded from it.")
@backend_key_option
def forget(store: str | None, session: str | None, user: str | None, tenant: str | None,
           older_than_days: float | None, backends: tuple[str, ...],
           backend_api_key: str | None) -> None:
    """Delete recorded turns and everything derived from them (feedback, judgments); for
    a user or a tenant, their personal adapters too."""
    import asyncio
    import time

    from nextstate.core.store import Forgotten, Store
    from nextstate.core.vllm import VLLMClient

    if session is None and user is None and tenant is None and older_than_days is None:
        raise click.UsageError("give --session, --user, --tenant or --older-than-days")
    db = Store(existing_store(store))
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None

    async def go() -> tuple[Forgotten, lora.Erased]:
        vllms = [VLLMClient(url, backend_api_key) for url in backends]
        try:
            return await lora.forget(db, vllms, session_id=session, tenant=tenant, user=user,
                                     older_than=cutoff)
        finally:
            for vllm in vllms:
                await vllm.aclose()

    try:
        forgotten, erased = asyncio.run(go())
    finally:
        db.close()
    images = f" and {forgotten.images} images no other turn used" if forgotten.images else ""
    click.echo(f"deleted {forgotten.turns} turns{images}")
    if forgotten.adapters:
        click.echo("\n".join(_erased(forgotten.adapters, erased, backends)))


def _erased(rows: list[dict[str, object]], erased: lora.Erased,
            backends: tuple[str, ...]) -> list[str]:
    """What happened to forgotten adapters, in words."""
    names = sorted(str(row["name"]) for row in rows)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    lines = [f"forgot {len(names)} personal adapter versions ({shown}): the proxy serves "
             "their users the shared adapter from its next look at the store",
             f"deleted {len(erased.directories)} adapter directories"]
    lines += [f"unloaded from {url}: {', '.join(done)}" for url, done in erased.unloaded.items()]
    lines += [f"could not reach {url} ({why}): it may keep them loaded until it restarts"
              for url, why in erased.unreachable.items()]
    if not backends:
        lines.append("no --backend given: a vLLM that has them loaded keeps them until it "
                     "restarts, or until a running learner unloads them from its backends")
    return lines


@click.command()
@store_option
@click.option("--session", default=None, help="Only this session's turns.")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl",
              show_default=True)
@click.option("--out", type=click.File("wb"), default="-", help="Output file (default stdout).")
@click.option("--with-images", is_flag=True,
              help="Put each image back inline as the client sent it (a data: URL, or an "
              "Anthropic block's base64). Default: the store's references, "
              "nextstate-image:sha256:<hex>, each image once in the store.")
def export(store: str | None, session: str | None, fmt: str, out: IO[bytes],
           with_images: bool) -> None:
    """Write recorded turns, one JSON object a turn, oldest first."""
    from nextstate.core.store import Store
    from nextstate.core.store.images import ImageMissing

    url = existing_store(store)
    db = Store(url)
    written = 0
    try:
        for turn in db.turns.iterate(session_id=session, with_images=with_images):
            out.write(orjson.dumps(turn) + b"\n")
            written += 1
    except ImageMissing as exc:  # forgotten while we read: say so, and what was written
        raise click.ClickException(f"{exc}; {written} turns written before it") from exc
    finally:
        db.close()
    if not written:
        click.echo(f"no turns{f' in session {session}' if session else ''} in the store at "
                   f"{url}", err=True)
