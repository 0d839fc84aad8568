"""Responses kept for ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}``
(agent -> proxy -> **kept responses** <- store).

conversation.py says what is kept and how a chain expands; this is where it lives. A
response served with ``store`` not false is kept twice:

- in the proxy's memory (`KeptResponses`, the most recent ``size`` per proxy process), put
  there before the client gets the end of its answer, so the client's very next request
  finds it even while its turn is still on its way to the store;
- in the store, with its turn: the turn's ``dialect`` column holds the expanded request
  and the Responses object, and a ``turn_keys`` row maps the response id to the turn
  (`nextstate.core.store.responses`, written by the recorder with the turn). Another
  proxy process, or this one after a restart, finds it there. A turn that is not
  recorded (recording off, ``X-NextState-Record: off``) is kept in memory only.

Lookups are scoped to the tenant: another tenant's id is unknown. ``DELETE`` forgets the
id in both places; forgetting the turn (retention, ``DELETE /v1/sessions/...``) forgets
its response with it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from nextstate.proxy.dialects.conversation import Kept, keep
from nextstate.proxy.errors import StoreUnavailable

Key = tuple[str | None, str]  # (tenant, response id)
T = TypeVar("T")


async def _ask(work: Callable[..., T], *args: Any) -> T:
    """A store call off the event loop; a store that fails is a 503, not a 500."""
    try:
        return await asyncio.to_thread(work, *args)
    except Exception as exc:
        raise StoreUnavailable(f"the store cannot be read ({type(exc).__name__})") from exc


class KeptResponses:
    """The kept responses of one proxy: memory first, then the store."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._memory: OrderedDict[Key, Kept] = OrderedDict()
        self._deleted: OrderedDict[Key, None] = OrderedDict()  # ids DELETEd here

    def put(self, tenant: str | None, kept: Kept) -> None:
        key = (tenant, str(kept.response["id"]))
        self._memory[key] = kept
        self._memory.move_to_end(key)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)

    async def get(self, store: Any, tenant: str | None, response_id: str) -> Kept | None:
        key = (tenant, response_id)
        if key in self._deleted:
            return None
        kept = self._memory.get(key)
        if kept is None and store is not None:
            kept = await _ask(self._find, store, tenant, response_id)
        return kept

    async def delete(self, store: Any, tenant: str | None, response_id: str) -> bool:
        """Forget a kept response; False when there was none (for this tenant)."""
        key = (tenant, response_id)
        if await self.get(store, tenant, response_id) is None:
            return False
        self._memory.pop(key, None)
        self._deleted[key] = None
        while len(self._deleted) > self.size:
            self._deleted.popitem(last=False)
        if store is not None:
            await _ask(self._unindex, store, tenant, response_id)
        return True

    @staticmethod
    def _find(store: Any, tenant: str | None, response_id: str) -> Kept | None:
        dialect = store.responses.find(tenant, response_id)
        if dialect is None or not isinstance(dialect.get("request"), dict):
            return None
        return keep(dialect["request"], dialect.get("response") or {})

    @staticmethod
    def _unindex(store: Any, tenant: str | None, response_id: str) -> None:
        store.responses.unindex(tenant, response_id)
