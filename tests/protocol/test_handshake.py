"""HandshakeSession and TransportSession, driven by hand: no event loop, no clock."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.errors import (
    ErrorCode,
    FrameError,
    HandshakeError,
    IdentityMismatchError,
    LocalProtocolError,
    ProtocolError,
)
from crdtswarm.identity import Identity
from crdtswarm.protocol.handshake import (
    MAX_ABORT_REASON_SIZE,
    MAX_HANDSHAKE_MESSAGE_SIZE,
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeSession,
    TransportSession,
)
from crdtswarm.protocol.noise import CipherState, HandshakeState

# The conftest identities, for hypothesis tests (which cannot take function-scoped fixtures).
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
SWARM_KEY = bytes(range(100, 132))
OTHER_SWARM_KEY = bytes(range(200, 232))

Tamper = Callable[[int, bytes], bytes]


def transfer(a: HandshakeSession, b: HandshakeSession) -> None:
    """Move data_to_send() both ways until neither side has anything to send."""
    while True:
        moved = False
        for source, destination in ((a, b), (b, a)):
            for message in source.data_to_send():
                moved = True
                destination.receive_message(message)
        if not moved:
            return


def run(
    initiator: HandshakeSession, responder: HandshakeSession, tamper: Tamper | None = None
) -> dict[str, list[ProtocolError]]:
    """Deliver messages one at a time, in order, collecting each side's protocol errors.

    ``tamper(index, message)`` may rewrite the index-th delivered message. A message
    for a side that already completed belongs to its transport session and is dropped.
    """
    sessions = {"initiator": initiator, "responder": responder}
    peer = {"initiator": "responder", "responder": "initiator"}
    errors: dict[str, list[ProtocolError]] = {"initiator": [], "responder": []}
    queue: deque[tuple[str, bytes]] = deque()
    index = 0
    while True:
        for name, session in sessions.items():
            queue.extend((peer[name], message) for message in session.data_to_send())
        if not queue:
            return errors
        destination, message = queue.popleft()
        if tamper is not None:
            message = tamper(index, message)
        index += 1
        if sessions[destination].is_complete:
            continue
        try:
            sessions[destination].receive_message(message)
        except ProtocolError as exc:
            errors[destination].append(exc)


def pair(
    initiator_identity: Identity,
    responder_identity: Identity,
    **kwargs: object,
) -> tuple[HandshakeSession, HandshakeSession]:
    """Two sessions; ``responder_``-prefixed keyword arguments go to the responder."""
    initiator_kwargs: dict[str, Any] = {}
    responder_kwargs: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name.startswith("responder_"):
            responder_kwargs[name.removeprefix("responder_")] = value
        else:
            initiator_kwargs[name] = value
    return (
        HandshakeSession(initiator_identity, initiator=True, **initiator_kwargs),
        HandshakeSession(responder_identity, initiator=False, **responder_kwargs),
    )


def connected(
    a: Identity, b: Identity, **kwargs: object
) -> tuple[HandshakeSession, HandshakeSession]:
    initiator, responder = pair(a, b, **kwargs)
    transfer(initiator, responder)
    assert initiator.is_complete
    assert responder.is_complete
    return initiator, responder


def only_abort(session: HandshakeSession) -> bytes:
    [message] = session.data_to_send()
    assert message[0] == 0x01
    assert session.data_to_send() == []
    return message


# --- Success ---------------------------------------------------------------------


def test_both_sides_complete_and_agree(alice: Identity, bob: Identity) -> None:
    initiator, responder = connected(alice, bob)
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 64
    assert initiator.remote_key == bob.public_key
    assert responder.remote_key == alice.public_key
    assert initiator.transport() is initiator.transport()
    assert initiator.data_to_send() == responder.data_to_send() == []
    assert not initiator.is_failed
    assert not responder.is_failed


def test_link_message_sizes_and_types(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    assert message_1[0] == 0x00
    assert len(message_1) == 1 + 32  # e, empty payload
    responder.receive_message(message_1)
    [message_2] = responder.data_to_send()
    initiator.receive_message(message_2)
    assert len(message_2) == 1 + 32 + 48 + 97 + 16
    assert not initiator.is_complete  # complete only once ready arrives
    with pytest.raises(LocalProtocolError):
        initiator.transport()
    with pytest.raises(LocalProtocolError):
        _ = initiator.handshake_hash
    assert initiator.remote_key == bob.public_key
    [message_3] = initiator.data_to_send()
    responder.receive_message(message_3)
    assert responder.is_complete
    [ready] = responder.data_to_send()
    assert ready[0] == 0x02
    assert len(ready) == 1 + 16
    initiator.receive_message(ready)
    assert initiator.is_complete


def test_transport_round_trip_both_ways(alice: Identity, bob: Identity) -> None:
    initiator, responder = connected(alice, bob)
    a, b = initiator.transport(), responder.transport()
    for size in (0, 1, 1000, TransportSession.MAX_PLAINTEXT_SIZE):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert b.decrypt(a.encrypt(data)) == data
        assert a.decrypt(b.encrypt(data)) == data
    assert TransportSession.MAX_PLAINTEXT_SIZE == 65535 - 16
    assert len(a.encrypt(b"x")) == 1 + 16
    assert a.encrypt(b"same") != a.encrypt(b"same")


def test_transport_rejects_replayed_reordered_and_altered_messages(
    alice: Identity, bob: Identity
) -> None:
    initiator, responder = connected(alice, bob)
    a, b = initiator.transport(), responder.transport()
    first, second, third = a.encrypt(b"1"), a.encrypt(b"2"), a.encrypt(b"3")
    with pytest.raises(FrameError):
        b.decrypt(second)  # reordered
    assert b.decrypt(first) == b"1"
    with pytest.raises(FrameError):
        b.decrypt(first)  # replayed
    with pytest.raises(FrameError):
        b.decrypt(second[:-1] + bytes([second[-1] ^ 0x80]))  # flipped tag
    with pytest.raises(FrameError):
        b.decrypt(bytes([second[0] ^ 1]) + second[1:])  # flipped body
    with pytest.raises(FrameError):
        b.decrypt(second[:10])  # truncated
    with pytest.raises(FrameError):
        b.decrypt(bytes(65536))  # too long
    with pytest.raises(FrameError):
        a.decrypt(first)  # our own message echoed back
    assert b.decrypt(second) == b"2"  # failures did not advance the nonce
    assert b.decrypt(third) == b"3"
    with pytest.raises(ValueError, match="at most"):
        a.encrypt(bytes(TransportSession.MAX_PLAINTEXT_SIZE + 1))


def test_expected_remote_matches(alice: Identity, bob: Identity) -> None:
    initiator, responder = connected(
        alice, bob, expected_remote=bob.public_key, responder_expected_remote=alice.public_key
    )
    assert initiator.remote_key == bob.public_key
    assert responder.remote_key == alice.public_key


def test_seeded_rng_makes_the_handshake_deterministic(alice: Identity, bob: Identity) -> None:
    def transcript(seed: int) -> list[bytes]:
        rng = random.Random(seed).randbytes
        initiator, responder = pair(alice, bob, rng=rng, responder_rng=rng)
        sent: list[bytes] = []

        def record(_: int, message: bytes) -> bytes:
            sent.append(message)
            return message

        run(initiator, responder, tamper=record)
        return sent

    assert transcript(1) == transcript(1)
    assert transcript(1) != transcript(2)


# --- Identity --------------------------------------------------------------------


def test_reaching_someone_else_fails_on_both_sides(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    initiator, responder = pair(alice, carol, expected_remote=bob.public_key)
    errors = run(initiator, responder)
    [mismatch] = errors["initiator"]
    assert isinstance(mismatch, IdentityMismatchError)
    assert mismatch.expected == bob.public_key
    assert mismatch.actual == carol.public_key
    assert mismatch.code == ErrorCode.HANDSHAKE_ERROR
    [aborted] = errors["responder"]
    assert type(aborted) is HandshakeError
    assert "peer aborted the handshake" in str(aborted)
    assert bob.public_key.short in str(aborted)
    # The initiator gave up before message 3: it never proved its identity to carol.
    assert responder.remote_key is None
    assert initiator.is_failed
    assert responder.is_failed


def test_responder_expected_remote_mismatch(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    initiator, responder = pair(alice, bob, responder_expected_remote=carol.public_key)
    errors = run(initiator, responder)
    [mismatch] = errors["responder"]
    assert isinstance(mismatch, IdentityMismatchError)
    assert mismatch.actual == alice.public_key
    [aborted] = errors["initiator"]
    assert "peer aborted the handshake" in str(aborted)
    assert not initiator.is_complete


# --- Swarm keys ------------------------------------------------------------------


def test_matching_swarm_keys(alice: Identity, bob: Identity) -> None:
    initiator, responder = connected(alice, bob, swarm_key=SWARM_KEY, responder_swarm_key=SWARM_KEY)
    open_initiator, _ = connected(alice, bob)
    assert initiator.handshake_hash != open_initiator.handshake_hash
    a, b = initiator.transport(), responder.transport()
    assert b.decrypt(a.encrypt(b"private")) == b"private"


@pytest.mark.parametrize(
    ("initiator_key", "responder_key"),
    [(SWARM_KEY, OTHER_SWARM_KEY), (SWARM_KEY, None), (None, SWARM_KEY)],
    ids=["wrong", "responder-missing", "initiator-missing"],
)
def test_swarm_key_mismatch_fails_on_both_sides(
    alice: Identity, bob: Identity, initiator_key: bytes | None, responder_key: bytes | None
) -> None:
    initiator, responder = pair(
        alice, bob, swarm_key=initiator_key, responder_swarm_key=responder_key
    )
    errors = run(initiator, responder)
    assert not initiator.is_complete
    assert not responder.is_complete
    assert initiator.is_failed
    assert responder.is_failed
    [responder_error] = errors["responder"]
    [initiator_error] = errors["initiator"]
    assert type(responder_error) is HandshakeError
    assert type(initiator_error) is HandshakeError
    assert "swarm key" in str(responder_error)
    assert "peer aborted the handshake" in str(initiator_error)
    assert "swarm key" in str(initiator_error)  # the remote reason is included


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_swarm_key_must_be_32_bytes(alice: Identity, size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        HandshakeSession(alice, initiator=True, swarm_key=bytes(size))


# --- Malformed input -------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    private=st.booleans(),
    index=st.integers(min_value=0, max_value=3),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_flipped_byte_fails_with_handshake_error(
    data: st.DataObject, private: bool, index: int, mask: int
) -> None:
    key = SWARM_KEY if private else None
    initiator, responder = pair(ALICE, BOB, swarm_key=key, responder_swarm_key=key)

    def flip(position_index: int, message: bytes) -> bytes:
        if position_index != index:
            return message
        position = data.draw(st.integers(min_value=0, max_value=len(message) - 1))
        return message[:position] + bytes([message[position] ^ mask]) + message[position + 1 :]

    errors = run(initiator, responder, tamper=flip)
    raised = errors["initiator"] + errors["responder"]
    assert raised
    assert all(isinstance(exc, HandshakeError) for exc in raised)
    assert not initiator.is_complete
    if index < 3:  # only a flipped "ready" reaches the responder after it completed
        assert not responder.is_complete


@pytest.mark.parametrize("index", [0, 1, 2, 3])
@pytest.mark.parametrize("keep", [0, 1, 2, 17, 32, -1])
def test_truncated_messages_fail(alice: Identity, bob: Identity, index: int, keep: int) -> None:
    initiator, responder = pair(alice, bob)

    def truncate(position_index: int, message: bytes) -> bytes:
        if position_index != index:
            return message
        return message[: min(keep % len(message), len(message) - 1)]

    errors = run(initiator, responder, tamper=truncate)
    raised = errors["initiator"] + errors["responder"]
    assert raised
    assert all(isinstance(exc, HandshakeError) for exc in raised)
    assert not initiator.is_complete


def test_oversized_message(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    too_big = message_1 + bytes(MAX_HANDSHAKE_MESSAGE_SIZE + 1 - len(message_1))
    with pytest.raises(HandshakeError, match="exceeds"):
        responder.receive_message(too_big)
    abort = only_abort(responder)
    assert abort[1] == ErrorCode.HANDSHAKE_ERROR
    with pytest.raises(HandshakeError, match="peer aborted"):
        initiator.receive_message(abort)


def test_extra_bytes_in_message_1(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    with pytest.raises(HandshakeError, match="payload"):
        responder.receive_message(message_1 + b"\x00")
    only_abort(responder)


@pytest.mark.parametrize("message_type", [0x03, 0x10, 0x7F, 0xFF])
def test_garbage_type_byte(alice: Identity, bob: Identity, message_type: int) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    with pytest.raises(HandshakeError, match="unexpected handshake message type"):
        responder.receive_message(bytes([message_type]) + message_1[1:])
    only_abort(responder)


def test_empty_message(alice: Identity, bob: Identity) -> None:
    initiator, _ = pair(alice, bob)
    initiator.data_to_send()
    with pytest.raises(HandshakeError, match="empty"):
        initiator.receive_message(b"")
    only_abort(initiator)


def test_replayed_message_1(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    responder.receive_message(message_1)
    responder.data_to_send()
    with pytest.raises(HandshakeError, match="message 3"):
        responder.receive_message(message_1)
    only_abort(responder)


def test_ready_out_of_turn(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    initiator.data_to_send()
    with pytest.raises(HandshakeError, match="type 0x02"):
        initiator.receive_message(b"\x02" + bytes(16))
    only_abort(initiator)
    with pytest.raises(HandshakeError, match="type 0x02"):
        responder.receive_message(b"\x02" + bytes(16))


def _forge_initiator(alice: Identity, responder: HandshakeSession, proof: bytes) -> None:
    """Run a handshake toward ``responder`` as alice's Noise key, with any message-3 payload."""
    noise = HandshakeState(
        PROTOCOL_NAME, initiator=True, prologue=PROLOGUE, s=alice.x25519_private()
    )
    responder.receive_message(b"\x00" + noise.write_message(b""))
    [message_2] = responder.data_to_send()
    noise.read_message(message_2[1:])
    responder.receive_message(b"\x00" + noise.write_message(proof))


def _proof(identity: Identity, static: bytes, version: int = 1) -> bytes:
    signature = identity.sign(b"crdtswarm-noise-static-key:" + static)
    return bytes([version]) + bytes(identity.public_key) + signature


@pytest.mark.parametrize(
    ("make_proof", "message"),
    [
        (lambda a, c: _proof(a, a.public_key.x25519()), None),  # the honest proof
        (lambda a, c: _proof(c, c.public_key.x25519()), "another Noise static key"),
        (lambda a, c: _proof(c, a.public_key.x25519()), "another Noise static key"),
        (
            lambda a, c: _proof(a, a.public_key.x25519())[:33] + _proof(c, b"x")[33:],
            "does not verify",
        ),
        (lambda a, c: _proof(a, b"other"), "does not verify"),
        (lambda a, c: _proof(a, a.public_key.x25519(), version=2), "version"),
        (lambda a, c: _proof(a, a.public_key.x25519())[:-1], "97"),
        (lambda a, c: _proof(a, a.public_key.x25519()) + b"\x00", "97"),
        (lambda a, c: b"\x01" + b"\xff" * 32 + bytes(64), "invalid public key"),
        (lambda a, c: b"", "expected 97"),
    ],
)
def test_forged_identity_proof_is_rejected(
    alice: Identity,
    bob: Identity,
    carol: Identity,
    make_proof: Callable[[Identity, Identity], bytes],
    message: str | None,
) -> None:
    responder = HandshakeSession(bob, initiator=False)
    proof = make_proof(alice, carol)
    if message is None:
        _forge_initiator(alice, responder, proof)
        assert responder.is_complete
        assert responder.remote_key == alice.public_key
        return
    with pytest.raises(HandshakeError, match=message) as excinfo:
        _forge_initiator(alice, responder, proof)
    assert type(excinfo.value) is HandshakeError
    assert responder.remote_key is None
    only_abort(responder)


def test_forged_responder_proof_is_rejected(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    initiator = HandshakeSession(alice, initiator=True)
    noise = HandshakeState(
        PROTOCOL_NAME, initiator=False, prologue=PROLOGUE, s=bob.x25519_private()
    )
    [message_1] = initiator.data_to_send()
    noise.read_message(message_1[1:])
    message_2 = noise.write_message(_proof(carol, bob.public_key.x25519()))
    with pytest.raises(HandshakeError, match="another Noise static key"):
        initiator.receive_message(b"\x00" + message_2)
    only_abort(initiator)


# --- Aborts and terminal states --------------------------------------------------


def test_local_abort_reaches_the_peer_and_is_not_answered(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    responder.receive_message(initiator.data_to_send()[0])
    responder.data_to_send()
    initiator.abort(ErrorCode.TIMEOUT, "gave up waiting")
    assert initiator.is_failed
    abort = only_abort(initiator)
    assert abort == b"\x01\x08gave up waiting"
    with pytest.raises(HandshakeError, match="peer aborted the handshake: gave up waiting"):
        responder.receive_message(abort)
    assert responder.data_to_send() == []
    initiator.abort(ErrorCode.TIMEOUT, "again")  # already failed: nothing more
    assert initiator.data_to_send() == []


def test_abort_reason_is_cut_at_200_bytes_on_a_character(alice: Identity) -> None:
    session = HandshakeSession(alice, initiator=True)
    session.data_to_send()
    session.abort(ErrorCode.CANCELLED, "é" * 150)  # 300 bytes of UTF-8
    abort = only_abort(session)
    reason = abort[2:]
    assert len(reason) == MAX_ABORT_REASON_SIZE
    assert reason.decode("utf-8") == "é" * 100


@pytest.mark.parametrize(
    "abort", [b"\x01", b"\x01\x09", b"\x01\xee\xff\xfe", b"\x01\x01" + bytes(2000)]
)
def test_malformed_aborts_still_abort_without_reply(
    alice: Identity, bob: Identity, abort: bytes
) -> None:
    responder = HandshakeSession(bob, initiator=False)
    with pytest.raises(HandshakeError, match="peer aborted the handshake"):
        responder.receive_message(abort)
    assert responder.is_failed
    assert responder.data_to_send() == []


def test_calls_after_failure_raise_handshake_error(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    [message_1] = initiator.data_to_send()
    with pytest.raises(HandshakeError):
        responder.receive_message(b"\x07")
    only_abort(responder)
    with pytest.raises(HandshakeError, match="already failed"):
        responder.receive_message(message_1)
    assert responder.data_to_send() == []
    with pytest.raises(LocalProtocolError):
        responder.transport()


def test_messages_after_completion_belong_to_the_transport(alice: Identity, bob: Identity) -> None:
    initiator, responder = connected(alice, bob)
    message = initiator.transport().encrypt(b"data")
    with pytest.raises(LocalProtocolError, match="transport"):
        responder.receive_message(message)
    assert responder.is_complete
    assert responder.transport().decrypt(message) == b"data"
    with pytest.raises(LocalProtocolError):
        responder.abort(ErrorCode.CANCELLED, "too late")


def test_transport_session_needs_keys() -> None:
    with pytest.raises(ValueError, match="keyed"):
        TransportSession(CipherState(), CipherState(bytes(32)))
