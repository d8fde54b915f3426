"""Does the directory document stay flat over a day of a 50-node swarm with churn?

Simulated, without network or sleeps: ``--nodes`` node slots, each a `Directory`
over its own `pycrdt.Doc` (its own Yjs client), all exchanging updates through one
reference document (the union of everything, whose size is reported). Time advances
in one-minute steps on a simulated clock. Every minute each node leaves with
probability ``churn / 10`` (so ``--churn`` of the nodes are replaced per 10 minutes;
70 % call `Directory.leave`, the rest vanish) and a fresh identity takes its slot.
Every node republishes its member entry every ``member_ttl / 3`` (200 s), publishes
a latency row to ``--latency-peers`` random peers (16) every ``--latency-every``
minutes (5), posts 1.5 KiB signals (3 when it joins, then ``--signals`` per hour),
and runs `Directory.maintain` every ``--maintain-every`` minutes (30, staggered).
An observer directory reads the reference document at every report.

The same run (same seed, same actions) is measured twice: with `maintain()` and,
as the baseline, without it. Reported every simulated hour: the encoded size of
the reference document (``len(doc.get_update())``), the envelopes it holds and
their bytes, the rest (``overhead``: Yjs structure and tombstones), its Yjs clients
(one per node ever), the members the observer reads and the members ever joined.

Run: ``python -m benchmarks.directory_size [--hours 24] [--quick]``. Prints a
table, one JSON line per row, and writes ``benchmarks/results/directory_size.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycrdt

from crdtswarm.identity import Identity
from crdtswarm.protocol.wire import Reader
from crdtswarm.sync.directory import Directory, DirectoryConfig

RESULTS = Path(__file__).resolve().parent / "results"
START = 1_700_000_000.0
STEP = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    identity: Identity
    doc: pycrdt.Doc[Any]
    directory: Directory
    next_member: float
    next_latency: float
    next_maintain: float


def push(node: Node, hub: pycrdt.Doc[Any]) -> None:
    hub.apply_update(node.doc.get_update(hub.get_state()))


def pull(node_doc: pycrdt.Doc[Any], hub: pycrdt.Doc[Any]) -> None:
    node_doc.apply_update(hub.get_update(node_doc.get_state()))


def census(hub: pycrdt.Doc[Any]) -> dict[str, int]:
    """What the reference document holds."""
    root = hub.get("entries", type=pycrdt.Map)
    envelopes = envelope_bytes = containers = 0
    for _, value in root.items():
        containers += 1
        if isinstance(value, pycrdt.Array):
            items = value.to_py() or []
            envelopes += len(items)
            envelope_bytes += sum(len(item) for item in items)
    size = len(hub.get_update())
    return {
        "size_bytes": size,
        "entries": envelopes,
        "entry_bytes": envelope_bytes,
        "overhead_bytes": size - envelope_bytes,
        "containers": containers,
        "clients": Reader(hub.get_state()).read_uvarint(),
    }


def simulate(args: argparse.Namespace, *, maintain: bool) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    clock = Clock()
    config = DirectoryConfig()
    hub: pycrdt.Doc[Any] = pycrdt.Doc()
    observer_doc: pycrdt.Doc[Any] = pycrdt.Doc()
    observer = Directory(observer_doc, Identity(rng.randbytes(32)), config=config, clock=clock)
    ever = 0
    members_every = config.member_ttl / 3

    def join() -> Node:
        nonlocal ever
        ever += 1
        identity = Identity(rng.randbytes(32))
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        pull(doc, hub)
        node = Node(
            identity=identity,
            doc=doc,
            directory=Directory(doc, identity, config=config, clock=clock),
            next_member=clock.now + members_every,
            next_latency=clock.now + rng.uniform(0, args.latency_every * 60),
            next_maintain=clock.now + rng.uniform(0, args.maintain_every * 60),
        )
        node.directory.publish_member([f"tcp://10.0.{rng.randrange(256)}.1:4242"], ["tcp"])
        return node

    nodes: list[Node] = []
    for _ in range(args.nodes):
        nodes.append(join())
        push(nodes[-1], hub)
    for node in nodes:  # the first wave's offers to each other
        post_signals(node, nodes, rng, 3)

    rows: list[dict[str, Any]] = []
    steps = int(args.hours * 60)
    for minute in range(steps + 1):
        if minute % args.report_every == 0:
            pull(observer_doc, hub)
            observer.refresh()
            rows.append(
                {
                    "name": "directory_size",
                    "maintain": maintain,
                    "hour": round(minute / 60, 3),
                    **census(hub),
                    "members": len(observer.members),
                    "members_ever": ever,
                }
            )
        if minute == steps:
            break
        clock.now += STEP
        keys = [node.identity.public_key for node in nodes]
        for slot, node in enumerate(nodes):
            if rng.random() < args.churn / 10:
                if rng.random() < 0.7:
                    node.directory.leave()
                    push(node, hub)
                node.directory.close()
                nodes[slot] = node = join()
                keys[slot] = node.identity.public_key
                post_signals(node, nodes, rng, 3)
                push(node, hub)
                continue
            wrote = False
            if clock.now >= node.next_member:
                node.directory.publish_member(
                    node.directory.members[node.identity.public_key].addresses, ["tcp"]
                )
                node.next_member += members_every
                wrote = True
            if clock.now >= node.next_latency:
                others = [k for k in keys if k != node.identity.public_key]
                peers = rng.sample(others, min(args.latency_peers, len(others)))
                node.directory.publish_latency({p: rng.uniform(0.005, 0.200) for p in peers})
                node.next_latency += args.latency_every * 60
                wrote = True
            if rng.random() < args.signals / 60:
                post_signals(node, nodes, rng, 1)
                wrote = True
            if maintain and clock.now >= node.next_maintain:
                pull(node.doc, hub)
                node.directory.maintain()
                node.next_maintain += args.maintain_every * 60
                wrote = True
            if wrote:
                push(node, hub)
    return rows


def post_signals(node: Node, nodes: list[Node], rng: random.Random, count: int) -> None:
    others = [n for n in nodes if n is not node]
    for peer in rng.sample(others, min(count, len(others))):
        node.directory.post_signal(peer.identity.public_key, rng.randbytes(1536))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50, help="node slots (50)")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours (24)")
    parser.add_argument("--churn", type=float, default=0.05, help="share replaced per 10 min")
    parser.add_argument("--signals", type=float, default=6.0, help="signals per node per hour")
    parser.add_argument("--latency-peers", type=int, default=16, help="peers per row (16)")
    parser.add_argument("--latency-every", type=int, default=5, help="minutes between rows")
    parser.add_argument("--maintain-every", type=int, default=30, help="minutes per node")
    parser.add_argument("--report-every", type=int, default=60, help="minutes between rows")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.hours, args.report_every = 16, 1.5, 30

    results: list[dict[str, Any]] = []
    timings: dict[bool, float] = {}
    for maintain in (True, False):
        start = time.perf_counter()
        rows = simulate(args, maintain=maintain)
        timings[maintain] = time.perf_counter() - start
        for row in rows:
            results.append(row)
            print(json.dumps(row), flush=True)
    with_gc = [r for r in results if r["maintain"]]
    baseline = [r for r in results if not r["maintain"]]
    first, last = with_gc[len(with_gc) // 2], with_gc[-1]  # the second half: steady state
    base_first, base_last = baseline[len(baseline) // 2], baseline[-1]
    hours = last["hour"] - first["hour"]
    departed = last["clients"] - first["clients"]
    summary = {
        "name": "directory_growth",
        "nodes": args.nodes,
        "hours": args.hours,
        "churn_per_10min": args.churn,
        "members_ever": last["members_ever"],
        "size_growth_bytes_per_hour": round((last["size_bytes"] - first["size_bytes"]) / hours),
        "overhead_growth_bytes_per_hour": round(
            (last["overhead_bytes"] - first["overhead_bytes"]) / hours
        ),
        "overhead_bytes_per_departed_node": round(
            (last["overhead_bytes"] - first["overhead_bytes"]) / max(departed, 1)
        ),
        "baseline_size_growth_bytes_per_hour": round(
            (base_last["size_bytes"] - base_first["size_bytes"]) / hours
        ),
        "final_size_bytes": last["size_bytes"],
        "baseline_final_size_bytes": base_last["size_bytes"],
        "seconds": round(timings[True], 2),
        "baseline_seconds": round(timings[False], 2),
    }
    results.append(summary)
    print(json.dumps(summary), flush=True)

    print()
    print(
        f"directory_size: {args.nodes} node slots, {args.hours:g} simulated hours, "
        f"{args.churn:.0%} churn per 10 min, seed {args.seed}"
    )
    print(f"{'':>6}{'--- with maintain() ---':>36}{'--- baseline ---':>28}")
    print(
        f"{'hour':>6}{'bytes':>10}{'entries':>9}{'overhead':>10}{'bytes':>12}{'entries':>9}"
        f"{'overhead':>10}{'members':>9}{'ever':>6}"
    )
    for ours, base in zip(with_gc, baseline, strict=True):
        print(
            f"{ours['hour']:>6g}{ours['size_bytes']:>10}{ours['entries']:>9}"
            f"{ours['overhead_bytes']:>10}{base['size_bytes']:>12}{base['entries']:>9}"
            f"{base['overhead_bytes']:>10}{ours['members']:>9}{ours['members_ever']:>6}"
        )
    print(
        f"second half: {summary['size_growth_bytes_per_hour']} B/h with maintain() "
        f"(overhead {summary['overhead_growth_bytes_per_hour']} B/h, "
        f"{summary['overhead_bytes_per_departed_node']} B per departed node), "
        f"{summary['baseline_size_growth_bytes_per_hour']} B/h without"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "directory_size.json"
    out.write_text(json.dumps({"benchmark": "directory_size", "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
