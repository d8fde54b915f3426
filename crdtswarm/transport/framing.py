"""Length-prefixed frames over a byte stream (sans-IO: no anyio, no sockets).

A frame on the wire is a 4-byte big-endian payload length followed by the payload::

    +----------------+---------------------+
    | length (u32be) | payload (length B)  |
    +----------------+---------------------+

`encode_frame` and `frame_header` build frames; a `FrameDecoder` turns the bytes of
a stream, split however the network pleases, back into payloads.

Invariants of `FrameDecoder`:

* Rule 1: the decoder holds at most ``max_frame_size + 4`` bytes: a partial header
  (under 4 bytes) or the header of one frame plus part of its payload. A header that
  announces more than ``max_frame_size`` raises `FrameError` the moment its fourth
  byte arrives, before any of that payload is buffered.
* Rule 2: after raising, the decoder is dead: every later `feed` raises the same error.
  Frames that the raising call completed before the bad header are not lost: they
  are in `FrameDecoder.frames_before_error`, for a driver that wants to deliver them.
* Rule 3: big frames cost linear time: a payload that spans several fed chunks is
  joined once at the end (only the piece that started mid-chunk is copied before),
  and a payload that is a whole fed chunk is returned without a copy.
"""

from __future__ import annotations

import struct
from typing import Final

from crdtswarm.errors import FrameError

__all__ = ["HEADER_SIZE", "MAX_FRAME_LENGTH", "FrameDecoder", "encode_frame", "frame_header"]

HEADER_SIZE: Final = 4
"""Bytes in a frame header."""
MAX_FRAME_LENGTH: Final = 0xFFFF_FFFF
"""The largest payload a header can announce."""

_HEADER: Final = struct.Struct(">I")


def frame_header(length: int) -> bytes:
    """The 4-byte header announcing a payload of ``length`` bytes.

    Raises:
        ValueError: if ``length`` is negative or above `MAX_FRAME_LENGTH`.
    """
    if not 0 <= length <= MAX_FRAME_LENGTH:
        raise ValueError(f"a frame payload is 0 to {MAX_FRAME_LENGTH} bytes, not {length}")
    return _HEADER.pack(length)


def encode_frame(data: bytes) -> bytes:
    """``data`` as one frame: its header followed by the payload.

    Raises:
        ValueError: if ``data`` is longer than `MAX_FRAME_LENGTH`.
    """
    return frame_header(len(data)) + data


class FrameDecoder:
    """Splits a byte stream into the payloads of its frames.

    Args:
        max_frame_size: the largest payload, in bytes, a frame may announce.

    Raises:
        ValueError: if ``max_frame_size`` is negative.
    """

    __slots__ = (
        "_error",
        "_header",
        "_length",
        "_max_frame_size",
        "_parts",
        "_received",
        "frames_before_error",
    )

    def __init__(self, max_frame_size: int) -> None:
        if max_frame_size < 0:
            raise ValueError(f"max_frame_size must be >= 0, not {max_frame_size}")
        self._max_frame_size = min(max_frame_size, MAX_FRAME_LENGTH)
        self._header = b""  # partial header, only while fewer than 4 bytes have arrived
        self._length = -1  # payload length of the current frame; -1 while reading a header
        self._parts: list[bytes | memoryview] = []  # payload pieces of the current frame
        self._received = 0  # sum of len(self._parts)
        self._error: FrameError | None = None
        self.frames_before_error: list[bytes] = []
        """The frames completed by the `feed` call that raised, before the bad header."""

    @property
    def max_frame_size(self) -> int:
        """The largest payload, in bytes, a frame may announce."""
        return self._max_frame_size

    @property
    def error(self) -> FrameError | None:
        """The error `feed` raised, if it did: the decoder is then unusable."""
        return self._error

    @property
    def buffered_size(self) -> int:
        """Bytes held for an incomplete frame (header included); at most ``max_frame_size + 4``."""
        if self._length < 0:
            return len(self._header)
        return HEADER_SIZE + self._received

    @property
    def is_at_frame_boundary(self) -> bool:
        """Whether no partial frame is buffered: a clean place for the stream to end."""
        return self._length < 0 and not self._header

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return every frame they complete, in order.

        Raises:
            FrameError: if a header announces a payload larger than ``max_frame_size``
                (and on every call after that); the frames this call completed before
                that header are in `frames_before_error`.
        """
        if self._error is not None:
            raise self._error
        frames: list[bytes] = []
        size = len(data)
        pos = 0
        view = memoryview(data)
        while pos < size:
            if self._length < 0:
                if not self._header and size - pos >= HEADER_SIZE:
                    (length,) = _HEADER.unpack_from(data, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(self._header), size - pos)
                    self._header += data[pos : pos + take]
                    pos += take
                    if len(self._header) < HEADER_SIZE:
                        break
                    (length,) = _HEADER.unpack(self._header)
                    self._header = b""
                if length > self._max_frame_size:
                    self._error = FrameError(
                        f"frame of {length} bytes exceeds the limit of {self._max_frame_size}"
                    )
                    self._parts = []
                    self.frames_before_error = frames
                    raise self._error
                self._length = length
            needed = self._length - self._received
            available = size - pos
            if available >= needed:
                if not self._parts:
                    frame = data if (pos == 0 and needed == size) else data[pos : pos + needed]
                else:
                    self._parts.append(view[pos : pos + needed])
                    frame = b"".join(self._parts)
                    self._parts = []
                    self._received = 0
                frames.append(frame)
                pos += needed
                self._length = -1
            else:
                # The rest of `data` is part of this payload. A tail is copied so that the
                # frames before it in `data` are not kept alive (Rule 1).
                if available:
                    self._parts.append(data if pos == 0 else data[pos:])
                    self._received += available
                break
        return frames
