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
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["LinkGraph", "ShortestPathTree"]

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
