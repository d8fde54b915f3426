"""Sealed signals: signed, encrypted, single-use messages between two identities.

A signal (a WebRTC offer or answer, an ICE candidate, ...) travels from its sender
to its recipient through carriers nobody trusts: a signaling server, a forwarding
peer, the shared directory document. `seal_signal` makes it so that a carrier can
neither read, forge, alter, replay nor redirect it, and cannot even tell who sent it;
`open_signal` checks all of that on arrival.

Wire format (version 1)::

    sealed = crypto_box_seal(inner || signature, recipient's X25519 key)   # +48 bytes
    inner  = version    u8        1
             sender     32 bytes  Ed25519 public key
             recipient  32 bytes  Ed25519 public key
             signal_id  16 bytes  random, unique per signal
             expires    u64 BE    unix time in milliseconds
             payload    the rest  (up to the signature)
    signature = Ed25519(sender, SIGNAL_DOMAIN || inner)   # 64 bytes; the domain is
                b"crdtswarm-signal-v1" followed by one zero byte

The sealed box (libsodium ``crypto_box_seal``, an ephemeral X25519 key plus
XSalsa20-Poly1305) hides everything, the sender included, from carriers; the X25519
keys are derived from the Ed25519 identities (`PublicKey.x25519`). The parse is
canonical: fixed fields, then the payload up to the trailing signature.

Rules `open_signal` enforces, in this order (the first failure raises):

1. The sealed input is at most ``max_signal_size`` bytes (`FrameError`).
2. It decrypts with our key (`FrameError`: a signal sealed to someone else and a
   signal altered in transit look the same, and both are undecryptable).
3. It parses as version 1 (`FrameError`).
4. The recipient field is our key (`SignatureError`): a node that received a
   signal cannot re-seal it to a third node and pass it off as addressed to them.
5. The signature verifies under the sender field (`SignatureError`).
6. ``now < expires <= now + max_ttl`` (`SignalExpiredError`): expired signals, and
   signals claiming to live longer than the replay cache is meant to remember.
7. ``(sender, signal_id)`` is not in the `ReplayCache` (`SignalReplayError`), and
   the cache can remember it (see `ReplayCache` for the policy when it is full).

No clock is read here: the caller passes ``now`` (unix seconds, as in the signal).
"""

from __future__ import annotations

import heapq
import math
import os
import struct
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.public

from crdtswarm.errors import FrameError, RemoteProtocolError, SignatureError
from crdtswarm.identity import KEY_SIZE, SIGNATURE_SIZE, Identity, InvalidKeyError, PublicKey

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "MAX_PAYLOAD_SIZE",
    "MAX_SIGNAL_SIZE",
    "MAX_TTL",
    "SIGNAL_DOMAIN",
    "SIGNAL_ID_SIZE",
    "SIGNAL_OVERHEAD",
    "SIGNAL_VERSION",
    "OpenedSignal",
    "ReplayCache",
    "SignalExpiredError",
    "SignalReplayError",
    "open_signal",
    "seal_signal",
]

SIGNAL_VERSION: Final = 1
"""The version byte of the inner encoding."""
SIGNAL_DOMAIN: Final = b"crdtswarm-signal-v1\0"
"""Domain-separation prefix of the signed message."""
SIGNAL_ID_SIZE: Final = 16
"""Bytes of the random signal id."""
MAX_SIGNAL_SIZE: Final = 64 * 1024
"""Default bound on a sealed signal, in bytes (64 KiB)."""
MAX_TTL: Final = 300.0
"""Default bound on a signal's lifetime, in seconds (300 s): the replay window."""
DEFAULT_MAX_ENTRIES: Final = 4096
"""Default number of signal ids a `ReplayCache` remembers."""

_HEADER: Final = struct.Struct(f">B{KEY_SIZE}s{KEY_SIZE}s{SIGNAL_ID_SIZE}sQ")
_SEAL_OVERHEAD: Final = nacl.bindings.crypto_box_SEALBYTES  # ephemeral key + MAC: 48
SIGNAL_OVERHEAD: Final = _SEAL_OVERHEAD + _HEADER.size + SIGNATURE_SIZE
"""Bytes a sealed signal adds to its payload (209)."""
MAX_PAYLOAD_SIZE: Final = MAX_SIGNAL_SIZE - SIGNAL_OVERHEAD
"""Largest payload that fits in a signal of `MAX_SIGNAL_SIZE` bytes."""
_MAX_EXPIRES_MS: Final = (1 << 64) - 1


class SignalExpiredError(RemoteProtocolError):
    """Raised by `open_signal` when a signal is outside its validity window.

    That is: it has expired (``expires <= now``), or it claims an expiry further
    ahead than ``max_ttl`` allows (a sender's clock far ahead of ours, or a sender
    trying to make us remember its id for too long).

    Attributes:
        expires: the signal's expiry, unix seconds.
        now: the time it was checked against, unix seconds.
    """

    def __init__(self, message: str, *, expires: float, now: float) -> None:
        super().__init__(message)
        self.expires = expires
        self.now = now


class SignalReplayError(RemoteProtocolError):
    """Raised by `open_signal` when a signal's freshness cannot be established.

    Usually it is a replay: the same ``(sender, signal_id)`` was opened before. It
    is also raised when the `ReplayCache` is full of unexpired ids and cannot
    remember this one (see `ReplayCache`): the signal is refused rather than
    accepted without protection.

    Attributes:
        signal_id: the 16-byte id of the refused signal.
    """

    def __init__(self, message: str, *, signal_id: bytes) -> None:
        super().__init__(message)
        self.signal_id = signal_id


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenedSignal:
    """A signal that passed every check of `open_signal`."""

    sender: PublicKey
    """Who signed it."""
    payload: bytes
    """The application bytes."""
    signal_id: bytes
    """Its 16-byte random id."""
    expires: float
    """When it stops being valid, unix seconds."""


class ReplayCache:
    """Remembers the ids of opened signals until they expire, within a bounded size.

    An id is remembered until its signal's expiry; after that the signal itself is
    refused as expired, so forgetting the id is safe.

    Policy when full. The cache holds at most ``max_entries`` ids. Expired ids go
    first. If every remembered id is still live, the one expiring soonest is evicted
    *and its expiry becomes a floor*: any later signal expiring at or before the
    floor is refused with `SignalReplayError`, since it might be the evicted one
    replayed. A new signal that would itself be the soonest to expire is refused
    the same way. So a flood can never make the cache grow, and never makes it
    accept a replay; the price is availability: while an attacker keeps the cache
    full of long-lived ids, signals with shorter lifetimes are refused (fail
    closed). Size ``max_entries`` for the signal rate you expect over `MAX_TTL`.

    Args:
        max_entries: the most ids remembered at once (default 4096, at least 1).

    Raises:
        ValueError: if ``max_entries`` is below 1.
    """

    __slots__ = ("_expiries", "_floor", "_heap", "_max_entries")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self._max_entries = max_entries
        self._expiries: dict[bytes, float] = {}
        # Each remembered key is in the heap exactly once (duplicates are refused).
        self._heap: list[tuple[float, bytes]] = []
        self._floor = -math.inf

    @property
    def max_entries(self) -> int:
        """The most ids remembered at once."""
        return self._max_entries

    @property
    def floor(self) -> float:
        """Signals expiring at or before this time are refused (``-inf`` until an eviction)."""
        return self._floor

    def __len__(self) -> int:
        return len(self._expiries)

    def __contains__(self, key: object) -> bool:
        return key in self._expiries

    def expire(self, now: float) -> None:
        """Forget every id whose signal expired at or before ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            del self._expiries[key]

    def check_and_remember(self, key: bytes, expires: float, now: float) -> None:
        """Remember ``key`` (a signal valid until ``expires``), or refuse it.

        Raises:
            SignalReplayError: if ``key`` is already remembered, or it cannot be
                remembered safely (see the class docstring); ``signal_id`` is the last
                16 bytes of ``key``.
        """
        self.expire(now)
        signal_id = key[-SIGNAL_ID_SIZE:]
        if key in self._expiries:
            raise SignalReplayError("signal replayed: its id was seen before", signal_id=signal_id)
        if expires <= self._floor:
            raise SignalReplayError(
                "replay cache overflowed: cannot tell whether this signal was seen before",
                signal_id=signal_id,
            )
        heap = self._heap
        if len(heap) >= self._max_entries:
            if expires <= heap[0][0]:
                raise SignalReplayError(
                    "replay cache full of signals that outlive this one: refusing it",
                    signal_id=signal_id,
                )
            evicted_expiry, evicted = heapq.heappop(heap)
            del self._expiries[evicted]
            self._floor = max(self._floor, evicted_expiry)
        heapq.heappush(heap, (expires, key))
        self._expiries[key] = expires


def _check_time(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value}")


def seal_signal(
    identity: Identity,
    recipient: PublicKey,
    payload: bytes,
    *,
    now: float,
    ttl: float = 60.0,
    nonce: bytes | None = None,
    max_signal_size: int = MAX_SIGNAL_SIZE,
) -> bytes:
    """Sign ``payload`` as ``identity`` and seal it so that only ``recipient`` can open it.

    Args:
        identity: the sender.
        recipient: the only identity able to open the signal.
        payload: the application bytes.
        now: the current unix time, in seconds.
        ttl: seconds the signal stays valid (default 60; more than 0, at most the
            receiver's ``max_ttl``, 300 s by default, or it will be refused).
        nonce: the 16-byte signal id; None (the default) draws a random one. Pass one
            only in tests: a repeated id is refused as a replay.
        max_signal_size: the bound on the sealed result, in bytes (default 64 KiB).

    Returns:
        The sealed signal, ``len(payload) + SIGNAL_OVERHEAD`` bytes.

    Raises:
        ValueError: if ``ttl``, ``now`` or ``nonce`` is out of range, or the sealed
            signal would exceed ``max_signal_size``.
    """
    _check_time("now", now)
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a finite number of seconds > 0, not {ttl}")
    if nonce is None:
        nonce = os.urandom(SIGNAL_ID_SIZE)
    elif len(nonce) != SIGNAL_ID_SIZE:
        raise ValueError(f"a signal id is {SIGNAL_ID_SIZE} bytes, got {len(nonce)}")
    size = len(payload) + SIGNAL_OVERHEAD
    if size > max_signal_size:
        raise ValueError(
            f"a payload of {len(payload)} bytes makes a {size}-byte signal, "
            f"over max_signal_size={max_signal_size}"
        )
    expires_ms = math.floor((now + ttl) * 1000)  # never later than now + ttl
    if expires_ms > _MAX_EXPIRES_MS:
        raise ValueError("expiry out of range")
    inner = (
        _HEADER.pack(
            SIGNAL_VERSION,
            bytes(identity.public_key),
            bytes(recipient),
            bytes(nonce),
            expires_ms,
        )
        + payload
    )
    signature = identity.sign(SIGNAL_DOMAIN + inner)
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient.x25519()))
    return box.encrypt(inner + signature)


def open_signal(
    identity: Identity,
    sealed: bytes,
    *,
    now: float,
    replay: ReplayCache,
    max_ttl: float = MAX_TTL,
    max_signal_size: int = MAX_SIGNAL_SIZE,
) -> OpenedSignal:
    """Decrypt and check a signal sealed to ``identity``; remember its id in ``replay``.

    The checks and the error each one raises are listed in the module docstring.
    The replay cache is updated only when every other check passed.

    Args:
        identity: the recipient (us).
        sealed: the sealed signal, as `seal_signal` made it.
        now: the current unix time, in seconds.
        replay: the cache of ids already opened; share one per identity.
        max_ttl: the longest lifetime accepted, in seconds (default 300).
        max_signal_size: the largest sealed signal accepted, in bytes (default 64 KiB).

    Returns:
        The sender, payload, id and expiry.

    Raises:
        crdtswarm.errors.FrameError: if the input is too large, does not decrypt with
            our key (not for us, or altered) or is malformed.
        crdtswarm.errors.SignatureError: if it is addressed to someone else or its
            signature does not verify.
        SignalExpiredError: if it expired or claims to live longer than ``max_ttl``.
        SignalReplayError: if it was opened before (or cannot be remembered).
        ValueError: if ``now`` is not a finite time.
    """
    _check_time("now", now)
    if len(sealed) > max_signal_size:
        raise FrameError(f"signal of {len(sealed)} bytes exceeds max_signal_size={max_signal_size}")
    if len(sealed) < SIGNAL_OVERHEAD:
        raise FrameError(f"signal of {len(sealed)} bytes is shorter than {SIGNAL_OVERHEAD}")
    box = nacl.public.SealedBox(nacl.public.PrivateKey(identity.x25519_private()))
    try:
        plain = box.decrypt(bytes(sealed))
    except nacl.exceptions.CryptoError:
        raise FrameError("cannot decrypt the signal: not sealed to us, or altered") from None
    inner, signature = plain[:-SIGNATURE_SIZE], plain[-SIGNATURE_SIZE:]
    if len(inner) < _HEADER.size:  # pragma: no cover - implied by SIGNAL_OVERHEAD
        raise FrameError("signal too short")
    version, sender_raw, recipient_raw, signal_id, expires_ms = _HEADER.unpack_from(inner)
    if version != SIGNAL_VERSION:
        raise FrameError(f"unsupported signal version {version}")
    if recipient_raw != bytes(identity.public_key):
        raise SignatureError("signal addressed to another identity (re-sealed by a carrier?)")
    try:
        sender = PublicKey(sender_raw)
    except InvalidKeyError as exc:
        raise SignatureError("signal sender is not a valid public key") from exc
    if not sender.verify(signature, SIGNAL_DOMAIN + inner):
        raise SignatureError(f"bad signature on a signal claiming to come from {sender.short}")
    expires = expires_ms / 1000
    if expires <= now:
        raise SignalExpiredError(
            f"signal expired {now - expires:.3f} s ago", expires=expires, now=now
        )
    if expires > now + max_ttl:
        raise SignalExpiredError(
            f"signal claims to stay valid {expires - now:.3f} s, over max_ttl={max_ttl}",
            expires=expires,
            now=now,
        )
    replay.check_and_remember(sender_raw + signal_id, expires, now)
    return OpenedSignal(
        sender=sender,
        payload=inner[_HEADER.size :],
        signal_id=signal_id,
        expires=expires,
    )
