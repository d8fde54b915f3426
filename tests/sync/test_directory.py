"""The signed membership directory over plain pycrdt docs, with a simulated clock.

Docs exchange updates directly (``get_update(state)`` / ``apply_update``); hostile
members are modelled by writing to a doc behind the directory's back.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crdtswarm.identity import Identity, PublicKey
from crdtswarm.protocol.wire import encode_uvarint, encode_var_bytes, encode_var_string
from crdtswarm.sync.directory import (
    DOC_NAME,
    Directory,
    DirectoryConfig,
    MemberJoined,
    MemberLeft,
)

T0 = 1_700_000_000.0
HEADER = struct.Struct(">BB32sQQQ")
CONTEXT = b"crdtswarm-directory-v1:"
MEMBER, SIGNAL, LATENCY = 1, 2, 3


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def identity(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


class Node:
    def __init__(self, ident: Identity, clock: Clock, config: DirectoryConfig | None = None):
        self.identity = ident
        self.key = ident.public_key
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.directory = Directory(self.doc, ident, config=config, clock=clock)


def nodes(count: int, clock: Clock, config: DirectoryConfig | None = None) -> list[Node]:
    return [Node(identity(i + 1), clock, config) for i in range(count)]


def send(src: pycrdt.Doc[Any], dst: pycrdt.Doc[Any]) -> None:
    dst.apply_update(src.get_update(dst.get_state()))


def exchange(*docs: pycrdt.Doc[Any]) -> None:
    for src in docs:
        for dst in docs:
            if src is not dst:
                send(src, dst)


def root(doc: pycrdt.Doc[Any]) -> pycrdt.Map[Any]:
    return doc.get("entries", type=pycrdt.Map)


def envelopes(doc: pycrdt.Doc[Any], author: PublicKey) -> list[bytes]:
    value = root(doc).get(str(author))
    if not isinstance(value, pycrdt.Array):
        return []
    return [bytes(item) for item in value.to_py() or [] if isinstance(item, bytearray)]


def all_items(doc: pycrdt.Doc[Any]) -> int:
    return sum(len(v) for v in root(doc).values() if isinstance(v, pycrdt.Array))


def put(doc: pycrdt.Doc[Any], key: str, *items: Any) -> None:
    """A hostile write: append ``items`` to the container ``key`` (created if need be)."""
    with doc.transaction():
        container = root(doc).get(key)
        if isinstance(container, pycrdt.Array):
            container.extend(list(items))
        else:
            root(doc)[key] = pycrdt.Array(list(items))


def seal(
    signer: Identity,
    kind: int,
    seq: int,
    issued: float,
    expires: float,
    payload: bytes,
    *,
    author: PublicKey | None = None,
    version: int = 1,
) -> bytes:
    """An envelope built from the layout documented in the module docstring."""
    who = bytes(author or signer.public_key)
    body = HEADER.pack(version, kind, who, seq, round(issued * 1000), round(expires * 1000))
    body += payload
    return body + signer.sign(CONTEXT + body)


def member_payload(addresses: tuple[str, ...], transports: tuple[str, ...] = ("tcp",)) -> bytes:
    parts = [encode_uvarint(len(addresses)), *map(encode_var_string, addresses)]
    parts += [encode_uvarint(len(transports)), *map(encode_var_string, transports)]
    return b"".join(parts)


def addresses_seen(node: Node) -> dict[PublicKey, tuple[str, ...]]:
    return {key: member.addresses for key, member in node.directory.members.items()}


# -- members -------------------------------------------------------------------------------


def test_members_replicate_across_docs() -> None:
    clock = Clock()
    a, b, c = nodes(3, clock)
    for i, node in enumerate((a, b, c)):
        node.directory.publish_member([f"tcp://10.0.0.{i}:4242"], ["tcp", "webrtc"])
    exchange(a.doc, b.doc, c.doc)
    for node in (a, b, c):
        node.directory.refresh()
        members = node.directory.members
        assert set(members) == {a.key, b.key, c.key}
        assert members[b.key].addresses == ("tcp://10.0.0.1:4242",)
        assert members[b.key].transports == ("tcp", "webrtc")
        assert members[b.key].expires_at == pytest.approx(T0 + 600)
    assert Directory.DOC_NAME == DOC_NAME == "crdtswarm/directory"


def test_first_seen_last_seen_and_refresh() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    assert b.directory.is_dirty
    assert b.directory.members == {}  # nothing is read until refresh
    assert b.directory.refresh() == [MemberJoined(public_key=a.key)]
    assert not b.directory.is_dirty
    first = b.directory.members[a.key]
    clock.now += 100
    a.directory.publish_member(["tcp://a:2"], ["tcp"])
    assert not a.directory.is_dirty  # our own writes leave the cache up to date
    send(a.doc, b.doc)
    assert b.directory.refresh() == []  # a refresh is not a join
    second = b.directory.members[a.key]
    assert second.first_seen == first.first_seen == T0
    assert second.last_seen == T0 + 100
    assert second.expires_at == T0 + 700
    assert second.seq > first.seq
    assert second.addresses == ("tcp://a:2",)
    assert envelopes(b.doc, a.key) == envelopes(a.doc, a.key)
    assert len(envelopes(a.doc, a.key)) == 1  # the superseded entry was deleted


def test_member_joined_once_per_member_and_never_for_ourselves() -> None:
    clock = Clock()
    a, b, c = nodes(3, clock)
    events: list[Any] = []
    for _ in range(5):
        for node in (a, b, c):
            node.directory.publish_member(["tcp://x:1"], ["tcp"])
        exchange(a.doc, b.doc, c.doc)
        events += a.directory.refresh()
        clock.now += 30
    assert sorted(events, key=lambda e: e.public_key) == sorted(
        [MemberJoined(public_key=b.key), MemberJoined(public_key=c.key)],
        key=lambda e: e.public_key,
    )
    assert a.key in a.directory.members  # ourselves: a member, but no event


def test_events_found_by_maintain_are_returned_by_the_next_refresh() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    b.directory.maintain()
    assert b.directory.refresh() == [MemberJoined(public_key=a.key)]
    assert b.directory.refresh() == []


def test_leave_is_seen_as_member_left_and_publish_rejoins() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    b.directory.refresh()
    clock.now += 10
    a.directory.leave()
    assert a.key not in a.directory.members
    send(a.doc, b.doc)
    assert b.directory.refresh() == [MemberLeft(public_key=a.key)]
    assert b.directory.members == {}
    clock.now += 10
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    assert b.directory.refresh() == [MemberJoined(public_key=a.key)]
    assert b.directory.members[a.key].first_seen == T0 + 20  # a new membership


def test_expired_members_leave_and_are_collected() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    b.directory.refresh()
    clock.now += 600  # exactly at expires_at: no longer valid
    assert b.directory.members == {}
    assert b.directory.refresh() == [MemberLeft(public_key=a.key)]
    report = b.directory.maintain()
    assert report.removed == 0  # kept for collect_delay, so that leaves propagate
    late = Node(identity(9), clock)
    send(b.doc, late.doc)
    assert late.directory.refresh() == []  # an expired entry is never reported
    clock.now += 60
    report = b.directory.maintain()
    assert report.removed >= 1
    assert report.entries == 0
    assert str(a.key) not in root(b.doc)  # the author's container went too


# -- attacks ---------------------------------------------------------------------------------


def test_forged_signature_is_ignored_and_collected() -> None:
    clock = Clock()
    victim, reader, attacker = nodes(3, clock)
    victim.directory.publish_member(["tcp://victim:1"], ["tcp"])
    send(victim.doc, reader.doc)
    reader.directory.refresh()
    forged = seal(attacker.identity, MEMBER, 2**62, T0, T0 + 600, member_payload(("tcp://evil:1",)))
    forged = forged[:2] + bytes(victim.key) + forged[34:]  # claims to be the victim
    flipped = bytearray(envelopes(victim.doc, victim.key)[0])
    flipped[-1] ^= 1
    put(reader.doc, str(victim.key), forged, bytes(flipped))
    assert reader.directory.refresh() == []
    assert addresses_seen(reader)[victim.key] == ("tcp://victim:1",)
    assert reader.directory.statistics().rejected == 1  # the copy is dropped unverified: seq
    report = reader.directory.maintain()
    assert report.removed == 2
    assert envelopes(reader.doc, victim.key) == envelopes(victim.doc, victim.key)


def test_entries_under_another_members_key_are_ignored() -> None:
    clock = Clock()
    victim, reader, attacker = nodes(3, clock)
    victim.directory.publish_member(["tcp://victim:1"], ["tcp"])
    send(victim.doc, reader.doc)
    reader.directory.refresh()
    # the attacker's own, validly signed entry, written into the victim's container
    own = seal(attacker.identity, MEMBER, 2**62, T0, T0 + 600, member_payload(("tcp://evil",)))
    put(reader.doc, str(victim.key), own)
    # and the victim's genuine entry copied into the attacker's container
    put(reader.doc, str(attacker.key), envelopes(victim.doc, victim.key)[0])
    reader.directory.refresh()
    assert set(reader.directory.members) == {victim.key}
    assert addresses_seen(reader)[victim.key] == ("tcp://victim:1",)
    reader.directory.maintain()
    assert envelopes(reader.doc, victim.key) == envelopes(victim.doc, victim.key)
    assert str(attacker.key) not in root(reader.doc)


@pytest.mark.parametrize("attack", ["delete", "overwrite_bytes", "overwrite_array", "wipe"])
def test_overwriting_or_deleting_a_victims_entry_changes_nothing_read(attack: str) -> None:
    clock = Clock()
    victim, reader, attacker = nodes(3, clock)
    victim.directory.publish_member(["tcp://victim:1"], ["tcp"])
    exchange(victim.doc, reader.doc, attacker.doc)
    reader.directory.refresh()
    attacker.directory.refresh()
    (genuine,) = envelopes(victim.doc, victim.key)
    key = str(victim.key)
    with attacker.doc.transaction():
        if attack == "delete":
            del root(attacker.doc)[key]
        elif attack == "overwrite_bytes":
            root(attacker.doc)[key] = b"junk"
        elif attack == "overwrite_array":
            root(attacker.doc)[key] = pycrdt.Array([b"junk"])
        else:
            del root(attacker.doc)[key][0]
    exchange(victim.doc, reader.doc, attacker.doc)
    assert genuine not in envelopes(reader.doc, victim.key)
    assert reader.directory.refresh() == []
    assert addresses_seen(reader) == {victim.key: ("tcp://victim:1",)}
    # a newcomer cannot see the victim until it heals its entry
    newcomer = Node(identity(7), clock)
    send(reader.doc, newcomer.doc)
    newcomer.directory.refresh()
    assert newcomer.directory.members == {}
    reader.directory.maintain()  # does not delete the container of a live member
    report = victim.directory.maintain()
    assert report.repaired == 1
    exchange(victim.doc, reader.doc, attacker.doc, newcomer.doc)
    assert newcomer.directory.refresh() == [MemberJoined(public_key=victim.key)]
    assert addresses_seen(newcomer) == {victim.key: ("tcp://victim:1",)}
    assert victim.directory.maintain().repaired == 0  # healed for good


def test_replayed_older_entry_is_ignored_and_collected() -> None:
    clock = Clock()
    victim, reader = nodes(2, clock)
    victim.directory.publish_member(["tcp://old:1"], ["tcp"])
    old = envelopes(victim.doc, victim.key)[0]
    clock.now += 1
    victim.directory.publish_member(["tcp://new:1"], ["tcp"])
    send(victim.doc, reader.doc)
    reader.directory.refresh()
    put(reader.doc, str(victim.key), old)
    assert reader.directory.refresh() == []
    assert addresses_seen(reader)[victim.key] == ("tcp://new:1",)
    assert reader.directory.maintain().removed == 1
    assert old not in envelopes(reader.doc, victim.key)


def test_a_replay_cannot_undo_a_leave() -> None:
    clock = Clock()
    victim, reader = nodes(2, clock)
    victim.directory.publish_member(["tcp://v:1"], ["tcp"])
    alive = envelopes(victim.doc, victim.key)[0]
    send(victim.doc, reader.doc)
    reader.directory.refresh()
    clock.now += 5
    victim.directory.leave()
    send(victim.doc, reader.doc)
    assert reader.directory.refresh() == [MemberLeft(public_key=victim.key)]
    clock.now += 120  # the leave entry itself has been collected by now
    reader.directory.maintain()
    assert envelopes(reader.doc, victim.key) == []
    put(reader.doc, str(victim.key), alive)  # still unexpired, validly signed
    assert reader.directory.refresh() == []
    assert reader.directory.members == {}


def test_a_node_that_only_saw_the_leave_rejects_the_older_entry() -> None:
    clock = Clock()
    victim, reader = nodes(2, clock)
    victim.directory.publish_member(["tcp://v:1"], ["tcp"])
    alive = envelopes(victim.doc, victim.key)[0]
    clock.now += 5
    victim.directory.leave()
    send(victim.doc, reader.doc)
    assert reader.directory.refresh() == []
    put(reader.doc, str(victim.key), alive)
    assert reader.directory.refresh() == []
    assert reader.directory.members == {}


def test_malformed_items_and_keys_are_ignored_and_collected() -> None:
    clock = Clock()
    honest, reader, other = nodes(3, clock)
    honest.directory.publish_member(["tcp://h:1"], ["tcp"])
    send(honest.doc, reader.doc)
    good = envelopes(honest.doc, honest.key)[0]
    key = str(honest.key)
    junk: list[Any] = [
        1.5,
        "text",
        None,
        b"",
        good[:40],  # truncated
        seal(honest.identity, 9, 2**62, T0, T0 + 10, b""),  # unknown kind
        seal(honest.identity, MEMBER, 2**62, T0, T0 + 10, b"", version=2),
        seal(honest.identity, MEMBER, 2**62, T0, T0 + 10, member_payload(("x",)) + b"!"),
        seal(honest.identity, MEMBER, 2**62, T0, T0 + 10, b"\x05"),  # 5 strings, no bytes
        seal(honest.identity, MEMBER, 2**62, T0 + 10, T0, member_payload(("x",))),  # ends early
        seal(honest.identity, MEMBER, 2**62, T0, T0 + 7200, member_payload(("x",))),  # too long
        good,  # a duplicate
    ]
    put(reader.doc, key, *junk)
    with reader.doc.transaction():
        root(reader.doc)["not-a-key"] = pycrdt.Array([good])
        root(reader.doc)[str(other.key)] = pycrdt.Map({"x": 1})
    reader.directory.refresh()
    assert addresses_seen(reader) == {honest.key: ("tcp://h:1",)}
    reader.directory.maintain()
    assert set(root(reader.doc).keys()) == {key}
    assert envelopes(reader.doc, honest.key) == [good]


def test_oversized_entries_are_ignored_and_refused() -> None:
    clock = Clock()
    config = DirectoryConfig(max_member_size=512)
    author, reader = nodes(2, clock, config)
    big = seal(author.identity, MEMBER, 1, T0, T0 + 600, member_payload(("x" * 600,)))
    put(reader.doc, str(author.key), big)
    reader.directory.refresh()
    assert reader.directory.members == {}
    assert reader.directory.maintain().removed >= 1
    with pytest.raises(ValueError, match="exceeds"):
        author.directory.publish_member(["x" * 600], ["tcp"])
    with pytest.raises(ValueError, match="max_signal_size"):
        author.directory.post_signal(reader.key, bytes(20_000))
    with pytest.raises(TypeError):
        author.directory.publish_member("tcp://not-a-list:1", ["tcp"])


def test_our_container_is_healed_after_an_attack() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    a.directory.publish_latency({b.key: 0.010})
    b.directory.post_signal(a.key, b"hello")
    exchange(a.doc, b.doc)
    with b.doc.transaction():
        root(b.doc)[str(a.key)] = b"mine now"
    send(b.doc, a.doc)
    report = a.directory.maintain()
    assert report.repaired == 2
    send(a.doc, b.doc)
    assert len(envelopes(b.doc, a.key)) == 2
    assert a.directory.maintain().repaired == 0


# -- signals and latency -------------------------------------------------------------------


def test_signals_are_addressed_replaced_and_expire() -> None:
    clock = Clock()
    a, b, c = nodes(3, clock)
    a.directory.post_signal(b.key, b"offer for b", ttl=30)
    a.directory.post_signal(c.key, b"offer for c")
    exchange(a.doc, b.doc, c.doc)
    b.directory.refresh()
    c.directory.refresh()
    (for_b,) = b.directory.signals_for()
    assert (for_b.author, for_b.recipient, for_b.payload) == (a.key, b.key, b"offer for b")
    assert for_b.expires_at == T0 + 30
    assert [s.payload for s in c.directory.signals_for(c.key)] == [b"offer for c"]
    assert a.directory.signals_for(a.key) == []
    clock.now += 1
    a.directory.post_signal(b.key, b"second offer", ttl=30)
    exchange(a.doc, b.doc, c.doc)
    b.directory.refresh()
    (latest,) = b.directory.signals_for()
    assert latest.payload == b"second offer"
    assert latest.seq > for_b.seq
    clock.now += 31
    assert b.directory.signals_for() == []
    assert [s.payload for s in c.directory.signals_for()] == [b"offer for c"]  # ttl 60
    a.directory.withdraw_signal(c.key)
    exchange(a.doc, b.doc, c.doc)
    c.directory.refresh()
    assert c.directory.signals_for() == []
    clock.now += 120
    for node in (a, b, c):
        node.directory.maintain()
    exchange(a.doc, b.doc, c.doc)
    assert all_items(b.doc) == 0
    with pytest.raises(ValueError, match="ttl"):
        a.directory.post_signal(b.key, b"x", ttl=0)


def test_signals_per_author_are_bounded() -> None:
    clock = Clock()
    config = DirectoryConfig(max_signals_per_author=2)
    a, reader, *others = nodes(5, clock, config)
    for other in others:  # a posts to 3: its oldest signal is withdrawn
        a.directory.post_signal(other.key, b"offer")
        clock.now += 1
    send(a.doc, reader.doc)
    reader.directory.refresh()
    live = [
        signal.recipient for other in others for signal in reader.directory.signals_for(other.key)
    ]
    assert live == [others[1].key, others[2].key]
    # a misbehaving author writing more than the limit by hand: the excess is ignored
    extra = [
        seal(
            a.identity, SIGNAL, 10**15, clock.now, clock.now + 60, bytes(k) + encode_var_bytes(b"")
        )
        for k in (identity(20).public_key, identity(21).public_key)
    ]
    put(reader.doc, str(a.key), *extra)
    reader.directory.refresh()
    assert reader.directory.statistics().signals == 2


def test_latency_rows_are_quantised_and_expire() -> None:
    clock = Clock()
    a, b, c = nodes(3, clock)
    a.directory.publish_latency({b.key: 0.0123456, c.key: 0.2})
    b.directory.publish_latency({a.key: 0.0})
    exchange(a.doc, b.doc, c.doc)
    c.directory.refresh()
    assert c.directory.latency_rows() == {
        a.key: {b.key: 0.012, c.key: 0.2},
        b.key: {a.key: 0.0},
    }
    clock.now += 120
    assert c.directory.latency_rows() == {}
    with pytest.raises(ValueError, match="finite"):
        a.directory.publish_latency({b.key: -1.0})
    with pytest.raises(ValueError, match="finite"):
        a.directory.publish_latency({b.key: math.nan})
    with pytest.raises(TypeError):
        a.directory.publish_latency({"b": 1.0})  # type: ignore[dict-item]


def test_latency_rows_out_of_order_are_rejected() -> None:
    clock = Clock()
    a, reader = nodes(2, clock)
    low, high = sorted(bytes(identity(n).public_key)[:8] for n in (30, 31))
    rows = encode_uvarint(2) + high + b"\x01" + low + b"\x02"
    put(reader.doc, str(a.key), seal(a.identity, LATENCY, 1, T0, T0 + 60, rows))
    reader.directory.refresh()
    assert reader.directory.latency_rows() == {}


def test_latency_rows_name_peers_by_an_8_byte_key_prefix() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_latency({b.key: 0.005})
    latency = next(raw for raw in envelopes(a.doc, a.key) if raw[1] == LATENCY)
    payload = latency[HEADER.size : -64]
    assert payload == encode_uvarint(1) + bytes(b.key)[:8] + encode_uvarint(5)
    # a thousand peers fit the default 16 KiB limit (with 32-byte keys: about 400)
    many = {Identity.generate().public_key: 0.005 for _ in range(1000)}
    a.directory.publish_latency(many)
    size = len(next(raw for raw in envelopes(a.doc, a.key) if raw[1] == LATENCY))
    assert size <= 58 + 64 + 2 + 1000 * (8 + 1)
    assert size <= DirectoryConfig().max_latency_size


def test_a_row_prefix_nobody_or_several_keys_match_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crdtswarm.sync import directory as module

    clock = Clock()
    a, b, reader = nodes(3, clock)
    stranger = identity(99).public_key  # never publishes anything: its prefix resolves to nobody
    a.directory.publish_latency({b.key: 0.005, stranger: 0.007})
    b.directory.publish_member(["tcp://b:1"], ["tcp"])
    exchange(a.doc, b.doc, reader.doc)
    reader.directory.refresh()
    assert reader.directory.latency_rows() == {a.key: {b.key: 0.005}}

    # with 1-byte prefixes, keys collide: a prefix matching two live keys is ambiguous
    monkeypatch.setattr(module, "ROW_KEY_PREFIX", 1)
    keys = [identity(n) for n in range(100, 160)]
    first: dict[bytes, Identity] = {}
    pair: tuple[Identity, Identity] | None = None
    for ident in keys:
        prefix = bytes(ident.public_key)[:1]
        if prefix in first:
            pair = (first[prefix], ident)
            break
        first[prefix] = ident
    assert pair is not None
    one, two = (Node(ident, clock) for ident in pair)
    other = Node(identity(200), clock)
    # the author leaves colliding peers out of its own row
    other.directory.publish_latency({one.key: 0.001, two.key: 0.002, a.key: 0.003})
    raw = next(r for r in envelopes(other.doc, other.key) if r[1] == LATENCY)
    assert raw[HEADER.size] == 1  # one peer left: a
    # a reader that knows both colliding keys ignores that prefix in anybody's row
    seal_rows = encode_uvarint(1) + bytes(one.key)[:1] + b"\x05"
    put(reader.doc, str(other.key), seal(other.identity, LATENCY, 2, T0, T0 + 60, seal_rows))
    one.directory.publish_member(["tcp://one:1"], ["tcp"])
    two.directory.publish_member(["tcp://two:1"], ["tcp"])
    exchange(one.doc, two.doc, reader.doc)
    reader.directory.refresh()
    assert reader.directory.latency_rows().get(other.key) == {}


# -- format, limits, lifecycle ---------------------------------------------------------------


def test_envelope_layout_matches_the_documentation() -> None:
    clock = Clock()
    (a,) = nodes(1, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    (raw,) = envelopes(a.doc, a.key)
    body, signature = raw[:-64], raw[-64:]
    version, kind, author, seq, issued, expires = HEADER.unpack_from(body)
    assert (version, kind, author) == (1, MEMBER, bytes(a.key))
    assert (seq, issued, expires) == (T0 * 1000, T0 * 1000, (T0 + 600) * 1000)
    assert body[HEADER.size :] == member_payload(("tcp://a:1",))
    assert a.key.verify(signature, CONTEXT + body)


def test_seq_keeps_growing_across_a_restart() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    clock.now -= 5  # even with a clock that went back
    restarted = Directory(a.doc, a.identity, clock=clock)
    restarted.publish_member(["tcp://a:2"], ["tcp"])
    assert len(envelopes(a.doc, a.key)) == 1
    send(a.doc, b.doc)
    b.directory.refresh()
    assert addresses_seen(b) == {a.key: ("tcp://a:2",)}


def test_cache_limit_ignores_new_slots_without_collecting_them() -> None:
    clock = Clock()
    config = DirectoryConfig(max_cached_entries=2)
    a, b, c, reader = nodes(4, clock, config)
    for node in (a, b, c):
        node.directory.publish_member(["tcp://x:1"], ["tcp"])
        send(node.doc, reader.doc)
    reader.directory.refresh()
    assert len(reader.directory.members) == 2
    reader.directory.maintain()
    assert all_items(reader.doc) == 3  # valid entries are not ours to collect


def test_expired_slots_make_room_in_a_full_cache() -> None:
    clock = Clock()
    config = DirectoryConfig(max_cached_entries=2)
    a, b, c, reader = nodes(4, clock, config)
    for node in (a, b):
        node.directory.publish_member(["tcp://x:1"], ["tcp"])
        send(node.doc, reader.doc)
    reader.directory.refresh()
    clock.now += 600
    c.directory.publish_member(["tcp://c:1"], ["tcp"])
    send(c.doc, reader.doc)
    reader.directory.refresh()
    assert set(reader.directory.members) == {c.key}


def test_slots_are_forgotten_once_nothing_older_can_be_valid() -> None:
    clock = Clock()
    a, reader = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    a.directory.post_signal(reader.key, b"offer")
    send(a.doc, reader.doc)
    reader.directory.refresh()
    clock.now += 3599
    assert reader.directory.maintain().forgotten == 0
    assert reader.directory.statistics().cached_slots == 2  # expired, but still guarding
    clock.now += 1
    assert reader.directory.maintain().forgotten == 2
    assert reader.directory.statistics().cached_slots == 0


def test_entries_beyond_the_per_author_limit_are_ignored_and_collected() -> None:
    clock = Clock()
    config = DirectoryConfig(max_entries_per_author=3)
    a, reader = nodes(2, clock, config)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, reader.doc)
    latency = seal(a.identity, LATENCY, 1, T0, T0 + 60, encode_uvarint(0))
    put(reader.doc, str(a.key), b"junk", b"junk", b"junk", latency)
    reader.directory.refresh()
    assert set(reader.directory.members) == {a.key}
    assert reader.directory.latency_rows() == {}  # the 5th item is never read
    assert reader.directory.maintain().removed == 4
    assert len(envelopes(reader.doc, a.key)) == 1


def test_close_stops_observing() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    b.directory.refresh()
    b.directory.close()
    b.directory.close()
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    send(a.doc, b.doc)
    assert not b.directory.is_dirty
    assert b.directory.maintain().entries == 1  # maintain reads the doc regardless


def test_statistics() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    a.directory.publish_member(["tcp://a:1"], ["tcp"])
    a.directory.publish_latency({b.key: 0.01})
    a.directory.post_signal(b.key, b"s")
    send(a.doc, b.doc)
    b.directory.refresh()
    stats = b.directory.statistics()
    assert (stats.members, stats.signals, stats.latency_rows, stats.cached_slots) == (1, 1, 1, 3)
    assert stats.accepted == 3
    assert stats.rejected == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"member_ttl": 0},
        {"signal_ttl": 7200},
        {"collect_delay": -1},
        {"max_member_size": 10},
        {"max_cached_entries": 0},
    ],
)
def test_config_is_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        DirectoryConfig(**kwargs)


def test_the_doc_stays_flat_under_republishing() -> None:
    clock = Clock()
    a, b = nodes(2, clock)
    sizes = []
    for i in range(300):
        a.directory.publish_member([f"tcp://a:{i % 7}"], ["tcp"])
        a.directory.publish_latency({b.key: i / 1000})
        a.directory.post_signal(b.key, b"offer")
        send(a.doc, b.doc)
        if i % 10 == 0:
            b.directory.maintain()
            send(b.doc, a.doc)
        clock.now += 60
        sizes.append(len(b.doc.get_update()))
    assert sizes[-1] < sizes[20] + 200  # a map key per entry would grow ~12 bytes per write


# -- convergence under attack ----------------------------------------------------------------

HONEST = 3


class DirectoryMachine(RuleBasedStateMachine):
    """Honest nodes publish and leave; an attacker tampers with any doc; docs merge at
    random. After honest nodes maintain and everything is exchanged, every node
    reports the same members: the honest nodes that are in, with what they
    published last."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        config = DirectoryConfig(collect_delay=3000)  # no leave is collected mid-run
        self.nodes = nodes(HONEST, self.clock, config)
        self.attacker = identity(66)
        self.truth: dict[PublicKey, tuple[str, ...] | None] = {}
        self.published: dict[PublicKey, set[tuple[str, ...]]] = {n.key: set() for n in self.nodes}
        self.captured: list[bytes] = []
        self.counter = 0

    node = st.integers(0, HONEST - 1)

    @rule(i=node, port=st.integers(1, 3))
    def publish(self, i: int, port: int) -> None:
        node = self.nodes[i]
        addresses = (f"tcp://n{i}:{port}",)
        node.directory.publish_member(addresses, ["tcp"])
        self.truth[node.key] = addresses
        self.published[node.key].add(addresses)

    @rule(i=node)
    def leave(self, i: int) -> None:
        node = self.nodes[i]
        node.directory.leave()
        if node.key in self.truth:
            self.truth[node.key] = None

    @rule(src=node, dst=node)
    def merge(self, src: int, dst: int) -> None:
        if src != dst:
            send(self.nodes[src].doc, self.nodes[dst].doc)

    @rule(i=node)
    def refresh(self, i: int) -> None:
        self.nodes[i].directory.refresh()

    @rule(i=node)
    def maintain(self, i: int) -> None:
        self.nodes[i].directory.maintain()

    @rule(seconds=st.floats(0.001, 5))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(i=node)
    def capture(self, i: int) -> None:
        for node in self.nodes:
            self.captured += envelopes(self.nodes[i].doc, node.key)

    @rule(d=node, victim=node, kind=st.sampled_from(["delete", "bytes", "array", "wipe"]))
    def vandalise(self, d: int, victim: int, kind: str) -> None:
        doc, key = self.nodes[d].doc, str(self.nodes[victim].key)
        with doc.transaction():
            current = root(doc).get(key)
            if kind == "delete" and current is not None:
                del root(doc)[key]
            elif kind == "bytes":
                root(doc)[key] = b"junk"
            elif kind == "array":
                root(doc)[key] = pycrdt.Array([b"junk"])
            elif kind == "wipe" and isinstance(current, pycrdt.Array) and len(current):
                del current[0 : len(current)]

    @precondition(lambda self: self.captured)
    @rule(d=node, victim=node, pick=st.integers(0, 10**6))
    def replay(self, d: int, victim: int, pick: int) -> None:
        raw = self.captured[pick % len(self.captured)]
        put(self.nodes[d].doc, str(self.nodes[victim].key), raw)

    @rule(d=node, victim=node, misplace=st.booleans())
    def forge(self, d: int, victim: int, misplace: bool) -> None:
        self.counter += 1
        seq = 2**60 + self.counter
        payload = member_payload(("tcp://evil:666",))
        now = self.clock.now
        target = self.nodes[victim].key
        if misplace:  # the attacker's own valid entry, in the victim's container
            raw = seal(self.attacker, MEMBER, seq, now, now + 600, payload)
        else:  # an entry in the victim's name, signed by the attacker
            raw = seal(self.attacker, MEMBER, seq, now, now + 600, payload, author=target)
        put(self.nodes[d].doc, str(target), raw)

    @invariant()
    def only_what_honest_nodes_published_is_reported(self) -> None:
        for node in self.nodes:
            for key, member in node.directory.members.items():
                assert member.addresses in self.published[key]

    def teardown(self) -> None:
        docs = [node.doc for node in self.nodes]
        for _ in range(2):  # a heal can race a collection once; the second round settles it
            for node in self.nodes:
                node.directory.maintain()
            exchange(*docs)
        views = []
        for node in self.nodes:
            node.directory.refresh()
            views.append({k: (m.addresses, m.seq) for k, m in node.directory.members.items()})
        expected = {key: addresses for key, addresses in self.truth.items() if addresses}
        assert all(view == views[0] for view in views), views
        assert {k: a for k, (a, _) in views[0].items()} == expected


TestDirectoryConvergence = DirectoryMachine.TestCase
TestDirectoryConvergence.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
