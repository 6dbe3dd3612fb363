"""API keys: created, listed and revoked by the operator, stored hashed in SQLite, checked in constant time.

A key reads `il_<id>_<secret>`. The database keeps the id, a name, and the SHA-256 of the secret,
never the key itself: whoever reads the file cannot use it. `verify` finds the row by id and compares
the hashes with `hmac.compare_digest`, so the time it takes says nothing about the secret. Revoking
takes effect at once: every request reads the row again.

>>> store = KeyStore(":memory:")
>>> key = store.create("alice")
>>> store.verify(key).name
'alice'
>>> store.revoke("alice"); store.verify(key) is None
1
True
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass

_SCHEMA = """CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL, created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0)"""


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    created: float
    revoked: bool


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The keys of one database file (`:memory:` for tests)."""

    def __init__(self, path: str):
        self.path = path  # the server keeps its jobs in the same file (store.py)
        # one connection shared by the server's threads, used under a lock
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(_SCHEMA)

    def create(self, name: str) -> str:
        """A new key for `name`; the returned text is the only time the key exists in the clear."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
        with self._lock:
            self._db.execute("INSERT INTO keys (id, name, hash, created) VALUES (?, ?, ?, ?)",
                             (key_id, name, _hash(secret), time.time()))
        return f"il_{key_id}_{secret}"

    def list(self) -> list[Key]:
        with self._lock:
            rows = self._db.execute("SELECT id, name, created, revoked FROM keys ORDER BY created").fetchall()
        return [Key(i, n, c, bool(r)) for i, n, c, r in rows]

    def revoke(self, id_or_name: str) -> int:
        """Revoke the key with this id, or every key with this name; returns how many."""
        with self._lock:
            cursor = self._db.execute("UPDATE keys SET revoked = 1 WHERE (id = ? OR name = ?) AND revoked = 0",
                                      (id_or_name, id_or_name))
        return cursor.rowcount

    def revoked(self) -> set[str]:
        """The ids of every revoked key (a server looks often: a revoke comes from another process)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM keys WHERE revoked = 1")}

    def verify(self, key: str | None) -> Key | None:
        """The key's record when `key` is valid and not revoked, else None."""
        parts = (key or "").split("_", 2)
        if len(parts) != 3 or parts[0] != "il":
            return None
        with self._lock:
            row = self._db.execute("SELECT id, name, hash, created, revoked FROM keys WHERE id = ?",
                                   (parts[1],)).fetchone()
        # compare against a stand-in hash when the id is unknown: the same work either way
        stored = row[2] if row else _hash("")
        if not hmac.compare_digest(stored, _hash(parts[2])) or row is None or row[4]:
            return None
        return Key(row[0], row[1], row[3], False)
