"""The store (proxy -> store -> learner): SQLAlchemy tables and the `Store` that reads and
writes them."""

from nextstate.proxy.store.store import EXPORT_COLUMNS, Store, make_engine

__all__ = ["EXPORT_COLUMNS", "Store", "make_engine"]
