"""Where nextstate keeps its files and how it names a vLLM server (every process).

The proxy, the learner and the CLI all need the data dir (models, the default store, the
journal, adapter directories) and read backend URLs the way people write them; both
live here so that none of them imports another for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit


def data_dir() -> Path:
    """Where nextstate keeps models, the default store and spool files."""
    home = os.environ.get("NEXTSTATE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "nextstate"


def default_store_url() -> str:
    return f"sqlite:///{data_dir() / 'nextstate.db'}"


def backend_root(url: str) -> str:
    """A vLLM server's root URL from the way people write it: with or without the
    ``/v1`` that ``OPENAI_BASE_URL`` carries, with or without a trailing slash. The proxy
    and the learner add the API paths (``/v1/chat/completions``, ``/tokenize``) to it.
    Raises ValueError, in one sentence, for something that is not an http(s) URL."""
    given = url.strip()
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not a backend URL: give the vLLM server's address "
                         "with its scheme, e.g. http://127.0.0.1:8000 (with or without /v1)")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a backend URL has no query or fragment; give e.g. "
                         "http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"
