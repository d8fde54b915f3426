"""Whom to link to for short routes: elected relay hubs and near peers (sans-IO).

On the Internet the direct path is often not the shortest: in a real PlanetLab
matrix some one-relay path beats the direct one for 79 % of pairs. A random mesh
rarely holds those relays, so crdtswarm's optional *latency mesh*
(``MeshConfig(relay_hubs=..., near_peers=...)``) adds two kinds of links to the
random ones, both chosen from the latency rows every member publishes:

* **Relay hubs** ("super nodes"): `elect_relays` counts, for every pair of nodes
  with a common neighbour in the `LinkGraph`, which node carries the cheapest
  one-relay path between them when that path beats their own link (or they have
  none), and elects the ``count`` nodes with the most such shortcuts. Every node
  links to the hubs, so any two nodes have many candidate relays whose both legs
  are measured. Incumbents keep their seat unless a challenger carries clearly
  more (``keep_ratio``), so the hubs do not churn on noise; every node holding the
  same rows elects the same hubs (ties go to the smaller key).
* **Near peers**: hubs are linked to everybody, so their rows hold an RTT to every
  member: a *landmark vector* per member. `near_candidates` ranks the members
  whose vector is closest to ours (mean absolute difference), which are likely,
  not surely, near; the mesh dials them one at a time, measures the link, and
  keeps the ``near_peers`` lowest-RTT ones (`nearest`).

Costs: O(sum of squared degrees) for an election (hubs have degree ~N: O(h N^2)),
O(N h) for the candidates. Both are pure functions of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from crdtswarm.protocol.routing import LinkGraph

__all__ = ["elect_relays", "near_candidates", "nearest"]

Node = TypeVar("Node", bound=Hashable)


def elect_relays(
    graph: LinkGraph[Node],
    count: int,
    *,
    incumbents: Iterable[Node] = (),
    keep_ratio: float = 0.8,
    eligible: Callable[[Node], bool] | None = None,
) -> list[Node]:
    """The ``count`` nodes carrying the most one-relay shortcuts in ``graph``.

    For every unordered pair ``{s, t}`` with a common neighbour, the cheapest
    ``s - r - t`` path (ties: the smaller ``r`` in key order) scores one point for
    ``r`` when it is cheaper than the ``s -- t`` link or there is no such link.
    The result is sorted by score (then key order). An incumbent stays elected
    while its score is at least ``keep_ratio`` times the score of the best
    non-elected challenger it would otherwise lose its seat to.

    Args:
        graph: the link graph (edges both ends report).
        count: how many hubs to elect (0 returns an empty list).
        incumbents: the hubs elected last time, if any.
        keep_ratio: an incumbent keeps its seat against a challenger scoring up to
            ``1 / keep_ratio`` times as much (default 0.8).
        eligible: nodes for which this returns False are never elected (for
            example members that refuse to relay).

    Raises:
        ValueError: if ``count`` < 0 or ``keep_ratio`` is not in (0, 1].
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if count == 0:
        return []
    previous = list(incumbents)
    adjacent, order = graph._adjacent, graph._order
    # best[(s, t)] with s < t in key order: (cost, relay key, relay)
    best: dict[tuple[Node, Node], tuple[float, bytes, Node]] = {}
    for relay, edges in adjacent.items():
        relay_order = order.get(relay, b"")
        ranked = sorted(edges.items(), key=lambda item: order.get(item[0], b""))
        for i, (s, ws) in enumerate(ranked):
            for t, wt in ranked[i + 1 :]:
                candidate = (ws + wt, relay_order, relay)
                pair = (s, t)
                current = best.get(pair)
                if current is None or candidate[:2] < current[:2]:
                    best[pair] = candidate
    score: dict[Node, int] = {}
    for (s, t), (cost, _, relay) in best.items():
        direct = adjacent.get(s, {}).get(t, math.inf)
        if cost < direct:
            score[relay] = score.get(relay, 0) + 1
    allowed = [n for n in score if eligible is None or eligible(n)]
    allowed.sort(key=lambda n: (-score[n], order.get(n, b"")))
    elected = allowed[:count]
    kept = [n for n in previous if n not in elected and n in allowed]
    for incumbent in sorted(kept, key=lambda n: (-score[n], order.get(n, b""))):
        # the weakest newcomer that took a seat from an incumbent
        newcomers = [n for n in elected if n not in previous]
        if not newcomers:
            break
        weakest = newcomers[-1]
        if score[incumbent] >= keep_ratio * score[weakest]:
            elected[elected.index(weakest)] = incumbent
    elected.sort(key=lambda n: (-score[n], order.get(n, b"")))
    return elected


def near_candidates(
    rows: Mapping[Node, Mapping[Node, float]],
    me: Node,
    landmarks: Iterable[Node],
    count: int,
    *,
    exclude: Iterable[Node] = (),
    min_common: int = 2,
) -> list[Node]:
    """Up to ``count`` members whose landmark vectors are closest to ``me``'s.

    A member's vector holds its RTT to each landmark, read from the landmark's row
    (or the member's own row when the landmark's lacks it). The distance between
    two vectors is the mean absolute difference over the landmarks both have
    (at least ``min_common``); landmarks themselves and ``exclude`` are skipped.
    Ties go to the smaller distance, then to iteration order of ``rows``.
    """
    if count <= 0:
        return []
    marks = [m for m in landmarks if m != me]

    def vector(node: Node) -> dict[Node, float]:
        out: dict[Node, float] = {}
        for mark in marks:
            figure = rows.get(mark, {}).get(node)
            if figure is None:
                figure = rows.get(node, {}).get(mark)
            if figure is not None:
                out[mark] = figure
        return out

    mine = vector(me)
    if len(mine) < min_common:
        return []
    skip = {me, *marks, *exclude}
    members: dict[Node, None] = dict.fromkeys(rows)  # insertion order: deterministic
    for row in rows.values():
        members.update(dict.fromkeys(row))
    scored: list[tuple[float, int, Node]] = []
    for index, node in enumerate(n for n in members if n not in skip):
        theirs = vector(node)
        common = [m for m in mine if m in theirs]
        if len(common) < min_common:
            continue
        distance = sum(abs(mine[m] - theirs[m]) for m in common) / len(common)
        scored.append((distance, index, node))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [node for _, _, node in scored[:count]]


def nearest(measured: Mapping[Node, float], count: int) -> list[Node]:
    """The ``count`` entries of ``measured`` (node -> RTT) with the smallest RTT."""
    ranked = sorted(measured.items(), key=lambda item: item[1])
    return [node for node, _ in ranked[: max(count, 0)]]
