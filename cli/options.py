"""Options and checks the ``nextstate`` commands share, defined once (user -> CLI).

Every command takes a backend URL the way people write it (``http://host:8000`` or the
``OPENAI_BASE_URL`` form ``http://host:8000/v1``) and a store; the commands that only
read a store first make sure it is there, and say which one they tried and how to point
at another instead of creating an empty one or printing a driver's traceback.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import click

from nextstate.core.paths import backend_root, data_dir, default_store_url
from nextstate.core.store.locate import StoreNotFound, check_url, require_store

TOY_MODEL_NAME = "nextstate-toy"
DEFAULT_PORT = 8400


def _backend_urls(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Normalise ``--backend`` (one or many) to root URLs; a bad one is a usage error."""
    if value is None:
        return None
    try:
        if isinstance(value, tuple):
            return tuple(backend_root(v) for v in value)
        return backend_root(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def backend_option(*, multiple: bool = False, required: bool = False,
                   help: str) -> Any:  # noqa: A002 - click's own name
    """``--backend URL`` (env NEXTSTATE_BACKEND), repeatable when ``multiple``."""
    return click.option("--backend", "backends" if multiple else "backend",
                        envvar="NEXTSTATE_BACKEND", multiple=multiple, required=required,
                        callback=_backend_urls, metavar="URL", help=help)


def _store_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            check_url(value)
        except StoreNotFound as exc:
            raise click.BadParameter(str(exc)) from exc
    return value


store_option = click.option(
    "--store", envvar="NEXTSTATE_STORE", default=None, metavar="URL", callback=_store_url,
    help="SQLAlchemy URL of the store (default: SQLite in the data dir, $NEXTSTATE_HOME).")

backend_key_option = click.option(
    "--backend-api-key", envvar="NEXTSTATE_BACKEND_API_KEY", default=None,
    help="Key to present to vLLM (the one it was started with, --api-key).")

api_key_option = click.option("--api-key", envvar="NEXTSTATE_API_KEY", default=None,
                              help="Bearer key clients must present to the proxy.")
no_record_option = click.option("--no-record", is_flag=True, help="Forward without recording.")
client_key_option = click.option(
    "--client-key", multiple=True, metavar="TENANT=KEY",
    help="A per-client key (repeatable); each tenant sees only its own sessions.")
host_option = click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to listen on (0.0.0.0: every interface; give keys then).")
port_option = click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
                           show_default=True, help="The proxy's port.")
personal_after_option = click.option(
    "--personal-after", type=click.IntRange(min=1), default=None, metavar="N",
    help="Personal adapters: a user (X-NextState-User, or the API key's tenant) with N "
    "judged turns gets their own adapter, trained on their turns from then on. Default: "
    "one adapter for everyone.")


memory_option = click.option(
    "--memory", is_flag=True,
    help="The memory: hints from judged turns become lessons, which the proxy adds to later "
    "requests they fit (each user's, their tenant's and shared ones) until the adapter has "
    "learned them. Off by default.")
memory_lessons_option = click.option(
    "--memory-lessons", type=click.IntRange(min=1), default=None, metavar="N",
    help="With --memory: the lessons a request gets at most, best first [default: 1; "
    "raise it where one user's lessons are about different things].")
memory_control_option = click.option(
    "--memory-control", type=click.FloatRange(min=0.0, max=0.5, max_open=True), default=None,
    metavar="SHARE",
    help="With --memory: the share of recorded requests an adapter serves that are served "
    "the other way (without their lessons while they are served, with them once handed "
    "over to the weights), so the learner can tell whether lessons still help "
    "[default: 0.2; 0: never measured, never handed over].")
memory_for_option = click.option(
    "--memory-for", multiple=True, metavar="TENANT|USER",
    help="With --memory: only this tenant's (or user's, as `nextstate export` names them) "
    "requests get lessons (repeatable). Default: everyone's.")


def require_learner_extra(what: str) -> None:
    """Training needs torch, which the proxy's own install leaves out on purpose."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"{what} needs the learner extra ({', '.join(missing)} not installed): "
            "pip install 'nextstate[learner]'")


def ensure_toy_model(progress: bool = True) -> Path:
    """The embedded toy model (built once, then cached in the data dir). The build runs
    in a child process: torch and its native libraries stay out of a long-running command
    (`up`), which would otherwise print their teardown noise at Ctrl-C."""
    import subprocess
    import sys

    from nextstate.learner.toy_model import ToyModelRecipe  # (no torch: the cache lookup)

    target = data_dir() / "models" / f"toy-{ToyModelRecipe().digest()}"
    if target.is_dir():
        return target
    require_learner_extra("building the toy model")
    built = subprocess.run([sys.executable, "-m", "nextstate.cli", "toy-model"],
                           stdout=subprocess.PIPE, stderr=None if progress else
                           subprocess.DEVNULL, text=True)
    if built.returncode != 0:
        raise click.ClickException("building the toy model failed (see above)")
    return Path(built.stdout.strip().splitlines()[-1])


def free_port_or_fail(host: str, port: int) -> None:
    """A port someone else holds is named now, before anything slow starts. (As uvicorn
    binds: with SO_REUSEADDR, so that the connections a stopped server left in TIME_WAIT
    do not count as a holder; they kept a proxy restarted after a crash off its port.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port} ({exc.strerror}): another nextstate or "
                "another server holds it; give another --port") from exc


def existing_store(store: str | None) -> str:
    """The store URL a reading command uses; a click error if no store is there."""
    url = store or default_store_url()
    try:
        require_store(url)
    except StoreNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    return url


def look_at_backend(url: str, api_key: str | None, model: str | None, *, then: str,
                    strict: bool = True) -> None:
    """Refuse a backend that answers but is not a usable vLLM (a wrong path, a wrong
    key), in one sentence; one that does not answer yet only gets a warning ending with
    ``then`` (what the command does meanwhile). Not ``strict`` (any provider: its
    clients may bring their own key), a refusal is a warning too."""
    from nextstate.core.vllm_server import BackendStartError, BackendUnreachable, check_backend

    try:
        names = check_backend(url, api_key=api_key)
    except BackendUnreachable as exc:
        click.echo(f"warning: {exc} {then}", err=True)
        return
    except BackendStartError as exc:
        if strict:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"warning: {exc}", err=True)
        return
    if model is not None and model not in names:
        click.echo(f"warning: {url} serves {', '.join(names) or 'no model'}, not {model!r}: "
                   f"requests for {model!r} will get vLLM's 404 until it does (the name "
                   "vLLM serves the base model under is its --served-model-name)", err=True)
