"""What ``crdtswarm doc get|set`` and ``crdtswarm node`` agree on: a map and one RPC.

Convention: the values of a document live in one root-level `pycrdt.Map`, named
``data`` unless ``--map`` says otherwise (`DEFAULT_MAP`). An application that keeps
its values elsewhere in the document is not seen by these commands.

Data travels the ordinary way, by document replication; the RPC `METHOD` only tells
when it has arrived. Its request is JSON ``{"doc": name, "state": base64}``, the
caller's state vector of that document. The serving node (`DocService`, run by
``crdtswarm node``) opens the document if it had not (from its data directory when it
has one), waits until its replica covers that state vector (at most
`SERVE_TIMEOUT`), and answers ``{"state": base64}``, its own state vector. Opening
the document makes the node exchange it with every peer that has it open, the caller
included.

`sync_with` is one round: ``get`` makes one and waits until its own replica covers
the node's answer. ``set`` makes one before writing, so that its write comes after
everything the node had (a Yjs map settles concurrent writes by client id, not by
time, and a fresh replica's write is concurrent with all it has not seen), and one
after, which returns once the node holds the write.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import anyio
import pycrdt

from crdtswarm.errors import ErrorCode, RpcError, SyncError
from crdtswarm.sync.protocol import validate_state_vector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from crdtswarm.identity import PublicKey
    from crdtswarm.peer import Peer

__all__ = [
    "DEFAULT_MAP",
    "METHOD",
    "SERVE_TIMEOUT",
    "DocService",
    "covers",
    "plain",
    "sync_with",
    "wait_covers",
]

logger = logging.getLogger(__name__)

DEFAULT_MAP: Final = "data"
"""The root-level map of a document that ``doc get|set`` read and write."""
METHOD: Final = "cli.doc-sync"
"""The RPC method served by ``crdtswarm node`` (see the module docstring)."""
CATCH_UP_TIMEOUT: Final = 5.0
"""Seconds a node spends fetching a document it just opened from its peers."""
SERVE_TIMEOUT: Final = 60.0
"""Seconds a node waits for a caller's changes to arrive before answering TIMEOUT."""
_MAX_STATE_SIZE: Final = 256 * 1024  # bytes of a state vector in a request (~20k clients)


def _clocks(state: bytes) -> dict[int, int]:
    """A well-formed state vector as client id -> next clock."""
    decoder = pycrdt.Decoder(state)
    count = decoder.read_var_uint()
    clocks: dict[int, int] = {}
    for _ in range(count):
        client = decoder.read_var_uint()
        clocks[client] = decoder.read_var_uint()
    return clocks


def covers(have: bytes, want: bytes) -> bool:
    """Whether the state vector ``have`` includes every change that ``want`` counts."""
    held = _clocks(have)
    return all(held.get(client, 0) >= clock for client, clock in _clocks(want).items())


async def wait_covers(doc: pycrdt.Doc[Any], state: bytes) -> None:
    """Wait until ``doc`` holds every change that the state vector ``state`` counts."""
    changed = [anyio.Event()]

    def wake(_event: object) -> None:
        changed[0].set()

    subscription = doc.observe(wake)
    try:
        while not covers(doc.get_state(), state):
            await changed[0].wait()
            changed[0] = anyio.Event()
    finally:
        doc.unobserve(subscription)


def plain(value: object) -> object:
    """A map value as plain Python (JSON's types), its numbers as JavaScript shows them.

    Nested pycrdt types become dicts and lists. Yjs numbers are doubles: pycrdt
    gives ``1.0`` for a ``1`` written by anyone, so whole numbers become ints.
    """
    to_py = getattr(value, "to_py", None)
    if callable(to_py):
        value = to_py()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _encode(message: dict[str, str]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _decode_state(payload: bytes, *, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object ``payload`` with its ``state`` decoded and checked.

    Raises:
        ValueError: not such an object, or a malformed state vector.
    """
    try:
        message = json.loads(payload)
        if not isinstance(message, dict) or any(
            not isinstance(message.get(f), str) for f in fields
        ):
            raise ValueError(f"expected a JSON object with {', '.join(fields)}")
        state = base64.b64decode(message["state"], validate=True)
        if len(state) > _MAX_STATE_SIZE:
            raise ValueError("state vector too large")
        validate_state_vector(state)
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, SyncError) as exc:
        raise ValueError(str(exc)) from None
    message["state"] = state
    return message


class DocService:
    """Serves `METHOD` for ``crdtswarm node``: register `handle` with `Swarm.handle_rpc`.

    Args:
        open_doc: opens (or returns) the replicated document of a name, as
            `crdtswarm.swarm.Swarm.doc` does; raises ValueError for a bad name.
    """

    def __init__(
        self,
        open_doc: Callable[[str], pycrdt.Doc[Any]],
        peers: Callable[[], Iterable[Peer]] = tuple,
        *,
        opened: Iterable[str] = (),
    ) -> None:
        self._open_doc = open_doc
        self._peers = peers
        self._opened = set(opened)

    async def handle(self, payload: bytes, remote_key: PublicKey) -> bytes:
        """Answer one request (see the module docstring).

        Raises:
            RpcError: PROTOCOL_ERROR for a malformed request or document name,
                TIMEOUT when the caller's changes did not arrive in time.
        """
        try:
            request = _decode_state(payload, fields=("doc", "state"))
            doc = self._open_doc(request["doc"])
        except ValueError as exc:
            raise RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)[:200]) from None
        if request["doc"] not in self._opened:  # just opened: catch up with our peers first
            self._opened.add(request["doc"])
            await self._catch_up(request["doc"], doc, remote_key)
        with anyio.move_on_after(SERVE_TIMEOUT) as scope:
            await wait_covers(doc, request["state"])
        if scope.cancelled_caught:
            raise RpcError(
                ErrorCode.TIMEOUT,
                f"the changes of {remote_key.short} did not arrive in {SERVE_TIMEOUT:g} s",
            )
        return _encode({"state": base64.b64encode(doc.get_state()).decode()})

    async def _catch_up(self, name: str, doc: pycrdt.Doc[Any], caller: PublicKey) -> None:
        """Wait (at most `CATCH_UP_TIMEOUT`) until ``doc`` holds what our peers hold."""

        async def one(peer: Peer) -> None:
            try:
                await sync_with(peer, name, doc, timeout=CATCH_UP_TIMEOUT, wait_here=True)
            except (RpcError, ValueError, anyio.BrokenResourceError, TimeoutError) as exc:
                logger.debug("no catch-up of %r with %s: %s", name, peer.public_key.short, exc)

        with anyio.move_on_after(CATCH_UP_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for peer in self._peers():
                    if peer.public_key != caller:
                        tg.start_soon(one, peer)


async def sync_with(
    peer: Peer, name: str, doc: pycrdt.Doc[Any], *, timeout: float, wait_here: bool
) -> None:
    """One round of `METHOD` with ``peer`` (see the module docstring).

    Returns once ``peer`` holds everything ``doc`` holds now and, with
    ``wait_here``, once ``doc`` holds everything the peer held when it answered.

    Raises:
        crdtswarm.errors.RpcTimeoutError: no answer within ``timeout`` seconds.
        RpcError: the peer refused or does not serve `METHOD`.
        ValueError: the answer is malformed.
        anyio.BrokenResourceError: the link went down.
    """
    request = _encode({"doc": name, "state": base64.b64encode(doc.get_state()).decode()})
    answer = _decode_state(await peer.rpc(METHOD, request, timeout=timeout), fields=("state",))
    if wait_here:
        await wait_covers(doc, answer["state"])
