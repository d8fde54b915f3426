"""The secure channel driver over simulated links: handshake outcomes, records, hostile peers."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from crdtswarm.errors import (
    ErrorCode,
    FrameError,
    HandshakeError,
    IdentityMismatchError,
)
from crdtswarm.identity import Identity
from crdtswarm.protocol.handshake import HandshakeSession, TransportSession
from crdtswarm.secure import SecureChannel, establish
from crdtswarm.testing import SimulatedNetwork
from crdtswarm.transport.abc import Link, LinkAttribute
from crdtswarm.transport.memory import MemoryLink

WAIT = 5.0  # seconds any single step may take before the test fails instead of hanging
RECORD = TransportSession.MAX_PLAINTEXT_SIZE  # 65519 plaintext bytes per Noise message
TAG = 16
SEALED = RECORD + TAG  # 65535: a full Noise message
MIB = 1024 * 1024
SWARM_KEY = bytes(range(100, 132))
OTHER_SWARM_KEY = bytes(range(200, 232))

Outcome = SecureChannel | Exception


# --- Helpers ---------------------------------------------------------------------


@asynccontextmanager
async def linked(
    a: Identity, b: Identity, *, max_message_size: int = MIB
) -> AsyncIterator[tuple[SimulatedNetwork, Link, Link]]:
    """A raw link from ``a`` (who dials) to ``b``: (network, a's end, b's end)."""
    net = SimulatedNetwork(seed=1, max_message_size=max_message_size)
    ta, tb = net.transport(), net.transport()
    send, accepted = anyio.create_memory_object_stream[Link](1)

    async def unexpected(link: Link) -> None:
        await link.aclose()

    async with anyio.create_task_group() as tg, send, accepted:
        await tg.start(ta.serve, a.public_key, unexpected)
        await tg.start(tb.serve, b.public_key, send.send)
        with anyio.fail_after(WAIT):
            ours = await ta.dial(b.public_key)
            theirs = await accepted.receive()
        try:
            yield net, ours, theirs
        finally:
            await anyio.aclose_forcefully(ours)
            await anyio.aclose_forcefully(theirs)
            tg.cancel_scope.cancel()


async def establish_both(
    ours: Link,
    theirs: Link,
    a: Identity,
    b: Identity,
    *,
    initiator: dict[str, Any] | None = None,
    responder: dict[str, Any] | None = None,
) -> tuple[Outcome, Outcome]:
    """Run `establish` on both ends at once: (a's outcome as initiator, b's as responder)."""
    results: dict[bool, Outcome] = {}

    async def run(
        link: Link, identity: Identity, is_initiator: bool, kwargs: dict[str, Any]
    ) -> None:
        try:
            results[is_initiator] = await establish(
                link, identity, initiator=is_initiator, **kwargs
            )
        except Exception as exc:
            results[is_initiator] = exc

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, ours, a, True, initiator or {})
            tg.start_soon(run, theirs, b, False, responder or {})
    return results[True], results[False]


@asynccontextmanager
async def secure_pair(
    a: Identity, b: Identity, *, max_message_size: int = MIB
) -> AsyncIterator[tuple[SimulatedNetwork, SecureChannel, SecureChannel]]:
    """Two established channels: (network, a's channel, b's channel)."""
    async with linked(a, b, max_message_size=max_message_size) as (net, ours, theirs):
        left, right = await establish_both(ours, theirs, a, b)
        assert isinstance(left, SecureChannel), left
        assert isinstance(right, SecureChannel), right
        yield net, left, right


async def handshake_by_hand(link: Link, identity: Identity, *, initiator: bool) -> TransportSession:
    """Our side of the handshake, run with the sans-IO session: we keep the raw link."""
    session = HandshakeSession(identity, initiator=initiator)
    for message in session.data_to_send():
        await link.send(message)
    while not session.is_complete:
        session.receive_message(await link.receive())
        for message in session.data_to_send():
            await link.send(message)
    return session.transport()


@asynccontextmanager
async def hostile_pair(
    a: Identity, b: Identity, *, max_message_size: int = MIB
) -> AsyncIterator[tuple[SecureChannel, Link, TransportSession]]:
    """b's honest channel, and a's raw link plus a's Noise keys: a can send anything."""
    async with linked(a, b, max_message_size=max_message_size) as (_, raw, theirs):
        channels: list[SecureChannel] = []

        async def honest() -> None:
            channels.append(await establish(theirs, b, initiator=False))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(honest)
                keys = await handshake_by_hand(raw, a, initiator=True)
        yield channels[0], raw, keys


def encode(keys: TransportSession, plaintext: bytes) -> bytes:
    """A channel message as the protocol frames it, built from the sender's keys."""
    pieces = range(0, max(len(plaintext), 1), RECORD)
    return b"".join(keys.encrypt(plaintext[i : i + RECORD]) for i in pieces)


def link_size(plaintext_size: int) -> int:
    """The link message size of a channel message of ``plaintext_size`` bytes."""
    return plaintext_size + TAG * max(1, math.ceil(plaintext_size / RECORD))


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def drain(link: Link) -> list[bytes]:
    """Every message left on ``link`` until the peer closes it (EndOfStream)."""
    messages: list[bytes] = []
    with anyio.fail_after(WAIT):
        while True:
            try:
                messages.append(await link.receive())
            except anyio.EndOfStream:
                return messages


async def assert_closed(link: Link) -> None:
    """``link`` was closed by its owner (send first: on an open link it returns at once)."""
    with anyio.fail_after(WAIT):
        with pytest.raises(anyio.ClosedResourceError):
            await link.send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await link.receive()


# --- Establishment ---------------------------------------------------------------


async def test_establish_on_both_sides(alice: Identity, bob: Identity) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        left, right = await establish_both(
            ours, theirs, alice, bob, initiator={"expected_remote": bob.public_key}
        )
        assert isinstance(left, SecureChannel)
        assert isinstance(right, SecureChannel)
        assert (left.local_key, left.remote_key, left.is_initiator) == (
            alice.public_key,
            bob.public_key,
            True,
        )
        assert (right.local_key, right.remote_key, right.is_initiator) == (
            bob.public_key,
            alice.public_key,
            False,
        )
        assert left.link is ours
        assert right.link is theirs
        assert left.extra(LinkAttribute.transport) == "mem"
        assert right.extra(LinkAttribute.remote_address) == f"mem://{alice.public_key}"
        # The handshake consumed every message it caused: nothing is left for the channel.
        assert isinstance(ours, MemoryLink)
        assert isinstance(theirs, MemoryLink)
        assert ours.statistics().messages_queued == 0
        assert theirs.statistics().messages_queued == 0


async def test_establish_with_the_same_swarm_key(alice: Identity, bob: Identity) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        left, right = await establish_both(
            ours,
            theirs,
            alice,
            bob,
            initiator={"swarm_key": SWARM_KEY},
            responder={"swarm_key": SWARM_KEY},
        )
        assert isinstance(left, SecureChannel)
        assert isinstance(right, SecureChannel)
        with anyio.fail_after(WAIT):
            await left.send(b"private")
            assert await right.receive() == b"private"


@pytest.mark.parametrize("wrong_side", ["initiator", "responder"])
async def test_expected_remote_mismatch(
    alice: Identity, bob: Identity, carol: Identity, wrong_side: str
) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        wrong = {"expected_remote": carol.public_key}
        left, right = await establish_both(ours, theirs, alice, bob, **{wrong_side: wrong})
        mismatch, other = (left, right) if wrong_side == "initiator" else (right, left)
        actual = bob.public_key if wrong_side == "initiator" else alice.public_key
        assert isinstance(mismatch, IdentityMismatchError), mismatch
        assert mismatch.expected == carol.public_key
        assert mismatch.actual == actual
        assert isinstance(other, HandshakeError), other
        assert not isinstance(other, IdentityMismatchError)
        assert "abort" in str(other)
        await assert_closed(ours)
        await assert_closed(theirs)


@pytest.mark.parametrize(
    ("initiator_key", "responder_key"),
    [(SWARM_KEY, OTHER_SWARM_KEY), (SWARM_KEY, None), (None, SWARM_KEY)],
    ids=["different keys", "responder has none", "initiator has none"],
)
async def test_wrong_swarm_key_fails_on_both_sides(
    alice: Identity, bob: Identity, initiator_key: bytes | None, responder_key: bytes | None
) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        left, right = await establish_both(
            ours,
            theirs,
            alice,
            bob,
            initiator={"swarm_key": initiator_key},
            responder={"swarm_key": responder_key},
        )
        assert isinstance(left, HandshakeError), left
        assert isinstance(right, HandshakeError), right
        assert not isinstance(left, IdentityMismatchError)
        assert not isinstance(right, IdentityMismatchError)
        await assert_closed(ours)
        await assert_closed(theirs)


@pytest.mark.parametrize("initiator", [True, False], ids=["initiator", "responder"])
async def test_silent_peer_times_out_and_the_link_is_closed(
    alice: Identity, bob: Identity, initiator: bool
) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        honest, silent = (ours, theirs) if initiator else (theirs, ours)
        timeout = 0.2
        start = anyio.current_time()
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await establish(honest, alice, initiator=initiator, timeout=timeout)
        elapsed = anyio.current_time() - start
        assert timeout <= elapsed < timeout + 2.0
        await assert_closed(honest)
        received = await drain(silent)
        # What the silent peer saw: message 1 (from an initiator), then an abort, then EOF.
        assert [m[0] for m in received] == ([0x00, 0x01] if initiator else [0x01])
        assert received[-1][1] == ErrorCode.TIMEOUT


async def test_peer_closing_during_the_handshake(alice: Identity, bob: Identity) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        await theirs.aclose()
        with anyio.fail_after(WAIT), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await establish(ours, alice, initiator=True)
        await assert_closed(ours)


async def test_cancelled_establish_closes_the_link(alice: Identity, bob: Identity) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        with anyio.move_on_after(0.05) as scope:
            await establish(ours, alice, initiator=True, timeout=WAIT)
        assert scope.cancelled_caught
        await assert_closed(ours)
        with anyio.fail_after(WAIT):
            assert (await theirs.receive())[0] == 0x00  # message 1 went out
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await theirs.receive()


async def test_link_too_small_for_a_record_is_refused_and_closed(
    alice: Identity, bob: Identity
) -> None:
    async with linked(alice, bob, max_message_size=SEALED - 1) as (_, ours, theirs):
        left, right = await establish_both(ours, theirs, alice, bob)
        assert isinstance(left, ValueError), left
        assert isinstance(right, ValueError), right
        # Failed setup closes the half-built resource: nobody else owns these links now.
        await assert_closed(ours)
        await assert_closed(theirs)


# --- Messages --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, RECORD, RECORD + 1, 2 * RECORD, 200_000, "max"], ids=str)
async def test_messages_round_trip_both_ways(
    alice: Identity, bob: Identity, size: int | str
) -> None:
    async with secure_pair(alice, bob) as (net, left, right):
        n = left.max_message_size if size == "max" else int(size)
        sizes: list[int] = []
        net.tap(lambda _src, _dst, data: sizes.append(len(data)))
        data = payload(n)
        with anyio.fail_after(WAIT):
            await left.send(data)
            assert await right.receive() == data
            await right.send(data[::-1])
            assert await left.receive() == data[::-1]
        # Each channel message is exactly one link message, records concatenated.
        assert sizes == [link_size(n), link_size(n)]


async def test_many_messages_keep_order_and_nonces_in_step(alice: Identity, bob: Identity) -> None:
    async with secure_pair(alice, bob) as (_, left, right):
        messages = [payload(size) for size in (5, RECORD + 7, 0, 3 * RECORD, 1, 100_000)]
        with anyio.fail_after(WAIT):
            for message in messages:
                await left.send(message)
            for message in messages:
                assert await right.receive() == message


@pytest.mark.parametrize(
    ("link_max", "expected"),
    [
        (SEALED, RECORD),
        (100_000, RECORD + (100_000 - SEALED - TAG)),
        (MIB, 16 * RECORD),
        (4 * MIB, MIB),  # capped by the channel's own default limit
    ],
    ids=["one record", "100000", "1 MiB", "4 MiB"],
)
async def test_largest_message_fits_one_link_message(
    alice: Identity, bob: Identity, link_max: int, expected: int
) -> None:
    async with secure_pair(alice, bob, max_message_size=link_max) as (net, left, right):
        assert left.max_message_size == right.max_message_size == expected
        assert link_size(expected) <= link_max
        sent: list[int] = []
        net.tap(lambda _src, _dst, data: sent.append(len(data)))
        with pytest.raises(ValueError, match="exceeds"):
            await left.send(bytes(expected + 1))
        assert sent == []  # nothing went out
        data = payload(expected)
        with anyio.fail_after(WAIT):
            await left.send(data)
            assert await right.receive() == data
            # The refused send did not disturb the channel in either direction.
            await right.send(b"after")
            assert await left.receive() == b"after"


async def test_send_eof_and_aclose(alice: Identity, bob: Identity) -> None:
    async with secure_pair(alice, bob) as (_, left, right):
        with anyio.fail_after(WAIT):
            await left.send(b"last")
            await left.send_eof()
            assert await right.receive() == b"last"
            with pytest.raises(anyio.EndOfStream):
                await right.receive()
            await right.send(b"still open this way")
            assert await left.receive() == b"still open this way"
            await right.aclose()
            with pytest.raises(anyio.EndOfStream):
                await left.receive()
            with pytest.raises(anyio.ClosedResourceError):
                await right.send(b"x")


# --- Hostile input on an established channel -------------------------------------

Attack = Callable[[Link, TransportSession, SecureChannel], Awaitable[None]]


async def garbage(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(random.Random(1).randbytes(100))


async def empty(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(b"")


async def shorter_than_a_tag(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(bytes(TAG - 1))


async def truncated_record(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(keys.encrypt(b"x" * 100)[:-1])


async def flipped_byte(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    record = bytearray(keys.encrypt(b"x" * 100))
    record[50] ^= 0x01
    await raw.send(bytes(record))


async def replayed(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    record = keys.encrypt(b"first")
    await raw.send(record)
    assert await channel.receive() == b"first"
    await raw.send(record)


async def replayed_multi_record(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    message = encode(keys, payload(RECORD + 500))
    await raw.send(message)
    assert await channel.receive() == payload(RECORD + 500)
    await raw.send(message)


async def reordered(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    keys.encrypt(b"skipped")
    await raw.send(keys.encrypt(b"second"))


async def reflected(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await channel.send(b"ping")
    await raw.send(await raw.receive())  # the channel's own record, sent back to it


async def oversized_garbage(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(bytes(raw.max_message_size))


async def last_record_short(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(keys.encrypt(bytes(RECORD)) + keys.encrypt(b"tail")[: TAG - 1])


async def last_record_one_byte(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(encode(keys, bytes(2 * RECORD)) + b"\x00")


async def misaligned_records(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    await raw.send(keys.encrypt(b"short first") + keys.encrypt(bytes(RECORD)))


async def records_swapped(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    first, second = keys.encrypt(bytes(RECORD)), keys.encrypt(b"\x01" * RECORD)
    await raw.send(second + first)


async def good_then_bad_record(raw: Link, keys: TransportSession, channel: SecureChannel) -> None:
    good = keys.encrypt(bytes(RECORD))
    bad = bytearray(keys.encrypt(b"end"))
    bad[-1] ^= 0x80
    await raw.send(good + bytes(bad))


ATTACKS: list[Attack] = [
    garbage,
    empty,
    shorter_than_a_tag,
    truncated_record,
    flipped_byte,
    replayed,
    replayed_multi_record,
    reordered,
    reflected,
    oversized_garbage,
    last_record_short,
    last_record_one_byte,
    misaligned_records,
    records_swapped,
    good_then_bad_record,
]


async def assert_rejected(channel: SecureChannel, raw: Link) -> None:
    """``channel`` fails its next receive with FrameError, closes its link, and stays dead."""
    with anyio.fail_after(WAIT):
        with pytest.raises(FrameError):
            await channel.receive()
        with pytest.raises((anyio.ClosedResourceError, anyio.BrokenResourceError)):
            await channel.receive()
        with pytest.raises((anyio.ClosedResourceError, anyio.BrokenResourceError)):
            await channel.send(b"x")
        # The hostile side sees the link go away.
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await raw.receive()


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.__name__)
async def test_hostile_input_is_a_frame_error_and_closes_the_link(
    alice: Identity, bob: Identity, attack: Attack
) -> None:
    async with hostile_pair(alice, bob) as (channel, raw, keys):
        # Sanity: the hand-made side really speaks the protocol.
        await raw.send(encode(keys, b"hello"))
        with anyio.fail_after(WAIT):
            assert await channel.receive() == b"hello"
            await attack(raw, keys, channel)
        await assert_rejected(channel, raw)


async def test_authentic_message_over_max_message_size_is_a_frame_error(
    alice: Identity, bob: Identity
) -> None:
    # The link carries 4 MiB, the channel's limit is 1 MiB: the peer's keys are valid,
    # but the message is larger than this channel accepts.
    async with hostile_pair(alice, bob, max_message_size=4 * MIB) as (channel, raw, keys):
        assert channel.max_message_size == MIB
        with anyio.fail_after(WAIT):
            await raw.send(encode(keys, bytes(channel.max_message_size)))
            assert await channel.receive() == bytes(channel.max_message_size)
            await raw.send(encode(keys, bytes(channel.max_message_size + 1)))
        await assert_rejected(channel, raw)


# --- Hostile input during the handshake ------------------------------------------

BAD_HANDSHAKE_MESSAGES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="type only"),
    pytest.param(b"\x00" + bytes(31), id="short ephemeral key"),
    pytest.param(b"\x00" + random.Random(2).randbytes(100), id="garbage noise message"),
    pytest.param(b"\x07" + bytes(40), id="unknown type"),
    pytest.param(b"\x02" + bytes(TAG), id="ready out of turn"),
    pytest.param(b"\x00" * 1025, id="oversized"),
    pytest.param(b"\x00" + random.Random(3).randbytes(SEALED), id="oversized noise message"),
    pytest.param(bytes(MIB), id="link-sized"),
    pytest.param(b"\x01", id="abort without code"),
    pytest.param(b"\x01\x05go away", id="abort with reason"),
    pytest.param(b"\x01\xff" + b"\xff" * 300, id="abort with junk reason"),
]


@pytest.mark.parametrize("message", BAD_HANDSHAKE_MESSAGES)
@pytest.mark.parametrize("initiator", [True, False], ids=["initiator", "responder"])
async def test_bad_handshake_message_fails_fast(
    alice: Identity, bob: Identity, initiator: bool, message: bytes
) -> None:
    async with linked(alice, bob) as (_, ours, theirs):
        honest, raw = (ours, theirs) if initiator else (theirs, ours)
        await raw.send(message)  # what the hostile peer answers (or opens with)
        timeout = 2.0
        start = anyio.current_time()
        with anyio.fail_after(WAIT), pytest.raises((HandshakeError, FrameError)) as info:
            await establish(honest, alice, initiator=initiator, timeout=timeout)
        assert anyio.current_time() - start < timeout  # failed on the message, not the clock
        is_abort = message[:1] == b"\x01"
        if is_abort:
            assert "abort" in str(info.value)
        if message == b"\x01\x05go away":
            assert "go away" in str(info.value)
        await assert_closed(honest)
        received = await drain(raw)
        expected_types = [0x00] if initiator else []
        if not is_abort:
            expected_types.append(0x01)  # an abort is sent back, except to an abort
        assert [m[0] for m in received] == expected_types
