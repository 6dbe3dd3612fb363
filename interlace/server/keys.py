"""API keys: created once, stored hashed in SQLite, checked in constant time.

A key reads `il_<id>_<secret>`. The id is public (it names the key in lists and logs); only a
SHA-256 of the secret is stored, so the database never holds a usable key. Checking a key looks up
its id and compares the digests with `hmac.compare_digest`.

>>> import tempfile, os
>>> store = KeyStore(os.path.join(tempfile.mkdtemp(), "keys.db"))
>>> key = store.create("alice")
>>> store.check(key).name, store.check(key + "x")
('alice', None)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL
)
"""


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created: float
    revoked: float | None


class KeyStore:
    """The keys of one server, in the SQLite file at `path` (made when missing)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the server's threads in turn
        self._db = sqlite3.connect(path, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(_SCHEMA)

    def create(self, name: str) -> str:
        """A new key for `name`; the key itself is returned here once and never stored."""
        key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(24)
        with self._lock, self._db:
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, NULL)", (key_id, name, _digest(secret), time.time()))
        return f"il_{key_id}_{secret}"

    def check(self, key: str | None) -> KeyInfo | None:
        """The key's record when `key` is a valid, unrevoked key; else None."""
        parts = key.split("_", 2) if isinstance(key, str) else []
        if len(parts) != 3 or parts[0] != "il":
            return None
        with self._lock:
            row = self._db.execute("SELECT id, name, digest, created, revoked FROM keys WHERE id = ?",
                                   (parts[1],)).fetchone()
        if row is None or row[4] is not None or not hmac.compare_digest(row[2], _digest(parts[2])):
            return None
        return KeyInfo(row[0], row[1], row[3], row[4])

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute("SELECT id, name, created, revoked FROM keys ORDER BY created").fetchall()
        return [KeyInfo(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke the key with this id (or whole key); whether one was revoked."""
        key_id = key_id.split("_")[1] if key_id.startswith("il_") else key_id
        with self._lock, self._db:
            done = self._db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                    (time.time(), key_id)).rowcount
        return done > 0

    def close(self) -> None:
        self._db.close()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
