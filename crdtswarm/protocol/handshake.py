"""crdtswarm's link handshake: Noise XX binding the two nodes' Ed25519 identities.

The protocol is ``Noise_XX_25519_ChaChaPoly_BLAKE2b``, or
``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b`` when a 32-byte swarm key makes the swarm
private, with the prologue `PROLOGUE`. Each side's Noise static key is the X25519
conversion of its Ed25519 identity key, and each side proves that identity inside
the encrypted handshake with an *identity proof*:

```
version 1 (1 byte) | Ed25519 public key (32) | Ed25519 signature (64) over
    b"crdtswarm-noise-static-key:" + the sender's X25519 static public key
```

Link messages during the handshake start with a type byte; after it there is none
(transport messages are bare Noise ciphertexts, see `TransportSession`):

```
initiator                                              responder
0x00 | XX message 1: e, empty payload           ->
                                                <-     0x00 | XX message 2: e, ee, s, es, proof
0x00 | XX message 3: s, se[, psk], proof        ->
                                                <-     0x02 | transport-encrypted empty payload
0x01 | error code (1 byte) | UTF-8 reason (<= 200 bytes): abort, either way, any time
```

The final ``0x02`` ("ready") makes a wrong swarm key fail on both sides: the
responder detects it at message 3 and aborts, and the initiator, which completes
only on ready, receives that abort.

Transitions (`_TRANSITIONS`; any other input is a failure):

```
state                        expects        handler          next state
RESPONDER_AWAIT_MESSAGE_1    0x00 msg 1     queue msg 2      RESPONDER_AWAIT_MESSAGE_3
INITIATOR_AWAIT_MESSAGE_2    0x00 msg 2     queue msg 3      INITIATOR_AWAIT_READY
RESPONDER_AWAIT_MESSAGE_3    0x00 msg 3     queue ready      COMPLETE
INITIATOR_AWAIT_READY        0x02 ready     -                COMPLETE
```

Rules:

1. COMPLETE and FAILED are terminal. A failure queues exactly one abort before
   raising, except when the failure *is* a received abort: aborts are never answered.
2. `HandshakeSession.remote_key` is set only once an identity proof verified against
   the Noise remote static key; a `TransportSession` is handed out only in COMPLETE.
3. A received link message is at most `MAX_HANDSHAKE_MESSAGE_SIZE` bytes.
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, ClassVar, Final, NoReturn

from crdtswarm.errors import (
    ErrorCode,
    FrameError,
    HandshakeError,
    IdentityMismatchError,
    LocalProtocolError,
    ProtocolError,
)
from crdtswarm.identity import KEY_SIZE, SIGNATURE_SIZE, InvalidKeyError, PublicKey
from crdtswarm.protocol.noise import MAX_MESSAGE_SIZE, TAG_SIZE, CipherState, HandshakeState

if TYPE_CHECKING:
    from collections.abc import Callable

    from crdtswarm.identity import Identity

__all__ = [
    "MAX_ABORT_REASON_SIZE",
    "MAX_HANDSHAKE_MESSAGE_SIZE",
    "PROLOGUE",
    "PROTOCOL_NAME",
    "PROTOCOL_NAME_PSK",
    "SWARM_KEY_SIZE",
    "HandshakeSession",
    "TransportSession",
]

PROLOGUE: Final = b"crdtswarm/1"
"""Mixed into the handshake hash: both sides must speak this protocol version."""
PROTOCOL_NAME: Final = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
"""The Noise protocol of an open swarm."""
PROTOCOL_NAME_PSK: Final = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
"""The Noise protocol of a private swarm (the swarm key is the psk)."""
SWARM_KEY_SIZE: Final = 32
"""The size of a swarm key, in bytes."""
MAX_HANDSHAKE_MESSAGE_SIZE: Final = 1024
"""The largest handshake-phase link message accepted, in bytes (the largest sent is 194)."""
MAX_ABORT_REASON_SIZE: Final = 200
"""The longest abort reason sent, in UTF-8 bytes."""

_HANDSHAKE: Final = 0x00
_ABORT: Final = 0x01
_READY: Final = 0x02

_PROOF_VERSION: Final = 1
_PROOF_SIZE: Final = 1 + KEY_SIZE + SIGNATURE_SIZE
_PROOF_CONTEXT: Final = b"crdtswarm-noise-static-key:"
_HINT: Final = "wrong or missing swarm key, or corrupted message"


class _State(enum.Enum):
    INITIATOR_AWAIT_MESSAGE_2 = enum.auto()
    INITIATOR_AWAIT_READY = enum.auto()
    RESPONDER_AWAIT_MESSAGE_1 = enum.auto()
    RESPONDER_AWAIT_MESSAGE_3 = enum.auto()
    COMPLETE = enum.auto()
    FAILED = enum.auto()


class TransportSession:
    """The Noise transport phase of a link: one send and one receive `CipherState`.

    Each message is one bare ChaChaPoly ciphertext with an implicit, strictly
    increasing nonce, so a replayed, reordered, truncated or altered message fails.
    """

    MAX_PLAINTEXT_SIZE: ClassVar[int] = MAX_MESSAGE_SIZE - TAG_SIZE
    """The largest plaintext `encrypt` accepts, in bytes."""

    __slots__ = ("_receive", "_send")

    def __init__(self, send: CipherState, receive: CipherState) -> None:
        """Wrap the two ciphers of a completed handshake.

        Raises:
            ValueError: if either cipher has no key.
        """
        if not (send.has_key() and receive.has_key()):
            raise ValueError("a TransportSession needs two keyed CipherStates")
        self._send = send
        self._receive = receive

    def encrypt(self, plaintext: bytes | memoryview) -> bytes:
        """Encrypt the next message to send.

        Raises:
            ValueError: if ``plaintext`` is longer than `MAX_PLAINTEXT_SIZE`.
            LocalProtocolError: if the 2**64-1 nonces are exhausted.
        """
        return self._send.encrypt_with_ad(b"", plaintext)

    def decrypt(self, message: bytes | memoryview) -> bytes:
        """Authenticate and decrypt the next received message.

        Raises:
            FrameError: if the message is too long or too short, or fails
                authentication (altered, truncated, replayed or out of order).
        """
        return self._receive.decrypt_with_ad(b"", message)


class HandshakeSession:
    """One side of crdtswarm's link handshake, sans-IO.

    Feed every received link message to `receive_message` and send what
    `data_to_send` returns, in order, until `is_complete`; then use `transport`.

    Args:
        identity: this node's identity.
        initiator: True on the dialling side, which sends first.
        expected_remote: the key we dialled (or the only key we accept); a peer
            proving another key fails with `IdentityMismatchError`.
        swarm_key: the 32-byte key of a private swarm, or None for an open one.
        rng: returns the given number of random bytes.

    Raises:
        ValueError: if ``swarm_key`` is given and is not 32 bytes.
    """

    __slots__ = (
        "_expected_remote",
        "_failure",
        "_noise",
        "_outgoing",
        "_proof",
        "_remote_key",
        "_state",
        "_transport",
    )

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        expected_remote: PublicKey | None = None,
        swarm_key: bytes | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if swarm_key is not None and len(swarm_key) != SWARM_KEY_SIZE:
            raise ValueError(f"a swarm key is {SWARM_KEY_SIZE} bytes, got {len(swarm_key)}")
        self._noise = HandshakeState(
            PROTOCOL_NAME if swarm_key is None else PROTOCOL_NAME_PSK,
            initiator=initiator,
            prologue=PROLOGUE,
            s=identity.x25519_private(),
            psks=() if swarm_key is None else (swarm_key,),
            rng=rng,
        )
        static = identity.public_key.x25519()
        self._proof = (
            bytes((_PROOF_VERSION,))
            + bytes(identity.public_key)
            + identity.sign(_PROOF_CONTEXT + static)
        )
        self._expected_remote = expected_remote
        self._remote_key: PublicKey | None = None
        self._transport: TransportSession | None = None
        self._outgoing: list[bytes] = []
        self._failure = ""
        if initiator:
            self._send_noise(b"")
            self._state = _State.INITIATOR_AWAIT_MESSAGE_2
        else:
            self._state = _State.RESPONDER_AWAIT_MESSAGE_1

    @property
    def is_complete(self) -> bool:
        """Whether the handshake succeeded and `transport` is available."""
        return self._state is _State.COMPLETE

    @property
    def is_failed(self) -> bool:
        """Whether the handshake failed or was aborted (by either side)."""
        return self._state is _State.FAILED

    @property
    def remote_key(self) -> PublicKey | None:
        """The peer's identity, once its proof verified."""
        return self._remote_key

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash: identical on both sides, unique to this link.

        Raises:
            LocalProtocolError: before completion.
        """
        if self._state is not _State.COMPLETE:
            raise LocalProtocolError("the handshake is not complete")
        return self._noise.handshake_hash

    def transport(self) -> TransportSession:
        """The transport session; the same object on every call.

        Raises:
            LocalProtocolError: before completion.
        """
        if self._state is not _State.COMPLETE or self._transport is None:
            raise LocalProtocolError("the handshake is not complete")
        return self._transport

    def data_to_send(self) -> list[bytes]:
        """The link messages to send now, in order; the queue is emptied."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def receive_message(self, message: bytes) -> None:
        """Process one received link message.

        On failure the session becomes terminal and an abort is queued for
        `data_to_send` (unless the message was itself an abort) before raising.

        Raises:
            IdentityMismatchError: if the peer proved a key other than ``expected_remote``.
            HandshakeError: if the message is malformed, oversized, unexpected, fails
                to decrypt (wrong or missing swarm key), carries a bad identity proof
                or is an abort from the peer; and on every call after a failure.
            LocalProtocolError: after completion: the message belongs to the transport.
        """
        if self._state is _State.FAILED:
            raise HandshakeError(f"the handshake already failed: {self._failure}")
        if self._state is _State.COMPLETE:
            raise LocalProtocolError(
                "the handshake is complete: pass messages to the transport session"
            )
        if not message:
            self._fail(HandshakeError("empty handshake message"))
        if message[0] == _ABORT:
            self._state = _State.FAILED
            self._failure = f"peer aborted the handshake: {_decode_abort(message)}"
            raise HandshakeError(self._failure)
        if len(message) > MAX_HANDSHAKE_MESSAGE_SIZE:
            self._fail(
                HandshakeError(
                    f"handshake message of {len(message)} bytes exceeds "
                    f"{MAX_HANDSHAKE_MESSAGE_SIZE}"
                )
            )
        expected_type, handler, next_state = _TRANSITIONS[self._state]
        if message[0] != expected_type:
            self._fail(
                HandshakeError(
                    f"unexpected handshake message type {message[0]:#04x} "
                    f"(expected {expected_type:#04x})"
                )
            )
        try:
            handler(self, message[1:])
        except BaseException as exc:
            self._record_failure(exc)
            raise
        self._state = next_state

    def abort(self, code: ErrorCode, reason: str) -> None:
        """Give up (e.g. on a timeout): queue an abort carrying ``code`` and ``reason``.

        Does nothing if the handshake already failed.

        Raises:
            LocalProtocolError: after completion (close the transport instead).
            ValueError: if ``code`` does not fit in one byte.
        """
        if self._state is _State.COMPLETE:
            raise LocalProtocolError("the handshake is complete; close the link instead")
        if self._state is _State.FAILED:
            return
        if not 0 <= code <= 0xFF:
            raise ValueError(f"an abort code is one byte, got {code}")
        self._queue_abort(code, reason)
        self._state = _State.FAILED
        self._failure = f"aborted locally: {reason}"

    # Transition handlers: each gets the message without its type byte.

    def _on_message_1(self, body: bytes) -> None:
        if self._read_noise(body, 1):
            raise HandshakeError(f"handshake message 1 carries a payload: {_HINT}")
        self._send_noise(self._proof)

    def _on_message_2(self, body: bytes) -> None:
        self._accept_proof(self._read_noise(body, 2))
        self._send_noise(self._proof)
        self._transport = TransportSession(*self._noise.transport_ciphers())

    def _on_message_3(self, body: bytes) -> None:
        self._accept_proof(self._read_noise(body, 3))
        self._transport = TransportSession(*self._noise.transport_ciphers())
        self._outgoing.append(bytes((_READY,)) + self._transport.encrypt(b""))

    def _on_ready(self, body: bytes) -> None:
        if self._transport is None:  # unreachable: set in _on_message_2
            raise LocalProtocolError("no transport session before ready")
        try:
            payload = self._transport.decrypt(body)
        except FrameError:
            raise HandshakeError(f"bad ready message: {_HINT}") from None
        if payload:
            raise HandshakeError("the ready message carries a payload")

    def _read_noise(self, body: bytes, number: int) -> bytes:
        try:
            return self._noise.read_message(body)
        except HandshakeError as exc:
            raise HandshakeError(f"bad handshake message {number} ({exc}): {_HINT}") from None

    def _send_noise(self, payload: bytes) -> None:
        self._outgoing.append(bytes((_HANDSHAKE,)) + self._noise.write_message(payload))

    def _accept_proof(self, payload: bytes) -> None:
        remote_static = self._noise.remote_static
        if remote_static is None:  # unreachable: XX messages 2 and 3 carry s
            raise LocalProtocolError("no Noise remote static key")
        if len(payload) != _PROOF_SIZE:
            raise HandshakeError(f"identity proof of {len(payload)} bytes, expected {_PROOF_SIZE}")
        if payload[0] != _PROOF_VERSION:
            raise HandshakeError(f"unsupported identity proof version {payload[0]}")
        try:
            key = PublicKey(payload[1 : 1 + KEY_SIZE])
        except InvalidKeyError:
            raise HandshakeError("the identity proof carries an invalid public key") from None
        if key.x25519() != remote_static:
            raise HandshakeError("the identity proof is for another Noise static key")
        if not key.verify(payload[1 + KEY_SIZE :], _PROOF_CONTEXT + remote_static):
            raise HandshakeError("the identity proof's signature does not verify")
        self._remote_key = key
        expected = self._expected_remote
        if expected is not None and key != expected:
            raise IdentityMismatchError(
                f"expected peer {expected.short}, but the peer proved {key.short}",
                expected=expected,
                actual=key,
            )

    def _fail(self, exc: HandshakeError) -> NoReturn:
        self._record_failure(exc)
        raise exc

    def _record_failure(self, exc: BaseException) -> None:
        """Move to FAILED and queue an abort telling the peer why."""
        if isinstance(exc, ProtocolError):
            code, reason = exc.code, str(exc)
        else:
            code, reason = ErrorCode.INTERNAL_ERROR, "internal error"
        self._state = _State.FAILED
        self._failure = str(exc)
        self._queue_abort(code, reason)

    def _queue_abort(self, code: int, reason: str) -> None:
        encoded = reason.encode("utf-8")[:MAX_ABORT_REASON_SIZE]
        encoded = encoded.decode("utf-8", "ignore").encode("utf-8")  # cut at a character
        self._outgoing.append(bytes((_ABORT, code)) + encoded)


def _decode_abort(message: bytes) -> str:
    """The peer's reason (and code), read leniently: an abort is never answered."""
    if len(message) < 2:
        return "no reason given"
    code = ErrorCode.parse(message[1])
    reason = message[2 : 2 + MAX_ABORT_REASON_SIZE].decode("utf-8", "replace")
    name = code.name if isinstance(code, ErrorCode) else str(code)
    return f"{reason} ({name})" if reason else name


_TRANSITIONS: Final[dict[_State, tuple[int, Callable[[HandshakeSession, bytes], None], _State]]] = {
    _State.RESPONDER_AWAIT_MESSAGE_1: (
        _HANDSHAKE,
        HandshakeSession._on_message_1,
        _State.RESPONDER_AWAIT_MESSAGE_3,
    ),
    _State.INITIATOR_AWAIT_MESSAGE_2: (
        _HANDSHAKE,
        HandshakeSession._on_message_2,
        _State.INITIATOR_AWAIT_READY,
    ),
    _State.RESPONDER_AWAIT_MESSAGE_3: (
        _HANDSHAKE,
        HandshakeSession._on_message_3,
        _State.COMPLETE,
    ),
    _State.INITIATOR_AWAIT_READY: (_READY, HandshakeSession._on_ready, _State.COMPLETE),
}
