import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.protocol.routing import (
    LinkGraph,
    Route,
    Router,
    RoutingConfig,
    best_path,
    best_paths,
)


def order(node: int) -> bytes:
    return node.to_bytes(4, "big")


def graph(rows: dict[int, dict[int, float]]) -> LinkGraph[int]:
    return LinkGraph.from_rows(rows, order=order)


@st.composite
def symmetric_rows(draw: st.DrawFn) -> dict[int, dict[int, float]]:
    n = draw(st.integers(1, 9))
    rows: dict[int, dict[int, float]] = {node: {} for node in range(n)}
    for a, b in itertools.combinations(range(n), 2):
        if draw(st.booleans()):
            weight = float(draw(st.integers(0, 5)))  # small range: many ties
            rows[a][b] = weight
            rows[b][a] = weight + draw(st.sampled_from([0.0, 0.0, 1.0]))  # asymmetric reports
    return rows


def brute_force(rows: dict[int, dict[int, float]]) -> dict[tuple[int, int], float]:
    nodes = list(rows)
    dist = {(a, b): 0.0 if a == b else math.inf for a in nodes for b in nodes}
    for a, row in rows.items():
        for b, weight in row.items():
            if a in rows.get(b, {}):
                dist[a, b] = min(dist[a, b], max(weight, rows[b][a]))
    for k, i, j in itertools.product(nodes, nodes, nodes):
        dist[i, j] = min(dist[i, j], dist[i, k] + dist[k, j])
    return dist


@settings(max_examples=300, deadline=None)
@given(symmetric_rows())
def test_tree_distances_match_brute_force(rows: dict[int, dict[int, float]]) -> None:
    g = graph(rows)
    expected = brute_force(rows)
    for root in rows:
        tree = g.tree(root)
        for node in rows:
            assert tree.distance(node) == expected[root, node]
            path = tree.path(node)
            if math.isinf(expected[root, node]):
                assert path == []
                assert node not in tree
                continue
            assert path[0] == root
            assert path[-1] == node
            # the path is made of real edges and its weight is the distance
            weight = sum(g.neighbours(a)[b] for a, b in itertools.pairwise(path))
            assert weight == expected[root, node]
            for child in tree.children(node):
                assert tree.parent(child) == node


@settings(max_examples=100, deadline=None)
@given(symmetric_rows(), st.randoms(use_true_random=False))
def test_trees_do_not_depend_on_row_order(
    rows: dict[int, dict[int, float]], rng: random.Random
) -> None:
    shuffled_nodes = list(rows)
    rng.shuffle(shuffled_nodes)
    shuffled = {}
    for node in shuffled_nodes:
        items = list(rows[node].items())
        rng.shuffle(items)
        shuffled[node] = dict(items)
    a, b = graph(rows), graph(shuffled)
    for root in rows:
        ta, tb = a.tree(root), b.tree(root)
        assert {n: ta.parent(n) for n in rows} == {n: tb.parent(n) for n in rows}


def test_an_edge_needs_both_ends() -> None:
    g = graph({1: {2: 0.01, 3: 0.01}, 2: {1: 0.02}, 3: {}})
    assert g.has_edge(1, 2)
    assert g.has_edge(2, 1)
    assert g.neighbours(1) == {2: 0.02}  # the larger report
    assert not g.has_edge(1, 3)  # 3 does not confirm it


def test_a_liar_cannot_shorten_other_peoples_links() -> None:
    honest = {1: {2: 0.1}, 2: {1: 0.1, 3: 0.1}, 3: {2: 0.1}}
    lying = {**honest, 4: {1: 0.0, 3: 0.0}}  # 4 claims zero-cost links to 1 and 3
    tree = graph(lying).tree(1)
    assert tree.path(3) == [1, 2, 3]
    assert 4 not in tree


def test_ties_go_to_the_smaller_key() -> None:
    rows = {0: {1: 1.0, 2: 1.0}, 1: {0: 1.0, 3: 1.0}, 2: {0: 1.0, 3: 1.0}, 3: {1: 1.0, 2: 1.0}}
    assert graph(rows).tree(0).parent(3) == 1


def test_unknown_root_has_a_tree_of_itself() -> None:
    tree = graph({1: {2: 1.0}, 2: {1: 1.0}}).tree(9)
    assert 9 in tree
    assert tree.children(9) == []
    assert tree.path(9) == [9]
    assert tree.parent(9) is None


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        graph({1: {2: -1.0}, 2: {1: 1.0}})
    with pytest.raises(ValueError, match="finite"):
        graph({1: {2: math.nan}, 2: {1: 1.0}})


def brute_best(rows: dict[int, dict[int, float]], source: int, target: int, max_relays: int):
    g = graph(rows)
    best = None
    others = [n for n in rows if n not in (source, target)]
    for count in range(max_relays + 1):
        for relays in itertools.permutations(others, count):
            path = [source, *relays, target]
            if not all(g.has_edge(a, b) for a, b in itertools.pairwise(path)):
                continue
            weight = sum(g.neighbours(a)[b] for a, b in itertools.pairwise(path))
            key = (weight, len(relays), tuple(order(r) for r in relays))
            if best is None or key < best[0]:
                best = (key, tuple(relays))
    return None if best is None else (best[1], best[0][0])


@settings(max_examples=300, deadline=None)
@given(symmetric_rows(), st.integers(0, 3), st.data())
def test_best_path_matches_brute_force(rows, max_relays, data) -> None:
    source = data.draw(st.sampled_from(sorted(rows)))
    target = data.draw(st.sampled_from(sorted(rows)))
    found = best_path(graph(rows), source, target, max_relays)
    if source == target:
        assert found == ((), 0.0)
        return
    expected = brute_best(rows, source, target, max_relays)
    assert found == expected


@settings(max_examples=300, deadline=None)
@given(symmetric_rows(), st.integers(0, 3), st.data())
def test_best_paths_to_every_target_match_brute_force(rows, max_relays, data) -> None:
    source = data.draw(st.sampled_from(sorted(rows)))
    found = best_paths(graph(rows), source, max_relays)
    for target in rows:
        if target != source:
            assert found.get(target) == brute_best(rows, source, target, max_relays)


def test_a_relay_is_used_only_when_clearly_better() -> None:
    me, far, relay = 1, 2, 3
    rows = {
        me: {far: 0.100, relay: 0.020},
        far: {me: 0.100, relay: 0.020},
        relay: {me: 0.020, far: 0.020},
    }
    router = Router(me, RoutingConfig(switch_margin=0.010, switch_ratio=0.9))
    router.update(graph(rows))
    assert router.route(far) == Route((relay,), 0.040)
    # the direct link improves a little: not enough to switch back
    rows[me][far] = rows[far][me] = 0.035
    router.update(graph(rows))
    assert router.route(far) == Route((relay,), 0.040)
    # ... then clearly: switch
    rows[me][far] = rows[far][me] = 0.010
    router.update(graph(rows))
    assert router.route(far) == Route((), 0.010)


def test_a_route_whose_link_died_is_replaced_at_once() -> None:
    me, far, r1, r2 = 1, 2, 3, 4
    rows = {
        me: {r1: 0.010, r2: 0.030},
        r1: {me: 0.010, far: 0.010},
        r2: {me: 0.030, far: 0.030},
        far: {r1: 0.010, r2: 0.030},
    }
    router = Router(me)
    router.update(graph(rows))
    assert router.route(far) == Route((r1,), 0.020)
    del rows[r1]  # r1's row expired: its links are gone
    router.update(graph(rows))
    assert router.route(far) == Route((r2,), 0.060)
    del rows[r2]
    router.update(graph(rows))
    assert router.route(far) == Route((), None)


def test_relays_are_bounded() -> None:
    chain = {i: {} for i in range(6)}
    for a in range(5):
        chain[a][a + 1] = chain[a + 1][a] = 0.001
    g = graph(chain)
    assert best_path(g, 0, 3, max_relays=2) == ((1, 2), 0.003)
    assert best_path(g, 0, 4, max_relays=2) is None
    router = Router(0, RoutingConfig(max_relays=3))
    router.update(g)
    assert router.route(4).hops == (1, 2, 3)
    assert router.route(0) == Route((), 0.0)
    with pytest.raises(ValueError, match="max_relays"):
        RoutingConfig(max_relays=-1)
