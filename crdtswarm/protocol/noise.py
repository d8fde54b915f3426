"""The Noise Protocol Framework, revision 34, on libsodium primitives.

Implements the three objects of the specification (section 5): `CipherState`,
`SymmetricState` and `HandshakeState`, generic over handshake patterns named in
the protocol name, e.g. ``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b``.

Supported:

* DH ``25519`` (X25519), cipher ``ChaChaPoly`` (IETF ChaCha20-Poly1305 with the
  nonce ``0x00000000 || little-endian 64-bit counter``), hashes ``BLAKE2b`` and
  ``SHA256`` (HMAC-based HKDF).
* Every one-way pattern (N, K, X), every interactive fundamental pattern (NN, NK,
  NX, KN, KK, KX, XN, XK, XX, IN, IK, IX), every deferred pattern (NK1, X1X, ...),
  and ``pskN`` modifiers on any of them (``NNpsk0+psk2`` included).

Rules enforced (the spec's section numbers in brackets):

* Every handshake and transport message is at most 65535 bytes [3]; a longer
  message is refused on write (`ValueError`) and on read (`HandshakeError` in a
  handshake, `FrameError` in transport).
* A nonce is never reused: 2**64-1 is reserved, and a `CipherState` whose counter
  reaches it refuses to encrypt (`LocalProtocolError`) or decrypt (`FrameError`) [5.1].
* With a psk modifier, every ``e`` token also calls ``MixKey(e.public_key)``, in
  pre-messages as well as in messages [9.2].
* A handshake that fails (bad ciphertext, truncated message, low-order DH result)
  is dead: further calls raise `LocalProtocolError`. `HandshakeState.split` can be
  called once, so the transport keys cannot be duplicated by mistake.

Randomness comes only from the ``rng`` given to `HandshakeState` (``os.urandom`` by
default); the module does no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crdtswarm.errors import FrameError, HandshakeError, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "DH_SIZE",
    "KEY_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_NONCE",
    "SUPPORTED_PATTERNS",
    "TAG_SIZE",
    "CipherPair",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "SymmetricState",
    "parse_protocol_name",
]

MAX_MESSAGE_SIZE: Final = 65535
"""The largest Noise message, handshake or transport, in bytes."""
TAG_SIZE: Final = 16
"""The size of the ChaChaPoly authentication tag."""
KEY_SIZE: Final = 32
"""The size of a cipher key and of a psk."""
DH_SIZE: Final = 32
"""The size of an X25519 public key, private key and DH output."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce: a `CipherState` never uses it except to rekey."""

_MAX_PLAINTEXT_SIZE: Final = MAX_MESSAGE_SIZE - TAG_SIZE
_NONCE: Final = struct.Struct("<4xQ")  # 32 zero bits, then the 64-bit counter little-endian
_ZEROS: Final = bytes(KEY_SIZE)
# ChaCha20-Poly1305 (RFC 8439) from OpenSSL through `cryptography` (a dependency of
# aiortc): the same bytes as libsodium's ietf construction, about three times faster
# on 64 KiB records with AVX2/AVX-512, and this is the hot path of every byte moved.
_HASH_NAMES: Final = {"BLAKE2b": "blake2b", "SHA256": "sha256"}
_T = TypeVar("_T")

# The handshake patterns of sections 7.4 (one-way), 7.5 (interactive fundamental)
# and 7.6 (interactive deferred), written as the spec writes them.
_PATTERN_TEXT: Final = {
    "N": "<- s\n...\n-> e, es",
    "K": "-> s\n<- s\n...\n-> e, es, ss",
    "X": "<- s\n...\n-> e, es, s, ss",
    "NN": "-> e\n<- e, ee",
    "NK": "<- s\n...\n-> e, es\n<- e, ee",
    "NX": "-> e\n<- e, ee, s, es",
    "KN": "-> s\n...\n-> e\n<- e, ee, se",
    "KK": "-> s\n<- s\n...\n-> e, es, ss\n<- e, ee, se",
    "KX": "-> s\n...\n-> e\n<- e, ee, se, s, es",
    "XN": "-> e\n<- e, ee\n-> s, se",
    "XK": "<- s\n...\n-> e, es\n<- e, ee\n-> s, se",
    "XX": "-> e\n<- e, ee, s, es\n-> s, se",
    "IN": "-> e, s\n<- e, ee, se",
    "IK": "<- s\n...\n-> e, es, s, ss\n<- e, ee, se",
    "IX": "-> e, s\n<- e, ee, se, s, es",
    "NK1": "<- s\n...\n-> e\n<- e, ee, es",
    "NX1": "-> e\n<- e, ee, s\n-> es",
    "X1N": "-> e\n<- e, ee\n-> s\n<- se",
    "X1K": "<- s\n...\n-> e, es\n<- e, ee\n-> s\n<- se",
    "XK1": "<- s\n...\n-> e\n<- e, ee, es\n-> s, se",
    "X1K1": "<- s\n...\n-> e\n<- e, ee, es\n-> s\n<- se",
    "X1X": "-> e\n<- e, ee, s, es\n-> s\n<- se",
    "XX1": "-> e\n<- e, ee, s\n-> es, s, se",
    "X1X1": "-> e\n<- e, ee, s\n-> es, s\n<- se",
    "K1N": "-> s\n...\n-> e\n<- e, ee\n-> se",
    "K1K": "-> s\n<- s\n...\n-> e, es\n<- e, ee\n-> se",
    "KK1": "-> s\n<- s\n...\n-> e\n<- e, ee, se, es",
    "K1K1": "-> s\n<- s\n...\n-> e\n<- e, ee, es\n-> se",
    "K1X": "-> s\n...\n-> e\n<- e, ee, s, es\n-> se",
    "KX1": "-> s\n...\n-> e\n<- e, ee, se, s\n-> es",
    "K1X1": "-> s\n...\n-> e\n<- e, ee, s\n-> se, es",
    "I1N": "-> e, s\n<- e, ee\n-> se",
    "I1K": "<- s\n...\n-> e, es, s\n<- e, ee\n-> se",
    "IK1": "<- s\n...\n-> e, s\n<- e, ee, se, es",
    "I1K1": "<- s\n...\n-> e, s\n<- e, ee, es\n-> se",
    "I1X": "-> e, s\n<- e, ee, s, es\n-> se",
    "IX1": "-> e, s\n<- e, ee, se, s\n-> es",
    "I1X1": "-> e, s\n<- e, ee, s\n-> se, es",
}

SUPPORTED_PATTERNS: Final = frozenset(_PATTERN_TEXT)
"""The base pattern names this module implements; each also takes psk modifiers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakePattern:
    """A handshake pattern with its modifiers applied.

    Attributes:
        name: the pattern as named in the protocol name, e.g. ``"XXpsk3"``.
        initiator_pre_message: tokens the responder knows in advance (``"e"``, ``"s"``).
        responder_pre_message: tokens the initiator knows in advance.
        messages: the tokens of each handshake message; the initiator writes the
            even-indexed ones, the responder the odd-indexed ones.
    """

    name: str
    initiator_pre_message: tuple[str, ...]
    responder_pre_message: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def is_one_way(self) -> bool:
        """Whether only the initiator ever sends (patterns N, K and X)."""
        return len(self.messages) == 1

    @property
    def psk_count(self) -> int:
        """How many psks the pattern consumes."""
        return sum(tokens.count("psk") for tokens in self.messages)

    @classmethod
    def parse(cls, name: str) -> HandshakePattern:
        """Build the pattern named ``name``: a base pattern plus ``+``-joined psk modifiers.

        Raises:
            ValueError: if the base pattern or a modifier is unknown or out of range.
        """
        split = next((i for i, char in enumerate(name) if char.islower()), len(name))
        base, modifier_text = name[:split], name[split:]
        text = _PATTERN_TEXT.get(base)
        if text is None:
            raise ValueError(f"unsupported Noise handshake pattern {base!r}")
        pre_text, _, message_text = text.rpartition("...")
        initiator_pre: tuple[str, ...] = ()
        responder_pre: tuple[str, ...] = ()
        for direction, tokens in _parse_lines(pre_text):
            if direction == "->":
                initiator_pre = tokens
            else:
                responder_pre = tokens
        messages = [list(tokens) for _, tokens in _parse_lines(message_text)]
        for modifier in modifier_text.split("+") if modifier_text else ():
            if not modifier.startswith("psk") or not modifier[3:].isdigit():
                raise ValueError(f"unsupported Noise pattern modifier {modifier!r} in {name!r}")
            position = int(modifier[3:])
            if position > len(messages):
                raise ValueError(f"{modifier} is out of range for the pattern {base}")
            if position == 0:
                messages[0].insert(0, "psk")
            else:
                messages[position - 1].append("psk")
        return cls(
            name=name,
            initiator_pre_message=initiator_pre,
            responder_pre_message=responder_pre,
            messages=tuple(tuple(tokens) for tokens in messages),
        )


def _parse_lines(text: str) -> list[tuple[str, tuple[str, ...]]]:
    lines = []
    for line in text.strip().splitlines():
        direction, _, tokens = line.strip().partition(" ")
        lines.append((direction, tuple(token.strip() for token in tokens.split(","))))
    return lines


def parse_protocol_name(protocol_name: str) -> tuple[HandshakePattern, str]:
    """Split a protocol name into its handshake pattern and its hashlib hash name.

    Raises:
        ValueError: if the name is malformed or names an unsupported pattern or function.
    """
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise ValueError(f"not a Noise protocol name: {protocol_name!r}")
    _, pattern_name, dh, cipher, hash_name = parts
    if dh != "25519":
        raise ValueError(f"unsupported Noise DH function {dh!r} (only 25519)")
    if cipher != "ChaChaPoly":
        raise ValueError(f"unsupported Noise cipher {cipher!r} (only ChaChaPoly)")
    if hash_name not in _HASH_NAMES:
        raise ValueError(f"unsupported Noise hash {hash_name!r} (BLAKE2b or SHA256)")
    return HandshakePattern.parse(pattern_name), _HASH_NAMES[hash_name]


class CipherState:
    """A cipher key and its nonce counter (spec section 5.1).

    Without a key, encryption and decryption return their input unchanged, as the
    spec requires during the first handshake messages.
    """

    __slots__ = ("_aead", "_key", "_nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self._nonce = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """Set the key (or clear it with None) and reset the nonce to zero.

        Raises:
            ValueError: if ``key`` is not 32 bytes.
        """
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError(f"a cipher key is {KEY_SIZE} bytes, got {len(key)}")
        self._key = key
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self._nonce = 0

    def has_key(self) -> bool:
        """Whether a key is set."""
        return self._key is not None

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._nonce

    def set_nonce(self, nonce: int) -> None:
        """Set the nonce (for out-of-band counters; never reuse one).

        Raises:
            ValueError: if ``nonce`` is not in ``0..MAX_NONCE``.
        """
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce out of range: {nonce}")
        self._nonce = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | memoryview) -> bytes:
        """Encrypt and authenticate ``plaintext`` with the associated data ``ad``.

        Raises:
            ValueError: if the ciphertext would exceed `MAX_MESSAGE_SIZE`.
            LocalProtocolError: if the nonces are exhausted (rekey or start over).
        """
        aead = self._aead
        if aead is None:
            return bytes(plaintext)
        nonce = self._nonce
        if nonce >= MAX_NONCE:
            raise LocalProtocolError("the Noise nonces are exhausted")
        if len(plaintext) > _MAX_PLAINTEXT_SIZE:
            raise ValueError(
                f"a Noise plaintext is at most {_MAX_PLAINTEXT_SIZE} bytes, got {len(plaintext)}"
            )
        ciphertext = aead.encrypt(_NONCE.pack(nonce), plaintext, ad)
        self._nonce = nonce + 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        """Authenticate and decrypt ``ciphertext``; the nonce advances only on success.

        Raises:
            FrameError: if the ciphertext is too long or too short, fails
                authentication, or the nonces are exhausted.
        """
        aead = self._aead
        if aead is None:
            return bytes(ciphertext)
        size = len(ciphertext)
        if size > MAX_MESSAGE_SIZE:
            raise FrameError(f"a Noise message is at most {MAX_MESSAGE_SIZE} bytes, got {size}")
        if size < TAG_SIZE:
            raise FrameError(f"a Noise ciphertext is at least {TAG_SIZE} bytes, got {size}")
        nonce = self._nonce
        if nonce >= MAX_NONCE:
            raise FrameError("the Noise nonces are exhausted")
        try:
            plaintext = aead.decrypt(_NONCE.pack(nonce), ciphertext, ad)
        except InvalidTag:
            raise FrameError("Noise message failed authentication") from None
        self._nonce = nonce + 1
        return plaintext

    def rekey(self) -> None:
        """Replace the key with one derived from it (spec section 11.3); the nonce is kept.

        Raises:
            LocalProtocolError: if no key is set.
        """
        if self._aead is None:
            raise LocalProtocolError("cannot rekey a CipherState without a key")
        nonce = self._nonce
        self.initialize_key(self._aead.encrypt(_NONCE.pack(MAX_NONCE), _ZEROS, b"")[:KEY_SIZE])
        self._nonce = nonce


class CipherPair(NamedTuple):
    """Two transport-phase `CipherState`s."""

    send: CipherState
    """Encrypts what this side sends (in `HandshakeState.split` order: c1)."""
    receive: CipherState
    """Decrypts what this side receives (in `HandshakeState.split` order: c2)."""


class SymmetricState:
    """The chaining key and handshake hash of a handshake (spec section 5.2)."""

    __slots__ = ("_cipher", "_ck", "_h", "_hash_name")

    def __init__(self, protocol_name: str) -> None:
        """Initialize from the full protocol name.

        Raises:
            ValueError: if the protocol name is not supported.
        """
        _, self._hash_name = parse_protocol_name(protocol_name)
        hash_size = hashlib.new(self._hash_name).digest_size
        name = protocol_name.encode("ascii")
        self._h = name.ljust(hash_size, b"\0") if len(name) <= hash_size else self._hash(name)
        self._ck = self._h
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        """The current handshake hash ``h``."""
        return self._h

    def has_key(self) -> bool:
        """Whether the handshake cipher has a key yet."""
        return self._cipher.has_key()

    def _hash(self, data: bytes) -> bytes:
        return hashlib.new(self._hash_name, data).digest()

    def _hkdf(self, input_key_material: bytes, outputs: int) -> list[bytes]:
        temp_key = hmac.digest(self._ck, input_key_material, self._hash_name)
        output = hmac.digest(temp_key, b"\x01", self._hash_name)
        results = [output]
        for i in range(2, outputs + 1):
            output = hmac.digest(temp_key, output + bytes((i,)), self._hash_name)
            results.append(output)
        return results

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey: fold a DH output (or, with psks, an ephemeral key) into the chaining key."""
        self._ck, temp_k = self._hkdf(input_key_material, 2)
        self._cipher.initialize_key(temp_k[:KEY_SIZE])

    def mix_hash(self, data: bytes) -> None:
        """MixHash: ``h = HASH(h || data)``."""
        self._h = self._hash(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash: fold a psk into both the chaining key and ``h``."""
        self._ck, temp_h, temp_k = self._hkdf(input_key_material, 3)
        self.mix_hash(temp_h)
        self._cipher.initialize_key(temp_k[:KEY_SIZE])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then mix the ciphertext into ``h``."""
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then mix the ciphertext into ``h``.

        Raises:
            HandshakeError: if the ciphertext fails authentication.
        """
        try:
            plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        except FrameError as exc:
            raise HandshakeError(f"handshake decryption failed: {exc}") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> CipherPair:
        """The two transport ciphers: c1 (initiator to responder) then c2."""
        temp_k1, temp_k2 = self._hkdf(b"", 2)
        return CipherPair(CipherState(temp_k1[:KEY_SIZE]), CipherState(temp_k2[:KEY_SIZE]))


@dataclass(frozen=True, slots=True)
class _KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> _KeyPair:
        if len(private) != DH_SIZE:
            raise ValueError(f"an X25519 private key is {DH_SIZE} bytes, got {len(private)}")
        return cls(private, nacl.bindings.crypto_scalarmult_base(private))


class HandshakeState:
    """One side of a Noise handshake (spec section 5.3).

    Call `write_message` and `read_message` in the pattern's order (the initiator
    writes first), then `split` (or `transport_ciphers`) once `is_complete`.

    Args:
        protocol_name: e.g. ``"Noise_XX_25519_ChaChaPoly_BLAKE2b"``.
        initiator: whether this side sends the first message.
        prologue: data both sides must agree on, mixed into the handshake hash.
        s: this side's static X25519 private key, if the pattern uses one.
        e: a fixed ephemeral private key: for test vectors only; by default a fresh
            one is drawn from ``rng`` when the pattern sends ``e``.
        rs: the peer's static public key, when the pattern has it as a pre-message.
        re: the peer's ephemeral public key, when the pattern has it as a pre-message.
        psks: the 32-byte pre-shared keys, in the order the pattern uses them.
        rng: returns the given number of random bytes.

    Raises:
        ValueError: if the protocol is unsupported, or a key the pattern needs is
            missing, of the wrong size, or given where the pattern has no use for it.
    """

    __slots__ = (
        "_e",
        "_failed",
        "_index",
        "_initiator",
        "_pattern",
        "_protocol_name",
        "_psks",
        "_re",
        "_rng",
        "_rs",
        "_s",
        "_split_done",
        "_symmetric",
        "_uses_psk",
    )

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        pattern, _ = parse_protocol_name(protocol_name)
        local_pre = pattern.initiator_pre_message if initiator else pattern.responder_pre_message
        remote_pre = pattern.responder_pre_message if initiator else pattern.initiator_pre_message
        local_messages = pattern.messages[0 if initiator else 1 :: 2]
        local_sends = {token for tokens in local_messages for token in tokens}
        _check_key("s", s, needed="s" in local_pre or "s" in local_sends)
        _check_key("e", e, needed="e" in local_pre, allowed="e" in local_sends)
        _check_key("rs", rs, needed="s" in remote_pre)
        _check_key("re", re, needed="e" in remote_pre)
        if len(psks) != pattern.psk_count:
            raise ValueError(f"{pattern.name} needs {pattern.psk_count} psks, got {len(psks)}")
        for psk in psks:
            if len(psk) != KEY_SIZE:
                raise ValueError(f"a psk is {KEY_SIZE} bytes, got {len(psk)}")

        self._protocol_name = protocol_name
        self._pattern = pattern
        self._uses_psk = pattern.psk_count > 0
        self._initiator = initiator
        self._rng = rng
        self._index = 0
        self._failed = False
        self._split_done = False
        self._psks = list(psks)
        self._s = None if s is None else _KeyPair.from_private(s)
        self._e = None if e is None else _KeyPair.from_private(e)
        self._rs = rs
        self._re = re

        self._symmetric = SymmetricState(protocol_name)
        self._symmetric.mix_hash(prologue)
        # Pre-messages: the initiator's first, then the responder's [7.1].
        for owner_is_initiator, tokens in (
            (True, pattern.initiator_pre_message),
            (False, pattern.responder_pre_message),
        ):
            is_local = owner_is_initiator == initiator
            for token in tokens:
                if token == "e":
                    public = _public(self._e) if is_local else self._re
                    self._mix_ephemeral(_required(public, "e"))
                else:
                    public = _public(self._s) if is_local else self._rs
                    self._symmetric.mix_hash(_required(public, "s"))

    @property
    def protocol_name(self) -> str:
        """The full Noise protocol name."""
        return self._protocol_name

    @property
    def pattern(self) -> HandshakePattern:
        """The handshake pattern, modifiers applied."""
        return self._pattern

    @property
    def is_initiator(self) -> bool:
        """Whether this side sends the first message."""
        return self._initiator

    @property
    def is_complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index == len(self._pattern.messages)

    @property
    def is_my_turn(self) -> bool:
        """Whether the next step is `write_message` (rather than `read_message`)."""
        return not self.is_complete and (self._index % 2 == 0) == self._initiator

    @property
    def local_static(self) -> bytes | None:
        """This side's static X25519 public key, if it has one."""
        return _public(self._s)

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static X25519 public key, once known."""
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        """The peer's ephemeral X25519 public key, once known."""
        return self._re

    @property
    def handshake_hash(self) -> bytes:
        """The final handshake hash ``h``: a unique id of this session, safe to reveal.

        Raises:
            LocalProtocolError: before the handshake is complete.
        """
        if not self.is_complete:
            raise LocalProtocolError("the handshake hash is final only after the handshake")
        return self._symmetric.handshake_hash

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message, carrying ``payload``.

        Raises:
            LocalProtocolError: if it is the peer's turn, or the handshake failed or ended.
            ValueError: if the message would exceed `MAX_MESSAGE_SIZE`.
            HandshakeError: if a DH with the peer's key fails (low-order point); the
                handshake is then dead.
        """
        self._check_step(writing=True)
        tokens = self._pattern.messages[self._index]
        size = self._message_overhead(tokens) + len(payload)
        if size > MAX_MESSAGE_SIZE:
            raise ValueError(f"handshake message of {size} bytes exceeds {MAX_MESSAGE_SIZE}")
        symmetric = self._symmetric
        parts: list[bytes] = []
        try:
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = _KeyPair.from_private(self._rng(DH_SIZE))
                    parts.append(self._e.public)
                    self._mix_ephemeral(self._e.public)
                elif token == "s":
                    static = _required(self._s, "s")
                    parts.append(symmetric.encrypt_and_hash(static.public))
                elif token == "psk":
                    symmetric.mix_key_and_hash(self._psks.pop(0))
                else:
                    symmetric.mix_key(self._dh(token))
            parts.append(symmetric.encrypt_and_hash(payload))
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its payload.

        Raises:
            LocalProtocolError: if it is our turn to write, or the handshake failed or ended.
            HandshakeError: if the message is too long, truncated or fails
                authentication, or a DH fails; the handshake is then dead.
        """
        self._check_step(writing=False)
        try:
            payload = self._read(message)
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return payload

    def _read(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_SIZE:
            raise HandshakeError(
                f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE_SIZE}"
            )
        symmetric = self._symmetric
        position = 0
        for token in self._pattern.messages[self._index]:
            if token == "e":
                self._re = _take(message, position, DH_SIZE)
                position += DH_SIZE
                self._mix_ephemeral(self._re)
            elif token == "s":
                size = DH_SIZE + (TAG_SIZE if symmetric.has_key() else 0)
                self._rs = symmetric.decrypt_and_hash(_take(message, position, size))
                position += size
            elif token == "psk":
                symmetric.mix_key_and_hash(self._psks.pop(0))
            else:
                symmetric.mix_key(self._dh(token))
        payload = message[position:]
        if symmetric.has_key() and len(payload) < TAG_SIZE:
            raise HandshakeError("truncated handshake message")
        return symmetric.decrypt_and_hash(payload)

    def split(self) -> CipherPair:
        """Derive the transport ciphers ``(c1, c2)``; c1 carries initiator-to-responder.

        The pair comes in the spec's order whatever our role; `transport_ciphers`
        orients it. Callable once, so transport keys are never duplicated.

        Raises:
            LocalProtocolError: before completion, or when called a second time.
        """
        if self._failed or not self.is_complete:
            raise LocalProtocolError("split() before the handshake completed")
        if self._split_done:
            raise LocalProtocolError("split() was already called")
        self._split_done = True
        return self._symmetric.split()

    def transport_ciphers(self) -> CipherPair:
        """Like `split`, but oriented: ``send`` encrypts what this side sends.

        Raises:
            LocalProtocolError: before completion, when called a second time, or for
                a one-way pattern (only the initiator sends there: use `split`).
        """
        if self._pattern.is_one_way:
            raise LocalProtocolError("a one-way pattern has a single cipher: use split()")
        c1, c2 = self.split()
        return CipherPair(c1, c2) if self._initiator else CipherPair(c2, c1)

    def _check_step(self, *, writing: bool) -> None:
        if self._failed:
            raise LocalProtocolError("the handshake failed; start a new one")
        if self.is_complete:
            raise LocalProtocolError("the handshake is already complete")
        if self.is_my_turn != writing:
            whose = "our turn to write" if self.is_my_turn else "the peer's turn to write"
            raise LocalProtocolError(f"it is {whose}")

    def _message_overhead(self, tokens: tuple[str, ...]) -> int:
        has_key = self._symmetric.has_key()
        size = 0
        for token in tokens:
            if token == "e":
                size += DH_SIZE
                has_key = has_key or self._uses_psk
            elif token == "s":
                size += DH_SIZE + (TAG_SIZE if has_key else 0)
            else:
                has_key = True
        return size + (TAG_SIZE if has_key else 0)

    def _mix_ephemeral(self, public: bytes) -> None:
        self._symmetric.mix_hash(public)
        if self._uses_psk:
            self._symmetric.mix_key(public)

    def _dh(self, token: str) -> bytes:
        # The token's first letter names the initiator's key, the second the responder's.
        local, remote = (token[0], token[1]) if self._initiator else (token[1], token[0])
        local_pair = _required(self._e if local == "e" else self._s, local)
        remote_public = _required(self._re if remote == "e" else self._rs, "r" + remote)
        try:
            return nacl.bindings.crypto_scalarmult(local_pair.private, remote_public)
        except nacl.exceptions.CryptoError:
            raise HandshakeError("Diffie-Hellman with a low-order public key") from None


def _take(message: bytes, position: int, size: int) -> bytes:
    if position + size > len(message):
        raise HandshakeError("truncated handshake message")
    return message[position : position + size]


def _public(pair: _KeyPair | None) -> bytes | None:
    return None if pair is None else pair.public


def _required(value: _T | None, name: str) -> _T:
    if value is None:
        raise LocalProtocolError(f"the handshake needs the key {name!r}, which is not set")
    return value


def _check_key(
    name: str, value: bytes | None, *, needed: bool, allowed: bool | None = None
) -> None:
    if value is None:
        if needed:
            raise ValueError(f"this handshake pattern needs {name!r}")
        return
    if not (needed or (allowed if allowed is not None else needed)):
        raise ValueError(f"this handshake pattern has no use for {name!r}")
    if len(value) != DH_SIZE:
        raise ValueError(f"{name!r} must be {DH_SIZE} bytes, got {len(value)}")
