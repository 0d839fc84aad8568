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
    BackendUnreachable,
    VLLMConfig,
    VLLMProcess,
    check_backend,
    spawn,
    stop_group,
    toy_model_config,
)
from nextstate.proxy.options import (
    TOY_MODEL_NAME,
    backend_key_option,
    backend_option,
    existing_store,
    free_port_or_fail,
    store_option,
)
from nextstate.proxy.server import run_proxy
from nextstate.proxy.settings import ProxySettings, data_dir

DEFAULT_PORT = 8400


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
    return ProxySettings(backend_url=backend, store_url=store or "",
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
    """nextstate: turn ordinary agent traffic into training signal.

    \b
    Start here:
      nextstate up                          vLLM + toy model + learner + proxy
      export OPENAI_BASE_URL=http://127.0.0.1:8400/v1
      nextstate status                      what the learner is doing
    In front of a vLLM you run:  nextstate serve --backend http://HOST:8000
    """


_store = store_option
_api_key = click.option("--api-key", envvar="NEXTSTATE_API_KEY", default=None,
                        help="Bearer key clients must present to the proxy.")
_backend_key = backend_key_option
_no_record = click.option("--no-record", is_flag=True, help="Forward without recording.")
_client_key = click.option(
    "--client-key", multiple=True, metavar="TENANT=KEY",
    help="A per-client key (repeatable); each tenant sees only its own sessions.")
_host = click.option("--host", default="127.0.0.1", show_default=True,
                     help="Address to listen on (0.0.0.0: every interface; give keys then).")


@main.command()
@backend_option(multiple=True, required=True,
                help="URL of a running vLLM server (http://HOST:PORT, with or without /v1); "
                "repeat it for replicas (sessions are spread across them, with affinity "
                "and failover).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
              show_default=True, help="The proxy's port.")
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
@click.option("--retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
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
                                "more_backends": backends[1:]}
    backend = backends[0]
    if no_redact:
        extra["redact_patterns"] = ()
    settings = _settings(backend, store, api_key, backend_api_key, no_record, client_key,
                         policy, **extra)
    free_port_or_fail(host, port)
    for url in settings.backend_urls():
        _look_at_backend(url, backend_api_key, policy)
    click.echo(f"nextstate proxy on http://{host}:{port}/v1 -> {settings.backend_url}", err=True)
    run_proxy(settings, host, port)


def _look_at_backend(url: str, api_key: str | None, policy: str | None) -> None:
    """Refuse a backend that answers but is not a usable vLLM (a wrong path, a wrong
    key); one that does not answer yet only gets a warning: the proxy answers 502 until
    it does, then serves."""
    try:
        names = check_backend(url, api_key=api_key)
    except BackendUnreachable as exc:
        click.echo(f"warning: {exc} The proxy starts anyway and answers 502 until it does.",
                   err=True)
        return
    except BackendStartError as exc:
        raise click.ClickException(str(exc)) from exc
    if policy is not None and policy not in names:
        click.echo(f"warning: {url} serves {', '.join(names) or 'no model'}, not the policy "
                   f"{policy!r}: requests for {policy!r} will get vLLM's 404 until it does "
                   "(--policy is the name vLLM serves the base model under, "
                   "--served-model-name)", err=True)


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
              show_default=True, help="The proxy's port.")
@click.option("--model", "model_dir", type=click.Path(exists=True, path_type=Path),
              default=None, help="A local Hugging Face model dir (default: the toy model).")
@click.option("--model-name", default=None, help="Name clients use for the model.")
@backend_option(help="Attach to this running vLLM (http://HOST:PORT, with or without /v1) "
                "instead of starting one.")
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
    free_port_or_fail(host, port)
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
@click.option("--vision", is_flag=True,
              help="The vision-language toy (a tiny Idefics3 with random weights) that vLLM "
                   "serves with images; see docs/vlm-on-cpu.md.")
def toy_model(out: Path | None, trained: bool, vision: bool) -> None:
    """Build the embedded toy model (cached in the data dir) and print its path."""
    if trained and vision:
        raise click.UsageError("--trained and --vision are two different models; pick one")
    try:
        from nextstate.learner.toy_model import (
            TRAINED_TOY,
            ToyModelRecipe,
            build_toy_model,
            ensure_toy_model,
        )
        from nextstate.learner.vlm_toy_model import build_vlm_toy_model, ensure_vlm_toy_model
    except ImportError as exc:  # the proxy-only install has no torch
        raise click.ClickException(
            f"building the toy model needs the learner extra ({exc}); "
            "pip install 'nextstate[learner]'") from exc
    progress = lambda m: click.echo(m, err=True)  # noqa: E731
    if vision:
        built = ensure_vlm_toy_model(data_dir(), progress=progress) if out is None \
            else build_vlm_toy_model(out, progress=progress)
        click.echo(str(built))
        return
    recipe = TRAINED_TOY if trained else ToyModelRecipe()
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
@backend_option(multiple=True, help="A vLLM serving the adapters (repeatable): forgotten "
                "personal adapters are unloaded from it.")
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
    db = Store(existing_store(store))
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

    url = existing_store(store)
    db = Store(url)
    written = 0
    try:
        for turn in db.turns(session_id=session):
            out.write(orjson.dumps(turn) + b"\n")
            written += 1
    finally:
        db.close()
    if not written:
        click.echo(f"no turns{f' in session {session}' if session else ''} in the store at "
                   f"{url}", err=True)


def _register_learner_commands() -> None:
    # The commands themselves import torch only when run.
    from nextstate.learner.commands import adapters, bench, demo, learn, status

    for command in (learn, status, adapters, bench, demo):
        main.add_command(command)


_register_learner_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
