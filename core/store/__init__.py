"""The store (proxy -> store -> learner): SQLAlchemy tables and the `Store` that reads and
writes them."""

from nextstate.core.store.rows import EXPORT_COLUMNS
from nextstate.core.store.store import Store, make_engine

__all__ = ["EXPORT_COLUMNS", "Store", "make_engine"]
