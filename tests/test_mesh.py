"""The mesh policy (crdtswarm/mesh.py): whom to dial, with explicit time."""

from __future__ import annotations

import random

from crdtswarm.identity import Identity, PublicKey
from crdtswarm.mesh import MeshConfig, MeshPolicy


def keys(n: int) -> list[PublicKey]:
    return [Identity(bytes([i + 1]) * 32).public_key for i in range(n)]


def test_full_mesh_up_to_max_peers() -> None:
    me, *others = keys(6)
    policy = MeshPolicy(me, MeshConfig(max_peers=8, max_concurrent_dials=10), random.Random(1))
    chosen = policy.plan(0.0, [me, *others], linked=[])
    assert sorted(chosen) == sorted(others)
    assert me not in chosen
    assert policy.plan(0.0, [me, *others], linked=[]) == []  # all being dialled


def test_partial_mesh_beyond_max_peers() -> None:
    me, *others = keys(30)
    policy = MeshPolicy(me, MeshConfig(max_peers=8, max_concurrent_dials=8), random.Random(2))
    linked = others[:5]
    chosen = policy.plan(0.0, others, linked=linked)
    assert len(chosen) == 3
    assert not set(chosen) & set(linked)


def test_concurrent_dials_are_capped() -> None:
    me, *others = keys(20)
    policy = MeshPolicy(me, MeshConfig(max_peers=8, max_concurrent_dials=2), random.Random(3))
    first = policy.plan(0.0, others, linked=[])
    assert len(first) == 2
    assert policy.plan(0.0, others, linked=[]) == []
    policy.dial_succeeded(first[0])
    assert len(policy.plan(0.0, others, linked=[first[0]])) == 1


def test_failed_members_back_off_exponentially() -> None:
    me, other = keys(2)
    config = MeshConfig(retry_interval=1.0, max_retry_interval=8.0)
    policy = MeshPolicy(me, config, random.Random(4))
    now = 0.0
    for interval in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert policy.plan(now, [other], linked=[]) == [other]
        policy.dial_failed(other, now)
        # jittered to [0.5, 1.5) x the interval: never sooner, never much later
        assert policy.plan(now + 0.5 * interval - 0.01, [other], linked=[]) == []
        now += 1.5 * interval
    policy.forget([other])  # it left the directory: a newcomer is tried at once
    assert policy.plan(now, [other], linked=[]) == [other]
    policy.dial_succeeded(other)
    assert policy.plan(now, [other], linked=[other]) == []


def test_same_seed_same_choices() -> None:
    me, *others = keys(40)
    a = MeshPolicy(me, MeshConfig(), random.Random(7)).plan(0.0, others, linked=[])
    b = MeshPolicy(me, MeshConfig(), random.Random(7)).plan(0.0, others, linked=[])
    assert a == b


def test_a_full_node_dials_one_more_member_now_and_then() -> None:
    me, *others = keys(10)
    config = MeshConfig(max_peers=3, shuffle_interval=30.0)
    policy = MeshPolicy(me, config, random.Random(4))
    linked = others[:3]
    assert policy.plan(0.0, others, linked=linked) == []
    assert policy.plan(29.0, others, linked=linked) == []
    (extra,) = policy.plan(30.0, others, linked=linked)  # joins up split groups
    assert extra not in linked
    policy.dial_succeeded(extra)
    assert policy.plan(31.0, others, linked=[*linked, extra]) == []
    assert len(policy.plan(60.0, others, linked=[*linked, extra])) == 1
    off = MeshPolicy(me, MeshConfig(max_peers=3, shuffle_interval=0.0), random.Random(4))
    assert off.plan(0.0, others, linked=linked) == off.plan(1000.0, others, linked=linked) == []


def test_may_dial_follows_the_backoff() -> None:
    me, other = keys(2)
    policy = MeshPolicy(me, MeshConfig(retry_interval=1.0), random.Random(1))
    assert policy.may_dial(other, now=0.0)
    policy.dial_failed(other, now=0.0)
    assert not policy.may_dial(other, now=0.0)
    assert policy.may_dial(other, now=2.0)  # backoff: 1 s * (0.5 to 1.5)
    policy.dial_succeeded(other)
    assert policy.may_dial(other, now=0.0)


def test_preferred_members_are_dialled_first_beyond_max_peers() -> None:
    me, *others = keys(12)
    hubs = others[:2]
    policy = MeshPolicy(me, MeshConfig(max_peers=3, max_concurrent_dials=10), random.Random(1))
    linked = others[2:5]  # max_peers random links already
    assert policy.plan(0.0, [me, *others], linked=linked) == []
    chosen = policy.plan(0.0, [me, *others], linked=linked, preferred=hubs)
    assert chosen == hubs  # the hubs, and no random link beyond max_peers
