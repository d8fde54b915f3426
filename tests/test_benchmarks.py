"""Benchmarks run as seconds-long smoke tests; their figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_quick(module: str) -> tuple[list[dict[str, Any]], str]:
    """Run ``python -m benchmarks.<module> --quick``; return its JSON lines and stdout."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return rows, result.stdout


def test_stream_throughput_smoke() -> None:
    rows, stdout = run_quick("stream_throughput")
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
    assert "ratio" in stdout


def test_directory_size_smoke() -> None:
    rows, stdout = run_quick("directory_size")
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
    assert "with maintain()" in stdout
    assert (ROOT / "benchmarks" / "results" / "directory_size.json").exists()


def test_convergence_smoke() -> None:
    rows, stdout = run_quick("convergence")
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
    assert "ratio" in stdout
    assert (ROOT / "benchmarks" / "results" / "convergence.json").exists()


def test_routing_smoke() -> None:
    rows, stdout = run_quick("routing")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    assert set(by_name) == {"routing_quality", "routing_traffic", "routing_failover"}
    for name, results in by_name.items():
        assert {(row["mesh"], row["n"]) for row in results} == {
            ("random", 30),
            ("near+random", 30),
            ("latency", 30),
        }, name
    quality = {row["mesh"]: row for row in by_name["routing_quality"]}
    # the latency mesh's hubs and near links give shorter routes than a random mesh
    assert quality["latency"]["route_mean_ms"] < quality["random"]["route_mean_ms"]
    assert quality["latency"]["mean_degree"] > quality["random"]["mean_degree"]
    for row in by_name["routing_quality"]:
        if row["share_no_route"] == 0:  # (talk is over all pairs, route over routed ones)
            # talking (direct link dialled too) is never worse than the route alone
            assert row["talk_mean_ms"] <= row["route_mean_ms"]
        assert row["stretch_talk_vs_onehop_opt_median"] > 0
        # the Router sees the mesh's own links: it can match, never beat, the optimum
        assert row["stretch_vs_mesh_opt_median"] >= 1.0
        assert row["route_mean_ms"] >= row["mesh_opt_mean_ms"] > 0
        assert row["onehop_opt_mean_ms"] <= row["direct_mean_ms"]
        assert 0 <= row["share_better_than_direct"] <= 1
    for row in by_name["routing_failover"]:
        assert row["affected_routes"] > 0
        assert 0 < row["median_s"] <= row["max_s"]
    for row in by_name["routing_traffic"]:
        assert row["probe_bytes_per_node_per_s"] > 0
        assert row["gossip_bytes_per_node_per_s"] > row["gossip_tree_bytes_per_node_per_s"] > 0
    assert "stretch" in stdout
    assert (ROOT / "benchmarks" / "results" / "routing-quick.json").exists()


def test_webrtc_smoke() -> None:
    rows, stdout = run_quick("webrtc")
    names = {row["name"] for row in rows}
    assert {
        "raw_connect_seq",
        "raw_connect_par",
        "crdtswarm_join",
        "crdtswarm_mesh",
        "raw_webrtc_stream_1proc",
        "crdtswarm_webrtc_stream_1proc",
        "raw_webrtc_stream_2proc",
        "crdtswarm_webrtc_stream_2proc",
    } <= names
    assert all(row["value"] > 0 for row in rows)
    (join,) = [row for row in rows if row["name"] == "crdtswarm_join"]
    assert (join["n"], join["links"]) == (3, 2)
    assert join["ratio_vs_raw_seq"] > 0
    (mesh,) = [row for row in rows if row["name"] == "crdtswarm_mesh"]
    assert (mesh["n"], mesh["links"]) == (5, 10)
    assert 0 < mesh["calls_ms"] <= mesh["value"]
    for row in rows:
        if row["name"].endswith(("_1proc", "_2proc")):
            assert row["cpu_s_per_mb"] > 0
        if row["name"].startswith("crdtswarm_webrtc_stream"):
            assert row["ratio_vs_raw"] > 0
    assert "ratio" in stdout
    assert (ROOT / "benchmarks" / "results" / "webrtc.json").exists()
