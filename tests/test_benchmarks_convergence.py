"""The convergence benchmark, run as a seconds-long smoke test; its figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_convergence_smoke() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.convergence", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    names = {row["name"] for row in rows}
    assert {
        "swarm_setup",
        "convergence_time",
        "convergence_time_wall",
        "convergence_bytes_per_node",
        "crdtswarm_tcp_sync",
        "pycrdt_websocket_sync",
    } <= names
    assert all(row["value"] > 0 for row in rows)
    times = [row for row in rows if row["name"] == "convergence_time"]
    assert sorted(row["n"] for row in times) == [5, 10]
    for row in times:
        assert row["floor_ms"] > 0
        assert row["ratio_vs_floor"] > 0
    for row in rows:
        if row["name"] == "convergence_bytes_per_node":
            assert row["floor_bytes"] > 0
            assert row["ratio_vs_floor"] > 0
        if row["name"] == "crdtswarm_tcp_sync":
            assert row["ratio_vs_pycrdt_websocket"] > 0
    assert {row["mode"] for row in rows if row["name"] == "crdtswarm_tcp_sync"} == {
        "burst",
        "paced",
    }
    assert "ratio" in result.stdout
    assert (ROOT / "benchmarks" / "results" / "convergence.json").exists()
