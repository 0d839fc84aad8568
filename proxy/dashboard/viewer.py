"""Who is looking at the dashboard, and what they may see (browser -> proxy -> store).

The dashboard's data endpoints sit behind the proxy's own keys (`ApiKeyMiddleware`):
the admin key, or a proxy with no keys at all, sees everything; a client key sees its
tenant's turns and sessions, the shared adapter, and the personal adapters of its own
users. Each endpoint asks `viewer` once and passes ``scope`` (a tenant, or None for
everything) to the store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nextstate.core.lora import owns, personal_policy
from nextstate.proxy.admin import caller
from nextstate.proxy.deps import Deps
from nextstate.proxy.errors import StoreUnavailable

NO_STORE = ("Cache-Control", "no-store")


@dataclass(frozen=True)
class Viewer:
    admin: bool
    tenant: str | None

    @property
    def scope(self) -> str | None:
        """The tenant whose data this viewer sees; None: everyone's."""
        return None if self.admin else self.tenant


def viewer(request: Request) -> tuple[Deps, Viewer]:
    deps, tenant, admin = caller(request)
    return deps, Viewer(admin=admin, tenant=tenant)


async def policies(deps: Deps, who: Viewer) -> list[str] | None:
    """The adapter policies ``who`` may see: None (all of them) for admin; otherwise the
    proxy's policy and the personal policies of the tenant's own users."""
    if who.scope is None:
        return None
    policy = deps.settings.policy
    if policy is None:
        return []
    users = await in_store(deps.store.browse.users, who.scope)
    return [policy, *(personal_policy(policy, user) for user in users)]


def visible(policy: str, allowed: list[str] | None, proxy_policy: str | None) -> bool:
    """Is an adapter of ``policy`` shown (admin: every policy; with a proxy policy, only
    its own adapters and those of its users)?"""
    if allowed is not None:
        return policy in allowed
    return proxy_policy is None or owns(proxy_policy, policy)


async def in_store(read: Any, *args: Any, **kwargs: Any) -> Any:
    """A store read, in a thread; a store that cannot answer is a 503."""
    try:
        return await asyncio.to_thread(read, *args, **kwargs)
    except Exception as exc:
        raise StoreUnavailable(f"the store cannot be read ({type(exc).__name__})") from exc


def json_response(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json",
                    headers=dict([NO_STORE]))
