"""The dashboard: see it learn, in a browser (browser -> proxy -> store, vLLM).

Served by the proxy at ``/ui/`` behind the proxy's own keys (a tenant sees its own data,
admin everything), with no build step: static files (`page`) and JSON endpoints under
``/v1/dashboard/`` that read the store's concepts (funnel, curves, browse, adapters),
never a query of their own. Charts are SVG drawn here (`charts`).

    page.py       /ui/: the page, its script and style (static/, package data)
    viewer.py     who is looking (admin or a tenant), what they may see
    api.py        me, funnel, curves, adapters
    sessions.py   sessions (searchable), one session, one turn's tokens, its images
    charts.py     line charts as SVG
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from nextstate.proxy.dashboard import api, page, sessions

API = "/v1/dashboard"


def routes() -> list[BaseRoute]:
    """The page's files (read now, from the package) and its data endpoints."""
    return [
        *page.routes(page.load()),
        Route(f"{API}/me", api.me, methods=["GET"]),
        Route(f"{API}/funnel", api.funnel, methods=["GET"]),
        Route(f"{API}/curves", api.curves, methods=["GET"]),
        Route(f"{API}/adapters", api.adapters, methods=["GET"]),
        Route(f"{API}/sessions", sessions.list_sessions, methods=["GET"]),
        Route(API + "/sessions/{session_id}", sessions.get_session, methods=["GET"]),
        Route(API + "/turns/{turn_id}/tokens", sessions.turn_tokens, methods=["GET"]),
        Route(API + "/images/{sha256}", sessions.image, methods=["GET"]),
    ]
