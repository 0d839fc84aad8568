"""``nextstate up``: the whole stack on one machine (vLLM with the model, the learner
as its own process, the recording proxy in front), stopped together by Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import httpx

from nextstate.cli.options import (
    TOY_MODEL_NAME,
    api_key_option,
    backend_option,
    ensure_toy_model,
    free_port_or_fail,
    host_option,
    memory_control_option,
    memory_lessons_option,
    memory_option,
    no_record_option,
    personal_after_option,
    port_option,
    store_option,
)
from nextstate.cli.serve import memory_settings, proxy_settings
from nextstate.core.doctor import recompute_exact
from nextstate.core.health import Finding
from nextstate.core.paths import data_dir
from nextstate.core.vllm import auth_headers
from nextstate.core.vllm_server import (
    BackendStartError,
    VLLMConfig,
    VLLMProcess,
    check_backend,
    spawn,
    stop_group,
    toy_model_config,
)
from nextstate.learner.multimodal import image_token_id
from nextstate.proxy.server import run_proxy
from nextstate.proxy.settings import ProxySettings

SCALE_OUT = "--enable-scale-out"  # vLLM's render and token-in routes (the image teacher)


@click.command()
@port_option
@click.option("--model", "model_dir", type=click.Path(exists=True, path_type=Path),
              default=None, help="A local Hugging Face model dir (default: the toy model).")
@click.option("--model-name", default=None, help="Name clients use for the model.")
@backend_option(help="Attach to this running vLLM (http://HOST:PORT, with or without /v1) "
                "instead of starting one.")
@click.option("--vllm-arg", multiple=True, help="Extra argument for vLLM (repeatable), "
              "e.g. --vllm-arg=--tool-call-parser=hermes --vllm-arg=--enable-auto-tool-choice")
@click.option("--no-learner", is_flag=True, help="Serve and record, but do not learn.")
@personal_after_option
@host_option
@store_option
@api_key_option
@no_record_option
@click.option("--backend-api-key", envvar="NEXTSTATE_BACKEND_API_KEY", default=None,
              help="With --backend: the key that vLLM wants. Otherwise the key the vLLM "
              "started here asks for (default: a random one).")
@memory_option
@memory_lessons_option
@memory_control_option
def up(port: int, model_dir: Path | None, model_name: str | None, backend: str | None,
       vllm_arg: tuple[str, ...], no_learner: bool, personal_after: int | None, host: str,
       store: str | None, api_key: str | None, no_record: bool,
       backend_api_key: str | None, memory: bool, memory_lessons: int | None,
       memory_control: float | None) -> None:
    """Bring the whole stack up: vLLM with the model, the learner, the recording proxy."""
    remembering = memory_settings(memory, memory_lessons, control=memory_control)
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
                      backend_api_key=backend_api_key, memory=memory):
            _announce(host, port, name, store, api_key)
            run_proxy(proxy_settings((backend,), store, api_key, backend_api_key, no_record,
                                     policy=name, memory=remembering,
                                     sampler_logprobs=sampler_logprobs(
                                         backend, backend_api_key, name, no_learner)),
                      host, port)
        return
    # The vLLM started here is never open: only this proxy and learner know its key.
    key = backend_api_key or secrets.token_urlsafe(32)
    log_path = data_dir() / "logs" / "vllm.log"
    if model_dir is None:
        config = toy_model_config(ensure_toy_model(), model_name or TOY_MODEL_NAME,
                                  log_path=log_path, extra_args=vllm_arg, api_key=key)
    else:
        if image_token_id(model_dir) is not None and SCALE_OUT not in vllm_arg:
            # The learner's image teacher scores GUI turns through vLLM's render and
            # token-in routes; the proxy never exposes them (only the inference surface).
            vllm_arg = (*vllm_arg, SCALE_OUT)
        config = VLLMConfig(model=model_dir, served_model_name=model_name or model_dir.name,
                            log_path=log_path, extra_args=vllm_arg, api_key=key)
    name = config.served_model_name
    click.echo(f"starting vLLM with {config.model} (log: {config.log_path}) ...", err=True)
    try:
        with VLLMProcess(config) as vllm, _learner(vllm.url, name, config.model, store_url,
                                                  train=True, off=no_learner,
                                                  personal_after=personal_after,
                                                  backend_api_key=key, memory=memory):
            _announce(host, port, name, store, api_key)
            run_proxy(proxy_settings((vllm.url,), store, api_key, key, no_record, policy=name,
                                     memory=remembering,
                                     sampler_logprobs=sampler_logprobs(
                                         vllm.url, key, name, no_learner)), host, port)
    except BackendStartError as exc:
        raise click.ClickException(str(exc)) from exc


def sampler_logprobs(url: str, key: str | None, model: str, no_learner: bool,
                     transport: httpx.AsyncBaseTransport | None = None) -> str:
    """Where the proxy ``up`` starts gets sampler logprobs: from the learner that ``up``
    runs beside it (`learner.sampler_logprobs`: most of recording's cost off the request
    path) when vLLM's sampling defaults let them be recomputed exactly (checked once, as
    doctor does); otherwise, and without a learner, recorded on the request path."""
    if no_learner:
        return "record"

    async def check() -> list[Finding]:
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(key),
                                     timeout=30.0, transport=transport) as http:
            return await recompute_exact(http, f"vLLM at {url}", model)

    try:
        found = asyncio.run(check())
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        found = [Finding("vllm.sampling_defaults", "warn", f"not checked ({exc})"[:200])]
    if found and all(f.level == "ok" for f in found):
        click.echo("sampler logprobs: recomputed by the learner where a request allows it "
                   "(off the request path)", err=True)
        return "recompute"
    click.echo("sampler logprobs: recorded on the request path"
               + (f" ({found[0].what})" if found else ""), err=True)
    return "record"


@contextlib.contextmanager
def _learner(backend: str, name: str, model_dir: Path | None, store_url: str, train: bool,
             off: bool = False, personal_after: int | None = None,
             backend_api_key: str | None = None, memory: bool = False) -> Iterator[None]:
    """``nextstate learn`` as its own process for as long as the stack is up (the
    backend's key in its environment, where other users cannot read it)."""
    if off:
        yield
        return
    command = [sys.executable, "-m", "nextstate.cli", "learn", "--backend", backend,
               "--model", name, "--store", store_url]
    command += ["--model-dir", str(model_dir)] if train and model_dir else ["--no-train"]
    if personal_after is not None:
        command += ["--personal-after", str(personal_after)]
    if memory:
        command.append("--memory")
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
        f"  export: nextstate export --store {settings.resolved_store_url()}\n"
        f"  dashboard: http://{host}:{port}/ui/\n\n"
        "Ctrl-C stops everything.", err=True)
