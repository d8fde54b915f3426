"""Wire primitives shared by the sans-IO cores: lib0-compatible varints and a bounded reader.

Unsigned varints are LEB128, as lib0 (Yjs) and protobuf write them: seven bits per
byte, least significant group first, high bit set on every byte but the last.
Decoding rejects truncated input, over-long encodings and values beyond 64 bits
with `crdtswarm.errors.FrameError`.
"""

from __future__ import annotations

from typing import Final

from crdtswarm.errors import FrameError

__all__ = ["Reader", "encode_uvarint", "encode_var_bytes", "encode_var_string"]

MAX_UVARINT: Final = (1 << 64) - 1
_MAX_UVARINT_SIZE: Final = 10


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative integer below 2**64 as an unsigned LEB128 varint.

    Raises:
        ValueError: if ``value`` is negative or too large.
    """
    if not 0 <= value <= MAX_UVARINT:
        raise ValueError(f"uvarint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_var_bytes(data: bytes) -> bytes:
    """Encode ``data`` prefixed with its length as a uvarint (lib0 ``writeVarUint8Array``)."""
    return encode_uvarint(len(data)) + data


def encode_var_string(text: str) -> bytes:
    """Encode ``text`` as UTF-8 prefixed with its byte length (lib0 ``writeVarString``)."""
    return encode_var_bytes(text.encode("utf-8"))


class Reader:
    """Reads wire primitives from a buffer, raising `FrameError` instead of overrunning it."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self._pos = pos

    @property
    def position(self) -> int:
        """The offset of the next unread byte."""
        return self._pos

    @property
    def remaining(self) -> int:
        """How many bytes are left to read."""
        return len(self._data) - self._pos

    def at_end(self) -> bool:
        """Whether every byte has been read."""
        return self._pos >= len(self._data)

    def read_uvarint(self) -> int:
        """Read an unsigned LEB128 varint.

        Raises:
            FrameError: if the varint is truncated, over-long or exceeds 64 bits.
        """
        data, pos = self._data, self._pos
        if pos < len(data) and data[pos] < 0x80:  # fast path: one byte
            self._pos = pos + 1
            return data[pos]
        value = 0
        shift = 0
        for i in range(_MAX_UVARINT_SIZE):
            if pos + i >= len(data):
                raise FrameError("truncated varint")
            byte = data[pos + i]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise FrameError("over-long varint encoding")
                if value > MAX_UVARINT:
                    raise FrameError("varint exceeds 64 bits")
                self._pos = pos + i + 1
                return value
            shift += 7
        raise FrameError("varint longer than 10 bytes")

    def read_u8(self) -> int:
        """Read one byte.

        Raises:
            FrameError: at the end of the buffer.
        """
        if self._pos >= len(self._data):
            raise FrameError("truncated: expected 1 more byte")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def read_bytes(self, size: int) -> bytes:
        """Read exactly ``size`` bytes.

        Raises:
            FrameError: if fewer than ``size`` bytes remain.
        """
        end = self._pos + size
        if end > len(self._data):
            raise FrameError(f"truncated: expected {size} bytes, {self.remaining} left")
        value = self._data[self._pos : end]
        self._pos = end
        return value

    def read_var_bytes(self, max_size: int) -> bytes:
        """Read a uvarint length then that many bytes, refusing lengths above ``max_size``.

        Raises:
            FrameError: if the length exceeds ``max_size`` or the data is truncated.
        """
        size = self.read_uvarint()
        if size > max_size:
            raise FrameError(f"field of {size} bytes exceeds the limit of {max_size}")
        return self.read_bytes(size)

    def read_var_string(self, max_size: int) -> str:
        """Read a length-prefixed UTF-8 string of at most ``max_size`` bytes.

        Raises:
            FrameError: if too long, truncated or not valid UTF-8.
        """
        raw = self.read_var_bytes(max_size)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError("string is not valid UTF-8") from exc

    def read_rest(self) -> bytes:
        """Read every remaining byte."""
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value
