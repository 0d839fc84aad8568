"""Live checks of the loop: what `nextstate doctor` asks vLLM and the proxy.

doctor -> vLLM (each backend, straight) and doctor -> proxy -> vLLM. These are the
traps a setup falls into that the store can't show, because nothing was recorded or
published yet: a vLLM that can't load adapters at run time, one started without
``--enable-lora`` or with a max rank under the learner's, logprobs in raw mode (so the
recorded logprobs are not the sampling distribution's), a key it wants, token ids that
don't decode to the text, a replica missing the adapter the others serve. Each check is
a few small requests (one token each where it can) with a timeout; what they find comes
back as `nextstate.core.health.Finding`s, with the fix.

How a flag is read from outside (measured on vLLM 0.32):
- runtime LoRA updating: without it ``POST /v1/load_lora_adapter`` is a 404;
- ``--enable-lora``: ``/metrics`` has ``vllm:lora_requests_info`` only with it;
- the max rank: loading a directory holding only an ``adapter_config.json`` of the
  learner's rank fails with "LoRA rank R is greater than max_lora_rank M" when it is
  over, and with "doesn't contain tensors" when it is not (nothing gets loaded);
- processed logprobs: the same token's logprob changes with the temperature; raw ones
  don't;
- sampling defaults (a generation config's top_p, top_k, penalties): a request at
  temperature 1 is sampled with logprobs other than a prefill's ``prompt_logprobs``.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from nextstate.core.health import Finding
from nextstate.core.vllm import auth_headers

PROBE_ADAPTER = "nextstate-doctor-probe"
TIMEOUT = 20.0


async def check_backend(url: str, *, api_key: str | None, model: str | None, lora_rank: int,
                        current: tuple[str, ...] = (),
                        transport: httpx.AsyncBaseTransport | None = None) -> list[Finding]:
    """Every check of one vLLM server; ``current``: the adapters it should be serving."""
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(api_key),
                                 timeout=TIMEOUT, transport=transport) as http:
        where = f"vLLM at {url}"
        try:
            listed = await http.get("/v1/models")
        except httpx.HTTPError as exc:
            return [Finding("vllm.reachable", "block", f"nothing answers at {url} "
                            f"({type(exc).__name__})", "no turn is served or learned from",
                            "start vLLM (nextstate up starts one), or give doctor --backend")]
        if listed.status_code == 401:
            return [Finding("vllm.key", "block", f"{where} wants an API key",
                            "the proxy and the learner can't call it without one",
                            "give --backend-api-key (the key vLLM was started with) to "
                            "doctor, serve, learn and up")]
        if listed.status_code != 200:
            return [Finding("vllm.reachable", "block", f"{where} answers /v1/models with "
                            f"{listed.status_code}", "it may not be vLLM",
                            "give the URL vLLM listens on, without /v1")]
        served = [m["id"] for m in listed.json().get("data", []) if isinstance(m, dict)]
        found = [Finding("vllm.reachable", "ok", f"{where} serves {', '.join(served)}")]
        model = model or (served[0] if served else None)
        if model is None or model not in served:
            found.append(Finding("vllm.model", "block", f"{where} doesn't serve {model}",
                                 "requests for it get a 404",
                                 f"start vLLM with --served-model-name {model}"))
            return found
        missing = [name for name in current if name not in served]
        if missing:
            found.append(Finding(
                "vllm.adapter", "block", f"{where} doesn't have the current adapter "
                f"{', '.join(missing)}", "requests this replica serves get the old policy "
                "(the proxy routes them elsewhere only if it knows)",
                "restart the learner (it loads the current adapter on every backend) or "
                f"run nextstate adapters rollback VERSION --backend {url}"))
        for check in (_lora_checks(http, where, lora_rank), _logprobs_mode(http, where, model),
                      round_trip(http, where, model), recompute_exact(http, where, model)):
            try:
                found += await check
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                # A slow or odd answer is a finding too, never a traceback.
                found.append(Finding("vllm.answers", "warn", f"{where} gave no usable answer "
                                     f"to a check ({type(exc).__name__}: {exc})"[:300],
                                     "that check could not be made",
                                     "run doctor again; if it repeats, see vLLM's log"))
    return found


async def _lora_checks(http: httpx.AsyncClient, where: str, lora_rank: int) -> list[Finding]:
    metrics = await http.get("/metrics")
    if metrics.status_code == 200 and "vllm:lora_requests_info" not in metrics.text:
        return [Finding("vllm.enable_lora", "block", f"{where} runs without --enable-lora",
                        "it can't serve the adapters the learner trains",
                        f"start vLLM with --enable-lora --max-lora-rank {lora_rank}")]
    with tempfile.TemporaryDirectory(prefix="nextstate-doctor-") as probe:
        (Path(probe) / "adapter_config.json").write_text(json.dumps({
            "r": lora_rank, "lora_alpha": lora_rank, "target_modules": ["q_proj"],
            "peft_type": "LORA", "bias": "none"}))
        answer = await http.post("/v1/load_lora_adapter", json={
            "lora_name": f"{PROBE_ADAPTER}-{uuid.uuid4().hex[:8]}", "lora_path": probe})
    text = answer.text
    if answer.status_code == 404 and "Not Found" in text:
        return [Finding("vllm.runtime_lora", "block",
                        f"{where} can't load adapters at run time",
                        "the learner publishes each step by loading a new adapter",
                        "start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 in its "
                        "environment")]
    if "greater than max_lora_rank" in text:
        return [Finding("vllm.lora_rank", "block",
                        f"{where} refuses adapters of the learner's rank {lora_rank}",
                        "every adapter the learner publishes fails to load",
                        f"start vLLM with --max-lora-rank {lora_rank} (or more)")]
    if "contain tensors" in text:
        return [Finding("vllm.lora", "ok", f"{where} loads adapters at run time, rank "
                        f"{lora_rank} included")]
    return [Finding("vllm.lora", "warn", f"{where} loads adapters at run time, but its "
                    f"max rank could not be checked ({answer.status_code}: {text[:120]})",
                    "vLLM does not see doctor's files (another machine?)",
                    "run doctor where the learner runs: they share the adapters' directory")]


async def _logprobs_mode(http: httpx.AsyncClient, where: str, model: str) -> list[Finding]:
    tops: list[dict[str, float]] = []
    for temperature in (1.0, 0.3):
        answer = await http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 1, "temperature": temperature, "seed": 0, "logprobs": True,
            "top_logprobs": 5})
        if answer.status_code != 200:
            return [Finding("vllm.logprobs", "block", f"{where} refuses a request with "
                            f"logprobs ({answer.status_code}: {answer.text[:160]})",
                            "the proxy records every turn's logprobs",
                            "check vLLM's --max-logprobs (at least 5)")]
        first = answer.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        tops.append({t["token"]: float(t["logprob"]) for t in first})
    common = set(tops[0]) & set(tops[1])
    if common and all(math.isclose(tops[0][t], tops[1][t], abs_tol=1e-4) for t in common):
        return [Finding("vllm.logprobs_mode", "block",
                        f"{where} returns raw logprobs (before temperature)",
                        "the recorded logprobs are not the ones tokens were sampled with, "
                        "so the learner's importance ratios are wrong",
                        "start vLLM with --logprobs-mode processed_logprobs")]
    return [Finding("vllm.logprobs_mode", "ok", f"{where} returns processed logprobs")]


async def round_trip(http: httpx.AsyncClient, where: str, model: str) -> list[Finding]:
    """A short answer with token ids: present, decoding to exactly the text, as many as
    usage says, each with a finite logprob."""
    answer = await http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 16, "temperature": 0, "logprobs": True, "return_token_ids": True})
    body: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
    choice = (body.get("choices") or [{}])[0]
    ids = choice.get("token_ids")
    fix = ("talk to vLLM 0.10 or newer directly (no router in between) so that "
           "return_token_ids and logprobs come back")
    if not ids or not body.get("prompt_token_ids"):
        return [Finding("vllm.token_ids", "block", f"{where} gives no token ids "
                        f"({answer.status_code})", "the learner trains only on the exact "
                        "tokens sampled", fix)]
    problems = []
    text = choice.get("message", {}).get("content") or ""
    decoded = await http.post("/detokenize", json={"model": model, "tokens": ids})
    if decoded.status_code == 200 and decoded.json().get("prompt") != text:
        problems.append("they decode to other text than the answer's")
    if (body.get("usage") or {}).get("completion_tokens") != len(ids):
        problems.append(f"{len(ids)} ids for {body['usage'].get('completion_tokens')} "
                        "completion tokens")
    logprobs = [t.get("logprob") for t in (choice.get("logprobs") or {}).get("content") or []]
    if len(logprobs) != len(ids) or not all(
            v is not None and math.isfinite(v) for v in logprobs):
        problems.append("a logprob per token, each finite, was not given")
    if problems:
        return [Finding("vllm.token_ids", "block", f"{where}'s token ids are wrong: "
                        + "; ".join(problems), "training on them would teach other text",
                        "start vLLM without --return-tokens-as-token-ids and without a tool "
                        "or reasoning parser that rewrites the text")]
    return [Finding("vllm.token_ids", "ok", f"{where}: {len(ids)} token ids decode to the "
                    "answer, each with its logprob")]


async def recompute_exact(http: httpx.AsyncClient, where: str, model: str) -> list[Finding]:
    """Whether a plain request's sampler logprobs (temperature 1, nothing else set) can
    be recomputed exactly by a prefill, as ``serve --sampler-logprobs recompute`` needs:
    they can't when vLLM applies sampling defaults of its own (a model's generation config
    with top_p, top_k or a repetition penalty)."""
    answer = await http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8, "temperature": 1.0, "seed": 0, "logprobs": True,
        "return_token_ids": True})
    body = answer.json() if answer.status_code == 200 else {}
    choice = (body.get("choices") or [{}])[0]
    ids, prompt = choice.get("token_ids"), body.get("prompt_token_ids")
    if not ids or not prompt:
        return []  # round_trip names it
    sampled = [t["logprob"] for t in choice["logprobs"]["content"]]
    scored = await http.post("/v1/completions", json={
        "model": model, "prompt": prompt + ids, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 0})
    entries = scored.json()["choices"][0]["prompt_logprobs"][len(prompt):]
    again = [entry[str(token)]["logprob"] for entry, token in zip(entries, ids, strict=True)]
    gap = max(abs(a - b) for a, b in zip(sampled, again, strict=True))
    if gap > 1e-3:
        return [Finding("vllm.sampling_defaults", "warn",
                        f"{where} samples a request at temperature 1 from another "
                        f"distribution than the model's own (logprobs differ by {gap:.3g}: "
                        "sampling defaults from a generation config?)",
                        "with serve --sampler-logprobs recompute the learner would "
                        "recompute other logprobs than the tokens were sampled with",
                        "keep serve's default (--sampler-logprobs record), or start vLLM "
                        "with --generation-config vllm")]
    return [Finding("vllm.sampling_defaults", "ok", f"{where}: a plain request's logprobs "
                    "are recomputed exactly (serve --sampler-logprobs recompute is exact)")]


async def check_proxy(url: str, *, transport: httpx.AsyncBaseTransport | None = None
                      ) -> tuple[list[Finding], dict[str, Any]]:
    """The proxy's /health: its backends and recorder (spool, rejected records). Returns
    the findings and the health body (doctor takes the backends from it)."""
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, transport=transport) as http:
        try:
            answer = await http.get("/health")
        except httpx.HTTPError as exc:
            return [Finding("proxy.reachable", "block", f"no proxy answers at {url} "
                            f"({type(exc).__name__})", "agents' turns are not recorded",
                            "start it (nextstate up, or nextstate serve --backend URL), or "
                            "give doctor --proxy")], {}
    try:
        health = answer.json()
    except ValueError:
        health = {}
    if "recorder" not in health:
        return [Finding("proxy.reachable", "block", f"{url} is not a nextstate proxy "
                        f"(/health: {answer.status_code})", "",
                        "give doctor the proxy's URL (nextstate up prints it)")], {}
    found = [Finding("proxy.reachable", "ok", f"the proxy at {url} is {health['status']}")]
    recorder = health.get("recorder")
    if recorder is None:
        found.append(Finding("proxy.recording", "block", "the proxy records nothing "
                             "(started with recording off)", "no turn reaches the learner",
                             "start it without --no-record"))
        return found, health
    if recorder.get("spool_pending"):
        found.append(Finding(
            "proxy.spool", "warn", f"{recorder['spool_pending']} turns wait in the "
            "journal for the store", "the learner sees them only once they are written",
            f"check the store (its last error: {recorder.get('last_error')})"))
    if recorder.get("rejected"):
        found.append(Finding(
            "proxy.rejected", "warn", f"{recorder['rejected']} records the store refused "
            "were set aside", "they are not learned from",
            "see the rejected-*.jsonl files in the spool directory and the proxy's log"))
    return found, health
