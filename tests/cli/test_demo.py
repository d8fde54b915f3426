"""`crdtswarm demo`, run as a user would, on each transport (plain output: no terminal)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crdtswarm.cli.scenario import DemoConfig, _block_plan


def demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "crdtswarm.cli", "demo", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    summary = json.loads(out.read_text()) if out.exists() else {}
    return result, summary


def check_survivors(summary: dict[str, Any], count: int) -> dict[str, Any]:
    """The common checks of a good run; returns the killed node's report."""
    assert summary["ok"] is True
    assert summary["failure"] is None
    assert summary["node_count"] == count
    nodes = {node["name"]: node for node in summary["nodes"]}
    assert len(nodes) == count
    killed = summary["killed"]
    assert nodes[killed["name"]]["state"] == "killed"
    assert killed["gone_ms"] > 0
    survivors = [node for node in nodes.values() if node["state"] == "up"]
    assert len(survivors) == count - 1
    # every newcomer joined: a linked call, then a member everywhere
    assert summary["join_ms"]["count"] == count - 1
    assert 0 < summary["join_call_ms"]["median"] <= summary["join_ms"]["max"]
    for node in survivors:
        assert killed["name"] not in {link["peer"] for link in node["links"]}
        assert node["members"] == count - 1
    # every node edited at once, before and after the kill, and the survivors converged
    assert summary["edits"][0]["by"] == [f"node{i}" for i in range(1, count + 1)]
    assert all(edit["converge_ms"] > 0 for edit in summary["edits"])
    assert summary["converged"] is True
    assert summary["doc_entries"] >= 2 * count - 1
    assert {node["doc_digest"] for node in survivors} == {summary["doc_digest"]}
    assert all(node["doc_entries"] == summary["doc_entries"] for node in survivors)
    assert summary["rtt_ms"]["median"] > 0
    assert summary["bytes_sent"] > 0
    assert summary["bytes_received"] > 0
    return killed


def test_sim_routes_a_blocked_pair_through_a_relay_and_fails_over(tmp_path: Path) -> None:
    result, summary = demo(
        tmp_path, "--transport", "sim", "--nodes", "4", "--duration", "0", "--seed", "1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    killed = check_survivors(summary, 4)
    relay = summary["relay"]
    assert [relay["source"], relay["target"]] in relay["blocked"]
    assert len(relay["hops"]) == 1
    assert relay["remote_address"].startswith("relay://")
    assert relay["expected_rtt_ms"] > 0
    assert relay["ping_ms"] > 0
    # the killed node was that relay: the pair went through another one
    failover = relay["failover"]
    assert failover["killed_relay"] == killed["name"]
    assert killed["key"] in relay["remote_address"]
    assert failover["hops"]
    assert killed["name"] not in failover["hops"]
    assert killed["name"] not in failover["route_hops"]
    assert failover["relink_ms"] > 0
    assert failover["route_ms"] >= 0  # 0: the route had moved on before the link died
    assert failover["remote_address"].startswith("relay://")
    assert summary["network_bytes"] > summary["bytes_sent"] > 0
    assert "route() goes via" in result.stdout
    assert "called" in result.stdout
    assert "relay failover" in result.stdout


def test_sim_with_three_nodes_kills_an_end_of_the_blocked_pair(tmp_path: Path) -> None:
    result, summary = demo(
        tmp_path, "--transport", "sim", "--nodes", "3", "--duration", "0", "--seed", "7"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    killed = check_survivors(summary, 3)
    relay = summary["relay"]
    assert relay["remote_address"].startswith("relay://")
    assert killed["name"] == relay["target"]
    assert relay["failover"] is None
    assert "no second relay" in relay["failover_skipped"]


def test_tcp_shows_the_swarm_for_the_duration(tmp_path: Path) -> None:
    result, summary = demo(
        tmp_path, "--transport", "tcp", "--nodes", "3", "--duration", "2.5", "--seed", "1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_survivors(summary, 3)
    assert summary["elapsed_s"] >= 2.5
    assert len(summary["edits"]) >= 3  # besides the two rounds, timed edits while showing
    assert summary["relay"] is None
    assert summary["network_bytes"] is None
    for node in summary["nodes"]:
        for link in node["links"]:
            assert link["remote_address"].startswith("tcp://")
    # plain timestamped lines (no terminal), then the summary table
    lines = result.stdout.splitlines()
    assert any(line.split()[1:2] == ["s"] and "killing node" in line for line in lines)
    assert "seed" in result.stdout
    assert "OK in" in result.stdout


def test_webrtc_joins_through_the_signaling_server(tmp_path: Path) -> None:
    result, summary = demo(
        tmp_path, "--transport", "webrtc", "--nodes", "3", "--duration", "0", "--seed", "1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_survivors(summary, 3)
    assert summary["signaling_url"].startswith("ws://127.0.0.1:")
    links = [link for node in summary["nodes"] for link in node["links"]]
    assert links
    assert {link["transport"] for link in links} == {"webrtc"}
    assert "offer through the signaling server" in result.stdout


def test_a_phase_that_times_out_fails_with_one_line_and_a_summary(tmp_path: Path) -> None:
    result, summary = demo(tmp_path, "--transport", "sim", "--nodes", "3", "--timeout", "0.001")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("crdtswarm: error: demo failed: node2 could not join")
    assert summary["ok"] is False
    assert summary["failure"].startswith("node2 could not join")
    assert "FAILED" in result.stdout


@pytest.mark.parametrize("n", range(3, 13))
def test_the_block_plan_keeps_every_node_reachable(n: int) -> None:
    for seed in range(20):
        (a, c), blocked = _block_plan(n, random.Random(seed))
        assert 0 < a < c < n
        assert frozenset({a, c}) in blocked
        assert len(blocked) == 1 + ((n - 4) // 2 if n >= 6 else 0)

        def partners(i: int, blocked: set[frozenset[int]] = blocked) -> set[int]:
            return {j for j in range(n) if j != i and frozenset({i, j}) not in blocked}

        for i in range(1, n):
            assert any(j < i for j in partners(i)), "a newcomer has nobody to call"
        if n >= 4:
            assert len(partners(a) & partners(c)) >= 2, "no second relay to fail over to"


def test_the_config_rejects_nonsense() -> None:
    for bad in [{"transport": "carrier pigeon"}, {"nodes": 2}, {"timeout": 0.0}]:
        with pytest.raises(ValueError, match=r"must|needs"):
            DemoConfig(**bad)  # type: ignore[arg-type]
