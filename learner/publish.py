"""Publishing adapters into the running vLLM without a pause (learner -> vLLM).

vLLM 0.16-0.32 serves stale or dead weights when an adapter is reloaded under the same
name (the prefix cache is keyed by name, and ``load_inplace`` re-reads a directory that
may be gone). So every version gets a NEW immutable directory (written elsewhere, then
renamed in) and a NEW name, ``<policy>@<version:06d>``; the proxy switches the policy's
model name to it only once vLLM has loaded it. Old versions stay loaded for a grace
period so requests already running on them finish, then are unloaded; directories
beyond the last ``keep`` are deleted, never one that is still loaded.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx

VERSION = re.compile(r"@(\d+)$")


class PublishError(Exception):
    """vLLM did not take the adapter; the previous version keeps serving."""


def version_name(policy: str, version: int) -> str:
    return f"{policy}@{version:06d}"


def version_of(served_model: str | None) -> int:
    """The adapter version that served a turn (0: the base model)."""
    match = VERSION.search(served_model or "")
    return int(match.group(1)) if match else 0


def install(staged: Path, adapters_dir: Path, name: str) -> Path:
    """Move a freshly written adapter into its final, immutable place."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    final = adapters_dir / name
    if final.exists():  # left by a learner killed between rename and record: replace
        shutil.rmtree(final)
    staged.rename(final)
    return final


class VLLMAdmin:
    """vLLM's runtime LoRA endpoints (never reachable through the proxy)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0,
                 client: httpx.AsyncClient | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.url = base_url.rstrip("/")
        self.client = client or httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                                  headers=headers)

    async def close(self) -> None:
        await self.client.aclose()

    async def loaded(self) -> set[str]:
        answer = await self.client.get("/v1/models")
        answer.raise_for_status()
        return {m["id"] for m in answer.json().get("data", [])}

    async def load(self, name: str, path: Path) -> None:
        try:
            answer = await self.client.post("/v1/load_lora_adapter", json={
                "lora_name": name, "lora_path": str(path)})
        except httpx.HTTPError as exc:
            raise PublishError(f"vLLM unreachable: {type(exc).__name__}: {exc}") from exc
        if answer.status_code != 200 and "already" not in answer.text:
            raise PublishError(f"vLLM refused {name}: {answer.status_code} {answer.text[:300]}")
        if name not in await self.loaded():
            raise PublishError(f"vLLM does not list {name} after loading it")

    async def unload(self, name: str) -> None:
        answer = await self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if answer.status_code not in (200, 400, 404):
            raise PublishError(f"vLLM could not unload {name}: {answer.text[:300]}")


def prune(adapters_dir: Path, rows: list[dict[str, Any]], keep: int) -> list[str]:
    """Delete adapter directories beyond the newest ``keep``, except loaded ones.
    Returns the names deleted."""
    loaded = {r["name"] for r in rows if r["status"] in ("current", "previous", "staged")}
    by_age = sorted(rows, key=lambda r: r["version"], reverse=True)
    deleted = []
    for row in by_age[keep:]:
        path = Path(row["path"])
        if row["name"] not in loaded and path.exists() and path.parent == adapters_dir:
            shutil.rmtree(path)
            deleted.append(row["name"])
    return deleted
