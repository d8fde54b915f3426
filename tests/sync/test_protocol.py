"""SyncSession and the y-protocols codec, driven by hand: two sessions, two docs, no I/O."""

from __future__ import annotations

import random
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtswarm.errors import FrameError, LocalProtocolError, SyncError
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_bytes, encode_var_string
from crdtswarm.sync import protocol
from crdtswarm.sync.protocol import (
    EMPTY_UPDATE,
    MAX_VALUE_DEPTH,
    AwarenessClient,
    AwarenessReceived,
    AwarenessUpdate,
    SyncCompleted,
    SyncEvent,
    SyncMessage,
    SyncSession,
    SyncStep1,
    SyncStep2,
    Update,
    UpdateApplied,
    decode_awareness_update,
    decode_message,
    encode_awareness_update,
    encode_message,
    validate_state_vector,
    validate_update,
)

# --- Helpers ---------------------------------------------------------------------


def transfer(a: SyncSession, b: SyncSession) -> None:
    """Move data_to_send() both ways until neither side has anything to send."""
    while True:
        moved = False
        for source, destination in ((a, b), (b, a)):
            for message in source.data_to_send():
                moved = True
                destination.receive_message(message)
        if not moved:
            return


def events(session: SyncSession) -> list[SyncEvent]:
    out: list[SyncEvent] = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def new_doc(client_id: int) -> pycrdt.Doc[Any]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
    doc["map"] = pycrdt.Map()
    doc["text"] = pycrdt.Text()
    doc["array"] = pycrdt.Array()
    return doc


def contents(doc: pycrdt.Doc[Any]) -> dict[str, Any]:
    return {
        "map": doc.get("map", type=pycrdt.Map).to_py(),
        "text": str(doc.get("text", type=pycrdt.Text)),
        "array": doc.get("array", type=pycrdt.Array).to_py(),
    }


def state_vector(doc: pycrdt.Doc[Any]) -> dict[int, int]:
    reader = Reader(doc.get_state())
    clocks = {reader.read_uvarint(): reader.read_uvarint() for _ in range(reader.read_uvarint())}
    assert reader.at_end()
    return clocks


def snapshot(doc: pycrdt.Doc[Any]) -> tuple[bytes, bytes, dict[str, Any]]:
    """Everything observable about a doc: state vector, full update, contents."""
    return doc.get_state(), doc.get_update(), contents(doc)


def edit(doc: pycrdt.Doc[Any], rng: random.Random, count: int) -> None:
    """Apply ``count`` random edits to the map, text and array of ``doc``."""
    map_ = doc.get("map", type=pycrdt.Map)
    text = doc.get("text", type=pycrdt.Text)
    array = doc.get("array", type=pycrdt.Array)
    for _ in range(count):
        kind = rng.randrange(7)
        if kind == 0:
            map_[f"k{rng.randrange(4)}"] = rng.choice([1, "x", 2.5, None, True, [1, 2], {"q": 1}])
        elif kind == 1:
            text.insert(rng.randint(0, len(text)), rng.choice(["ab", "c", "xyz"]))
        elif kind == 2:
            array.insert(rng.randint(0, len(array)), rng.randrange(100))
        elif kind == 3 and len(text):
            start = rng.randrange(len(text))
            del text[start : start + 1]
        elif kind == 4 and len(array):
            del array[rng.randrange(len(array))]
        elif kind == 5:
            map_[f"sub{rng.randrange(2)}"] = pycrdt.Map({"z": rng.randrange(9)})
        elif kind == 6 and len(map_):
            del map_[rng.choice(sorted(map_.keys()))]


def diverged_pair(seed: int) -> tuple[pycrdt.Doc[Any], pycrdt.Doc[Any]]:
    """Two docs that share a history, then each made edits the other lacks."""
    rng = random.Random(seed)
    a, b = new_doc(1 + seed % 1000), new_doc(2001 + seed % 1000)
    edit(a, rng, rng.randint(1, 8))
    b.apply_update(a.get_update())
    edit(a, rng, rng.randint(1, 8))
    edit(b, rng, rng.randint(1, 8))
    return a, b


def update_message(update: bytes) -> bytes:
    return encode_message(Update(update=update))


def struct_update(client: int, clock: int, *structs: bytes, delete_set: bytes = b"\x00") -> bytes:
    """A v1 update with one client's ``structs`` (each an encoded struct) and a delete set."""
    header = encode_uvarint(1) + encode_uvarint(len(structs))
    return header + encode_uvarint(client) + encode_uvarint(clock) + b"".join(structs) + delete_set


def root_item(root: str, content_ref: int, content: bytes, key: str | None = None) -> bytes:
    """An item without origins whose parent is the root type ``root``."""
    info = content_ref | (0x20 if key is not None else 0)
    out = bytes((info,)) + encode_uvarint(1) + encode_var_string(root)
    if key is not None:
        out += encode_var_string(key)
    return out + content


def child_item(parent: tuple[int, int], key: str, content_ref: int, content: bytes) -> bytes:
    """A map entry without origins whose parent is the item ``parent`` (a nested type)."""
    info = content_ref | 0x20
    out = bytes((info,)) + encode_uvarint(0) + encode_uvarint(parent[0])
    return out + encode_uvarint(parent[1]) + encode_var_string(key) + content


def any_content(*values: bytes) -> bytes:
    return encode_uvarint(len(values)) + b"".join(values)


ANY_ONE = b"\x7d\x01"  # lib0 any: the integer 1
ZERO_LENGTH_GC = bytes.fromhex("0102d9430008010161017c425ffea60000010101740301d943010103")
"""Found by fuzzing: a GC struct of length 0 makes yrs divide by zero and poisons the doc."""
HUGE_CLOCK = bytes.fromhex("0102bb058fd997bcb800010101740184bb0500046278797a01bb05010001")
"""Found by fuzzing: a clock beyond 32 bits (and over-long) makes yrs index out of bounds."""


# --- Codec -----------------------------------------------------------------------

MESSAGES: list[SyncMessage] = [
    SyncStep1(state_vector=b"\x00"),
    SyncStep1(state_vector=b""),
    SyncStep2(update=EMPTY_UPDATE),
    Update(update=b"\x01\x02\x03"),
    Update(update=bytes(300)),
    AwarenessUpdate(data=b"\x01\x05\x01\x04null"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_round_trip(message: SyncMessage) -> None:
    assert decode_message(encode_message(message)) == message


def test_exact_bytes() -> None:
    # writeVarUint(0) writeVarUint(0) writeVarUint8Array(Y.encodeStateVector(new Y.Doc()))
    assert encode_message(SyncStep1(state_vector=pycrdt.Doc().get_state())) == b"\x00\x00\x01\x00"
    assert encode_message(SyncStep2(update=EMPTY_UPDATE)) == b"\x00\x01\x02\x00\x00"
    assert encode_message(Update(update=b"\xaa")) == b"\x00\x02\x01\xaa"
    assert encode_message(AwarenessUpdate(data=bytes(128))) == b"\x01\x80\x01" + bytes(128)
    assert pycrdt.Doc().get_update() == EMPTY_UPDATE


def test_matches_pycrdt_helpers() -> None:
    doc = new_doc(7)
    doc.get("text", type=pycrdt.Text).insert(0, "hello")
    update = doc.get_update()
    assert encode_message(SyncStep1(state_vector=doc.get_state())) == pycrdt.create_sync_message(
        doc
    )
    assert encode_message(Update(update=update)) == pycrdt.create_update_message(update)
    assert encode_message(AwarenessUpdate(data=update)) == pycrdt.create_awareness_message(update)


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_every_truncation_is_rejected(message: SyncMessage) -> None:
    data = encode_message(message)
    for end in range(len(data)):
        with pytest.raises(FrameError):
            decode_message(data[:end])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x02\x01\xaa\x00", "trailing"),
        (b"\x02\x00", "unknown y-protocols message type 2"),
        (b"\x00\x03\x00", "unknown sync message type 3"),
        (b"\x80\x00\x00\x00", "over-long"),
        (b"", "truncated"),
    ],
)
def test_malformed_messages_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_message(data)


def test_oversized_payload_is_rejected_before_it_is_read() -> None:
    assert decode_message(b"\x00\x02\x04abcd", max_size=4) == Update(update=b"abcd")
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_message(b"\x00\x02\x05abcde", max_size=4)
    with pytest.raises(FrameError, match="exceeds the limit"):  # the length alone decides
        decode_message(b"\x00\x02" + encode_uvarint(1 << 40))


messages = st.one_of(
    st.builds(SyncStep1, state_vector=st.binary(max_size=300)),
    st.builds(SyncStep2, update=st.binary(max_size=300)),
    st.builds(Update, update=st.binary(max_size=300)),
    st.builds(AwarenessUpdate, data=st.binary(max_size=300)),
)


@given(messages)
def test_decode_inverts_encode(message: SyncMessage) -> None:
    assert decode_message(encode_message(message)) == message


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_frame_error(data: bytes) -> None:
    try:
        message = decode_message(data, max_size=32)
    except FrameError:
        return
    assert encode_message(message) == data


# --- Awareness -------------------------------------------------------------------


def test_awareness_round_trip() -> None:
    clients = [
        AwarenessClient(client_id=1, clock=3, state={"user": {"name": "ada", "color": "#f00"}}),
        AwarenessClient(client_id=2**40, clock=0, state=None),
    ]
    data = encode_awareness_update(clients)
    assert decode_awareness_update(data) == clients
    # y-protocols: varUint count, then per client varUint id, varUint clock, varString JSON
    assert encode_awareness_update([AwarenessClient(client_id=5, clock=1, state=None)]) == (
        b"\x01\x05\x01\x04null"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x05\x01\x04nul",  # truncated
        b"\x01\x05\x01\x04null\x00",  # trailing
        b"\x01\x05\x01\x03nul",  # not JSON
        b"\x01\x05\x01\x02\xff\xfe",  # not UTF-8
        b"\x01\x05\x01" + encode_var_string("[" * 100_000),  # nesting beyond json's recursion
    ],
)
def test_awareness_junk_is_rejected(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_awareness_update(data)


# --- Sessions --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_concurrent_edits_converge(seed: int) -> None:
    doc_a, doc_b = diverged_pair(seed)
    a, b = SyncSession(doc_a), SyncSession(doc_b)
    a.start()
    b.start()
    transfer(a, b)
    assert a.is_synced
    assert b.is_synced
    assert contents(doc_a) == contents(doc_b)
    assert state_vector(doc_a) == state_vector(doc_b)  # encoded in hash-map order
    for session in (a, b):
        got = events(session)
        assert got[-1] == SyncCompleted()
        assert all(isinstance(event, UpdateApplied) for event in got[:-1])


def test_sync_completes_once_and_only_after_the_peers_step2() -> None:
    doc_a, doc_b = diverged_pair(99)
    a, b = SyncSession(doc_a), SyncSession(doc_b)
    a.start()
    [step1] = a.data_to_send()
    b.receive_message(step1)
    assert not a.is_synced
    assert events(b) == []  # a step 1 only asks
    [step2] = b.data_to_send()
    assert isinstance(decode_message(step2), SyncStep2)
    a.receive_message(step2)
    assert a.is_synced
    assert not b.is_synced
    assert events(a) == [UpdateApplied(update=decode_message(step2).update), SyncCompleted()]
    a.receive_message(step2)  # a repeated step 2 changes nothing and completes nothing again
    assert events(a) == [UpdateApplied(update=decode_message(step2).update)]


def test_incremental_updates_carry_exactly_the_applied_bytes() -> None:
    doc_a, doc_b = new_doc(1), new_doc(2)
    a, b = SyncSession(doc_a), SyncSession(doc_b)
    a.start()
    b.start()
    transfer(a, b)
    events(a)
    events(b)
    local: list[bytes] = []
    doc_a.observe(lambda event: local.append(event.update))
    with doc_a.transaction():
        doc_a.get("text", type=pycrdt.Text).insert(0, "hi")
        doc_a.get("map", type=pycrdt.Map)["x"] = 1
        doc_a.get("array", type=pycrdt.Array).append("y")
    [update] = local
    a.send_update(update)
    assert a.data_to_send() == [update_message(update)]
    b.receive_message(update_message(update))
    assert events(b) == [UpdateApplied(update=update)]
    assert contents(doc_b) == {"map": {"x": 1}, "text": "hi", "array": ["y"]}


def test_an_update_received_twice_is_idempotent() -> None:
    doc_a, doc_b = diverged_pair(5)
    update = doc_a.get_update()
    session = SyncSession(doc_b)
    session.receive_message(update_message(update))
    after_once = snapshot(doc_b)
    fired: list[bytes] = []
    doc_b.observe(lambda event: fired.append(event.update))
    session.receive_message(update_message(update))
    assert snapshot(doc_b) == after_once
    assert fired == []  # nothing new: no observer fires, so a replicator forwards nothing
    assert events(session) == [UpdateApplied(update=update)] * 2


def test_an_empty_update_is_not_applied() -> None:
    session = SyncSession(new_doc(1))
    session.receive_message(update_message(EMPTY_UPDATE))
    assert events(session) == []
    session.receive_message(encode_message(SyncStep2(update=EMPTY_UPDATE)))
    assert events(session) == [SyncCompleted()]
    assert session.is_synced


def test_awareness_is_passed_up_and_sent_as_is() -> None:
    data = encode_awareness_update([AwarenessClient(client_id=9, clock=1, state={"a": 1})])
    a, b = SyncSession(new_doc(1)), SyncSession(new_doc(2))
    a.send_awareness(data)
    transfer(a, b)
    assert events(b) == [AwarenessReceived(data=data)]
    assert events(a) == []


def test_observer_errors_propagate_after_the_update_is_applied() -> None:
    source = new_doc(1)
    source.get("text", type=pycrdt.Text).insert(0, "x")
    doc = new_doc(2)

    def broken(_event: pycrdt.TransactionEvent) -> None:
        raise KeyError("observer bug")

    doc.observe(broken)
    session = SyncSession(doc)
    with pytest.raises(ExceptionGroup):
        session.receive_message(update_message(source.get_update()))
    assert str(doc.get("text", type=pycrdt.Text)) == "x"
    assert events(session) == [UpdateApplied(update=source.get_update())]
    assert not session.is_failed


def test_queues_are_bounded() -> None:
    session = SyncSession(new_doc(1), max_queue_length=3)
    for _ in range(3):
        session.send_update(EMPTY_UPDATE)
    with pytest.raises(LocalProtocolError, match="drain data_to_send"):
        session.start()
    with pytest.raises(LocalProtocolError, match="drain data_to_send"):
        session.receive_message(encode_message(SyncStep1(state_vector=b"\x00")))
    assert len(session.data_to_send()) == 3
    for _ in range(3):
        session.receive_message(encode_message(AwarenessUpdate(data=b"")))
    with pytest.raises(LocalProtocolError, match="drain next_event"):
        session.receive_message(encode_message(AwarenessUpdate(data=b"")))
    assert len(events(session)) == 3
    assert not session.is_failed


def test_oversized_messages_are_refused() -> None:
    session = SyncSession(new_doc(1), max_update_size=4)
    with pytest.raises(FrameError):
        session.receive_message(update_message(bytes(5)))
    assert session.is_failed
    with pytest.raises(LocalProtocolError, match="failed"):
        session.start()


@pytest.mark.parametrize("bad", [b"", b"\x01", b"\x02\x01\x05", b"\x01\x01\x80\x80\x80\x80\x10"])
def test_a_malformed_state_vector_is_a_sync_error(bad: bytes) -> None:
    session = SyncSession(new_doc(1))
    with pytest.raises(SyncError, match="state vector"):
        session.receive_message(encode_message(SyncStep1(state_vector=bad)))
    assert session.data_to_send() == []


# --- Hostile updates -------------------------------------------------------------


def hostile_updates() -> dict[str, bytes]:
    donor = new_doc(4242)
    donor.get("text", type=pycrdt.Text).insert(0, "hello")
    donor.get("map", type=pycrdt.Map)["k"] = [1, 2]
    good = donor.get_update()
    assert good.startswith(b"\x01")
    assert good.endswith(b"\x00")  # one client, no deletions
    nested = ANY_ONE
    for _ in range(MAX_VALUE_DEPTH + 1):
        nested = b"\x75\x01" + nested  # an array holding the next value
    return {
        "garbage": bytes(range(7, 47)),
        "truncated": good[:-3],
        "cut in half": good[: len(good) // 2],
        "trailing byte": good + b"\x00",
        "zero-length GC": ZERO_LENGTH_GC,
        "over-long clock": HUGE_CLOCK,
        "clock beyond 32 bits": struct_update(77, 1 << 32, root_item("text", 4, b"\x01a")),
        "struct reaching beyond 32 bits": struct_update(
            77, (1 << 32) - 2, root_item("text", 4, b"\x02ab")
        ),
        "last clock of 32 bits": struct_update(77, (1 << 32) - 1, root_item("text", 4, b"\x01a")),
        "deletion reaching beyond 32 bits": b"\x00\x01\x4d\x01"
        + encode_uvarint((1 << 32) - 1)
        + b"\x01",
        "zero-length string": struct_update(77, 0, root_item("text", 4, encode_var_string(""))),
        "zero-length deletion": EMPTY_UPDATE[:1] + b"\x01\x4d\x01\x00\x00",
        "unknown content": struct_update(77, 0, root_item("text", 11, b"\x01")),
        "unknown type": struct_update(77, 0, root_item("map", 7, b"\x07", key="t")),
        "unknown value tag": struct_update(77, 0, root_item("map", 8, any_content(b"\x70"), "k")),
        "nested too deep": struct_update(77, 0, root_item("array", 8, any_content(nested))),
        "repeated client": b"\x02" + good[1:-1] * 2 + b"\x00",
        "client beyond 53 bits": struct_update(
            1 << 53, 0, root_item("map", 8, any_content(ANY_ONE), "k")
        ),
        "legacy JSON content": struct_update(77, 0, root_item("array", 2, b"\x01\x01{")),
        "embed that is not JSON": struct_update(77, 0, root_item("text", 5, b"\x01{")),
        "own parent": struct_update(77, 0, child_item((77, 0), "k", 8, any_content(ANY_ONE))),
        "parent in update is not a type": struct_update(
            77,
            0,
            root_item("text", 4, encode_var_string("abc")),
            child_item((77, 1), "k", 8, any_content(ANY_ONE)),
        ),
    }


HOSTILE = hostile_updates()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_updates_raise_sync_error_and_leave_the_doc_alone(name: str) -> None:
    doc_a, doc = diverged_pair(3)
    before = snapshot(doc)
    session = SyncSession(doc)
    with pytest.raises(SyncError):
        session.receive_message(update_message(HOSTILE[name]))
    assert snapshot(doc) == before
    assert session.is_failed
    assert events(session) == []
    # the doc is still sound: it goes on syncing with a fresh session
    fresh, other = SyncSession(doc), SyncSession(doc_a)
    fresh.start()
    other.start()
    transfer(fresh, other)
    assert contents(doc) == contents(doc_a)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_validate_update_agrees(name: str) -> None:
    if name in ("embed that is not JSON", "parent in update is not a type"):
        return  # well-formed: only pycrdt, or the document, can tell
    with pytest.raises(SyncError):
        validate_update(HOSTILE[name])


def test_a_parent_in_the_document_that_is_not_a_type_is_refused() -> None:
    doc = new_doc(5)
    doc.get("text", type=pycrdt.Text).insert(0, "abc")  # items 5#0..5#2, a string
    doc.get("map", type=pycrdt.Map)["nested"] = pycrdt.Map()  # item 5#3, a type
    before = snapshot(doc)
    # 77#0 is a root item, applied first; 77#1 names the string 5#1 as its parent.
    bad = struct_update(
        77,
        0,
        root_item("map", 8, any_content(ANY_ONE), key="fine"),
        child_item((5, 1), "k", 8, any_content(ANY_ONE)),
    )
    with pytest.raises(SyncError, match="not a type"):
        SyncSession(doc).receive_message(update_message(bad))
    assert snapshot(doc) == before
    good = struct_update(77, 0, child_item((5, 3), "k", 8, any_content(ANY_ONE)))
    SyncSession(doc).receive_message(update_message(good))
    assert contents(doc)["map"] == {"nested": {"k": 1}}


def test_many_parents_in_the_document_are_checked_on_a_copy() -> None:
    doc = new_doc(5)
    map_ = doc.get("map", type=pycrdt.Map)
    for i in range(protocol._MAX_PARENT_PROBES + 1):
        map_[f"m{i}"] = pycrdt.Map()  # items 5#0, 5#1, ...
    children = [child_item((5, i), "k", 8, any_content(ANY_ONE)) for i in range(len(map_))]
    SyncSession(doc).receive_message(update_message(struct_update(77, 0, *children)))
    assert all(value == {"k": 1} for value in contents(doc)["map"].values())
    doc.get("text", type=pycrdt.Text).insert(0, "abc")  # 5#65..5#67
    before = snapshot(doc)
    bad = struct_update(78, 0, *children, child_item((5, 66), "k", 8, any_content(ANY_ONE)))
    with pytest.raises(SyncError):
        SyncSession(doc).receive_message(update_message(bad))
    assert snapshot(doc) == before


def test_a_pycrdt_panic_becomes_a_sync_error() -> None:
    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    class PanickingDoc:
        def apply_update(self, update: bytes) -> None:
            raise PanicException("attempt to divide by zero")

    session = SyncSession(PanickingDoc())  # type: ignore[arg-type]
    with pytest.raises(SyncError, match="panicked") as caught:
        session.receive_message(update_message(new_update()))
    assert isinstance(caught.value.__cause__, PanicException)


def new_update() -> bytes:
    doc = new_doc(31)
    doc.get("map", type=pycrdt.Map)["a"] = "b"
    return doc.get_update()


def test_validate_accepts_what_pycrdt_encodes() -> None:
    for seed in range(20):
        doc_a, doc_b = diverged_pair(seed)
        validate_update(doc_a.get_update())
        validate_update(doc_a.get_update(doc_b.get_state()))
        validate_state_vector(doc_a.get_state())
    validate_update(EMPTY_UPDATE)
    validate_state_vector(b"\x00")


class _SpanReader(Reader):
    """A Reader that remembers where each uvarint it read lies."""

    __slots__ = ("spans",)

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.spans: list[tuple[int, int, int]] = []

    def read_uvarint(self) -> int:
        start = self.position
        value = super().read_uvarint()
        self.spans.append((start, self.position, value))
        return value


def varint_spans(update: bytes) -> list[tuple[int, int, int]]:
    reader = _SpanReader(update)
    protocol._walk_update(reader)
    return reader.spans


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    mutations=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["zero", "one", "+1", "-1", "x2", "id"])),
        min_size=1,
        max_size=3,
    ),
    full=st.booleans(),
)
def test_mutated_updates_apply_or_leave_the_doc_alone(
    seed: int, mutations: list[tuple[int, str]], full: bool
) -> None:
    """Rewrite clocks, lengths, client ids and parents of a real update: well-formed
    nonsense that only the document can refute. Either it applies, or SyncError and
    the doc is exactly as before."""
    doc_a, doc_b = diverged_pair(seed)
    data = bytearray(doc_a.get_update() if full else doc_a.get_update(doc_b.get_state()))
    for pick, how in mutations:
        spans = varint_spans(bytes(data))
        start, end, value = spans[pick % len(spans)]
        new = {
            "zero": 0,
            "one": 1,
            "+1": value + 1,
            "-1": max(value - 1, 0),
            "x2": value * 2,
            "id": doc_b.client_id,
        }[how]
        data[start:end] = encode_uvarint(new)
        try:
            varint_spans(bytes(data))
        except FrameError:
            break
    before = snapshot(doc_b)
    session = SyncSession(doc_b)
    try:
        session.receive_message(update_message(bytes(data)))
    except SyncError:
        assert snapshot(doc_b) == before
    else:
        doc_b.get_update()  # still sound


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_corrupted_updates_apply_or_leave_the_doc_alone(seed: int, data: st.DataObject) -> None:
    doc_a, doc_b = diverged_pair(seed)
    update = bytearray(doc_a.get_update(doc_b.get_state()))
    for _ in range(data.draw(st.integers(1, 4))):
        update[data.draw(st.integers(0, len(update) - 1))] = data.draw(st.integers(0, 255))
    before = snapshot(doc_b)
    try:
        SyncSession(doc_b).receive_message(update_message(bytes(update)))
    except SyncError:
        assert snapshot(doc_b) == before


def test_wire_helpers_agree_with_lib0() -> None:
    # lib0 writeVarUint8Array: uvarint length, then the bytes
    assert encode_message(Update(update=b"ab")) == b"\x00\x02" + encode_var_bytes(b"ab")


def test_awareness_states_must_be_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode_awareness_update([AwarenessClient(client_id=1, clock=1, state=float("nan"))])
    with pytest.raises(TypeError):
        encode_awareness_update([AwarenessClient(client_id=1, clock=1, state=b"bytes")])


def test_known_limit_a_pending_child_of_a_non_type() -> None:
    """Invariant 3's exception: yrs keeps an item whose parent is missing as pending,
    out of our sight; when the parent then arrives as a string, the update bringing it
    fails part-way. It still fails as SyncError."""
    doc = new_doc(1)
    session = SyncSession(doc)
    orphan = struct_update(77, 5, child_item((77, 0), "x", 8, any_content(ANY_ONE)))
    session.receive_message(update_message(orphan))
    assert state_vector(doc) == {}  # parked: clocks 0..4 of client 77 are missing
    parent_as_text = struct_update(77, 0, root_item("text", 4, encode_var_string("hello")))
    with pytest.raises(SyncError, match="parent"):
        session.receive_message(update_message(parent_as_text))


def test_receive_update_applies_like_an_update_message() -> None:
    doc_a, doc_b = diverged_pair(6)
    _, twin = diverged_pair(6)
    update = doc_a.get_update()
    session = SyncSession(doc_b)
    session.receive_update(update)
    SyncSession(twin).receive_message(update_message(update))
    assert contents(doc_b) == contents(twin) != contents(diverged_pair(6)[1])
    assert events(session) == [UpdateApplied(update=update)]


def test_receive_update_refuses_oversized_and_fails_on_garbage() -> None:
    small = SyncSession(new_doc(1), max_update_size=8)
    with pytest.raises(FrameError, match="exceeds"):
        small.receive_update(bytes(9))
    assert small.is_failed
    with pytest.raises(LocalProtocolError):
        small.receive_update(EMPTY_UPDATE)
    session = SyncSession(new_doc(1))
    with pytest.raises((FrameError, SyncError)):
        session.receive_update(b"\x01\x05garbage")
