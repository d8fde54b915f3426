"""`crdtswarm bench`: one fast benchmark end to end, its errors, and the plots alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crdtswarm.cli.bench import BENCHMARKS, find_root
from crdtswarm.cli.plots import (
    plot_convergence,
    plot_directory_size,
    plot_route_stretch,
    plot_throughput,
    require_matplotlib,
)

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def crdtswarm(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; from crdtswarm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_quick_run_writes_json_and_a_plot_and_prints_a_summary(tmp_path: Path) -> None:
    # directory_size is the fastest of the five (about 2 s with --quick)
    out = tmp_path / "out"
    result = crdtswarm("bench", "directory_size", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((out / "directory_size.json").read_text())
    names = {row["name"] for row in document["results"]}
    assert {"directory_size", "directory_growth"} <= names
    assert (out / "directory_size.png").read_bytes().startswith(PNG)
    assert "wrote" in (out / "directory_size.log").read_text()
    # no terminal: plain progress lines, then the summary table
    assert "[1/1] directory_size: running" in result.stdout
    assert "[1/1] directory_size: done" in result.stdout
    assert "directory_growth" in result.stdout
    assert f"plot: {out / 'directory_size.png'}" in result.stdout


def test_an_unknown_benchmark_is_one_error_line_listing_the_valid_names() -> None:
    result = crdtswarm("bench", "directory_size", "nonsense")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "unknown benchmark 'nonsense'" in result.stderr
    assert "valid names: " + ", ".join(BENCHMARKS) in result.stderr


def test_without_matplotlib_it_says_so_before_running_anything(tmp_path: Path) -> None:
    prelude = "import sys; sys.modules['matplotlib'] = None; "  # makes the import fail
    result = crdtswarm("bench", "routing", "--out", str(tmp_path), prelude=prelude)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "matplotlib is not installed" in result.stderr
    assert "crdtswarm[bench]" in result.stderr
    assert not list(tmp_path.iterdir())


def test_the_benchmarks_are_found_only_in_a_clone(tmp_path: Path) -> None:
    assert find_root([tmp_path, ROOT]) == ROOT
    assert find_root([tmp_path]) is None


@pytest.fixture
def documents() -> dict[str, dict[str, object]]:
    require_matplotlib()
    return {
        "stream_throughput": {
            "results": [
                {"name": "raw_tcp_stream_1proc", "value": 2000.0, "unit": "MB/s"},
                {"name": "crdtswarm_tcp_stream_1proc", "value": 500.0, "unit": "MB/s"},
                {"name": "crdtswarm_call", "value": 3.7, "unit": "ms"},  # no baseline in MB/s
            ]
        },
        "webrtc": {
            "results": [
                {"name": "raw_webrtc_stream_1proc", "value": 16.0, "unit": "MB/s"},
                {"name": "crdtswarm_webrtc_stream_1proc", "value": 15.5, "unit": "MB/s"},
            ]
        },
        "convergence": {
            "results": [
                {"name": "convergence_time", "value": 35.0, "n": 10, "floor_ms": 34.0},
                {"name": "convergence_time", "value": 55.0, "n": 50, "floor_ms": 55.0},
                {"name": "convergence_time_wall", "value": 40.0, "n": 10},
                {"name": "convergence_time", "n": 200},  # no value: skipped
            ]
        },
        "routing": {
            "results": [
                {"name": "routing_quality", "mesh": "random", "n": 30, "stretch": [1.0, 1.2, 1.0]}
            ]
        },
        "directory_size": {
            "results": [
                {"name": "directory_size", "maintain": True, "hour": 0, "size_bytes": 4000},
                {"name": "directory_size", "maintain": True, "hour": 1, "size_bytes": 9000},
                {"name": "directory_size", "maintain": False, "hour": 1, "size_bytes": 90000},
            ]
        },
    }


def test_each_plot_is_drawn_from_the_rows_it_knows(
    tmp_path: Path, documents: dict[str, dict[str, object]]
) -> None:
    for plot, name in [
        (plot_throughput, "throughput.png"),
        (plot_convergence, "convergence.png"),
        (plot_route_stretch, "route_stretch.png"),
        (plot_directory_size, "directory_size.png"),
    ]:
        path = plot(documents, tmp_path / name)
        assert path == tmp_path / name
        assert path.read_bytes().startswith(PNG)


def test_a_plot_without_its_rows_is_skipped(tmp_path: Path) -> None:
    require_matplotlib()
    odd = {
        "stream_throughput": {"results": "not a list"},
        "convergence": {"results": [{"name": "convergence_time", "value": "fast"}]},
        "routing": {"results": [{"name": "routing_quality", "stretch_vs_mesh_opt_median": 1.0}]},
    }
    for plot in (plot_throughput, plot_convergence, plot_route_stretch, plot_directory_size):
        assert plot(odd, tmp_path / "x.png") is None
    assert not list(tmp_path.iterdir())
