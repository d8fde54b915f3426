"""The swarm's membership directory: signed entries in a replicated Yjs document.

The directory is an ordinary `pycrdt.Doc` (replicated like any other under
`DOC_NAME`). A CRDT has no access control, so any member can write or delete
anything in it; `Directory` gets its guarantees from signatures and from a
reader-side cache instead.

Layout. The root `pycrdt.Map` ``entries`` maps ``str(author)`` (the author's public
key text) to a `pycrdt.Array` of signed envelopes (bytes): the author's *container*.
Each author appends to its own container only and deletes what it supersedes, so
its writes form one chain that Yjs squashes into a single tombstone. (A map key per
entry would leave a ~12-byte tombstone per overwrite, growing with history; see
``benchmarks/directory_size.py``.)

Envelope (version 1), all integers big-endian::

    offset  size  field
    0       1     version = 1
    1       1     kind: 1 member, 2 signal, 3 latency
    2       32    author: Ed25519 public key
    34      8     seq: strictly increasing per (kind, author[, recipient])
    42      8     issued_at_ms: Unix time, milliseconds
    50      8     expires_at_ms: Unix time, milliseconds
    58      ...   payload, lib0 varints (crdtswarm.protocol.wire):
                  member:  uvarint n, n var-string addresses, uvarint m, m var-string transports
                  signal:  32-byte recipient key, var-bytes sealed payload
                  latency: uvarint n, n x (8-byte peer key prefix, uvarint milliseconds),
                           prefixes in strictly ascending byte order
    end-64  64    Ed25519 signature by author over b"crdtswarm-directory-v1:" + everything above

A *slot* is (kind, author) for members and latency rows and (kind, author,
recipient) for signals; a slot holds one entry at a time, the one with the highest
seq. Authors choose ``seq = max(previous + 1, issued_at_ms)``, so seqs keep growing
across restarts.

Rules (the invariants the tests check):

1. Acceptance. A reader accepts an envelope only if it is bytes, at most the kind's
   size limit, parses exactly (no trailing bytes), names the container's author,
   carries a lifetime of at most ``max_lifetime``, verifies with the author's key,
   and has a seq above the one cached for its slot. Forged, replayed, misplaced and
   oversized envelopes therefore change nothing anybody reads.
2. The cache is the truth. Accepted entries live in an in-memory cache, and
   `Directory.members`, `Directory.signals_for` and `Directory.latency_rows` read
   the cache, not the document: deleting or overwriting someone's entry in the doc
   changes nothing for a reader that already accepted it. A slot's seq is
   remembered until ``issued_at + max_lifetime``, after which no older entry of the
   author can still be unexpired, so replays stay ignored.
3. Expiry. Entries are reported while ``now < expires_at``. An expired entry with a
   higher seq still supersedes: `Directory.leave` publishes a member entry that
   expires at once, and every reader drops the member (`MemberLeft`).
4. Observer safety. pycrdt forbids reading a document inside its observers, so the
   observer only notes which containers changed; `Directory.refresh` re-reads those
   containers into the cache, and `Directory.maintain` re-reads them all, collects
   and heals.
5. Collection. `Directory.maintain` deletes from the document every envelope that
   is invalid, misplaced, superseded, in excess of the per-author limits, or
   expired for longer than ``collect_delay``, and the containers of authors with
   nothing left, so the document stays bounded under churn.
6. Self-healing. When the document lacks one of our current envelopes (an attacker
   deleted or overwrote it), `Directory.maintain` writes our container back whole.
7. Bounds. Entry sizes, signals per author, entries per container and cache slots
   are limited by `DirectoryConfig`; what exceeds them is ignored (and, except for
   valid entries that merely do not fit our cache, collected).
8. Row keys. A latency row names each peer by the first `ROW_KEY_PREFIX` (8)
   bytes of its key: a row of 400 peers costs 4 KB instead of 13.6 KB. Readers
   resolve prefixes among the keys of live members and row authors, and ignore a
   prefix that matches none or several; an author leaves out peers whose prefixes
   collide. Making two keys share 8 bytes takes about 2^32 work, so a member can
   only blur its own identities; matching somebody else's key takes 2^64.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pycrdt

from crdtswarm.errors import FrameError
from crdtswarm.identity import KEY_SIZE, SIGNATURE_SIZE, InvalidKeyError, PublicKey
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_bytes, encode_var_string

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from crdtswarm.identity import Identity

__all__ = [
    "DOC_NAME",
    "Directory",
    "DirectoryConfig",
    "DirectoryEvent",
    "DirectoryStatistics",
    "MaintenanceReport",
    "Member",
    "MemberJoined",
    "MemberLeft",
    "Signal",
]

logger = logging.getLogger(__name__)

DOC_NAME: Final = "crdtswarm/directory"
"""The name under which the directory document is replicated."""

SIGNATURE_CONTEXT: Final = b"crdtswarm-directory-v1:"
"""Prefix of every signed message, so a directory signature means nothing elsewhere."""

_ROOT: Final = "entries"
_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BB32sQQQ")
_SEQ_OFFSET: Final = 34
_RECIPIENT_OFFSET: Final = _HEADER.size
_MIN_SIZE: Final = _HEADER.size + SIGNATURE_SIZE
_MAX_U64: Final = (1 << 64) - 1
ROW_KEY_PREFIX: Final = 8
"""Bytes of a peer's key in a latency row: its first 8 (rule 8)."""
_MAX_REJECTED: Final = 4096
_MAX_KEY_CACHE: Final = 8192


class _Kind(enum.IntEnum):
    MEMBER = 1
    SIGNAL = 2
    LATENCY = 3


# (kind, author key bytes, recipient key bytes or b"")
_SlotKey = tuple[int, bytes, bytes]


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectoryConfig:
    """Lifetimes and limits of directory entries."""

    member_ttl: float = 600.0
    """Seconds a member entry stays valid; republish every ``member_ttl / 3`` (600 s)."""
    signal_ttl: float = 60.0
    """Default seconds a signal stays valid (60 s)."""
    latency_ttl: float = 120.0
    """Seconds a latency row stays valid (120 s)."""
    max_lifetime: float = 3600.0
    """Longest lifetime (``expires_at - issued_at``) a reader accepts, in seconds (3600 s)."""
    collect_delay: float = 60.0
    """Seconds an expired entry stays in the document before `Directory.maintain`
    collects it, so that a `Directory.leave` reaches every replica (60 s)."""
    max_member_size: int = 4 * 1024
    """Largest member envelope, in bytes (4 KiB)."""
    max_signal_size: int = 16 * 1024
    """Largest signal envelope, in bytes (16 KiB)."""
    max_latency_size: int = 16 * 1024
    """Largest latency envelope, in bytes (16 KiB: about 1,600 peers)."""
    max_signals_per_author: int = 64
    """Unexpired signals one author may have at a time; more are ignored (64)."""
    max_entries_per_author: int = 256
    """Envelopes read from one author's container; the rest are ignored (256)."""
    max_cached_entries: int = 16384
    """Slots the reader's cache holds; entries for new slots beyond it are ignored (16384)."""

    def __post_init__(self) -> None:
        for name in ("member_ttl", "signal_ttl", "latency_ttl"):
            value = getattr(self, name)
            if not 0 < value <= self.max_lifetime:
                raise ValueError(f"{name} must be in (0, max_lifetime], got {value}")
        if self.collect_delay < 0:
            raise ValueError(f"collect_delay must be >= 0, got {self.collect_delay}")
        for name in ("max_member_size", "max_signal_size", "max_latency_size"):
            if getattr(self, name) < 256:
                raise ValueError(f"{name} must be at least 256 bytes")
        for name in ("max_signals_per_author", "max_entries_per_author", "max_cached_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class Member:
    """A current member of the swarm, as its latest valid entry describes it."""

    public_key: PublicKey
    """The member's key (its address)."""
    addresses: tuple[str, ...]
    """Where it can be dialled directly, e.g. ``"tcp://10.0.0.2:4242"``."""
    transports: tuple[str, ...]
    """The transport schemes it speaks, e.g. ``("tcp", "webrtc")``."""
    first_seen: float
    """Unix seconds: ``issued_at`` of the first entry accepted since it (re)joined."""
    last_seen: float
    """Unix seconds: ``issued_at`` of its latest entry."""
    expires_at: float
    """Unix seconds after which it is no longer a member unless it republishes."""
    seq: int
    """Sequence number of its latest entry."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Signal:
    """An opaque payload one member left in the directory for another."""

    author: PublicKey
    """Who posted it (its signature was verified)."""
    recipient: PublicKey
    """Whom it is for."""
    seq: int
    """Sequence number: a newer signal from the same author replaces the older one."""
    payload: bytes
    """The bytes the author posted (sealing them is the caller's job)."""
    issued_at: float
    """Unix seconds when it was posted."""
    expires_at: float
    """Unix seconds after which it is ignored."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberJoined:
    """A member appeared in the directory (or came back after leaving)."""

    public_key: PublicKey


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberLeft:
    """A member left: its entry expired or it published a leave."""

    public_key: PublicKey


DirectoryEvent = MemberJoined | MemberLeft


@dataclass(frozen=True, kw_only=True, slots=True)
class MaintenanceReport:
    """What one `Directory.maintain` call did."""

    removed: int
    """Envelopes and containers deleted from the document."""
    repaired: int
    """Our own envelopes written back because the document had lost them."""
    forgotten: int
    """Cache slots dropped because nothing older can still be valid."""
    entries: int
    """Envelopes left in the document."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectoryStatistics:
    """Counters of a `Directory`."""

    members: int
    """Current members (ourselves included once published)."""
    signals: int
    """Unexpired signals (to anyone)."""
    latency_rows: int
    """Unexpired latency rows."""
    cached_slots: int
    """Slots in the cache, expired ones included."""
    accepted: int
    """Envelopes accepted since the directory was created."""
    rejected: int
    """Envelopes rejected for a bad signature, layout or lifetime."""
    removed: int
    """Envelopes and containers collected by `Directory.maintain`."""
    repaired: int
    """Own envelopes written back by `Directory.maintain`."""


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: _Kind
    author: PublicKey
    seq: int
    issued_ms: int
    expires_ms: int
    raw: bytes
    addresses: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()
    recipient: PublicKey | None = None
    payload: bytes = b""
    rows: tuple[tuple[bytes, int], ...] = ()  # (peer key prefix, milliseconds)


@dataclass(slots=True)
class _Cached:
    entry: _Entry
    first_seen_ms: int


class _Status(enum.Enum):
    CANDIDATE = enum.auto()  # judged against the cache once the scan is complete
    KEEP = enum.auto()  # valid, but our cache is full: not ours to collect
    DROP = enum.auto()  # invalid, misplaced, too old, or in excess


@dataclass(slots=True)
class _Container:
    key: str
    author: PublicKey | None
    array: pycrdt.Array[Any] | None
    records: list[tuple[int, bytes, _Status, _SlotKey | None]] = field(default_factory=list)


def _slot_of(raw: bytes) -> _SlotKey:
    kind = raw[1]
    recipient = (
        raw[_RECIPIENT_OFFSET : _RECIPIENT_OFFSET + KEY_SIZE] if kind == _Kind.SIGNAL else b""
    )
    return (kind, raw[2 : 2 + KEY_SIZE], recipient)


def _read_strings(reader: Reader, max_size: int) -> tuple[str, ...]:
    count = reader.read_uvarint()
    if count > reader.remaining:
        raise FrameError(f"{count} strings cannot fit in {reader.remaining} bytes")
    return tuple(reader.read_var_string(max_size) for _ in range(count))


def _decode(raw: bytes, author: PublicKey, key_of: Callable[[bytes], PublicKey]) -> _Entry:
    """Parse a whole envelope whose header names ``author`` (the signature is not checked).

    ``key_of`` turns 32 bytes into a `PublicKey` (a cache: validating a key is slow).

    Raises:
        FrameError: if the layout is wrong.
        InvalidKeyError: if a key in the payload is not a valid public key.
    """
    body = raw[:-SIGNATURE_SIZE]
    version, kind_value, _, seq, issued_ms, expires_ms = _HEADER.unpack_from(body)
    try:
        kind = _Kind(kind_value)
    except ValueError:
        raise FrameError(f"unknown entry kind {kind_value}") from None
    if version != _VERSION:
        raise FrameError(f"unknown envelope version {version}")
    reader = Reader(body, _HEADER.size)
    addresses: tuple[str, ...] = ()
    transports: tuple[str, ...] = ()
    recipient: PublicKey | None = None
    payload = b""
    rows: list[tuple[bytes, int]] = []
    if kind is _Kind.MEMBER:
        addresses = _read_strings(reader, len(raw))
        transports = _read_strings(reader, len(raw))
    elif kind is _Kind.SIGNAL:
        recipient = key_of(reader.read_bytes(KEY_SIZE))
        payload = reader.read_var_bytes(len(raw))
    else:
        count = reader.read_uvarint()
        if count > reader.remaining // (ROW_KEY_PREFIX + 1):
            raise FrameError(f"{count} latency rows cannot fit in {reader.remaining} bytes")
        previous = b""
        for _ in range(count):
            peer = reader.read_bytes(ROW_KEY_PREFIX)
            if peer <= previous:
                raise FrameError("latency rows are not in strictly ascending key order")
            rows.append((peer, reader.read_uvarint()))
            previous = peer
    if not reader.at_end():
        raise FrameError(f"{reader.remaining} trailing bytes after the payload")
    return _Entry(
        kind,
        author,
        seq,
        issued_ms,
        expires_ms,
        raw,
        addresses=addresses,
        transports=transports,
        recipient=recipient,
        payload=payload,
        rows=tuple(rows),
    )


def _encode_member(addresses: Sequence[str], transports: Sequence[str]) -> bytes:
    parts: list[bytes] = []
    for name, values in (("addresses", addresses), ("transports", transports)):
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"{name} must be a sequence of str")
        parts.append(encode_uvarint(len(values)))
        parts.extend(encode_var_string(value) for value in values)
    return b"".join(parts)


def _encode_latency(rows: Mapping[PublicKey, float]) -> bytes:
    """The latency payload; peers whose key prefixes collide are left out (rule 8)."""
    by_prefix: dict[bytes, int | None] = {}
    for peer, seconds in rows.items():
        if not isinstance(peer, PublicKey):
            raise TypeError(f"latency rows are keyed by PublicKey, got {type(peer).__name__}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {seconds}")
        prefix = bytes(peer)[:ROW_KEY_PREFIX]
        ms = min(round(seconds * 1000), _MAX_U64)
        by_prefix[prefix] = None if prefix in by_prefix else ms  # a collision: neither
    encoded = sorted((p, ms) for p, ms in by_prefix.items() if ms is not None)
    parts = [encode_uvarint(len(encoded))]
    parts.extend(peer + encode_uvarint(ms) for peer, ms in encoded)
    return b"".join(parts)


class Directory:
    """The signed membership directory kept in a replicated `pycrdt.Doc`.

    The owner replicates ``doc`` (under `DOC_NAME`), calls `publish_member` every
    ``member_ttl / 3``, `refresh` after remote updates (it returns the membership
    events), and `maintain` periodically (collection and self-healing). None of the
    methods may be called from inside a pycrdt observer or transaction callback.

    Args:
        doc: the directory document; it may already hold state (from a store).
        identity: our keypair; we write and sign our own entries only.
        config: lifetimes and limits (defaults: `DirectoryConfig()`).
        clock: returns the current Unix time in seconds (default `time.time`).
    """

    DOC_NAME: Final = DOC_NAME

    def __init__(
        self,
        doc: pycrdt.Doc[Any],
        identity: Identity,
        *,
        config: DirectoryConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._doc = doc
        self._identity = identity
        self._me = identity.public_key
        self._me_bytes = bytes(self._me)
        self._own_key = str(self._me)
        self._config = config or DirectoryConfig()
        self._clock = clock
        self._max_life_ms = round(self._config.max_lifetime * 1000)
        self._delay_ms = round(self._config.collect_delay * 1000)
        self._max_size = {
            _Kind.MEMBER: self._config.max_member_size,
            _Kind.SIGNAL: self._config.max_signal_size,
            _Kind.LATENCY: self._config.max_latency_size,
        }
        self._root: pycrdt.Map[Any] = doc.get(_ROOT, type=pycrdt.Map)
        self._slots: dict[_SlotKey, _Cached] = {}
        self._signal_slots: dict[bytes, set[_SlotKey]] = {}
        self._authors: dict[str, PublicKey | None] = {}
        self._keys: dict[bytes, PublicKey] = {}
        self._rejected: set[bytes] = set()
        self._pruned = False
        self._live_members: set[PublicKey] = set()
        self._events: list[DirectoryEvent] = []
        self._counts = dict.fromkeys(("accepted", "rejected", "removed", "repaired"), 0)
        self._dirty = True
        self._dirty_keys: set[str] | None = None  # containers changed since the scan; None: all
        self._subscription: pycrdt.Subscription | None = self._root.observe_deep(self._on_change)

    # -- reading -------------------------------------------------------------------------

    @property
    def public_key(self) -> PublicKey:
        """Our own key: the author of the entries we write."""
        return self._me

    @property
    def is_dirty(self) -> bool:
        """Whether the document changed since the cache last read it (see `refresh`)."""
        return self._dirty

    @property
    def departed(self) -> list[PublicKey]:
        """Members whose entry expired or who left, while the cache still remembers them.

        A node that restarted while we were cut off looks departed to us; an isolated
        node tries these (see `crdtswarm.swarm`).
        """
        now_ms = self._now_ms(None)
        return [
            cached.entry.author
            for (kind, author, _), cached in self._slots.items()
            if kind == _Kind.MEMBER
            and cached.entry.expires_ms <= now_ms
            and author != self._me_bytes
        ]

    @property
    def members(self) -> dict[PublicKey, Member]:
        """Every current member: valid and unexpired, ourselves included once published.

        Read from the cache: call `refresh` first to take in remote updates.
        """
        now_ms = self._now_ms(None)
        members: dict[PublicKey, Member] = {}
        for (kind, _, _), cached in self._slots.items():
            entry = cached.entry
            if kind == _Kind.MEMBER and entry.expires_ms > now_ms:
                members[entry.author] = Member(
                    public_key=entry.author,
                    addresses=entry.addresses,
                    transports=entry.transports,
                    first_seen=cached.first_seen_ms / 1000,
                    last_seen=entry.issued_ms / 1000,
                    expires_at=entry.expires_ms / 1000,
                    seq=entry.seq,
                )
        return members

    def signals_for(self, recipient: PublicKey | None = None) -> list[Signal]:
        """The unexpired signals addressed to ``recipient`` (default: us), oldest first."""
        target = self._me_bytes if recipient is None else bytes(recipient)
        now_ms = self._now_ms(None)
        found: list[Signal] = []
        for (kind, _, to), cached in self._slots.items():
            entry = cached.entry
            if kind == _Kind.SIGNAL and to == target and entry.expires_ms > now_ms:
                assert entry.recipient is not None  # set for every signal by _decode
                found.append(
                    Signal(
                        author=entry.author,
                        recipient=entry.recipient,
                        seq=entry.seq,
                        payload=entry.payload,
                        issued_at=entry.issued_ms / 1000,
                        expires_at=entry.expires_ms / 1000,
                    )
                )
        found.sort(key=lambda s: (s.issued_at, bytes(s.author)))
        return found

    def latency_rows(self) -> dict[PublicKey, dict[PublicKey, float]]:
        """Unexpired latency rows: author -> peer -> seconds (1 ms resolution)."""
        now_ms = self._now_ms(None)
        live = [
            cached.entry
            for (kind, _, _), cached in self._slots.items()
            if kind in (_Kind.LATENCY, _Kind.MEMBER) and cached.entry.expires_ms > now_ms
        ]
        # a row names its peers by key prefix: resolve them among the keys we know
        keys: dict[bytes, PublicKey | None] = {}
        for key in {self._me, *(entry.author for entry in live)}:
            prefix = bytes(key)[:ROW_KEY_PREFIX]
            keys[prefix] = None if keys.get(prefix, key) != key else key  # None: ambiguous
        rows: dict[PublicKey, dict[PublicKey, float]] = {}
        for entry in live:
            if entry.kind is _Kind.LATENCY:
                row: dict[PublicKey, float] = {}
                for prefix, ms in entry.rows:
                    peer = keys.get(prefix)
                    if peer is not None:
                        row[peer] = ms / 1000
                rows[entry.author] = row
        return rows

    def statistics(self) -> DirectoryStatistics:
        """A snapshot of the counters."""
        now_ms = self._now_ms(None)
        live = [kind for (kind, _, _), c in self._slots.items() if c.entry.expires_ms > now_ms]
        return DirectoryStatistics(
            members=live.count(_Kind.MEMBER),
            signals=live.count(_Kind.SIGNAL),
            latency_rows=live.count(_Kind.LATENCY),
            cached_slots=len(self._slots),
            **self._counts,
        )

    def refresh(self, now: float | None = None) -> list[DirectoryEvent]:
        """Re-read the document if it changed, expire entries, and return the new events.

        Returns every `MemberJoined` / `MemberLeft` found since the previous call,
        including those found by `publish_member` and `maintain` (which queue
        theirs for this method). Events about ourselves are not reported.

        Args:
            now: the current Unix time in seconds (default: the clock).
        """
        self._reload(self._now_ms(now))
        events, self._events = self._events, []
        return events

    # -- writing -------------------------------------------------------------------------

    def publish_member(self, addresses: Sequence[str], transports: Sequence[str]) -> None:
        """Publish (or refresh) our member entry, valid for ``member_ttl``.

        Raises:
            TypeError: if ``addresses`` or ``transports`` is not a sequence of str.
            ValueError: if the entry would exceed ``max_member_size``.
        """
        payload = _encode_member(addresses, transports)
        self._publish(_Kind.MEMBER, b"", payload, self._config.member_ttl)

    def leave(self) -> None:
        """Publish a member entry that expires at once: every reader sees `MemberLeft`.

        `publish_member` joins again.
        """
        self._publish(_Kind.MEMBER, b"", _encode_member((), ()), 0.0)

    def post_signal(
        self, recipient: PublicKey, sealed_payload: bytes, ttl: float | None = None
    ) -> None:
        """Leave ``sealed_payload`` for ``recipient``, replacing our previous signal to it.

        When we already have ``max_signals_per_author`` unexpired signals to others,
        the oldest is withdrawn first.

        Args:
            recipient: whom it is for.
            sealed_payload: opaque bytes (sealing them to the recipient is the caller's job).
            ttl: seconds it stays valid (default ``signal_ttl``).

        Raises:
            ValueError: if ``ttl`` is not in (0, max_lifetime] or the entry would
                exceed ``max_signal_size``.
        """
        ttl = self._config.signal_ttl if ttl is None else ttl
        if not 0 < ttl <= self._config.max_lifetime:
            raise ValueError(f"ttl must be in (0, {self._config.max_lifetime}], got {ttl}")
        payload = bytes(recipient) + encode_var_bytes(bytes(sealed_payload))
        if len(payload) + _MIN_SIZE > self._config.max_signal_size:
            raise ValueError(f"signal exceeds max_signal_size ({self._config.max_signal_size})")
        now_ms = self._now_ms(None)
        self._reload(now_ms)
        target = bytes(recipient)
        live = sorted(
            (self._slots[slot].entry.issued_ms, slot[2])
            for slot in self._signal_slots.get(self._me_bytes, ())
            if self._slots[slot].entry.expires_ms > now_ms and slot[2] != target
        )
        excess = max(0, len(live) - self._config.max_signals_per_author + 1)
        with self._writing():  # readers see the withdrawals with the new signal
            for _, oldest in live[:excess]:
                self.withdraw_signal(PublicKey(oldest))
            self._publish(_Kind.SIGNAL, target, payload, ttl)

    def withdraw_signal(self, recipient: PublicKey) -> None:
        """Replace our signal to ``recipient`` (if any) with one that expires at once."""
        slot = (_Kind.SIGNAL.value, self._me_bytes, bytes(recipient))
        cached = self._slots.get(slot)
        if cached is not None and cached.entry.expires_ms > self._now_ms(None):
            payload = bytes(recipient) + encode_var_bytes(b"")
            self._publish(_Kind.SIGNAL, bytes(recipient), payload, 0.0)

    def publish_latency(self, rows: Mapping[PublicKey, float]) -> None:
        """Publish our measured latencies (seconds, kept to 1 ms) for ``latency_ttl``.

        Raises:
            TypeError: if a key is not a `PublicKey`.
            ValueError: if a value is negative or not finite, or the entry would
                exceed ``max_latency_size``.
        """
        self._publish(_Kind.LATENCY, b"", _encode_latency(rows), self._config.latency_ttl)

    # -- upkeep --------------------------------------------------------------------------

    def maintain(self, now: float | None = None) -> MaintenanceReport:
        """Collect garbage from the document and write back our own lost entries.

        Re-reads the whole document (the membership events it finds are returned by
        the next `refresh`), then, in one transaction, deletes every envelope that
        is invalid, misplaced, superseded, in excess, or expired for longer than
        ``collect_delay``, deletes the containers of authors with nothing left, and
        rewrites our container if it lacks one of our current envelopes.

        Args:
            now: the current Unix time in seconds (default: the clock).
        """
        now_ms = self._now_ms(now)
        self._dirty, self._dirty_keys = False, set()
        containers = self._scan(now_ms)
        forgotten = self._forget(now_ms)
        self._note_membership(now_ms)
        removed, repaired, entries = self._collect(containers, now_ms)
        self._counts["removed"] += removed
        self._counts["repaired"] += repaired
        if len(self._rejected) > _MAX_REJECTED // 2:
            self._rejected.clear()  # what they named has just been deleted
        return MaintenanceReport(
            removed=removed, repaired=repaired, forgotten=forgotten, entries=entries
        )

    def close(self) -> None:
        """Stop observing the document (idempotent); the cache stays readable."""
        if self._subscription is not None:
            self._root.unobserve(self._subscription)
            self._subscription = None

    # -- internals -----------------------------------------------------------------------

    def _on_change(self, events: list[Any]) -> None:
        # an observer: reading the document here is forbidden by pycrdt, but its events
        # say which containers changed, so that `refresh` re-reads only those
        self._dirty = True
        keys = self._dirty_keys
        if keys is None:
            return
        for event in events:
            path = event.path
            if path:
                keys.add(str(path[0]))  # inside a container
            elif isinstance(changed := getattr(event, "keys", None), dict):
                keys.update(str(key) for key in changed)  # containers added or removed
            else:
                self._dirty_keys = None
                return

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A transaction of our own writes, which leave the cache up to date."""
        was_dirty = self._dirty
        was_keys = None if self._dirty_keys is None else set(self._dirty_keys)
        with self._doc.transaction():
            yield
        self._dirty, self._dirty_keys = was_dirty, was_keys  # it fired for our own writes only

    def _now_ms(self, now: float | None) -> int:
        return math.floor((self._clock() if now is None else now) * 1000)

    def _reload(self, now_ms: int) -> None:
        if self._dirty:
            keys, self._dirty, self._dirty_keys = self._dirty_keys, False, set()
            self._scan(now_ms, keys)
        self._forget(now_ms)
        self._note_membership(now_ms)

    def _author_of(self, key: str) -> PublicKey | None:
        if key in self._authors:
            return self._authors[key]
        if len(self._authors) >= _MAX_KEY_CACHE:
            self._authors.clear()
        try:
            author: PublicKey | None = PublicKey.parse(key)
        except InvalidKeyError:
            author = None
        self._authors[key] = author
        return author

    def _key_of(self, raw: bytes) -> PublicKey:
        key = self._keys.get(raw)
        if key is None:
            if len(self._keys) >= _MAX_KEY_CACHE:
                self._keys.clear()
            key = self._keys[raw] = PublicKey(raw)
        return key

    def _scan(self, now_ms: int, keys: Iterable[str] | None = None) -> list[_Container]:
        """Read every container (or those of ``keys``), accepting what is new into the cache."""
        limit = self._config.max_entries_per_author
        self._pruned = False
        containers: list[_Container] = []
        root = self._root
        found = root.items() if keys is None else ((k, root[k]) for k in keys if k in root)
        for key, value in found:
            author = self._author_of(key)
            array = value if isinstance(value, pycrdt.Array) else None
            container = _Container(key, author, array)
            containers.append(container)
            if author is None or array is None:
                continue
            for index, item in enumerate(array.to_py() or ()):
                if index >= limit:
                    container.records.append((index, b"", _Status.DROP, None))
                    continue
                raw = bytes(item) if isinstance(item, bytes | bytearray) else b""
                status, slot = self._consider(author, raw, now_ms)
                container.records.append((index, raw, status, slot))
        return containers

    def _consider(
        self, author: PublicKey, raw: bytes, now_ms: int
    ) -> tuple[_Status, _SlotKey | None]:
        if len(raw) < _MIN_SIZE or raw[0] != _VERSION or raw[1] not in self._max_size:
            return _Status.DROP, None
        if len(raw) > self._max_size[_Kind(raw[1])] or raw[2 : 2 + KEY_SIZE] != bytes(author):
            return _Status.DROP, None
        slot = _slot_of(raw)
        _, _, _, seq, issued_ms, expires_ms = _HEADER.unpack_from(raw)
        cached = self._slots.get(slot)
        if cached is not None and (raw == cached.entry.raw or seq <= cached.entry.seq):
            return _Status.CANDIDATE, slot  # current or superseded: settled by the cache
        if (
            issued_ms > expires_ms
            or expires_ms - issued_ms > self._max_life_ms
            or expires_ms > now_ms + self._max_life_ms
            or issued_ms + self._max_life_ms <= now_ms
        ):
            return _Status.DROP, None  # a bad lifetime, or too old to matter
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self._rejected:
            return _Status.DROP, None
        if (
            slot[0] == _Kind.SIGNAL
            and (cached is None or cached.entry.expires_ms <= now_ms)
            and expires_ms > now_ms
            and self._live_signals(slot[1], now_ms) >= self._config.max_signals_per_author
        ):
            return _Status.DROP, None  # the author has too many signals out
        if cached is None and len(self._slots) >= self._config.max_cached_entries:
            if not self._pruned:  # once per scan: make room by dropping expired slots
                self._pruned = True
                self._forget(now_ms, expired_too=True)
            if len(self._slots) >= self._config.max_cached_entries:
                return _Status.KEEP, None  # valid, but no room: leave it to others
        try:
            if not author.verify(raw[-SIGNATURE_SIZE:], SIGNATURE_CONTEXT + raw[:-SIGNATURE_SIZE]):
                raise FrameError("bad signature")
            entry = _decode(raw, author, self._key_of)
        except (FrameError, ValueError) as exc:
            logger.debug("rejected a directory entry of %s: %s", author.short, exc)
            self._counts["rejected"] += 1
            if len(self._rejected) < _MAX_REJECTED:
                self._rejected.add(digest)
            return _Status.DROP, None
        self._accept(slot, entry, now_ms)
        return _Status.CANDIDATE, slot

    def _live_signals(self, author: bytes, now_ms: int) -> int:
        slots = self._signal_slots.get(author, ())
        return sum(1 for slot in slots if self._slots[slot].entry.expires_ms > now_ms)

    def _accept(self, slot: _SlotKey, entry: _Entry, now_ms: int) -> None:
        previous = self._slots.get(slot)
        if previous is not None and previous.entry.expires_ms > now_ms:
            first_seen_ms = previous.first_seen_ms
        else:
            first_seen_ms = entry.issued_ms
        self._slots[slot] = _Cached(entry, first_seen_ms)
        if entry.kind == _Kind.SIGNAL:
            self._signal_slots.setdefault(slot[1], set()).add(slot)
        self._counts["accepted"] += 1

    def _forget(self, now_ms: int, *, expired_too: bool = False) -> int:
        """Drop slots no older entry can beat any more (and, if asked, every expired one)."""
        doomed = [
            slot
            for slot, cached in self._slots.items()
            if cached.entry.issued_ms + self._max_life_ms <= now_ms
            or (expired_too and cached.entry.expires_ms <= now_ms)
        ]
        for slot in doomed:
            del self._slots[slot]
            if slot[0] == _Kind.SIGNAL:
                authored = self._signal_slots[slot[1]]
                authored.discard(slot)
                if not authored:
                    del self._signal_slots[slot[1]]
        return len(doomed)

    def _note_membership(self, now_ms: int) -> None:
        live = {
            cached.entry.author
            for (kind, author, _), cached in self._slots.items()
            if kind == _Kind.MEMBER
            and cached.entry.expires_ms > now_ms
            and author != self._me_bytes
        }
        self._events.extend(MemberJoined(public_key=k) for k in sorted(live - self._live_members))
        self._events.extend(MemberLeft(public_key=k) for k in sorted(self._live_members - live))
        self._live_members = live

    def _own_envelopes(self, now_ms: int) -> list[bytes]:
        """Our entries that belong in the document: current ones and recently expired ones."""
        own = [
            cached.entry
            for (_, author, _), cached in self._slots.items()
            if author == self._me_bytes and cached.entry.expires_ms + self._delay_ms > now_ms
        ]
        own.sort(key=lambda e: (e.kind, e.issued_ms))
        return [entry.raw for entry in own]

    def _publish(self, kind: _Kind, recipient: bytes, payload: bytes, ttl: float) -> None:
        now_ms = self._now_ms(None)
        self._reload(now_ms)
        slot = (kind.value, self._me_bytes, recipient)
        previous = self._slots.get(slot)
        seq = max(now_ms, previous.entry.seq + 1 if previous is not None else 0)
        expires_ms = now_ms + round(ttl * 1000)
        body = _HEADER.pack(_VERSION, kind, self._me_bytes, seq, now_ms, expires_ms) + payload
        raw = body + self._identity.sign(SIGNATURE_CONTEXT + body)
        if len(raw) > self._max_size[kind]:
            raise ValueError(f"a {kind.name.lower()} entry of {len(raw)} bytes exceeds the limit")
        self._accept(slot, _decode(raw, self._me, self._key_of), now_ms)
        with self._writing():
            container = self._root.get(self._own_key)
            if isinstance(container, pycrdt.Array):
                container.append(raw)
                items = container.to_py() or []
                for index in range(len(items) - 2, -1, -1):  # what this entry supersedes
                    item = items[index]
                    if (
                        isinstance(item, bytes | bytearray)
                        and len(item) >= _MIN_SIZE
                        and _slot_of(bytes(item)) == slot
                    ):
                        del container[index]
            else:
                self._root[self._own_key] = pycrdt.Array(self._own_envelopes(now_ms))

    def _collect(self, containers: list[_Container], now_ms: int) -> tuple[int, int, int]:
        """Delete what the cache rejects and heal our container; (removed, repaired, left)."""
        holders = {
            author
            for (_, author, _), cached in self._slots.items()
            if cached.entry.expires_ms + self._delay_ms > now_ms
        }
        own = self._own_envelopes(now_ms)
        own_present: set[bytes] = set()
        own_container_ok = False
        removed = left = 0
        with self._writing():
            for container in containers:
                if container.author is None or container.array is None:
                    del self._root[container.key]  # ours is rewritten below if need be
                    removed += 1
                    continue
                kept: set[bytes] = set()
                doomed: list[int] = []
                for index, raw, status, slot in container.records:
                    if status is _Status.KEEP and raw not in kept:
                        kept.add(raw)
                        continue
                    cached = self._slots.get(slot) if slot is not None else None
                    if (
                        status is _Status.CANDIDATE
                        and cached is not None
                        and cached.entry.raw == raw
                        and cached.entry.expires_ms + self._delay_ms > now_ms
                        and raw not in kept
                    ):
                        kept.add(raw)
                        continue
                    doomed.append(index)
                if not kept and bytes(container.author) not in holders:
                    del self._root[container.key]
                    removed += 1 + len(doomed)
                    continue
                for index in reversed(doomed):
                    del container.array[index]
                removed += len(doomed)
                left += len(kept)
                if container.key == self._own_key:
                    own_present = kept
                    own_container_ok = True
            missing = [raw for raw in own if raw not in own_present]
            if own and (missing or not own_container_ok):
                self._root[self._own_key] = pycrdt.Array(own)
                left += len(own) - len(own_present)
        return removed, len(missing) if own else 0, left
