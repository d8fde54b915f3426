"""Benchmarks run as seconds-long smoke tests; their figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stream_throughput_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.stream_throughput", "--quick"],
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
        "raw_tcp_stream_2proc",
        "crdtswarm_tcp_stream_2proc",
        "raw_tcp_stream_1proc",
        "crdtswarm_tcp_stream_1proc",
        "crdtswarm_call",
        "memory_per_idle_link",
    } <= names
    assert all(row["value"] > 0 for row in rows)
    assert "ratio" in result.stdout
