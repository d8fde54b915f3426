"""The directory size benchmark, run as a seconds-long smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_directory_size_smoke() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.directory_size", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    sizes = [row for row in rows if row["name"] == "directory_size"]
    with_gc = [row for row in sizes if row["maintain"]]
    baseline = [row for row in sizes if not row["maintain"]]
    assert len(with_gc) == len(baseline) >= 3
    assert [row["hour"] for row in with_gc] == [row["hour"] for row in baseline]
    for row in sizes:
        assert row["size_bytes"] > 0
        assert row["size_bytes"] == row["entry_bytes"] + row["overhead_bytes"]
        assert 0 < row["members"] <= row["members_ever"]
    # the same simulated day, so maintain() can only make the document smaller
    assert with_gc[-1]["size_bytes"] < baseline[-1]["size_bytes"]
    (summary,) = [row for row in rows if row["name"] == "directory_growth"]
    assert summary["baseline_size_growth_bytes_per_hour"] > 0
    assert "with maintain()" in result.stdout
    assert (ROOT / "benchmarks" / "results" / "directory_size.json").exists()
