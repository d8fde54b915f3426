"""Ed25519 identities: a node's keypair (`Identity`) and its address (`PublicKey`).

A node's public key is its address in the swarm. Its text form is 56 characters
of lowercase RFC 4648 base32: the 32-byte key followed by a 3-byte BLAKE2b
checksum, so a mistyped key is rejected instead of dialling a stranger.

The X25519 keys used by the Noise handshake are derived from the Ed25519 keys with
libsodium's conversion (``crypto_sign_ed25519_*_to_curve25519``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.signing

__all__ = ["Identity", "IdentityFileError", "InvalidKeyError", "PublicKey"]

KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_CHECKSUM_SIZE: Final = 3
_TEXT_SIZE: Final = 56
_FILE_HEADER: Final = "# crdtswarm identity: keep this file secret"


class InvalidKeyError(ValueError):
    """Raised by `PublicKey.parse` and `PublicKey(...)` when the input is not a valid key."""


class IdentityFileError(ValueError):
    """Raised by `Identity.load` when the file is malformed or readable by others.

    Attributes:
        path: the identity file.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"identity file {path}: {reason}")
        self.path = path


def _checksum(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=_CHECKSUM_SIZE, person=b"crdtswarm-pk").digest()


@functools.total_ordering
class PublicKey:
    """An Ed25519 public key: the address of a node.

    Hashable and ordered (by the key bytes). ``bytes(pk)`` is the raw 32-byte key
    and ``str(pk)`` the checksummed text form that `parse` reads back.

    Raises:
        InvalidKeyError: if ``key`` is not 32 bytes encoding a usable Ed25519 point.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray | memoryview):
            raise InvalidKeyError(f"a public key is 32 bytes, not {type(key).__name__}")
        key = bytes(key)
        if len(key) != KEY_SIZE:
            raise InvalidKeyError(f"a public key is {KEY_SIZE} bytes, got {len(key)}")
        try:
            nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(key)
        except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError) as exc:
            raise InvalidKeyError("not a valid Ed25519 public key") from exc
        self._key = key

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Read the text form produced by ``str(pk)``.

        Raises:
            InvalidKeyError: on anything that is not exactly a valid key's text form.
        """
        if not isinstance(text, str):
            raise InvalidKeyError(f"expected a str, got {type(text).__name__}")
        if len(text) != _TEXT_SIZE:
            raise InvalidKeyError(
                f"a public key is {_TEXT_SIZE} base32 characters, got {len(text)}: {text[:64]!r}"
            )
        if not text.isascii() or text != text.lower():
            raise InvalidKeyError(f"a public key is lowercase base32: {text!r}")
        try:
            raw = base64.b32decode(text.upper())
        except binascii.Error as exc:
            raise InvalidKeyError(f"not base32: {text!r}") from exc
        key, checksum = raw[:KEY_SIZE], raw[KEY_SIZE:]
        if _checksum(key) != checksum:
            raise InvalidKeyError(f"checksum mismatch (mistyped key?): {text!r}")
        return cls(key)

    def __bytes__(self) -> bytes:
        return self._key

    def __str__(self) -> str:
        return base64.b32encode(self._key + _checksum(self._key)).decode("ascii").lower()

    def __repr__(self) -> str:
        return f"PublicKey({str(self)!r})"

    @property
    def short(self) -> str:
        """The first 8 characters of the text form, for logs."""
        return str(self)[:8]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._key == other._key

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._key < other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return whether ``signature`` is this key's Ed25519 signature of ``message``."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            nacl.signing.VerifyKey(self._key).verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def x25519(self) -> bytes:
        """The X25519 public key derived from this key (libsodium's conversion)."""
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self._key)


class Identity:
    """A node's Ed25519 keypair.

    Create one with `generate`, or `load` it from a file written by `save`.
    """

    __slots__ = ("_public_key", "_signing_key")

    def __init__(self, seed: bytes) -> None:
        """Build an identity from its 32-byte secret seed.

        Raises:
            ValueError: if ``seed`` is not 32 bytes.
        """
        if len(seed) != KEY_SIZE:
            raise ValueError(f"an identity seed is {KEY_SIZE} bytes, got {len(seed)}")
        self._signing_key = nacl.signing.SigningKey(bytes(seed))
        self._public_key = PublicKey(bytes(self._signing_key.verify_key))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(os.urandom(KEY_SIZE))

    @property
    def public_key(self) -> PublicKey:
        """This identity's public key: the node's address."""
        return self._public_key

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Keep it secret."""
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._signing_key.sign(message).signature

    def x25519_private(self) -> bytes:
        """The X25519 private key derived from this identity (libsodium's conversion)."""
        _, secret = nacl.bindings.crypto_sign_seed_keypair(self.seed)
        return nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(secret)

    def __repr__(self) -> str:
        return f"Identity(public_key={self._public_key!r})"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the identity to ``path`` atomically, readable by the owner only (0600).

        Raises:
            OSError: if the file cannot be written.
        """
        target = Path(path)
        text = (
            f"{_FILE_HEADER}\n"
            f"public: {self._public_key}\n"
            f"secret: {base64.b64encode(self.seed).decode('ascii')}\n"
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read an identity written by `save`.

        Raises:
            FileNotFoundError: if there is no such file.
            IdentityFileError: if the file is readable by group or others, or malformed.
        """
        source = Path(path)
        with source.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityFileError(
                    source,
                    f"permissions {stat.filemode(mode)} let others read the secret key; "
                    f"run: chmod 600 {source}",
                )
            data = f.read(4096)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityFileError(source, "not an identity file (binary content)") from None
        fields: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise IdentityFileError(source, f"malformed line {line[:40]!r}")
            fields[name.strip()] = value.strip()
        if "secret" not in fields:
            raise IdentityFileError(source, "no 'secret:' line")
        try:
            seed = base64.b64decode(fields["secret"], validate=True)
        except binascii.Error:
            raise IdentityFileError(source, "the secret is not valid base64") from None
        if len(seed) != KEY_SIZE:
            raise IdentityFileError(source, f"the secret is {len(seed)} bytes, not {KEY_SIZE}")
        identity = cls(seed)
        if "public" in fields:
            try:
                stated = PublicKey.parse(fields["public"])
            except InvalidKeyError as exc:
                raise IdentityFileError(source, f"bad 'public:' line: {exc}") from None
            if stated != identity.public_key:
                raise IdentityFileError(source, "the public key does not match the secret")
        return identity
