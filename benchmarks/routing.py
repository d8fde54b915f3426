"""How good are crdtswarm's routes on real Internet latencies, and what do they cost?

Setup. The latencies are a real all-pairs round-trip matrix between 490 PlanetLab
hosts (``shared/data/latency/planetlab-490-rtt-ms.tsv.gz``, see its NOTES.md). For
each swarm size ``N`` (default 50, 100, 490) a seeded RNG picks ``N`` hosts (490:
all of them). A 490-node swarm cannot run as real `crdtswarm.Swarm` nodes on a
2-core machine, so this benchmark drives the sans-IO cores directly, in simulated
time, on an event queue:

* Mesh. Every node links to peers until it has ``max_peers`` = 8 links, accepting
  links up to 12 (``1.5 * max_peers``, as the real mesh tolerates), nodes taking
  turns in a seeded random order. Three policies: ``random`` (the default
  `crdtswarm.mesh.MeshPolicy`), ``near+random`` (the 4 lowest-RTT hosts first,
  then random ones: an oracle baseline that knows every RTT before linking), and
  ``latency``, crdtswarm's opt-in latency mesh (``MeshConfig(relay_hubs=16,
  near_peers=8)``), built with the library's own `crdtswarm.protocol.topology`
  functions on top of the random mesh: elect 16 relay hubs from the random mesh's
  graph (`elect_relays`), link everyone to them, let each node dial the 16
  candidates whose RTTs to the hubs are closest to its own (`near_candidates`)
  and keep the 8 lowest-RTT ones (`nearest`), then re-elect the hubs on the new
  graph (incumbents sticky). All links are up at t = 0 (the real swarm gets there
  over a few election intervals); the mesh does not repair itself after a node dies.
* Measurement. Each node runs a `crdtswarm.protocol.probe.ProbeScheduler` (default
  `ProbeConfig`) over its links. A probe's answer comes back after the matrix RTT
  times ``1 + U(-5 %, +5 %)`` (seeded); there is no random loss.
* Rows. Whenever ``row_update`` returns a row, the node publishes it: it reaches
  node ``v`` after the one-way delay of the shortest mesh path from its author
  (half the RTT per hop, plus 5 ms of batching per hop), and is valid for
  ``latency_ttl`` (120 s) from publication. A killed node's links carry nothing.
* Routing. A seeded sample of sources (all nodes up to ``--sources``, 40 by
  default) each keep a `crdtswarm.protocol.routing.Router` (default
  `RoutingConfig`: at most 2 relays, hysteresis of 10 ms and 10 %). At simulated
  t = 15, 60 and 200 s, and just before each kill, each source whose view of the
  rows changed builds ``LinkGraph.from_rows`` from the rows it has received and
  asks ``route()`` for every other node; the routes at t = 200 s are scored.

Scores (RTT in ms; the cost of a path is the sum of the matrix RTTs of its hops,
relays adding no delay of their own):

* ``direct``: the matrix RTT between source and target.
* ``1hop*``: the full-knowledge one-relay optimum, ``min(d[s,t], min_r d[s,r] +
  d[r,t])`` over all ``N`` hosts, whether linked or not.
* ``mesh*``: the optimum over the mesh's links with at most 2 relays (true RTTs):
  the best any router could do on this mesh under crdtswarm's relay limit.
* ``route``: the cost of the path crdtswarm's Router picked.
* ``talk``: the route once the source talks to the target: opening a stream to a
  node through relays also dials it directly in the background, so the source
  then knows the direct RTT too and uses the cheaper of the two
  (``min(route, direct)``; the real Router's hysteresis may keep the other one
  when they are within 10 ms / 10 %).
* Stretch: ``route / 1hop*`` (targets: median <= 1.05, p95 <= 1.2), ``talk /
  1hop*`` and ``route / mesh*``, on RTTs floored at 1 ms (the rows' resolution),
  over the pairs that have a route (``talk``: over all pairs). ``no route``: pairs
  more than 3 mesh hops apart, which the Router (at most 2 relays) cannot reach
  at all; the swarm dials those directly.
  The mean RTTs in the table are over the pairs that have a route. ``<direct``:
  share of all pairs whose route beats the direct RTT.
* Failover: at t = 210, 270 and 330 s, the node that relays the most current
  routes is killed (and stays dead). Its neighbours' probes time out; after 3
  losses in a row the link is down and leaves their rows (published at most once
  per 5 s); 20 s after the kill (``peer_timeout``) their keepalives close the link
  anyway. An edge needs both ends' rows, so one neighbour's new row is enough to
  remove it. For each route that went through the dead node we note the simulated
  time from the kill until its source's Router, re-asked whenever a changed row
  reaches the source, gives a route that avoids it (60 s horizon). The dead
  node's own row is not needed: it expires only after 120 s.
* Traffic per node, in the steady state (t = 80-200 s): probe bytes (probes sent
  times ``probe_size``, request and answer) and gossip bytes: each publication is a
  signed latency envelope (58-byte header, uvarint count, 8-byte key prefix and uvarint
  ms per peer, 64-byte signature; see `crdtswarm.sync.directory`) that crosses
  every mesh link once when flooded (``gossip``), or ``N - 1`` links along a
  shortest-path tree (``tree``, the replicator's route when rows are settled),
  summed over all nodes' publications and divided by ``N``.

Caveats: relays add no processing delay; Yjs framing of directory updates, the
deletion of superseded envelopes, and IP/UDP/DTLS/SCTP headers are not counted;
one matrix slice means no diurnal change; at ``N = 490`` only the sampled sources
route (the probing, rows and gossip of all 490 nodes are simulated in full).

Run: ``python -m benchmarks.routing [--nodes 50 100 490] [--quick]``. Prints tables,
one JSON line per result, writes ``benchmarks/results/routing.json`` and, if
matplotlib is installed, ``benchmarks/results/routing.png`` (stretch CDFs); with
``--quick`` (N = 30) they go to ``routing-quick.*`` instead.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import heapq
import itertools
import json
import math
import operator
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdtswarm.protocol.probe import ProbeConfig, ProbeScheduler
from crdtswarm.protocol.routing import LinkGraph, Route, Router, RoutingConfig
from crdtswarm.protocol.topology import elect_relays, near_candidates, nearest
from crdtswarm.protocol.wire import encode_uvarint
from crdtswarm.sync.directory import ROW_KEY_PREFIX

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "latency" / "planetlab-490-rtt-ms.tsv.gz"

MAX_PEERS = 8  # crdtswarm.mesh.MeshConfig.max_peers
MAX_LINKS = 12  # links a node accepts: 1.5 * max_peers
NEAREST = 4  # near+random: links to the nearest hosts first
HUBS = 16  # latency: MeshConfig.relay_hubs
NEAR = 8  # latency: MeshConfig.near_peers
TRIALS = 16  # latency: near candidates dialled and measured per node
NOISE = 0.05  # default of --noise: each probe sample is RTT * (1 + U(-noise, noise))
HOP_DELAY = 0.005  # batching per hop of a directory update (ReplicaConfig.batch_interval)
LATENCY_TTL = 120.0  # DirectoryConfig.latency_ttl
PEER_TIMEOUT = 20.0  # SwarmConfig.peer_timeout: keepalives close a dead link
CHECKS = (15.0, 60.0, 200.0)  # when the sources re-route (the last one is scored)
STEADY = (80.0, 200.0)  # the window the traffic is measured over
KILL_AT = (210.0, 270.0, 330.0)
HORIZON = 60.0
ENVELOPE_FIXED = 58 + 64  # header and signature of a signed directory envelope
FLOOR_MS = 1.0  # RTTs are floored at this before taking ratios

WAKE, ANSWER, CLOSE = 0, 1, 2


def load_matrix(path: Path) -> list[list[float]]:
    """The RTT matrix in milliseconds."""
    with gzip.open(path, "rt") as f:
        return [[float(x) for x in line.split("\t")] for line in f if line.strip()]


def order(node: int) -> bytes:
    return node.to_bytes(2, "big")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100])."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def build_mesh(d: list[list[float]], kind: str, rng: random.Random) -> list[set[int]]:
    n = len(d)
    adj: list[set[int]] = [set() for _ in range(n)]
    if kind == "latency":
        adj = build_mesh(d, "random", rng)
        return latency_mesh(d, adj)
    for node in rng.sample(range(n), n):
        others = [m for m in range(n) if m != node]
        rng.shuffle(others)
        if kind == "near+random":
            nearest = sorted(others, key=lambda m: d[node][m])[:NEAREST]
            others = nearest + [m for m in others if m not in nearest]
        for other in others:
            if len(adj[node]) >= MAX_PEERS:
                break
            if other not in adj[node] and len(adj[other]) < MAX_LINKS:
                adj[node].add(other)
                adj[other].add(node)
    return adj


def latency_mesh(d: list[list[float]], adj: list[set[int]]) -> list[set[int]]:
    """The latency mesh on top of the random one, as `crdtswarm.protocol.topology` builds it.

    1. Elect ``HUBS`` relay hubs from the random mesh's graph (`elect_relays`);
       every node links to them. 2. Each node ranks the other members by their
       landmark vectors (their RTTs to the hubs, from the hubs' rows), dials the
       ``TRIALS`` best candidates one after the other, measures them and keeps the
       ``NEAR`` lowest-RTT ones. 3. Re-elect the hubs on the new graph (incumbents
       keep their seat unless clearly beaten); nodes link to any new hub.
    """
    n = len(d)

    def graph() -> LinkGraph[int]:
        rows = {v: {u: d[v][u] for u in adj[v]} for v in range(n)}
        return LinkGraph.from_rows(rows, order=order)

    def link_to(hubs: list[int]) -> None:
        for v in range(n):
            for h in hubs:
                if h != v:
                    adj[v].add(h)
                    adj[h].add(v)

    hubs = elect_relays(graph(), HUBS)
    link_to(hubs)
    landmark_rows = {h: {u: d[h][u] for u in adj[h]} for h in hubs}
    near: list[list[int]] = []
    for v in range(n):
        rows = {**landmark_rows, v: {h: d[v][h] for h in hubs if h != v}}
        trials = near_candidates(rows, v, hubs, TRIALS, exclude=adj[v])
        measured = {u: d[v][u] for u in trials}
        near.append(nearest(measured, NEAR))
    for v, chosen in enumerate(near):
        for u in chosen:
            adj[v].add(u)
            adj[u].add(v)
    link_to(elect_relays(graph(), HUBS, incumbents=hubs))
    return adj


def mesh_optimum(adj: list[set[int]], d: list[list[float]], source: int) -> dict[int, float]:
    """The cheapest cost (ms) from ``source`` to every node over <= 3 mesh links."""
    best: dict[int, float] = {}
    ds = d[source]
    for a in adj[source]:
        wa = ds[a]
        if wa < best.get(a, math.inf):
            best[a] = wa
        da = d[a]
        for b in adj[a]:
            if b == source:
                continue
            wb = wa + da[b]
            if wb < best.get(b, math.inf):
                best[b] = wb
            db = d[b]
            for c in adj[b]:
                if c != source and (wc := wb + db[c]) < best.get(c, math.inf):
                    best[c] = wc
    return best


def gossip_delays(
    adj: list[set[int]], d: list[list[float]], alive: list[bool], source: int
) -> list[float]:
    """One-way seconds for a directory update from ``source`` to every node (Dijkstra)."""
    dist = {source: 0.0}
    heap = [(0.0, source)]
    done: set[int] = set()
    while heap:
        t, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        for other in adj[node]:
            if not alive[other]:
                continue
            arrive = t + d[node][other] / 2000 + HOP_DELAY
            if arrive < dist.get(other, math.inf):
                dist[other] = arrive
                heapq.heappush(heap, (arrive, other))
    return [dist.get(v, math.inf) for v in range(len(adj))]


def envelope_size(row: dict[int, float]) -> int:
    payload = len(encode_uvarint(len(row)))
    payload += sum(ROW_KEY_PREFIX + len(encode_uvarint(round(v * 1000))) for v in row.values())
    return ENVELOPE_FIXED + payload


@dataclass(slots=True)
class Publication:
    time: float
    version: int  # changes only when the row's content does
    row: dict[int, float]
    arrivals: dict[int, float]  # sampled source -> when the row reaches it


@dataclass
class Simulation:
    d: list[list[float]]  # ms
    adj: list[set[int]]
    sources: list[int]
    seed: int
    noise: float = NOISE
    config: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        n = len(self.d)
        self.rng = random.Random(self.seed)
        self.alive = [True] * n
        self.killed_at: dict[int, float] = {}
        self.schedulers: list[ProbeScheduler[int]] = [
            ProbeScheduler(self.config, rng=random.Random(self.seed * 1000 + v)) for v in range(n)
        ]
        self.wake_version = [0] * n
        self.events: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.probe_times: list[float] = []
        self.pubs: list[list[Publication]] = [[] for _ in range(n)]
        self.pub_log: list[tuple[float, int, int, int]] = []  # time, size, flood, tree links
        self.edges_alive = sum(len(a) for a in self.adj) // 2
        self.nodes_alive = n
        self.delays = {s: gossip_delays(self.adj, self.d, self.alive, s) for s in self.sources}
        self.routers = {s: Router(s, RoutingConfig()) for s in self.sources}
        self.routes: dict[int, dict[int, Route[int]]] = {s: {} for s in self.sources}
        self.view_sig: dict[int, tuple[tuple[int, int], ...]] = {}
        for v in range(n):
            for peer in self.adj[v]:
                self.schedulers[v].add_link(peer, 0.0)
            self._push(0.0, WAKE, v, 0)

    # -- the event queue ---------------------------------------------------------------

    def _push(self, at: float, kind: int, node: int, arg: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, node, arg))

    def run_until(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            at, _, kind, node, arg = heapq.heappop(self.events)
            self.now = at
            if not self.alive[node]:
                continue
            if kind == WAKE:
                if arg != self.wake_version[node]:
                    continue
            elif kind == ANSWER:
                probe_id, peer, sent = arg
                died = self.killed_at.get(peer)
                if died is not None and sent + self.d[node][peer] / 2000 >= died:
                    continue  # the probe reached a dead node
                self.schedulers[node].probe_answered(probe_id, at)
            elif kind == CLOSE:
                self.schedulers[node].remove_link(arg, at)
            self._step(node, at)
        self.now = until

    def _step(self, node: int, now: float) -> None:
        scheduler = self.schedulers[node]
        scheduler.handle_timer(now)
        for peer in scheduler.probes_due(now):
            probe_id = scheduler.probe_sent(peer, now)
            self.probe_times.append(now)
            if self.alive[peer]:
                rtt = self.d[node][peer] / 1000 * (1 + self.rng.uniform(-self.noise, self.noise))
                self._push(now + rtt, ANSWER, node, (probe_id, peer, now))
        row = scheduler.row_update(now)
        if row is not None:
            self._publish(node, now, row)
        timer = scheduler.get_timer()
        if timer is not None:
            self.wake_version[node] += 1
            self._push(max(timer, now + 1e-6), WAKE, node, self.wake_version[node])

    def _publish(self, author: int, now: float, row: dict[int, float]) -> None:
        previous = self.pubs[author][-1] if self.pubs[author] else None
        version = 0 if previous is None else previous.version + (previous.row != row)
        arrivals = {s: now + (0.0 if s == author else self.delays[s][author]) for s in self.sources}
        self.pubs[author].append(Publication(now, version, row, arrivals))
        self.pub_log.append((now, envelope_size(row), self.edges_alive, self.nodes_alive - 1))

    # -- what a source knows -------------------------------------------------------------

    def view(
        self, source: int, at: float
    ) -> tuple[tuple[tuple[int, int], ...], dict[int, dict[int, float]]]:
        """The rows ``source`` holds at ``at``, and a signature of their content."""
        rows: dict[int, dict[int, float]] = {}
        sig: list[tuple[int, int]] = []
        for author, pubs in enumerate(self.pubs):
            if not pubs:
                continue
            i = len(pubs) - 1
            while i >= 0 and pubs[i].arrivals[source] > at:
                i -= 1
            if i < 0 or at >= pubs[i].time + LATENCY_TTL:
                continue
            rows[author] = pubs[i].row
            sig.append((author, pubs[i].version))
        return tuple(sig), rows

    def reroute(self, source: int, at: float, targets: list[int] | None = None) -> bool:
        """Re-ask the source's Router if its view changed; returns whether it did."""
        sig, rows = self.view(source, at)
        if sig == self.view_sig.get(source):
            return False
        self.view_sig[source] = sig
        router = self.routers[source]
        router.update(LinkGraph.from_rows(rows, order=order))
        if targets is None:
            targets = [t for t in range(len(self.d)) if t != source and self.alive[t]]
        for target in targets:
            self.routes[source][target] = router.route(target)
        return True

    def check_routes(self, at: float) -> None:
        self.run_until(at)
        for source in self.sources:
            if self.alive[source]:
                self.reroute(source, at)

    # -- failures ------------------------------------------------------------------------

    def kill(self, victim: int, at: float) -> None:
        self.run_until(at)
        self.alive[victim] = False
        self.killed_at[victim] = at
        self.nodes_alive -= 1
        self.edges_alive -= sum(1 for peer in self.adj[victim] if self.alive[peer])
        for peer in self.adj[victim]:
            if self.alive[peer]:
                self._push(at + PEER_TIMEOUT, CLOSE, peer, victim)
        self.delays = {s: gossip_delays(self.adj, self.d, self.alive, s) for s in self.sources}

    def cost(self, source: int, route: Route[int], target: int) -> float:
        path = [source, *route.hops, target]
        return sum(self.d[a][b] for a, b in itertools.pairwise(path))


def run_case(
    full: list[list[float]], n: int, kind: str, seed: int, max_sources: int, noise: float
) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(f"{seed}:{n}")
    hosts = sorted(rng.sample(range(len(full)), n)) if n < len(full) else list(range(len(full)))
    d = [[full[a][b] for b in hosts] for a in hosts]
    adj = build_mesh(d, kind, random.Random(f"{seed}:{n}:{kind}"))
    sources = sorted(rng.sample(range(n), min(n, max_sources)))
    sim = Simulation(d, adj, sources, seed, noise)

    # -- steady-state routes ------------------------------------------------------------
    snapshots: dict[float, dict[int, dict[int, tuple[int, ...]]]] = {}
    for at in CHECKS:
        sim.check_routes(at)
        snapshots[at] = {s: {t: r.hops for t, r in sim.routes[s].items()} for s in sources}
    pairs = direct = opt1 = optm = route_ms = 0.0
    stretch_mesh: list[float] = []
    stretch_1hop: list[float] = []
    stretch_talk: list[float] = []
    talk_ms = 0.0
    talk_better = 0
    no_route = better = 0
    pairs_n = 0
    for s in sources:
        reach = mesh_optimum(adj, d, s)
        ds = d[s]
        for t in range(n):
            if t == s:
                continue
            pairs_n += 1
            route = sim.routes[s][t]
            one_hop = min(map(operator.add, ds, [row[t] for row in d]))
            cost = sim.cost(s, route, t) if route.latency is not None else math.inf
            # talking: s opened a stream to t, which also dials t directly and measures it
            talk = min(cost, ds[t])
            talk_ms += talk
            talk_better += talk < ds[t]
            stretch_talk.append(max(talk, FLOOR_MS) / max(one_hop, FLOOR_MS))
            if route.latency is None:
                no_route += 1
                continue
            best = reach[t]
            better += cost < ds[t]
            pairs += 1
            direct += ds[t]
            opt1 += one_hop
            optm += best
            route_ms += cost
            stretch_mesh.append(max(cost, FLOOR_MS) / max(best, FLOOR_MS))
            stretch_1hop.append(max(cost, FLOOR_MS) / max(one_hop, FLOOR_MS))
    first, last = snapshots[CHECKS[1]], snapshots[CHECKS[2]]
    changed = sum(first[s].get(t) != hops for s in sources for t, hops in last[s].items())
    degrees = [len(a) for a in adj]
    quality = {
        "name": "routing_quality",
        "mesh": kind,
        "n": n,
        "sources": len(sources),
        "pairs": pairs_n,
        "mean_degree": round(statistics.mean(degrees), 2),
        "direct_mean_ms": round(direct / pairs, 1),
        "onehop_opt_mean_ms": round(opt1 / pairs, 1),
        "mesh_opt_mean_ms": round(optm / pairs, 1),
        "route_mean_ms": round(route_ms / pairs, 1),
        "talk_mean_ms": round(talk_ms / pairs_n, 1),
        "stretch_vs_mesh_opt_median": round(percentile(stretch_mesh, 50), 3),
        "stretch_vs_mesh_opt_p95": round(percentile(stretch_mesh, 95), 3),
        "stretch_vs_onehop_opt_median": round(percentile(stretch_1hop, 50), 3),
        "stretch_vs_onehop_opt_p95": round(percentile(stretch_1hop, 95), 3),
        "stretch_talk_vs_onehop_opt_median": round(percentile(stretch_talk, 50), 3),
        "stretch_talk_vs_onehop_opt_p95": round(percentile(stretch_talk, 95), 3),
        "share_talk_better_than_direct": round(talk_better / pairs_n, 4),
        "share_no_route": round(no_route / pairs_n, 4),
        "share_better_than_direct": round(better / pairs_n, 4),
        "share_routes_changed_60_to_200s": round(changed / pairs_n, 4),
    }

    # -- traffic ------------------------------------------------------------------------
    lo, hi = STEADY
    span = hi - lo
    probes = bisect.bisect_right(sim.probe_times, hi) - bisect.bisect_left(sim.probe_times, lo)
    window = [p for p in sim.pub_log if lo <= p[0] < hi]
    traffic = {
        "name": "routing_traffic",
        "mesh": kind,
        "n": n,
        "window_s": span,
        "probes_per_node_per_s": round(probes / n / span, 3),
        "probe_bytes_per_node_per_s": round(probes * sim.config.probe_size / n / span, 1),
        "rows_per_node_per_min": round(len(window) / n / span * 60, 2),
        "mean_envelope_bytes": round(statistics.mean(p[1] for p in window), 1) if window else 0,
        "gossip_bytes_per_node_per_s": round(sum(p[1] * p[2] for p in window) / n / span, 1),
        "gossip_tree_bytes_per_node_per_s": round(sum(p[1] * p[3] for p in window) / n / span, 1),
    }

    # -- failover -----------------------------------------------------------------------
    times: list[float] = []
    unresolved = went_unreachable = 0
    kills = []
    for kill_at in KILL_AT:
        sim.check_routes(kill_at)
        load: dict[int, int] = {}
        for s in sources:
            if sim.alive[s]:
                for t, route in sim.routes[s].items():
                    if sim.alive[t]:
                        for hop in route.hops:
                            load[hop] = load.get(hop, 0) + 1
        if not load:
            break
        victim = max(sorted(load), key=load.__getitem__)
        affected = {
            s: [
                t
                for t, r in sim.routes[s].items()
                if victim in r.hops and sim.alive[t] and t != victim
            ]
            for s in sources
            if sim.alive[s] and s != victim
        }
        sim.kill(victim, kill_at)
        sim.run_until(kill_at + HORIZON)
        kill_times: list[float] = []
        for s, targets in affected.items():
            pending = set(targets)
            if not pending:
                continue
            moments = sorted(
                p.arrivals[s]
                for pubs in sim.pubs
                for i, p in enumerate(pubs)
                if kill_at < p.arrivals[s] <= kill_at + HORIZON
                and (i == 0 or pubs[i - 1].version != p.version)
            )
            for at in moments:
                if not pending:
                    break
                if not sim.reroute(s, at, sorted(pending)):
                    continue
                for t in sorted(pending):
                    route = sim.routes[s][t]
                    if victim not in route.hops:
                        pending.discard(t)
                        kill_times.append(at - kill_at)
                        went_unreachable += route.latency is None
            unresolved += len(pending)
            sim.view_sig.pop(s, None)  # only some targets were re-asked: re-ask all next time
        times.extend(kill_times)
        kills.append(
            {
                "victim_load": load[victim],
                "affected": sum(len(t) for t in affected.values()),
                "all_avoid_s": round(max(kill_times), 2) if kill_times else None,
            }
        )
    failover = {
        "name": "routing_failover",
        "mesh": kind,
        "n": n,
        "kills": len(kills),
        "affected_routes": len(times) + unresolved,
        "median_s": round(percentile(times, 50), 2),
        "p95_s": round(percentile(times, 95), 2),
        "max_s": round(max(times), 2) if times else None,
        "not_within_horizon": unresolved,
        "became_unreachable": went_unreachable,
        "per_kill": kills,
    }
    elapsed = round(time.perf_counter() - started, 1)
    for result in (quality, traffic, failover):
        result["seconds"] = elapsed
    return {
        "results": [quality, traffic, failover],
        "stretch_mesh": stretch_mesh,
        "stretch_1hop": stretch_1hop,
        "stretch_talk": stretch_talk,
    }


def print_tables(results: list[dict[str, Any]]) -> None:
    by = {(r["name"], r["mesh"], r["n"]): r for r in results}
    cases = sorted({(r["mesh"], r["n"]) for r in results}, key=lambda c: (c[0] != "random", c[1]))
    print()
    print("route quality (RTT means in ms over pairs with a route; stretch = route / optimum)")
    head = (
        f"{'mesh':<12}{'N':>5}{'deg':>6}{'direct':>8}{'1hop*':>8}{'mesh*':>8}{'route':>8}"
        f"{'vs mesh* med/p95':>18}{'vs 1hop* med/p95':>18}{'<direct':>9}{'no route':>10}"
        f"{'changed':>9}{'talk':>7}{'talk/1hop* med/p95':>20}{'<direct':>9}"
    )
    print(head)
    for kind, n in cases:
        q = by["routing_quality", kind, n]
        print(
            f"{kind:<12}{n:>5}{q['mean_degree']:>6.1f}{q['direct_mean_ms']:>8.1f}"
            f"{q['onehop_opt_mean_ms']:>8.1f}{q['mesh_opt_mean_ms']:>8.1f}{q['route_mean_ms']:>8.1f}"
            f"{q['stretch_vs_mesh_opt_median']:>9.3f}/{q['stretch_vs_mesh_opt_p95']:<8.3f}"
            f"{q['stretch_vs_onehop_opt_median']:>9.3f}/{q['stretch_vs_onehop_opt_p95']:<8.3f}"
            f"{q['share_better_than_direct']:>9.1%}{q['share_no_route']:>10.1%}"
            f"{q['share_routes_changed_60_to_200s']:>9.1%}{q['talk_mean_ms']:>7.1f}"
            f"{q['stretch_talk_vs_onehop_opt_median']:>11.3f}/"
            f"{q['stretch_talk_vs_onehop_opt_p95']:<8.3f}{q['share_talk_better_than_direct']:>9.1%}"
        )
    print()
    print("failover after killing the busiest relay, and traffic per node in the steady state")
    print(
        f"{'mesh':<12}{'N':>5}{'routes':>8}{'median s':>10}{'p95 s':>8}{'max s':>8}"
        f"{'>60s':>6}{'probes/s':>10}{'probe B/s':>11}{'rows/min':>10}{'gossip B/s':>12}"
        f"{'tree B/s':>10}"
    )
    for kind, n in cases:
        f, t = by["routing_failover", kind, n], by["routing_traffic", kind, n]
        print(
            f"{kind:<12}{n:>5}{f['affected_routes']:>8}{f['median_s']:>10.2f}{f['p95_s']:>8.2f}"
            f"{f['max_s'] if f['max_s'] is not None else math.nan:>8.2f}"
            f"{f['not_within_horizon']:>6}{t['probes_per_node_per_s']:>10.3f}"
            f"{t['probe_bytes_per_node_per_s']:>11.1f}{t['rows_per_node_per_min']:>10.2f}"
            f"{t['gossip_bytes_per_node_per_s']:>12.1f}{t['gossip_tree_bytes_per_node_per_s']:>10.1f}"
        )
    print()
    print(
        "targets: stretch vs 1hop* median <= 1.05 and p95 <= 1.2. 1hop*: full-knowledge "
        "one-relay optimum (direct included); mesh*: best path over mesh links, <= 2 relays; "
        "talk: the route once the source talks to the target (direct link dialled and measured)."
    )


def plot(curves: dict[tuple[str, int], dict[str, list[float]]], out: Path) -> bool:
    try:
        import matplotlib  # optional: the benchmark runs without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return False
    kinds = sorted({kind for kind, _ in curves}, key=lambda k: k != "random")
    sizes = sorted({n for _, n in curves})
    colour = {n: f"C{i}" for i, n in enumerate(sizes)}
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for (k, n), data in sorted(curves.items()):
            if k != kind:
                continue
            names = {"stretch_1hop": "route vs 1hop*", "stretch_talk": "talking vs 1hop*"}
            for label, style in (("stretch_1hop", "-"), ("stretch_talk", "--")):
                values = sorted(data[label])
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                name = names[label]
                ax.step(values, ys, style, color=colour[n], where="post", label=f"N={n} {name}")
        ax.axvline(1.05, color="grey", linewidth=0.5)
        ax.axvline(1.2, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 4)
        ax.set_xticks([1, 1.2, 1.5, 2, 3, 4], ["1", "1.2", "1.5", "2", "3", "4"])
        ax.minorticks_off()
        ax.set_xlabel("stretch of crdtswarm's route (RTT / optimum)")
        ax.set_ylabel("share of pairs")
        ax.set_title(f"{kind} mesh, PlanetLab RTTs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    global HUBS, NEAR, TRIALS  # the latency mesh's knobs, read by latency_mesh
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[50, 100, 490])
    parser.add_argument("--mesh", nargs="+", default=["random", "near+random", "latency"])
    parser.add_argument("--sources", type=int, default=40, help="routing sources per swarm")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--noise", type=float, default=NOISE, help="probe noise share (0.05)")
    parser.add_argument("--data", type=Path, default=DATA, help="the RTT matrix (.tsv.gz)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--hubs", type=int, default=HUBS, help="latency mesh: relay hubs (16)")
    parser.add_argument("--near", type=int, default=NEAR, help="latency mesh: near peers (8)")
    parser.add_argument(
        "--trials", type=int, default=TRIALS, help="latency mesh: near candidates tried (16)"
    )
    args = parser.parse_args()
    HUBS, NEAR, TRIALS = args.hubs, args.near, args.trials
    if args.quick:
        args.nodes = [30]
    for kind in args.mesh:
        if kind not in ("random", "near+random", "latency"):
            parser.error(f"unknown mesh {kind!r}")
    full = load_matrix(args.data)
    for n in args.nodes:
        if not 2 <= n <= len(full):
            parser.error(f"--nodes must be within 2..{len(full)}")

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], dict[str, list[float]]] = {}
    for n in args.nodes:
        for kind in args.mesh:
            case = run_case(full, n, kind, args.seed, args.sources, args.noise)
            for result in case["results"]:
                results.append(result)
                print(json.dumps(result), flush=True)
            curves[kind, n] = {k: case[k] for k in ("stretch_mesh", "stretch_1hop", "stretch_talk")}
    print_tables(results)
    name = "routing-quick" if args.quick else "routing"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    meta = {
        "benchmark": "routing",
        "seed": args.seed,
        "nodes": args.nodes,
        "sources": args.sources,
        "noise": args.noise,
        "latency_mesh": {"hubs": HUBS, "near": NEAR, "trials": TRIALS},
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    if plot(curves, RESULTS / f"{name}.png"):
        print(f"wrote {(RESULTS / f'{name}.png').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
