"""The store under test, on SQLite and on a real PostgreSQL (``store_url``)."""

from collections.abc import Iterator

import pytest

from nextstate.core.store import Store


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An empty store, closed after the test (a module may define its own, seeded)."""
    s = Store(store_url)
    yield s
    s.close()
