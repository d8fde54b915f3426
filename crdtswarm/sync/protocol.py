"""Sans-IO y-protocols sync and awareness messages for one `pycrdt.Doc`.

Messages are byte-for-byte those of y-protocols as y-websocket frames them, so a
`SyncSession` talks to any Yjs peer (yjs, y-websocket, y-webrtc, pycrdt-websocket):

```
sync step 1   varUint 0 | varUint 0 | varUint8Array state vector
sync step 2   varUint 0 | varUint 1 | varUint8Array update (what the peer lacks)
update        varUint 0 | varUint 2 | varUint8Array update
awareness     varUint 1 | varUint8Array awareness update
```

Each message is one whole link message: the caller delimits them (a length prefix,
a mux frame), and a message must be used up exactly, with no trailing bytes.

Invariants:

1. Nothing the peer sends makes `SyncSession.receive_message` raise anything but
   `FrameError` (a malformed or oversized message) or `SyncError` (a state vector
   or update that cannot be used); either one moves the session to a terminal
   state. (Exceptions of the application's own document observers pass through
   as pycrdt's ``ExceptionGroup``, after the update was applied.)
2. pycrdt sees an update only after `validate_update` has walked its whole
   structure: yrs panics on some malformed updates (zero-length structs, clocks
   beyond 32 bits) and leaves the document unusable, and it overflows the native
   stack, killing the process, on deeply nested values. Then every item whose
   parent is named by id must find a shared type there, in the document or the
   update: yrs checks that in the middle of integrating and stops, keeping what
   it integrated so far. A panic that still happens is reported as `SyncError`.
3. So a `SyncError` leaves the document exactly as it was, with one exception
   that cannot be seen from Python: yrs parks an item whose parent has not
   arrived as "pending" (and leaves it out of ``get_update``); if that parent later
   arrives as something other than a type, the update bringing it fails part-way.
4. `UpdateApplied` carries exactly the bytes given to `pycrdt.Doc.apply_update`
   and is queued once per applied non-empty update, in arrival order;
   `SyncCompleted` is queued once, after the first step 2 from the peer.
5. Every queue is bounded by ``max_queue_length``: the caller drains
   `SyncSession.data_to_send` and `SyncSession.next_event` after each call;
   a call that would overflow a queue raises `LocalProtocolError` and does nothing.
"""

from __future__ import annotations

import bisect
import json
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import pycrdt

from crdtswarm.errors import FrameError, LocalProtocolError, SyncError
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_bytes, encode_var_string

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "EMPTY_UPDATE",
    "AwarenessClient",
    "AwarenessReceived",
    "AwarenessUpdate",
    "SyncCompleted",
    "SyncEvent",
    "SyncMessage",
    "SyncSession",
    "SyncStep1",
    "SyncStep2",
    "Update",
    "UpdateApplied",
    "decode_awareness_update",
    "decode_message",
    "encode_awareness_update",
    "encode_message",
    "validate_state_vector",
    "validate_update",
]

MESSAGE_SYNC: Final = 0
MESSAGE_AWARENESS: Final = 1
SYNC_STEP1: Final = 0
SYNC_STEP2: Final = 1
SYNC_UPDATE: Final = 2

DEFAULT_MAX_SIZE: Final = 8 * 1024 * 1024
EMPTY_UPDATE: Final = b"\x00\x00"
"""A v1 update with no structs and no deletions (what an empty document encodes to)."""

MAX_CLOCK: Final = (1 << 32) - 1
"""yrs keeps clocks as u32: no struct or deletion may end (exclusive) beyond this clock."""
MAX_CLIENT_ID: Final = (1 << 53) - 1
"""Yjs keeps client ids as JavaScript numbers: larger ids cannot round-trip."""
MAX_VALUE_DEPTH: Final = 128
"""Deepest nesting of arrays and objects accepted in an update (serde_json's limit)."""


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncStep1:
    """Sync step 1: the sender's state vector; answered with `SyncStep2`."""

    state_vector: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncStep2:
    """Sync step 2: the update the receiver of our step 1 lacked."""

    update: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Update:
    """An incremental document update."""

    update: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class AwarenessUpdate:
    """An awareness update (see `decode_awareness_update`), carried opaquely."""

    data: bytes


SyncMessage: TypeAlias = SyncStep1 | SyncStep2 | Update | AwarenessUpdate


def encode_message(message: SyncMessage) -> bytes:
    """Encode ``message`` exactly as y-protocols does."""
    match message:
        case SyncStep1(state_vector=state_vector):
            return bytes((MESSAGE_SYNC, SYNC_STEP1)) + encode_var_bytes(state_vector)
        case SyncStep2(update=update):
            return bytes((MESSAGE_SYNC, SYNC_STEP2)) + encode_var_bytes(update)
        case Update(update=update):
            return bytes((MESSAGE_SYNC, SYNC_UPDATE)) + encode_var_bytes(update)
        case AwarenessUpdate(data=data):
            return bytes((MESSAGE_AWARENESS,)) + encode_var_bytes(data)
    raise TypeError(f"not a sync message: {message!r}")


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> SyncMessage:
    """Decode one whole y-protocols message; its payload may be at most ``max_size`` bytes.

    Only the framing is checked here: `SyncSession` validates state vectors and updates.

    Raises:
        FrameError: if the message is truncated, has trailing bytes, an unknown type
            or a payload above ``max_size``.
    """
    reader = Reader(data)
    kind = reader.read_uvarint()
    message: SyncMessage
    if kind == MESSAGE_SYNC:
        sync_kind = reader.read_uvarint()
        if sync_kind == SYNC_STEP1:
            message = SyncStep1(state_vector=reader.read_var_bytes(max_size))
        elif sync_kind == SYNC_STEP2:
            message = SyncStep2(update=reader.read_var_bytes(max_size))
        elif sync_kind == SYNC_UPDATE:
            message = Update(update=reader.read_var_bytes(max_size))
        else:
            raise FrameError(f"unknown sync message type {sync_kind}")
    elif kind == MESSAGE_AWARENESS:
        message = AwarenessUpdate(data=reader.read_var_bytes(max_size))
    else:
        raise FrameError(f"unknown y-protocols message type {kind}")
    if not reader.at_end():
        raise FrameError(f"{reader.remaining} trailing bytes after a sync message")
    return message


# -- awareness ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class AwarenessClient:
    """One client's entry in an awareness update (y-protocols ``awareness.js``)."""

    client_id: int
    """The client's Yjs client id."""
    clock: int
    """Incremented by the client on every change; the highest clock wins."""
    state: Any
    """The client's JSON state; None when the client went away."""


def encode_awareness_update(clients: list[AwarenessClient]) -> bytes:
    """Encode awareness entries as y-protocols ``encodeAwarenessUpdate`` does.

    Raises:
        ValueError: if an id or clock is negative, or a state holds NaN, an infinity
            or a reference cycle.
        TypeError: if a state holds something JSON cannot represent.
    """
    parts = [encode_uvarint(len(clients))]
    for client in clients:
        parts.append(encode_uvarint(client.client_id))
        parts.append(encode_uvarint(client.clock))
        text = json.dumps(client.state, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        parts.append(encode_var_string(text))
    return b"".join(parts)


def decode_awareness_update(data: bytes) -> list[AwarenessClient]:
    """Decode an awareness update (the ``data`` of an `AwarenessUpdate`).

    Raises:
        FrameError: if it is truncated, has trailing bytes or a state that is not JSON.
    """
    reader = Reader(data)
    count = reader.read_uvarint()
    clients: list[AwarenessClient] = []
    for _ in range(count):  # every entry uses at least 3 bytes: bounded by len(data)
        client_id = reader.read_uvarint()
        clock = reader.read_uvarint()
        text = reader.read_var_string(len(data))
        try:
            state = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise FrameError(f"awareness state of client {client_id} is not JSON") from exc
        clients.append(AwarenessClient(client_id=client_id, clock=clock, state=state))
    if not reader.at_end():
        raise FrameError(f"{reader.remaining} trailing bytes after an awareness update")
    return clients


# -- validation of pycrdt input -----------------------------------------------------------


def validate_state_vector(state_vector: bytes) -> None:
    """Check that ``state_vector`` is a well-formed Yjs state vector.

    Raises:
        SyncError: if it is malformed, truncated or names a client twice.
    """
    _parse_state_vector(state_vector)


def _parse_state_vector(state_vector: bytes) -> dict[int, int]:
    clocks: dict[int, int] = {}
    try:
        reader = Reader(state_vector)
        for _ in range(reader.read_uvarint()):
            client = _read_client(reader, clocks)
            clocks[client] = reader.read_uvarint()
            if clocks[client] > MAX_CLOCK:
                raise FrameError(f"clock of client {client} beyond 32 bits")
        _expect_end(reader)
    except FrameError as exc:
        raise SyncError(f"malformed state vector: {exc}") from exc
    return clocks


def _encode_state_vector(clocks: Mapping[int, int]) -> bytes:
    parts = [encode_uvarint(len(clocks))]
    for client, clock in clocks.items():
        parts.append(encode_uvarint(client))
        parts.append(encode_uvarint(clock))
    return b"".join(parts)


def validate_update(update: bytes) -> None:
    """Walk a Yjs v1 update from end to end and reject what pycrdt must never see.

    This accepts every update current yjs and yrs produce, and rejects malformed
    ones that would make yrs panic or overflow its stack: unknown struct or
    content kinds, zero-length structs or deletions, clocks beyond 32 bits,
    client ids beyond 53 bits, repeated clients, values nested deeper than
    `MAX_VALUE_DEPTH`, truncation and trailing bytes. It also rejects the legacy
    JSON content (kind 2), which yrs misreads.

    Raises:
        SyncError: if the update is malformed.
    """
    _parse_update(update)


def _parse_update(update: bytes) -> _UpdateShape:
    try:
        return _walk_update(Reader(update))
    except FrameError as exc:
        raise SyncError(f"malformed update: {exc}") from exc


@dataclass(slots=True)
class _ClientStructs:
    """Where each struct of one client starts in an update, and its kind."""

    clocks: list[int]
    refs: list[int]
    end: int

    def ref_at(self, clock: int) -> int | None:
        """The kind of the struct covering ``clock``, or None when outside the update."""
        if not self.clocks or not self.clocks[0] <= clock < self.end:
            return None
        return self.refs[bisect.bisect_right(self.clocks, clock) - 1]


@dataclass(slots=True)
class _UpdateShape:
    """What `SyncSession` needs to know of an update beyond its well-formedness."""

    clients: dict[int, _ClientStructs]
    parents: set[tuple[int, int]]
    """(client, clock) of every item named as a parent by id (children of nested types)."""


def _walk_update(reader: Reader) -> _UpdateShape:
    shape = _UpdateShape(clients={}, parents=set())
    for _ in range(reader.read_uvarint()):  # clients
        struct_count = reader.read_uvarint()
        client = _read_client(reader, shape.clients)
        clock = reader.read_uvarint()
        structs = shape.clients[client] = _ClientStructs(clocks=[], refs=[], end=clock)
        for _ in range(struct_count):  # every struct uses at least 2 bytes
            info = reader.read_u8()
            ref = info & 0x1F
            parent: tuple[int, int] | None = None
            if ref in (_GC, _SKIP):
                length = reader.read_uvarint()
            elif _FIRST_CONTENT <= ref <= _LAST_CONTENT:
                if info & _HAS_ORIGIN:
                    _read_id(reader)
                if info & _HAS_RIGHT_ORIGIN:
                    _read_id(reader)
                if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
                    if reader.read_uvarint() == 1:
                        reader.read_var_string(reader.remaining)  # root type name
                    else:
                        parent = _read_id(reader)
                    if info & _HAS_PARENT_SUB:
                        reader.read_var_string(reader.remaining)  # map key
                length = _CONTENT_READERS[ref](reader)
            else:
                raise FrameError(f"unknown struct kind {ref}")
            if length == 0:
                raise FrameError(f"zero-length struct of client {client}")
            if parent is not None:
                if parent[0] == client and clock <= parent[1] < clock + length:
                    raise FrameError(f"an item of client {client} is its own parent")
                shape.parents.add(parent)
            structs.clocks.append(clock)
            structs.refs.append(ref)
            clock += length
            if clock > MAX_CLOCK:  # the client's next clock must fit too
                raise FrameError(f"clock of client {client} beyond 32 bits")
        structs.end = clock
    _walk_delete_set(reader)
    _expect_end(reader)
    return shape


def _walk_delete_set(reader: Reader) -> None:
    seen: dict[int, None] = {}
    for _ in range(reader.read_uvarint()):
        client = _read_client(reader, seen)
        seen[client] = None
        for _ in range(reader.read_uvarint()):
            clock = reader.read_uvarint()
            length = reader.read_uvarint()
            if length == 0:
                raise FrameError(f"zero-length deletion of client {client}")
            if clock + length > MAX_CLOCK:
                raise FrameError(f"deletion of client {client} beyond 32 bits")


_GC: Final = 0
_SKIP: Final = 10
_FIRST_CONTENT: Final = 1
_LAST_CONTENT: Final = 9
_HAS_ORIGIN: Final = 0x80
_HAS_RIGHT_ORIGIN: Final = 0x40
_HAS_PARENT_SUB: Final = 0x20
_PARENT_KINDS: Final = frozenset({_GC, 1, 7, _SKIP})
"""Struct kinds yrs accepts as a parent: a type, or something it ignores (GC, deleted)."""
_MAX_PARENT_PROBES: Final = 64
"""Beyond this many parents to look up in the document, try the update on a copy."""
_TYPE_XML_ELEMENT: Final = 3
_TYPE_XML_HOOK: Final = 5
_LAST_TYPE: Final = 6


def _read_client(reader: Reader, seen: Mapping[int, object]) -> int:
    client = reader.read_uvarint()
    if client > MAX_CLIENT_ID:
        raise FrameError(f"client id {client} beyond 53 bits")
    if client in seen:
        raise FrameError(f"client {client} appears twice")
    return client


def _read_id(reader: Reader) -> tuple[int, int]:
    client = reader.read_uvarint()
    if client > MAX_CLIENT_ID:
        raise FrameError(f"client id {client} beyond 53 bits")
    clock = reader.read_uvarint()
    if clock > MAX_CLOCK:
        raise FrameError(f"clock {clock} beyond 32 bits")
    return client, clock


def _read_deleted(reader: Reader) -> int:
    return reader.read_uvarint()


def _read_json(reader: Reader) -> int:
    # Legacy content that no current yjs or yrs writes, and that yrs decodes one
    # string too far: what it would read is not what was validated here.
    raise FrameError("legacy JSON content is not supported")


def _read_binary(reader: Reader) -> int:
    reader.read_var_bytes(reader.remaining)
    return 1


def _read_string(reader: Reader) -> int:
    text = reader.read_var_string(reader.remaining)
    return len(text.encode("utf-16-le")) // 2  # clocks count UTF-16 code units


def _read_embed(reader: Reader) -> int:
    reader.read_var_string(reader.remaining)
    return 1


def _read_format(reader: Reader) -> int:
    reader.read_var_string(reader.remaining)  # key
    reader.read_var_string(reader.remaining)  # JSON value
    return 1


def _read_type(reader: Reader) -> int:
    type_ref = reader.read_uvarint()
    if type_ref > _LAST_TYPE:
        raise FrameError(f"unknown shared type {type_ref}")
    if type_ref in (_TYPE_XML_ELEMENT, _TYPE_XML_HOOK):
        reader.read_var_string(reader.remaining)  # node name / hook name
    return 1


def _read_any_content(reader: Reader) -> int:
    count = reader.read_uvarint()
    for _ in range(count):
        _skip_any(reader)
    return count


def _read_doc(reader: Reader) -> int:
    reader.read_var_string(reader.remaining)  # guid
    _skip_any(reader)  # options
    return 1


_CONTENT_READERS: Final = {
    1: _read_deleted,
    2: _read_json,
    3: _read_binary,
    4: _read_string,
    5: _read_embed,
    6: _read_format,
    7: _read_type,
    8: _read_any_content,
    9: _read_doc,
}

# lib0 "any" tags (lib0/encoding.js writeAny)
_ANY_FIXED_SIZE: Final = {127: 0, 126: 0, 124: 4, 123: 8, 122: 8, 121: 0, 120: 0}
_ANY_VAR_INT: Final = 125
_ANY_STRING: Final = 119
_ANY_OBJECT: Final = 118
_ANY_ARRAY: Final = 117
_ANY_BYTES: Final = 116
_MAX_VAR_INT_SIZE: Final = 10


def _skip_any(reader: Reader) -> None:
    """Skip one lib0 ``any`` value without recursion, bounding its nesting depth."""
    # Each entry counts the values still to read in one open array or object; an
    # object's entries are (key, value) pairs and its key is read with the value.
    pending: list[tuple[int, bool]] = [(1, False)]
    while pending:
        count, is_object = pending.pop()
        if count == 0:
            continue
        pending.append((count - 1, is_object))
        if is_object:
            reader.read_var_string(reader.remaining)
        tag = reader.read_u8()
        if (size := _ANY_FIXED_SIZE.get(tag)) is not None:
            reader.read_bytes(size)
        elif tag == _ANY_VAR_INT:
            for i in range(_MAX_VAR_INT_SIZE):
                if reader.read_u8() < 0x80:
                    break
                if i == _MAX_VAR_INT_SIZE - 1:
                    raise FrameError("integer longer than 10 bytes")
        elif tag == _ANY_STRING:
            reader.read_var_string(reader.remaining)
        elif tag == _ANY_BYTES:
            reader.read_var_bytes(reader.remaining)
        elif tag in (_ANY_OBJECT, _ANY_ARRAY):
            if len(pending) > MAX_VALUE_DEPTH:
                raise FrameError(f"values nested deeper than {MAX_VALUE_DEPTH}")
            pending.append((reader.read_uvarint(), tag == _ANY_OBJECT))
        else:
            raise FrameError(f"unknown value tag {tag}")


@contextmanager
def _pycrdt_errors(what: str) -> Iterator[None]:
    """Raise `SyncError` for whatever pycrdt raises, a Rust panic included.

    Exception groups, which pycrdt raises for failing document observers, pass.
    """
    try:
        yield
    except ExceptionGroup:
        raise
    except Exception as exc:
        raise SyncError(f"{what}: {exc}") from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # pyo3's, not importable
            raise
        raise SyncError(f"{what}: pycrdt panicked: {exc}") from exc


def _expect_end(reader: Reader) -> None:
    if not reader.at_end():
        raise FrameError(f"{reader.remaining} trailing bytes")


# -- session ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateApplied:
    """The peer's ``update`` (step 2 or incremental) was applied to the document."""

    update: bytes
    """Exactly the bytes given to `pycrdt.Doc.apply_update`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AwarenessReceived:
    """The peer sent an awareness update; see `decode_awareness_update`."""

    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncCompleted:
    """The peer's step 2 was applied: we hold everything the peer had at its step 1."""


SyncEvent: TypeAlias = UpdateApplied | AwarenessReceived | SyncCompleted


_MAX_KNOWN_PARENTS: Final = 65536  # parents remembered per document


class SyncSession:
    """One peer's view of one pycrdt.Doc: state-vector anti-entropy, then incremental updates.

    Both sides call `start` to send their state vector; each answers the other's
    step 1 with a step 2, after which local changes travel as `send_update`.

    Args:
        doc: the document this session reads and updates.
        max_update_size: the largest state vector, update or awareness payload we
            accept from the peer, in bytes (default 8 MiB).
        max_queue_length: how many outgoing messages, and how many events, may wait
            to be drained (default 256).
    """

    def __init__(
        self,
        doc: pycrdt.Doc[Any],
        *,
        max_update_size: int = DEFAULT_MAX_SIZE,
        max_queue_length: int = 256,
        known_parents: set[tuple[int, int]] | None = None,
    ) -> None:
        if max_update_size < 1 or max_queue_length < 1:
            raise ValueError("max_update_size and max_queue_length must be positive")
        self._doc = doc
        # items of ``doc`` already found to be shared types (a struct never changes
        # kind): sessions of one document may share this set
        self._known_parents = known_parents if known_parents is not None else set()
        self._max_update_size = max_update_size
        self._max_queue_length = max_queue_length
        self._output: list[bytes] = []
        self._events: deque[SyncEvent] = deque()
        self._synced = False
        self._failed = False

    @property
    def doc(self) -> pycrdt.Doc[Any]:
        """The document this session keeps in sync."""
        return self._doc

    @property
    def is_synced(self) -> bool:
        """Whether the peer's step 2 has been applied (we hold all it had at its step 1)."""
        return self._synced

    @property
    def is_failed(self) -> bool:
        """Whether the peer sent something invalid; the session then refuses all input."""
        return self._failed

    def start(self) -> None:
        """Queue our sync step 1 (the document's state vector).

        Raises:
            LocalProtocolError: if the output queue is full or the session failed.
        """
        self._check_usable(outputs=1, events=0)
        self._queue(SyncStep1(state_vector=self._doc.get_state()))

    def send_update(self, update: bytes) -> None:
        """Queue an incremental update (a local change) for the peer.

        Raises:
            LocalProtocolError: if the output queue is full or the session failed.
        """
        self._check_usable(outputs=1, events=0)
        self._queue(Update(update=update))

    def send_awareness(self, data: bytes) -> None:
        """Queue an awareness update (see `encode_awareness_update`) for the peer.

        Raises:
            LocalProtocolError: if the output queue is full or the session failed.
        """
        self._check_usable(outputs=1, events=0)
        self._queue(AwarenessUpdate(data=data))

    def receive_message(self, data: bytes) -> None:
        """Handle one whole message from the peer.

        A step 1 queues our step 2; a step 2 or update is applied to the document and
        queues `UpdateApplied` (and `SyncCompleted` after the first step 2); an
        awareness update queues `AwarenessReceived`.

        Raises:
            FrameError: if the message is malformed or too large.
            SyncError: if its state vector or update cannot be used.
            LocalProtocolError: if a queue is full (drain it) or the session failed.
            ExceptionGroup: raised by pycrdt when a document observer failed; the
                update was applied and its events are queued.
        """
        self._check_usable(outputs=0, events=0)
        try:
            message = decode_message(data, max_size=self._max_update_size)
        except FrameError:
            self._failed = True
            raise
        if isinstance(message, SyncStep1):
            self._check_usable(outputs=1, events=0)
        else:
            completes = isinstance(message, SyncStep2) and not self._synced
            self._check_usable(outputs=0, events=2 if completes else 1)
        try:
            match message:
                case SyncStep1(state_vector=state_vector):
                    self._queue(SyncStep2(update=self._diff(state_vector)))
                case SyncStep2(update=update):
                    self._apply(update)
                    if not self._synced:
                        self._synced = True
                        self._events.append(SyncCompleted())
                case Update(update=update):
                    self._apply(update)
                case AwarenessUpdate(data=payload):
                    self._events.append(AwarenessReceived(data=payload))
        except SyncError:
            self._failed = True
            raise

    def receive_update(self, update: bytes) -> None:
        """Apply an incremental update from the peer: what an `Update` message carries.

        For updates that reached us outside a y-protocols message (crdtswarm's routed
        updates); the same checks as `receive_message` apply.

        Raises:
            FrameError: if the update is malformed or larger than ``max_update_size``.
            SyncError: if pycrdt cannot apply it.
            LocalProtocolError: if the event queue is full or the session failed.
            ExceptionGroup: raised by pycrdt when a document observer failed.
        """
        self._check_usable(outputs=0, events=1)
        if len(update) > self._max_update_size:
            self._failed = True
            raise FrameError(f"update of {len(update)} bytes exceeds {self._max_update_size}")
        try:
            self._apply(update)
        except SyncError:
            self._failed = True
            raise

    def data_to_send(self) -> list[bytes]:
        """The messages to send to the peer, in order, each one whole (drains the queue)."""
        output, self._output = self._output, []
        return output

    def next_event(self) -> SyncEvent | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def _diff(self, state_vector: bytes) -> bytes:
        validate_state_vector(state_vector)
        with _pycrdt_errors("cannot diff against the peer's state vector"):
            return self._doc.get_update(state_vector)

    def _apply(self, update: bytes) -> None:
        shape = _parse_update(update)
        if update == EMPTY_UPDATE:
            return
        if shape.parents:
            self._check_parents(update, shape)
        try:
            with _pycrdt_errors("cannot apply the peer's update"):
                self._doc.apply_update(update)
        except ExceptionGroup:
            # pycrdt collected exceptions from document observers: the update is in.
            self._events.append(UpdateApplied(update=update))
            raise
        self._events.append(UpdateApplied(update=update))

    def _check_parents(self, update: bytes, shape: _UpdateShape) -> None:
        """Refuse an update naming as parent an item that is not a shared type.

        yrs finds such an item in the middle of integrating an update and stops
        there, leaving the structs before it applied. A parent is looked up in the
        document first (where yrs looks), then in the update itself.
        """
        known = self._known_parents
        parents = [parent for parent in shape.parents if parent not in known]
        if not parents:
            return
        with _pycrdt_errors("cannot read the document's state vector"):
            ours = _parse_state_vector(self._doc.get_state())
        in_doc: list[tuple[int, int]] = []
        for client, clock in parents:
            if clock < ours.get(client, 0):
                in_doc.append((client, clock))
            elif (structs := shape.clients.get(client)) is not None:
                ref = structs.ref_at(clock)
                if ref is not None and ref not in _PARENT_KINDS:
                    raise SyncError(f"the parent {client}#{clock} in the update is not a type")
        if len(in_doc) > _MAX_PARENT_PROBES:
            self._trial_apply(update)
            return
        for client, clock in in_doc:
            ref = self._kind_in_doc(ours, client, clock)
            if ref is None:  # an encoding we did not expect: let a copy decide
                self._trial_apply(update)
                return
            if ref not in _PARENT_KINDS:
                raise SyncError(f"the parent {client}#{clock} in the document is not a type")
        if len(known) + len(in_doc) > _MAX_KNOWN_PARENTS:
            known.clear()
        known.update(in_doc)

    def _kind_in_doc(self, ours: dict[int, int], client: int, clock: int) -> int | None:
        """The struct kind at (client, clock) in our document, from a diff starting there."""
        since = dict(ours)
        since[client] = clock
        with _pycrdt_errors("cannot read the document"):
            diff = self._doc.get_update(_encode_state_vector(since))
        try:
            reader = Reader(diff)
            if reader.read_uvarint() != 1:
                return None
            reader.read_uvarint()  # struct count
            if reader.read_uvarint() != client or reader.read_uvarint() != clock:
                return None
            return reader.read_u8() & 0x1F
        except FrameError:
            return None

    def _trial_apply(self, update: bytes) -> None:
        """Apply ``update`` to a copy of the document: costs a full encode and decode."""
        copy: pycrdt.Doc[Any] = pycrdt.Doc()
        with _pycrdt_errors("cannot apply the peer's update"):
            copy.apply_update(self._doc.get_update())
            copy.apply_update(update)

    def _queue(self, message: SyncMessage) -> None:
        self._output.append(encode_message(message))

    def _check_usable(self, *, outputs: int, events: int) -> None:
        if self._failed:
            raise LocalProtocolError("the sync session failed on invalid input from the peer")
        if len(self._output) + outputs > self._max_queue_length:
            raise LocalProtocolError("too many sync messages queued: drain data_to_send()")
        if len(self._events) + events > self._max_queue_length:
            raise LocalProtocolError("too many sync events queued: drain next_event()")
