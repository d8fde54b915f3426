"""The one abstraction every transport produces: a `Link`.

A link is reliable, ordered and message-oriented: each ``send(message)`` arrives
as exactly one ``receive()`` on the other side, in order, or the link breaks.
``send`` waits while the peer is not reading (back-pressure); messages larger than
``max_message_size`` are refused with ``ValueError`` before anything is sent.

Errors follow anyio's vocabulary:

* ``anyio.ClosedResourceError``: this side closed the link and then used it;
* ``anyio.BrokenResourceError``: the peer or the network died (``__cause__`` says why);
* ``anyio.EndOfStream``: the peer closed its sending side (``send_eof`` or ``aclose``)
  and every message it sent has been received.

A `Transport` dials links to a remote node and serves incoming ones. Transports know
nothing of identities beyond using the public key as a rendezvous name where they
need one (the memory network); authentication happens above, in `crdtswarm.secure`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

import anyio
from anyio import TypedAttributeSet, typed_attribute
from anyio.abc import ObjectStream, TaskStatus

if TYPE_CHECKING:
    from crdtswarm.identity import PublicKey

__all__ = ["Link", "LinkAttribute", "LinkHandler", "Transport", "check_message_size"]


class LinkAttribute(TypedAttributeSet):
    """Typed attributes every link offers through ``link.extra(...)``."""

    transport: str = typed_attribute()
    """The scheme of the transport that made the link: ``"mem"``, ``"tcp"``, ``"webrtc"``."""
    remote_address: str = typed_attribute()
    """Where the other end is, in the transport's address form (``"tcp://1.2.3.4:5"``)."""
    local_address: str = typed_attribute()
    """This end's address in the transport's address form."""


class Link(ObjectStream[bytes]):
    """A reliable, ordered, message-oriented connection to one remote endpoint."""

    @property
    @abc.abstractmethod
    def max_message_size(self) -> int:
        """The largest message, in bytes, that `send` accepts."""


def check_message_size(size: int, max_message_size: int) -> None:
    """Refuse a message over the link's limit, as every `Link.send` does before sending.

    Raises:
        ValueError: if ``size`` exceeds ``max_message_size``.
    """
    if size > max_message_size:
        raise ValueError(f"message of {size} bytes exceeds max_message_size={max_message_size}")


LinkHandler = Callable[[Link], Awaitable[None]]
"""Called with each incoming link, in a task of its own; the handler owns the link."""


class Transport(abc.ABC):
    """A way to reach other nodes: dials links and serves incoming ones.

    A transport instance belongs to one node: `serve` binds it to the node's public
    key, and `dial` may only be used after that.
    """

    scheme: ClassVar[str]
    """The address scheme this transport understands (``"tcp"`` for ``tcp://host:port``)."""

    @abc.abstractmethod
    async def serve(
        self,
        local_key: PublicKey,
        handler: LinkHandler,
        *,
        task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept incoming links until cancelled, calling ``handler`` for each in its own task.

        Reports the addresses where this node can now be dialled through
        ``task_status.started(addresses)`` (an empty list when the transport reaches
        nodes by key only). On exit (cancellation), every link it accepted and every
        socket it opened is closed.

        Raises:
            OSError: if the transport cannot listen (for example, the port is in use).
        """

    @abc.abstractmethod
    async def dial(self, remote_key: PublicKey, address: str | None = None) -> Link:
        """Open a link to the node ``remote_key``, at ``address`` when given.

        The caller owns the returned link. Cancelling the dial (for example through
        ``anyio.fail_after``) leaves nothing open.

        Raises:
            crdtswarm.errors.ConnectError: if no link could be made (``__cause__`` says why).
            ValueError: if ``address`` is not an address of this transport.
            RuntimeError: if called before `serve` has started.
        """

    def can_dial(self, address: str | None) -> bool:
        """Whether this transport can dial ``address`` (``None``: by key alone)."""
        if address is None:
            return False
        return address.startswith(f"{self.scheme}://")

    @property
    def addresses(self) -> list[str]:
        """Where this node can be dialled through this transport; empty before `serve`."""
        return []
