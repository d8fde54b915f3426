"""The swarm's link graph, built from the latency rows every node publishes (sans-IO).

Each node publishes, in the directory, a *row*: the peers it has a direct link to
and the round-trip time it measured to each. `LinkGraph` turns the rows into an
undirected weighted graph, and `LinkGraph.tree` computes shortest-path trees from it.

Rules:

1. An edge needs both ends. ``a -- b`` is in the graph only when ``a``'s row lists
   ``b`` and ``b``'s row lists ``a``; its weight is the larger of the two figures. A
   member that lies about links it does not have adds no edge and cannot make an
   edge between two others look shorter.
2. Determinism. Every node that holds the same rows computes the same graph and the
   same trees: Dijkstra breaks ties between equal distances by the smaller key
   (bytes order), so there is exactly one tree per root for a given set of rows.
3. Bounds. Weights are finite and >= 0 (rows are quantised to 1 ms by the
   directory); a row of ``n`` peers costs O(n); a tree costs O(E log V) and is
   cached per root until the graph is replaced (graphs are immutable).

The document replicator uses the trees to send each update once to every node, along
the shortest-path tree rooted at the node the update came from (link-state
multicast, as MOSPF does), instead of flooding it over every link.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "LinkGraph",
    "Route",
    "Router",
    "RoutingConfig",
    "ShortestPathTree",
    "best_path",
    "best_paths",
]

Node = TypeVar("Node", bound=Hashable)


class ShortestPathTree(Generic[Node]):
    """The shortest-path tree of a `LinkGraph` from one root (see `LinkGraph.tree`)."""

    __slots__ = ("_children", "_distance", "_parent", "root")

    def __init__(
        self,
        root: Node,
        parent: dict[Node, Node],
        distance: dict[Node, float],
    ) -> None:
        self.root = root
        self._parent = parent
        self._distance = distance
        self._children: dict[Node, list[Node]] = {}
        for child, up in parent.items():
            self._children.setdefault(up, []).append(child)

    def __contains__(self, node: object) -> bool:
        return node in self._distance

    def parent(self, node: Node) -> Node | None:
        """The next node towards the root (None for the root or a node not in the tree)."""
        return self._parent.get(node)

    def children(self, node: Node) -> list[Node]:
        """The nodes whose parent is ``node`` (empty for a leaf or a node not in the tree)."""
        return list(self._children.get(node, ()))

    def distance(self, node: Node) -> float:
        """The path weight from the root to ``node`` (``math.inf`` when unreachable)."""
        return self._distance.get(node, math.inf)

    def path(self, node: Node) -> list[Node]:
        """The nodes from the root to ``node``, both included (empty when unreachable)."""
        if node not in self._distance:
            return []
        path = [node]
        while (up := self._parent.get(path[-1])) is not None:
            path.append(up)
        path.reverse()
        return path


class LinkGraph(Generic[Node]):
    """An immutable undirected graph of the links both ends report (see the module rules)."""

    __slots__ = ("_adjacent", "_order", "_trees")

    def __init__(
        self,
        adjacent: Mapping[Node, Mapping[Node, float]],
        order: Callable[[Node], bytes] = bytes,  # type: ignore[assignment]
    ) -> None:
        self._adjacent = {node: dict(edges) for node, edges in adjacent.items()}
        self._order = {node: order(node) for node in self._adjacent}
        self._trees: dict[Node, ShortestPathTree[Node]] = {}

    @classmethod
    def from_rows(
        cls,
        rows: Mapping[Node, Mapping[Node, float]],
        order: Callable[[Node], bytes] = bytes,  # type: ignore[assignment]
    ) -> LinkGraph[Node]:
        """The graph of the edges that both ends list in their rows (rule 1).

        Args:
            rows: author -> peer -> weight (for example, round-trip seconds).
            order: the bytes that order nodes for tie-breaking (default: ``bytes``).

        Raises:
            ValueError: if a weight is negative or not finite.
        """
        adjacent: dict[Node, dict[Node, float]] = {}
        for author, row in rows.items():
            for peer, weight in row.items():
                if not (math.isfinite(weight) and weight >= 0):
                    raise ValueError(f"link weights are finite and >= 0, got {weight!r}")
                back = rows.get(peer, {}).get(author)
                if back is None or peer == author:
                    continue
                adjacent.setdefault(author, {})[peer] = max(weight, back)
        return cls(adjacent, order)

    def __contains__(self, node: object) -> bool:
        return node in self._adjacent

    def __len__(self) -> int:
        return len(self._adjacent)

    def nodes(self) -> list[Node]:
        """Every node with at least one edge."""
        return list(self._adjacent)

    def neighbours(self, node: Node) -> dict[Node, float]:
        """The nodes linked to ``node`` and the weight of each link (empty when unknown)."""
        return dict(self._adjacent.get(node, {}))

    def has_edge(self, a: Node, b: Node) -> bool:
        """Whether both ``a`` and ``b`` report their link."""
        return b in self._adjacent.get(a, {})

    def tree(self, root: Node) -> ShortestPathTree[Node]:
        """The shortest-path tree from ``root`` (cached; ties broken by key order)."""
        cached = self._trees.get(root)
        if cached is not None:
            return cached
        order = self._order
        distance: dict[Node, float] = {}
        parent: dict[Node, Node] = {}
        # entries: (distance, tie-break of node, tie-break of parent, node, parent)
        heap: list[tuple[float, bytes, bytes, Node, Node | None]] = [
            (0.0, order.get(root, b""), b"", root, None)
        ]
        while heap:
            dist, _, _, node, up = heapq.heappop(heap)
            if node in distance:
                continue
            distance[node] = dist
            if up is not None:
                parent[node] = up
            here = order.get(node, b"")
            for neighbour, weight in self._adjacent.get(node, {}).items():
                if neighbour not in distance:
                    entry = (dist + weight, order.get(neighbour, b""), here, neighbour, node)
                    heapq.heappush(heap, entry)
        tree = self._trees[root] = ShortestPathTree(root, parent, distance)
        return tree


@dataclass(frozen=True, slots=True)
class Route(Generic[Node]):
    """A path to a node: the relays to go through, and what the path is expected to cost."""

    hops: tuple[Node, ...]
    """The relays in order, empty for a direct path."""
    latency: float | None
    """Expected round-trip time in seconds along the path; None when unreachable."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingConfig:
    """How routes are chosen (see `Router`)."""

    max_relays: int = 2
    """Most relays a path may go through (2)."""
    switch_margin: float = 0.010
    """Seconds of round trip a new path must save before we switch to it (10 ms)."""
    switch_ratio: float = 0.9
    """A new path must also cost at most this fraction of the current one (0.9)."""

    def __post_init__(self) -> None:
        if self.max_relays < 0:
            raise ValueError(f"max_relays must be >= 0, got {self.max_relays}")
        if self.switch_margin < 0 or not 0 < self.switch_ratio <= 1:
            raise ValueError("switch_margin must be >= 0 and switch_ratio in (0, 1]")


def best_path(
    graph: LinkGraph[Node], source: Node, target: Node, max_relays: int
) -> tuple[tuple[Node, ...], float] | None:
    """The cheapest path from ``source`` to ``target`` through at most ``max_relays`` relays.

    Returns the relays in order and the path's weight, or None when no such path
    exists. Ties go to fewer relays, then to the smaller keys (bytes order), so the
    answer is deterministic. Bellman-Ford bounded to ``max_relays + 1`` edges:
    O((max_relays + 1) * E) (see `best_paths`, which answers for every target at once).
    """
    if source == target:
        return (), 0.0
    return best_paths(graph, source, max_relays).get(target)


def best_paths(
    graph: LinkGraph[Node], source: Node, max_relays: int
) -> dict[Node, tuple[tuple[Node, ...], float]]:
    """`best_path` from ``source`` to every node it can reach, in one pass.

    The same bounded Bellman-Ford and the same tie-breaking as `best_path`; the
    answer for each target equals ``best_path(graph, source, target, max_relays)``.
    O((max_relays + 1) * E) for all targets at once.
    """
    adjacent, order = graph._adjacent, graph._order

    def rank(weight: float, relays: tuple[Node, ...]) -> tuple[float, int, tuple[bytes, ...]]:
        return weight, len(relays), tuple(order.get(r, b"") for r in relays)

    best: dict[Node, tuple[float, tuple[Node, ...]]] = {source: (0.0, ())}
    for _ in range(max_relays + 1):
        following = dict(best)
        for node, (weight, before) in best.items():
            through = (*before, node) if node != source else ()
            for neighbour, edge in adjacent.get(node, {}).items():
                if neighbour == source or neighbour in through:
                    continue
                total = weight + edge
                current = following.get(neighbour)
                if (
                    current is None
                    or total < current[0]
                    or (total == current[0] and rank(total, through) < rank(*current))
                ):
                    following[neighbour] = (total, through)
        best = following
    del best[source]
    return {node: (relays, weight) for node, (weight, relays) in best.items()}


class Router(Generic[Node]):
    """Routes from one node to every other, with hysteresis (sans-IO).

    `update` takes a new `LinkGraph`; `route` answers from it. A route in use is
    kept while all its links are still in the graph, unless a new path saves both
    ``switch_margin`` seconds and a ``switch_ratio`` share of its cost (like iroh's
    and Tailscale's path rules), so routes do not flap on measurement noise. A route
    whose link disappeared (expired row, dead link) is replaced at once.
    """

    def __init__(self, me: Node, config: RoutingConfig | None = None) -> None:
        self._me = me
        self._config = config or RoutingConfig()
        self._graph: LinkGraph[Node] = LinkGraph({})
        self._paths: dict[Node, tuple[tuple[Node, ...], float]] | None = None
        self._routes: dict[Node, Route[Node]] = {}

    @property
    def config(self) -> RoutingConfig:
        """The routing rules."""
        return self._config

    def update(self, graph: LinkGraph[Node]) -> None:
        """Use ``graph`` from now on (routes are re-evaluated on their next `route`)."""
        self._graph = graph
        self._paths = None  # all best paths, computed at the first `route` on this graph

    def route(self, target: Node) -> Route[Node]:
        """The route to ``target``: kept, switched or dropped per the class rules."""
        if target == self._me:
            return Route((), 0.0)
        if self._paths is None:
            self._paths = best_paths(self._graph, self._me, self._config.max_relays)
        found = self._paths.get(target)
        current = self._routes.get(target)
        current_cost = self._cost(current, target) if current is not None else None
        if found is None:
            self._routes.pop(target, None)
            return Route((), None)
        hops, cost = found
        if current is not None and current_cost is not None and current.hops != hops:
            margin, ratio = self._config.switch_margin, self._config.switch_ratio
            if not (cost <= current_cost - margin and cost <= current_cost * ratio):
                route = Route(current.hops, current_cost)  # not clearly better: stay
                self._routes[target] = route
                return route
        route = self._routes[target] = Route(hops, cost)
        return route

    def _cost(self, route: Route[Node], target: Node) -> float | None:
        """The cost of ``route`` in the current graph; None when a link of it is gone."""
        path = [self._me, *route.hops, target]
        total = 0.0
        for a, b in itertools.pairwise(path):
            weight = self._graph._adjacent.get(a, {}).get(b)
            if weight is None:
                return None
            total += weight
        return total
