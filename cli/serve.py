"""``nextstate serve``: the recording proxy in front of a vLLM someone else runs
(user -> CLI -> proxy -> vLLM)."""

from __future__ import annotations

import click

from nextstate.cli.options import (
    api_key_option,
    backend_key_option,
    backend_option,
    client_key_option,
    free_port_or_fail,
    host_option,
    look_at_backend,
    memory_control_option,
    memory_for_option,
    memory_lessons_option,
    memory_option,
    no_record_option,
    port_option,
    store_option,
)
from nextstate.proxy.server import run_proxy
from nextstate.proxy.settings import MemorySettings, ProxySettings


def proxy_settings(backends: tuple[str, ...], store: str | None, api_key: str | None,
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
    try:
        return ProxySettings(backends=backends, store_url=store or "",
                             api_key=api_key, backend_api_key=backend_api_key,
                             record=not no_record, client_keys=tuple(pairs), policy=policy,
                             **more)  # type: ignore[arg-type]
    except ValueError as exc:  # a combination the settings refuse
        raise click.UsageError(str(exc)) from exc


def memory_settings(memory: bool, lessons: int | None, only: tuple[str, ...] = (),
                    control: float | None = None) -> MemorySettings:
    """The proxy's memory as the command line asks for it."""
    given = {"--memory-for": bool(only), "--memory-lessons": lessons is not None,
             "--memory-control": control is not None}
    for flag, set_ in given.items():
        if set_ and not memory:
            raise click.UsageError(f"{flag} needs --memory")
    chosen = {"lessons": lessons, "control": control}
    return MemorySettings(enabled=memory, only=only,
                          **{k: v for k, v in chosen.items() if v is not None})


@click.command()
@backend_option(multiple=True, required=True,
                help="URL of a running vLLM server (http://HOST:PORT, with or without /v1); "
                "repeat it for replicas (sessions are spread across them, with affinity "
                "and failover).")
@port_option
@host_option
@store_option
@api_key_option
@backend_key_option
@no_record_option
@client_key_option
@click.option("--policy", default=None,
              help="Model name whose requests go to the learner's current adapter.")
@click.option("--admin-key", envvar="NEXTSTATE_ADMIN_KEY", default=None,
              help="Key for export of all data, deletion of tenants, adapters, rollback.")
@click.option("--retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Delete turns (and what was derived from them) older than this.")
@click.option("--no-redact", is_flag=True,
              help="Store message text as sent (default: mask API keys, tokens, e-mails).")
@memory_option
@memory_for_option
@memory_lessons_option
@memory_control_option
@click.option("--no-capture", is_flag=True,
              help="Send requests as the client wrote them, without vLLM's token-capture "
              "fields: for any OpenAI-compatible backend. Turns are recorded as text (no "
              "token ids, so no LoRA training); the judge and --memory still learn.")
@click.option("--sampler-logprobs", type=click.Choice(["record", "recompute"]),
              default="record", show_default=True,
              help="recompute: ask vLLM for token ids only where the sampled tokens' "
              "logprobs can be recomputed exactly later (temperature 0 or 1, nothing else "
              "shaping the distribution); the learner recomputes them. Most of what "
              "recording costs vLLM (bench/README, 'The tax'). Needs a running learner.")
def serve(backends: tuple[str, ...], port: int, host: str, store: str | None,
          api_key: str | None,
          backend_api_key: str | None, no_record: bool, client_key: tuple[str, ...],
          policy: str | None, admin_key: str | None, retention_days: float | None,
          no_redact: bool, memory: bool, memory_for: tuple[str, ...],
          memory_lessons: int | None, memory_control: float | None, no_capture: bool,
          sampler_logprobs: str) -> None:
    """Run the recording proxy in front of an existing vLLM (or, with --no-capture, any
    OpenAI-compatible server)."""
    extra: dict[str, object] = {"admin_key": admin_key, "retention_days": retention_days,
                                "capture": not no_capture,
                                "sampler_logprobs": sampler_logprobs}
    if no_redact:
        extra["redact_patterns"] = ()
    extra["memory"] = memory_settings(memory, memory_lessons, memory_for, memory_control)
    settings = proxy_settings(backends, store, api_key, backend_api_key, no_record,
                              client_key, policy, **extra)
    free_port_or_fail(host, port)
    for url in settings.backends:
        look_at_backend(url, backend_api_key, policy, strict=not no_capture,
                        then="The proxy starts anyway and answers 502 until it does.")
    click.echo(f"nextstate proxy on http://{host}:{port}/v1 -> {settings.backend_url}; "
               f"dashboard: http://{host}:{port}/ui/", err=True)
    run_proxy(settings, host, port)
