import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.protocol.routing import LinkGraph
from crdtswarm.protocol.topology import elect_relays, near_candidates, nearest


def order(node: int) -> bytes:
    return node.to_bytes(4, "big")


def graph(edges: dict[tuple[int, int], float]) -> LinkGraph[int]:
    rows: dict[int, dict[int, float]] = {}
    for (a, b), weight in edges.items():
        rows.setdefault(a, {})[b] = weight
        rows.setdefault(b, {})[a] = weight
    return LinkGraph.from_rows(rows, order=order)


@st.composite
def edge_sets(draw: st.DrawFn) -> dict[tuple[int, int], float]:
    n = draw(st.integers(2, 8))
    edges: dict[tuple[int, int], float] = {}
    for a, b in itertools.combinations(range(n), 2):
        if draw(st.booleans()):
            edges[a, b] = float(draw(st.integers(0, 6)))
    return edges


def brute_scores(edges: dict[tuple[int, int], float]) -> dict[int, int]:
    weight = {**edges, **{(b, a): w for (a, b), w in edges.items()}}
    nodes = sorted({n for pair in edges for n in pair})
    scores: dict[int, int] = {}
    for s, t in itertools.combinations(nodes, 2):
        paths = [
            (weight[s, r] + weight[r, t], r)
            for r in nodes
            if r not in (s, t) and (s, r) in weight and (r, t) in weight
        ]
        if not paths:
            continue
        cost, relay = min(paths)
        if cost < weight.get((s, t), math.inf):
            scores[relay] = scores.get(relay, 0) + 1
    return scores


@settings(max_examples=300, deadline=None)
@given(edge_sets(), st.integers(0, 4))
def test_election_matches_brute_force(edges: dict[tuple[int, int], float], count: int) -> None:
    scores = brute_scores(edges)
    expected = sorted(scores, key=lambda n: (-scores[n], n))[:count]
    assert elect_relays(graph(edges), count) == expected


def star_with_tail() -> dict[tuple[int, int], float]:
    # 0 is a good relay between 1..4 (whose direct links are slow); 5 relays 6 and 7
    edges = {(0, n): 1.0 for n in range(1, 5)}
    edges.update(dict.fromkeys(itertools.combinations(range(1, 5), 2), 10.0))
    edges.update({(5, 6): 1.0, (5, 7): 1.0})
    return edges


def test_the_node_carrying_shortcuts_is_elected_and_ineligible_nodes_never_are() -> None:
    g = graph(star_with_tail())
    assert elect_relays(g, 1) == [0]
    assert elect_relays(g, 2) == [0, 5]
    assert elect_relays(g, 2, eligible=lambda n: n != 0) == [5]
    assert elect_relays(g, 0) == []


def test_an_incumbent_keeps_its_seat_unless_clearly_beaten() -> None:
    edges = star_with_tail()
    edges.update({(5, 8): 1.0, (5, 9): 1.0})  # 5 now carries 6 shortcuts, 0 carries 6
    edges[(0, 1)] = 2.0  # make 0 lose one... still 6: tie broken by key order
    g = graph(edges)
    scores = brute_scores(edges)
    assert scores[0] == scores[5]
    assert elect_relays(g, 1) == [0]
    assert elect_relays(g, 1, incumbents=[5]) == [5]  # a tie does not unseat 5
    edges.update({(5, 10): 1.0, (5, 11): 1.0, (5, 12): 1.0})  # 5 clearly ahead now
    assert elect_relays(graph(edges), 1, incumbents=[0]) == [5]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="count"):
        elect_relays(graph({}), -1)
    with pytest.raises(ValueError, match="keep_ratio"):
        elect_relays(graph({}), 1, keep_ratio=0)


def test_near_candidates_rank_members_by_landmark_vectors() -> None:
    # points on a line; landmarks at 0 and 100 measure everybody
    position = {10: 0.0, 11: 100.0, 1: 40.0, 2: 45.0, 3: 80.0, 4: 38.0, 5: 5.0}
    landmarks = [10, 11]
    rows = {m: {n: abs(position[m] - position[n]) for n in position if n != m} for m in landmarks}
    assert near_candidates(rows, 1, landmarks, 2) == [4, 2]
    assert near_candidates(rows, 1, landmarks, 2, exclude=[4]) == [2, 5]
    # nobody measured by the landmarks: no candidates rather than guesses
    assert near_candidates({}, 1, landmarks, 3) == []
    assert near_candidates(rows, 1, landmarks, 0) == []


def test_nearest_keeps_the_lowest_rtts() -> None:
    assert nearest({1: 0.3, 2: 0.1, 3: 0.2}, 2) == [2, 3]
    assert nearest({1: 0.3}, 0) == []
