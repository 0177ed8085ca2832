"""Persistent edit store (LMDB + FAISS). Knows nothing about models or serving."""

from .store import FORMAT_VERSION, Store, StoreError, StoreMismatchError, content_hash

__all__ = ["FORMAT_VERSION", "Store", "StoreError", "StoreMismatchError", "content_hash"]
