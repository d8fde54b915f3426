"""Sealed signals: round trip, and every way a carrier could tamper with one."""

from __future__ import annotations

import struct

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.errors import FrameError, RemoteProtocolError, SignatureError
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.protocol.signal import (
    MAX_PAYLOAD_SIZE,
    MAX_SIGNAL_SIZE,
    SIGNAL_DOMAIN,
    SIGNAL_OVERHEAD,
    ReplayCache,
    SignalExpiredError,
    SignalReplayError,
    open_signal,
    seal_signal,
)

NOW = 1_700_000_000.0
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
CAROL = Identity(bytes(range(2, 34)))
MALLORY = Identity(bytes(range(3, 35)))


def build_inner(
    *,
    sender: PublicKey,
    recipient: PublicKey,
    signal_id: bytes = b"\x07" * 16,
    expires: float = NOW + 60,
    payload: bytes = b"offer",
    version: int = 1,
) -> bytes:
    """The documented inner encoding, written independently of the module."""
    return (
        struct.pack(">B", version)
        + bytes(sender)
        + bytes(recipient)
        + signal_id
        + struct.pack(">Q", round(expires * 1000))
        + payload
    )


def seal_raw(recipient: PublicKey, plaintext: bytes) -> bytes:
    return nacl.public.SealedBox(nacl.public.PublicKey(recipient.x25519())).encrypt(plaintext)


def unseal_raw(identity: Identity, sealed: bytes) -> bytes:
    return nacl.public.SealedBox(nacl.public.PrivateKey(identity.x25519_private())).decrypt(sealed)


def test_round_trip() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"v=0 offer", now=NOW)
    assert len(sealed) == len(b"v=0 offer") + SIGNAL_OVERHEAD
    opened = open_signal(BOB, sealed, now=NOW + 1, replay=ReplayCache())
    assert opened.sender == ALICE.public_key
    assert opened.payload == b"v=0 offer"
    assert len(opened.signal_id) == 16
    assert opened.expires == pytest.approx(NOW + 60)


def test_empty_and_largest_payloads_round_trip() -> None:
    for payload in (b"", b"x" * MAX_PAYLOAD_SIZE):
        sealed = seal_signal(ALICE, BOB.public_key, payload, now=NOW)
        assert len(sealed) <= MAX_SIGNAL_SIZE
        assert open_signal(BOB, sealed, now=NOW, replay=ReplayCache()).payload == payload
    with pytest.raises(ValueError, match="max_signal_size"):
        seal_signal(ALICE, BOB.public_key, b"x" * (MAX_PAYLOAD_SIZE + 1), now=NOW)


def test_the_carrier_sees_neither_payload_nor_sender() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"secret sdp " * 10, now=NOW)
    assert b"secret sdp" not in sealed
    assert bytes(ALICE.public_key) not in sealed
    assert bytes(BOB.public_key) not in sealed
    # Two seals of the same payload share nothing recognisable.
    again = seal_signal(ALICE, BOB.public_key, b"secret sdp " * 10, now=NOW, nonce=b"\0" * 16)
    assert sealed[:32] != again[:32]


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="ttl"):
        seal_signal(ALICE, BOB.public_key, b"", now=NOW, ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        seal_signal(ALICE, BOB.public_key, b"", now=NOW, ttl=float("inf"))
    with pytest.raises(ValueError, match="now"):
        seal_signal(ALICE, BOB.public_key, b"", now=float("nan"))
    with pytest.raises(ValueError, match="16 bytes"):
        seal_signal(ALICE, BOB.public_key, b"", now=NOW, nonce=b"short")
    with pytest.raises(ValueError, match="max_entries"):
        ReplayCache(0)


SEALED = seal_signal(ALICE, BOB.public_key, b"an offer", now=NOW)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(SEALED) - 1), mask=st.integers(1, 255))
def test_a_flipped_byte_is_rejected(position: int, mask: int) -> None:
    tampered = bytearray(SEALED)
    tampered[position] ^= mask
    with pytest.raises(FrameError):
        open_signal(BOB, bytes(tampered), now=NOW, replay=ReplayCache())


def test_replay_is_rejected() -> None:
    cache = ReplayCache()
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW)
    opened = open_signal(BOB, sealed, now=NOW, replay=cache)
    with pytest.raises(SignalReplayError) as info:
        open_signal(BOB, sealed, now=NOW + 30, replay=cache)
    assert info.value.signal_id == opened.signal_id
    # The same id re-sealed by the sender (fresh ciphertext) is still a replay.
    first = seal_signal(ALICE, BOB.public_key, b"a", now=NOW, nonce=b"\1" * 16)
    second = seal_signal(ALICE, BOB.public_key, b"b", now=NOW, nonce=b"\1" * 16)
    open_signal(BOB, first, now=NOW, replay=cache)
    with pytest.raises(SignalReplayError):
        open_signal(BOB, second, now=NOW, replay=cache)
    # Another sender may use the same id: the cache is keyed by (sender, id).
    other = seal_signal(CAROL, BOB.public_key, b"c", now=NOW, nonce=b"\1" * 16)
    assert open_signal(BOB, other, now=NOW, replay=cache).sender == CAROL.public_key


def test_expired_is_rejected() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW, ttl=10)
    with pytest.raises(SignalExpiredError) as info:
        open_signal(BOB, sealed, now=NOW + 10, replay=ReplayCache())
    assert info.value.expires == pytest.approx(NOW + 10)
    assert info.value.now == NOW + 10
    assert isinstance(info.value, RemoteProtocolError)
    # Still valid a moment before.
    open_signal(BOB, sealed, now=NOW + 9.9, replay=ReplayCache())


def test_expiry_too_far_ahead_is_rejected() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW, ttl=3600)
    with pytest.raises(SignalExpiredError, match="max_ttl"):
        open_signal(BOB, sealed, now=NOW, replay=ReplayCache())
    assert open_signal(BOB, sealed, now=NOW, replay=ReplayCache(), max_ttl=3600).payload


def test_signal_for_bob_cannot_be_opened_by_carol() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW)
    with pytest.raises(FrameError, match="decrypt"):
        open_signal(CAROL, sealed, now=NOW, replay=ReplayCache())


def test_bob_cannot_redirect_alices_signal_to_carol() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW)
    resealed = seal_raw(CAROL.public_key, unseal_raw(BOB, sealed))
    with pytest.raises(SignatureError, match="another identity"):
        open_signal(CAROL, resealed, now=NOW, replay=ReplayCache())


def test_bob_cannot_rewrite_the_recipient_field_either() -> None:
    plain = unseal_raw(BOB, seal_signal(ALICE, BOB.public_key, b"offer", now=NOW))
    rewritten = plain[:33] + bytes(CAROL.public_key) + plain[65:]
    with pytest.raises(SignatureError, match="bad signature"):
        open_signal(CAROL, seal_raw(CAROL.public_key, rewritten), now=NOW, replay=ReplayCache())


def test_forged_sender_is_rejected() -> None:
    inner = build_inner(sender=ALICE.public_key, recipient=BOB.public_key)
    forged = seal_raw(BOB.public_key, inner + MALLORY.sign(SIGNAL_DOMAIN + inner))
    with pytest.raises(SignatureError, match="bad signature"):
        open_signal(BOB, forged, now=NOW, replay=ReplayCache())
    # The same construction signed by the claimed sender is accepted: the test is fair.
    genuine = seal_raw(BOB.public_key, inner + ALICE.sign(SIGNAL_DOMAIN + inner))
    assert open_signal(BOB, genuine, now=NOW, replay=ReplayCache()).payload == b"offer"


def test_signature_without_domain_prefix_is_rejected() -> None:
    inner = build_inner(sender=ALICE.public_key, recipient=BOB.public_key)
    sealed = seal_raw(BOB.public_key, inner + ALICE.sign(inner))
    with pytest.raises(SignatureError):
        open_signal(BOB, sealed, now=NOW, replay=ReplayCache())


def test_unknown_version_and_bad_sender_are_rejected() -> None:
    inner = build_inner(sender=ALICE.public_key, recipient=BOB.public_key, version=2)
    sealed = seal_raw(BOB.public_key, inner + ALICE.sign(SIGNAL_DOMAIN + inner))
    with pytest.raises(FrameError, match="version"):
        open_signal(BOB, sealed, now=NOW, replay=ReplayCache())
    inner = build_inner(sender=ALICE.public_key, recipient=BOB.public_key)
    inner = inner[:1] + bytes(32) + inner[33:]  # all-zero "key": not usable
    sealed = seal_raw(BOB.public_key, inner + ALICE.sign(SIGNAL_DOMAIN + inner))
    with pytest.raises(SignatureError):
        open_signal(BOB, sealed, now=NOW, replay=ReplayCache())


@pytest.mark.parametrize(
    "data",
    [b"", b"\0", bytes(SIGNAL_OVERHEAD - 1), SEALED[:-1], SEALED[:100], bytes(1000)],
    ids=["empty", "one-byte", "below-overhead", "truncated-by-one", "truncated", "zeros"],
)
def test_truncated_or_garbage_input_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        open_signal(BOB, data, now=NOW, replay=ReplayCache())


def test_huge_input_is_a_frame_error_before_decrypting() -> None:
    with pytest.raises(FrameError, match="max_signal_size"):
        open_signal(BOB, bytes(MAX_SIGNAL_SIZE + 1), now=NOW, replay=ReplayCache())
    with pytest.raises(FrameError, match="max_signal_size"):
        open_signal(BOB, SEALED, now=NOW, replay=ReplayCache(), max_signal_size=len(SEALED) - 1)


def test_failed_checks_do_not_poison_the_replay_cache() -> None:
    cache = ReplayCache()
    sealed = seal_signal(ALICE, BOB.public_key, b"offer", now=NOW, ttl=10)
    with pytest.raises(SignalExpiredError):
        open_signal(BOB, sealed, now=NOW + 20, replay=cache)
    assert len(cache) == 0
    open_signal(BOB, sealed, now=NOW, replay=cache)
    assert len(cache) == 1


# --- ReplayCache ------------------------------------------------------------------


def key(i: int) -> bytes:
    return bytes(32) + i.to_bytes(16, "big")


def test_cache_forgets_expired_ids() -> None:
    cache = ReplayCache(max_entries=10)
    cache.check_and_remember(key(1), NOW + 5, NOW)
    assert key(1) in cache
    cache.expire(NOW + 5)
    assert key(1) not in cache
    assert len(cache) == 0


def test_cache_bound_holds_under_100k_distinct_signals() -> None:
    cache = ReplayCache(max_entries=4096)
    accepted = refused = 0
    for i in range(100_000):
        now = NOW + i * 0.001  # 1000 signals per second, each valid 60 s
        try:
            cache.check_and_remember(key(i), now + 60, now)
            accepted += 1
        except SignalReplayError:
            refused += 1
        assert len(cache) <= 4096
    # Every signal got in (each newest one outlives the evicted ones); the floor rose.
    assert accepted == 100_000
    assert refused == 0
    assert cache.floor > NOW
    # A replay of an evicted id is still refused, thanks to the floor.
    with pytest.raises(SignalReplayError):
        cache.check_and_remember(key(0), NOW + 60, NOW + 99.999)


def test_full_cache_refuses_rather_than_forgets() -> None:
    cache = ReplayCache(max_entries=3)
    for i in range(3):  # a flood of long-lived signals
        cache.check_and_remember(key(i), NOW + 300, NOW)
    with pytest.raises(SignalReplayError, match="full"):
        cache.check_and_remember(key(10), NOW + 60, NOW)  # shorter-lived: cannot be held
    assert len(cache) == 3
    assert cache.floor == -float("inf")
    cache.check_and_remember(key(11), NOW + 301, NOW)  # outlives one: evicts it
    assert key(0) not in cache
    assert cache.floor == NOW + 300
    with pytest.raises(SignalReplayError, match="overflowed"):
        cache.check_and_remember(key(0), NOW + 300, NOW)  # the evicted one, replayed
    # Once the flood expires, the cache works normally again.
    cache.check_and_remember(key(12), NOW + 400, NOW + 300)
    assert len(cache) == 2


def test_replay_cache_through_open_signal_stays_bounded() -> None:
    cache = ReplayCache(max_entries=16)
    for i in range(200):
        sealed = seal_signal(ALICE, BOB.public_key, b"", now=NOW + i, ttl=60)
        open_signal(BOB, sealed, now=NOW + i, replay=cache)
        assert len(cache) <= 16


def test_the_longest_ttl_is_accepted_at_once() -> None:
    sealed = seal_signal(ALICE, BOB.public_key, b"", now=NOW + 0.0007, ttl=300)
    assert (
        open_signal(BOB, sealed, now=NOW + 0.0007, replay=ReplayCache()).expires <= NOW + 300.0007
    )
