"""The secure channel: a Noise handshake over any `Link`, then encrypted messages.

`establish` runs `crdtswarm.protocol.handshake.HandshakeSession` over a link and
returns a `SecureChannel`: an ``ObjectStream[bytes]`` authenticated to the remote
identity (`SecureChannel.remote_key`). The channel adds nothing to the link's
ordering and back-pressure; it refuses plaintexts above `SecureChannel.max_message_size`.

Records: a Noise transport message carries at most 65519 bytes of plaintext, but a
channel message may be larger (up to ``max_message_size``, 1 MiB by default), so
that a 64 KiB application write costs one link message, not two. A channel message
is cut into 65519-byte pieces, each encrypted as its own Noise message with the
next nonce, and the ciphertexts are concatenated into ONE link message. Every
ciphertext but the last is exactly 65535 bytes, so the receiver cuts the link
message at 65535-byte boundaries without any length field; a final piece shorter
than the 16-byte tag is a `FrameError`.

Errors at this boundary:

* `crdtswarm.errors.HandshakeError` (or its `IdentityMismatchError`) when the
  handshake fails; the abort is sent to the peer before raising, the link is closed;
* ``TimeoutError`` when the handshake does not finish within its timeout;
* `crdtswarm.errors.FrameError` from `SecureChannel.receive` when a message fails
  authentication (forged, replayed, truncated); the link is closed;
* ``anyio.BrokenResourceError`` / ``anyio.EndOfStream`` as the link reports them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ObjectStream

from crdtswarm.errors import ErrorCode, FrameError, HandshakeError, RemoteProtocolError
from crdtswarm.protocol.handshake import HandshakeSession, TransportSession

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from crdtswarm.identity import Identity, PublicKey
    from crdtswarm.transport.abc import Link

__all__ = ["SecureChannel", "establish"]

logger = logging.getLogger(__name__)

_TAG_SIZE = 16  # ChaCha20-Poly1305 authentication tag
_RECORD = TransportSession.MAX_PLAINTEXT_SIZE  # plaintext bytes per Noise message
_SEALED = _RECORD + _TAG_SIZE  # a full Noise message
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


def _plaintext_capacity(link_size: int) -> int:
    """The largest plaintext whose records fit in one link message of ``link_size`` bytes."""
    full, rest = divmod(link_size, _SEALED)
    return full * _RECORD + max(0, rest - _TAG_SIZE)


class SecureChannel(ObjectStream[bytes]):
    """An authenticated, encrypted message channel to one remote identity."""

    def __init__(
        self,
        link: Link,
        session: TransportSession,
        *,
        local_key: PublicKey,
        remote_key: PublicKey,
        initiator: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._link = link
        self._max_message_size = min(max_message_size, _plaintext_capacity(link.max_message_size))
        if self._max_message_size < _RECORD:
            raise ValueError(f"the link's messages are too small ({link.max_message_size} bytes)")
        records = -(-self._max_message_size // _RECORD)
        self._max_link_message = self._max_message_size + records * _TAG_SIZE
        self._local_key = local_key
        self._session = session
        self._remote_key = remote_key
        self._initiator = initiator

    @property
    def local_key(self) -> PublicKey:
        """This node's identity."""
        return self._local_key

    @property
    def remote_key(self) -> PublicKey:
        """The identity the peer proved during the handshake."""
        return self._remote_key

    @property
    def is_initiator(self) -> bool:
        """Whether this side dialled the link."""
        return self._initiator

    @property
    def link(self) -> Link:
        """The link underneath."""
        return self._link

    @property
    def max_message_size(self) -> int:
        """The largest plaintext `send` accepts, in bytes."""
        return self._max_message_size

    async def send(self, item: bytes) -> None:
        """Encrypt and send one message.

        Raises:
            ValueError: if ``item`` is larger than `max_message_size`.
        """
        size = len(item)
        if size > self._max_message_size:
            raise ValueError(f"message of {size} bytes exceeds {self._max_message_size}")
        encrypt = self._session.encrypt
        if size <= _RECORD:
            await self._link.send(encrypt(item))
            return
        view = memoryview(item)
        await self._link.send(
            b"".join(encrypt(view[i : i + _RECORD]) for i in range(0, size, _RECORD))
        )

    async def receive(self) -> bytes:
        """Receive and decrypt one message.

        Raises:
            FrameError: if the message fails authentication; the link is closed.
        """
        message = await self._link.receive()
        decrypt = self._session.decrypt
        try:
            if len(message) > self._max_link_message:
                raise FrameError(
                    f"a {len(message)}-byte record set exceeds this channel's "
                    f"{self._max_message_size}-byte message limit"
                )
            if len(message) <= _SEALED:
                return decrypt(message)
            if len(message) % _SEALED and len(message) % _SEALED < _TAG_SIZE:
                raise FrameError("a channel message ends in a truncated record")
            view = memoryview(message)
            return b"".join(decrypt(view[i : i + _SEALED]) for i in range(0, len(message), _SEALED))
        except RemoteProtocolError:
            await self._link.aclose()
            raise

    async def send_eof(self) -> None:
        """Half-close: the peer's `receive` ends with ``EndOfStream`` after our last message."""
        await self._link.send_eof()

    async def aclose(self) -> None:
        """Close the link underneath."""
        await self._link.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The link's typed attributes (transport, addresses)."""
        return self._link.extra_attributes


async def establish(
    link: Link,
    identity: Identity,
    *,
    initiator: bool,
    expected_remote: PublicKey | None = None,
    swarm_key: bytes | None = None,
    timeout: float = 10.0,
) -> SecureChannel:
    """Run the handshake over ``link`` and return the secure channel.

    On failure the link is closed (after sending an abort to the peer when the
    protocol allows) and the error re-raised; on success the caller owns the channel.

    Args:
        link: a fresh link; nothing else may have used it.
        identity: this node's identity.
        initiator: True on the dialling side.
        expected_remote: the key we dialled; any other proven key aborts the handshake.
        swarm_key: the 32-byte private-swarm key, or None for a public swarm.
        timeout: seconds the whole handshake may take.

    Raises:
        HandshakeError: the handshake failed (`IdentityMismatchError` on a wrong peer).
        TimeoutError: the handshake did not complete within ``timeout``.
        anyio.BrokenResourceError: the link died during the handshake.
        anyio.EndOfStream: the peer closed the link during the handshake.
    """
    if link.max_message_size < _SEALED:
        await anyio.aclose_forcefully(link)
        raise ValueError(
            f"the link's messages ({link.max_message_size} bytes) cannot carry a Noise "
            f"message ({_SEALED} bytes)"
        )
    session = HandshakeSession(
        identity, initiator=initiator, expected_remote=expected_remote, swarm_key=swarm_key
    )
    try:
        with anyio.fail_after(timeout):
            await _flush(link, session)
            while not session.is_complete:
                session.receive_message(await link.receive())
                await _flush(link, session)
    except TimeoutError:
        session.abort(ErrorCode.TIMEOUT, "handshake timed out")
        await _send_abort_quietly(link, session)
        await link.aclose()
        raise
    except HandshakeError as exc:
        logger.debug("handshake failed (%s): %s", "out" if initiator else "in", exc)
        await _send_abort_quietly(link, session)
        await link.aclose()
        raise
    except BaseException:
        await anyio.aclose_forcefully(link)
        raise
    remote = session.remote_key
    if remote is None:  # pragma: no cover - a complete session always knows its peer
        raise HandshakeError("handshake completed without a remote identity")
    return SecureChannel(
        link,
        session.transport(),
        local_key=identity.public_key,
        remote_key=remote,
        initiator=initiator,
    )


async def _flush(link: Link, session: HandshakeSession) -> None:
    for message in session.data_to_send():
        await link.send(message)


async def _send_abort_quietly(link: Link, session: HandshakeSession) -> None:
    with anyio.move_on_after(1.0, shield=True):
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await _flush(link, session)
