"""Durable document storage: an append-only log of Yjs updates in SQLite, compacted.

`DocStore` keeps, per document name, the updates that built it. Every update is
appended in its own transaction (WAL journal, ``synchronous=NORMAL``): once
`DocStore.append` returns, a crash of the process loses nothing. When a document's
log grows past ``compact_after`` rows, `DocStore.append` says so and the owner calls
`DocStore.compact` (outside the document's transaction), which replaces them, in
one SQLite transaction, with a single update holding the whole state, so the file
does not grow with history.

Every read is validated: `DocStore.load` applies the updates to a fresh document
and raises `crdtswarm.errors.SyncError` when one cannot be applied (a corrupted
file), rather than returning a document with holes.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crdtswarm.errors import StoreError, SyncError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator

    import pycrdt

__all__ = ["DocStore"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_doc ON updates (doc, id);
"""


class DocStore:
    """Updates of many documents in one SQLite file.

    Args:
        path: the database file (created with its folder if missing).
        compact_after: rows per document that trigger a compaction on `append`.

    Raises:
        StoreError: the file cannot be opened as a document store (damaged, not a
            database, locked).
        OSError: its folder cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], *, compact_after: int = 500) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the document store {self._path}: {exc}") from exc
        self._compact_after = compact_after
        self._rows: dict[str, int] = {}

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def names(self) -> list[str]:
        """The documents that have stored updates."""
        rows = self._db.execute("SELECT DISTINCT doc FROM updates ORDER BY doc").fetchall()
        return [name for (name,) in rows]

    def load(self, name: str, doc: pycrdt.Doc[Any]) -> int:
        """Apply every stored update of ``name`` to ``doc``; return how many there were.

        Raises:
            SyncError: if a stored update cannot be applied (the file is corrupted).
        """
        rows = self._db.execute(
            "SELECT data FROM updates WHERE doc = ? ORDER BY id", (name,)
        ).fetchall()
        for (data,) in rows:
            try:
                doc.apply_update(bytes(data))
            except ValueError as exc:
                raise SyncError(f"stored update of {name!r} in {self._path} is corrupted") from exc
        self._rows[name] = len(rows)
        return len(rows)

    def append(self, name: str, update: bytes) -> bool:
        """Store one update of ``name`` durably; return whether a `compact` is due.

        Safe to call from a document observer (it does not touch the document);
        `compact` is not: call it outside any transaction.
        """
        self._db.execute("INSERT INTO updates (doc, data) VALUES (?, ?)", (name, update))
        count = self._rows.get(name, 0) + 1
        self._rows[name] = count
        return count > self._compact_after

    def compact(self, name: str, doc: pycrdt.Doc[Any]) -> None:
        """Replace the stored updates of ``name`` with ``doc``'s whole state, atomically.

        Call it outside any transaction on ``doc`` (not from an observer).
        """
        state = doc.get_update()
        with self._transaction():
            self._db.execute("DELETE FROM updates WHERE doc = ?", (name,))
            self._db.execute("INSERT INTO updates (doc, data) VALUES (?, ?)", (name, state))
        self._rows[name] = 1
        logger.debug("compacted %r to %d bytes", name, len(state))

    def size(self, name: str) -> int:
        """Bytes stored for ``name``."""
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM updates WHERE doc = ?", (name,)
        ).fetchone()
        return int(total)

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
