"""Durable document storage (crdtswarm/sync/store.py) and Swarm restarts with data_dir."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pycrdt
import pytest

from crdtswarm.errors import SyncError
from crdtswarm.sync.store import DocStore


def edit_log(count: int) -> tuple[pycrdt.Doc, list[bytes]]:
    doc: pycrdt.Doc = pycrdt.Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("t", type=pycrdt.Text)
    for i in range(count):
        text += f"{i},"
    return doc, updates


def test_append_then_load_round_trips(tmp_path: Path) -> None:
    doc, updates = edit_log(20)
    store = DocStore(tmp_path / "docs.sqlite3")
    for update in updates:
        store.append("notes", update)
    store.close()
    reopened = DocStore(tmp_path / "docs.sqlite3")
    copy: pycrdt.Doc = pycrdt.Doc()
    assert reopened.load("notes", copy) == 20
    assert str(copy.get("t", type=pycrdt.Text)) == str(doc.get("t", type=pycrdt.Text))
    assert reopened.names() == ["notes"]
    reopened.close()


def test_compaction_keeps_the_state_and_bounds_the_log(tmp_path: Path) -> None:
    doc, updates = edit_log(300)
    store = DocStore(tmp_path / "docs.sqlite3", compact_after=50)
    for update in updates:
        if store.append("notes", update):
            store.compact("notes", doc)
    rows = store._db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
    assert rows <= 51
    copy: pycrdt.Doc = pycrdt.Doc()
    store.load("notes", copy)
    assert copy.get("t", type=pycrdt.Text).to_py() == doc.get("t", type=pycrdt.Text).to_py()
    store.close()


def test_a_corrupted_row_is_a_sync_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.sqlite3"
    store = DocStore(path)
    _, updates = edit_log(3)
    for update in updates:
        store.append("notes", update)
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE updates SET data = x'0102ff' WHERE id = 2")
    db.commit()
    db.close()
    reopened = DocStore(path)
    with pytest.raises(SyncError, match="corrupted"):
        reopened.load("notes", pycrdt.Doc())
    reopened.close()


def test_a_crash_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "docs.sqlite3"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        import pycrdt
        from crdtswarm.sync.store import DocStore
        store = DocStore({str(path)!r}, compact_after=7)
        doc = pycrdt.Doc()
        due = []
        doc.observe(lambda e: due.append(store.append("notes", e.update)))
        m = doc.get("m", type=pycrdt.Map)
        for i in range(40):
            m[f"k{{i}}"] = float(i)
            if due.pop():
                store.compact("notes", doc)
            print(i, flush=True)  # acknowledged: append() has returned
            if i == 33:
                os.kill(os.getpid(), signal.SIGKILL)  # crash without any cleanup
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    acknowledged = [int(line) for line in result.stdout.split()]
    assert acknowledged[-1] == 33
    store = DocStore(path)
    doc: pycrdt.Doc = pycrdt.Doc()
    store.load("notes", doc)
    stored = doc.get("m", type=pycrdt.Map).to_py()
    assert {f"k{i}" for i in acknowledged} <= set(stored)
    store.close()


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    from crdtswarm.errors import StoreError

    path = tmp_path / "docs.sqlite3"
    path.write_bytes(b"this is not a database, it is a text file " * 100)
    with pytest.raises(StoreError, match="cannot open the document store"):
        DocStore(path)
    assert isinstance(StoreError("x"), OSError)  # callers catching OSError see it too
