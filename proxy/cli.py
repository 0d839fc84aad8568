"""The ``nextstate`` command line: the entry point to every part of the data flow.

    nextstate up          vLLM + toy model + learner + proxy, on the embedded defaults
    nextstate serve       the proxy in front of an existing vLLM
    nextstate learn       the learner: judge recorded turns, train and publish adapters
    nextstate status      what the learner is doing
    nextstate adapters    list the published adapter versions, or roll back to one
    nextstate toy-model   build (or find in the cache) the embedded toy model
    nextstate bench learning / demo   the paper's experiment in miniature
    nextstate export      write recorded turns as JSON lines
    nextstate forget      delete a session, a user, a tenant, or turns past an age

Learner-side commands import torch lazily, so the proxy's own install never needs it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import click
import orjson

from nextstate.proxy.backend import (
    BackendStartError,
    VLLMConfig,
    VLLMProcess,
    check_backend,
    spawn,
    stop_group,
    toy_model_config,
)
from nextstate.proxy.server import run_proxy
from nextstate.proxy.settings import ProxySettings, data_dir

DEFAULT_PORT = 8400
TOY_MODEL_NAME = "nextstate-toy"


def _settings(backend: str, store: str | None, api_key: str | None,
              backend_api_key: str | None, no_record: bool,
              client_key: tuple[str, ...] = (), policy: str | None = None,
              **more: object) -> ProxySettings:
    pairs = []
    for item in client_key:
        tenant, sep, key = item.partition("=")
        if not sep or not tenant or not key:
            raise click.BadParameter(f"expected TENANT=KEY, got {item!r}",
                                     param_hint="--client-key")
        pairs.append((tenant, key))
    return ProxySettings(backend_url=backend.rstrip("/"), store_url=store or "",
                         api_key=api_key, backend_api_key=backend_api_key,
                         record=not no_record, client_keys=tuple(pairs), policy=policy,
                         **more)  # type: ignore[arg-type]


def _ensure_toy_model(progress: bool = True) -> Path:
    try:
        from nextstate.learner.toy_model import ensure_toy_model
    except ImportError as exc:  # the proxy-only install has no torch
        raise click.ClickException(
            f"building the toy model needs the learner extra ({exc}); "
            "pip install 'nextstate[learner]'") from exc
    return ensure_toy_model(data_dir(), progress=(lambda m: click.echo(m, err=True))
                            if progress else None)


@click.group()
def main() -> None:
    """nextstate: turn ordinary agent traffic into training signal."""


_store = click.option("--store", envvar="NEXTSTATE_STORE", default=None,
                      help="SQLAlchemy URL of the store (default: SQLite in the data dir).")
_api_key = click.option("--api-key", envvar="NEXTSTATE_API_KEY", default=None,
                        help="Bearer key clients must present to the proxy.")
_backend_key = click.option("--backend-api-key", envvar="NEXTSTATE_BACKEND_API_KEY",
                            default=None, help="Key the proxy presents to vLLM.")
_no_record = click.option("--no-record", is_flag=True, help="Forward without recording.")
_client_key = click.option(
    "--client-key", multiple=True, metavar="TENANT=KEY",
    help="A per-client key (repeatable); each tenant sees only its own sessions.")
_host = click.option("--host", default="127.0.0.1", show_default=True)


@main.command()
@click.option("--backend", "backends", envvar="NEXTSTATE_BACKEND", required=True,
              multiple=True, help="URL of a running vLLM server; repeat it for replicas "
              "(sessions are spread across them, with affinity and failover).")
@click.option("--port", default=DEFAULT_PORT, show_default=True)
@_host
@_store
@_api_key
@_backend_key
@_no_record
@_client_key
@click.option("--policy", default=None,
              help="Model name whose requests go to the learner's current adapter.")
@click.option("--admin-key", envvar="NEXTSTATE_ADMIN_KEY", default=None,
              help="Key for export of all data, deletion of tenants, adapters, rollback.")
@click.option("--retention-days", type=float, default=None,
              help="Delete turns (and what was derived from them) older than this.")
@click.option("--no-redact", is_flag=True,
              help="Store message text as sent (default: mask API keys, tokens, e-mails).")
def serve(backends: tuple[str, ...], port: int, host: str, store: str | None,
          api_key: str | None,
          backend_api_key: str | None, no_record: bool, client_key: tuple[str, ...],
          policy: str | None, admin_key: str | None, retention_days: float | None,
          no_redact: bool) -> None:
    """Run the recording proxy in front of an existing vLLM."""
    extra: dict[str, object] = {"admin_key": admin_key, "retention_days": retention_days,
                                "more_backends": tuple(b.rstrip("/") for b in backends[1:])}
    backend = backends[0]
    if no_redact:
        extra["redact_patterns"] = ()
    settings = _settings(backend, store, api_key, backend_api_key, no_record, client_key,
                         policy, **extra)
    click.echo(f"nextstate proxy on http://{host}:{port}/v1 -> {settings.backend_url}", err=True)
    run_proxy(settings, host, port)


@main.command()
@click.option("--port", default=DEFAULT_PORT, show_default=True, help="The proxy's port.")
@click.option("--model", "model_dir", type=click.Path(exists=True, path_type=Path),
              default=None, help="A local Hugging Face model dir (default: the toy model).")
@click.option("--model-name", default=None, help="Name clients use for the model.")
@click.option("--backend", default=None, help="Attach to this vLLM instead of starting one.")
@click.option("--vllm-arg", multiple=True, help="Extra argument for vLLM (repeatable), "
              "e.g. --vllm-arg=--tool-call-parser=hermes --vllm-arg=--enable-auto-tool-choice")
@click.option("--no-learner", is_flag=True, help="Serve and record, but do not learn.")
@click.option("--personal-after", type=click.IntRange(min=1), default=None, metavar="N",
              help="Personal adapters: a user with N judged turns gets their own adapter "
              "(see nextstate learn). Default: one adapter for everyone.")
@_host
@_store
@_api_key
@_no_record
@click.option("--backend-api-key", envvar="NEXTSTATE_BACKEND_API_KEY", default=None,
              help="With --backend: the key that vLLM wants. Otherwise the key the vLLM "
              "started here asks for (default: a random one).")
def up(port: int, model_dir: Path | None, model_name: str | None, backend: str | None,
       vllm_arg: tuple[str, ...], no_learner: bool, personal_after: int | None, host: str,
       store: str | None, api_key: str | None, no_record: bool,
       backend_api_key: str | None) -> None:
    """Bring the whole stack up: vLLM with the model, the learner, the recording proxy."""
    store_url = store or ProxySettings().resolved_store_url()
    if backend:
        try:
            names = check_backend(backend, backend_api_key)
        except BackendStartError as exc:
            raise click.ClickException(str(exc)) from exc
        name = model_name or (names[0] if names else TOY_MODEL_NAME)
        with _learner(backend, name, model_dir, store_url, train=bool(model_dir),
                      off=no_learner, personal_after=personal_after,
                      backend_api_key=backend_api_key):
            _announce(host, port, name, store, api_key)
            run_proxy(_settings(backend, store, api_key, backend_api_key, no_record,
                                policy=name), host, port)
        return
    # The vLLM started here is never open: only this proxy and learner know its key.
    key = backend_api_key or secrets.token_urlsafe(32)
    log_path = data_dir() / "logs" / "vllm.log"
    if model_dir is None:
        config = toy_model_config(_ensure_toy_model(), model_name or TOY_MODEL_NAME,
                                  log_path=log_path, extra_args=vllm_arg, api_key=key)
    else:
        config = VLLMConfig(model=model_dir, served_model_name=model_name or model_dir.name,
                            log_path=log_path, extra_args=vllm_arg, api_key=key)
    name = config.served_model_name
    click.echo(f"starting vLLM with {config.model} (log: {config.log_path}) ...", err=True)
    try:
        with VLLMProcess(config) as vllm, _learner(vllm.url, name, config.model, store_url,
                                                  train=True, off=no_learner,
                                                  personal_after=personal_after,
                                                  backend_api_key=key):
            _announce(host, port, name, store, api_key)
            run_proxy(_settings(vllm.url, store, api_key, key, no_record, policy=name),
                      host, port)
    except BackendStartError as exc:
        raise click.ClickException(str(exc)) from exc


@contextlib.contextmanager
def _learner(backend: str, name: str, model_dir: Path | None, store_url: str, train: bool,
             off: bool = False, personal_after: int | None = None,
             backend_api_key: str | None = None) -> Iterator[None]:
    """``nextstate learn`` as its own process for as long as the stack is up (the
    backend's key in its environment, where other users cannot read it)."""
    if off:
        yield
        return
    command = [sys.executable, "-m", "nextstate.proxy.cli", "learn", "--backend", backend,
               "--model", name, "--store", store_url]
    command += ["--model-dir", str(model_dir)] if train and model_dir else ["--no-train"]
    if personal_after is not None:
        command += ["--personal-after", str(personal_after)]
    log_path = data_dir() / "logs" / "learner.log"
    env = dict(os.environ)
    env.pop("NEXTSTATE_BACKEND_API_KEY", None)
    if backend_api_key:
        env["NEXTSTATE_BACKEND_API_KEY"] = backend_api_key
    process = spawn(command, log_path, env=env)
    click.echo(f"learner running (log: {log_path})", err=True)
    try:
        yield
    finally:
        stop_group(process)


def _announce(host: str, port: int, model: str, store: str | None, api_key: str | None) -> None:
    base = f"http://{host}:{port}/v1"
    settings = ProxySettings(store_url=store or "")
    click.echo(
        "\nnextstate is up. Point any OpenAI client at it:\n\n"
        f"  export OPENAI_BASE_URL={base}\n"
        f"  export OPENAI_API_KEY={api_key or 'unused'}\n\n"
        f"  model:  {model}\n"
        f"  store:  {settings.resolved_store_url()}\n"
        f"  export: nextstate export --store {settings.resolved_store_url()}\n\n"
        "Ctrl-C stops everything.", err=True)


@main.command("toy-model")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Build into this directory instead of the cache.")
@click.option("--trained", is_flag=True,
              help="The hint-following model of the learning benchmark (pretrained from "
                   "scratch: ~8 minutes on 2 cores, then cached).")
def toy_model(out: Path | None, trained: bool) -> None:
    """Build the embedded toy model (cached in the data dir) and print its path."""
    try:
        from nextstate.learner.toy_model import (
            TRAINED_TOY,
            ToyModelRecipe,
            build_toy_model,
            ensure_toy_model,
        )
    except ImportError as exc:  # the proxy-only install has no torch
        raise click.ClickException(
            f"building the toy model needs the learner extra ({exc}); "
            "pip install 'nextstate[learner]'") from exc
    recipe = TRAINED_TOY if trained else ToyModelRecipe()
    progress = lambda m: click.echo(m, err=True)  # noqa: E731
    if out is None:
        click.echo(str(ensure_toy_model(data_dir(), recipe, progress=progress)))
    else:
        click.echo(str(build_toy_model(out, recipe, progress=progress)))


@main.command()
@_store
@click.option("--session", default=None, help="Forget this session.")
@click.option("--user", default=None,
              help="Forget this user (as `nextstate export` shows it: tenant:id, the "
              "tenant, or the id): their turns and their personal adapters.")
@click.option("--tenant", default=None,
              help="Forget everything of this tenant, its users' personal adapters included.")
@click.option("--older-than-days", type=float, default=None,
              help="Forget turns older than this many days.")
@click.option("--backend", "backends", envvar="NEXTSTATE_BACKEND", multiple=True,
              help="A vLLM serving the adapters (repeatable): forgotten personal adapters "
              "are unloaded from it.")
@_backend_key
def forget(store: str | None, session: str | None, user: str | None, tenant: str | None,
           older_than_days: float | None, backends: tuple[str, ...],
           backend_api_key: str | None) -> None:
    """Delete recorded turns and everything derived from them (feedback, judgments); for
    a user or a tenant, their personal adapters too."""
    import time

    from nextstate.proxy.store import Store

    if session is None and user is None and tenant is None and older_than_days is None:
        raise click.UsageError("give --session, --user, --tenant or --older-than-days")
    db = Store(store or ProxySettings().resolved_store_url())
    try:
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        forgotten = db.forget(session_id=session, tenant=tenant, user=user, older_than=cutoff)
    finally:
        db.close()
    click.echo(f"deleted {forgotten.turns} turns")
    if forgotten.adapters:
        click.echo("\n".join(_erase(forgotten.adapters, backends, backend_api_key)))


def _erase(rows: list[dict[str, object]], backends: tuple[str, ...],
           api_key: str | None) -> list[str]:
    """Delete forgotten adapters' directories and unload them from ``backends``; what
    happened, in words."""
    import asyncio

    from nextstate.core.vllm import VLLMClient
    from nextstate.learner.forget import Erased, erase

    async def go() -> Erased:
        vllms = [VLLMClient(url, api_key) for url in backends]
        try:
            return await erase(rows, vllms)
        finally:
            for vllm in vllms:
                await vllm.aclose()

    erased = asyncio.run(go())
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


@main.command()
@_store
@click.option("--session", default=None, help="Only this session's turns.")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl",
              show_default=True)
@click.option("--out", type=click.File("wb"), default="-", help="Output file (default stdout).")
def export(store: str | None, session: str | None, fmt: str, out: IO[bytes]) -> None:
    """Write recorded turns, one JSON object a turn, oldest first."""
    from nextstate.proxy.store import Store

    db = Store(store or ProxySettings().resolved_store_url())
    try:
        for turn in db.turns(session_id=session):
            out.write(orjson.dumps(turn) + b"\n")
    finally:
        db.close()


def _register_learner_commands() -> None:
    # The commands themselves import torch only when run.
    from nextstate.learner.commands import adapters, bench, demo, learn, status

    for command in (learn, status, adapters, bench, demo):
        main.add_command(command)


_register_learner_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
