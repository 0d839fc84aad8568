"""The dashboard's page: static files shipped in the package, served as they are
(browser -> proxy; no build step, no CDN).

``/ui/`` is one HTML page, its script and its style; the script asks the data endpoints
(`api`, `sessions`) with the key the user typed, so the files themselves carry no data
and need no key. They are read once, when the app is built, and served with a strict
Content-Security-Policy: scripts and styles only from the proxy, no inline ones (images
also from the blob: URLs the script makes of screenshots it fetched with the key), no
framing (the rollback button can't be clicked through another site's page).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from nextstate.proxy.errors import NotFound

FILES = {"index.html": "text/html; charset=utf-8",
         "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8",
         "favicon.svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PREFIX = "/ui"


def load() -> dict[str, bytes]:
    """The files, from the installed package."""
    folder = resources.files("nextstate.proxy.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in FILES}


def is_static(path: str) -> bool:
    """Paths that serve the page's files (open: the data endpoints need the key)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def routes(files: Mapping[str, bytes]) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        if name not in files:
            raise NotFound(f"No file {name} in the dashboard.")
        return Response(files[name], media_type=FILES[name], headers=HEADERS)

    async def to_page(request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    return [Route(PREFIX, to_page, methods=["GET"]),
            Route(f"{PREFIX}/", page, methods=["GET"]),
            Route(PREFIX + "/{name}", page, methods=["GET"])]
