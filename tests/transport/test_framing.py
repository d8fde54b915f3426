from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtswarm.errors import FrameError
from crdtswarm.transport.framing import (
    HEADER_SIZE,
    MAX_FRAME_LENGTH,
    FrameDecoder,
    encode_frame,
    frame_header,
)

payloads = st.lists(st.binary(max_size=300), max_size=20)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@given(frames=payloads, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_frames_survive_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_frame_size=300)
    out: list[bytes] = []
    for piece in split(stream, cuts):
        out.extend(decoder.feed(piece))
        assert decoder.buffered_size <= 300 + HEADER_SIZE
    assert out == frames
    assert decoder.is_at_frame_boundary
    assert decoder.buffered_size == 0


@given(frames=payloads)
def test_byte_at_a_time(frames: list[bytes]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_frame_size=300)
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == frames


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_buffer_never_exceeds_the_bound_on_garbage(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=100)
    try:
        for piece in split(data, cuts):
            decoder.feed(piece)
            assert decoder.buffered_size <= 100 + HEADER_SIZE
    except FrameError:
        assert decoder.buffered_size <= 100 + HEADER_SIZE


def test_oversized_header_raises_at_once_and_forever() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.feed(encode_frame(b"0123456789")) == [b"0123456789"]
    assert decoder.feed(frame_header(11)[:3]) == []
    with pytest.raises(FrameError) as info:
        decoder.feed(frame_header(11)[3:])  # the 4th header byte: no payload needed
    assert info.value.code == FrameError.code
    assert decoder.buffered_size <= 10 + HEADER_SIZE
    with pytest.raises(FrameError):
        decoder.feed(b"")
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(b"ok"))


def test_huge_header_in_one_piece() -> None:
    decoder = FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(FrameError):
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)


def test_empty_frames() -> None:
    decoder = FrameDecoder(max_frame_size=0)
    assert decoder.feed(encode_frame(b"") * 3) == [b"", b"", b""]
    with pytest.raises(FrameError):
        decoder.feed(encode_frame(b"x"))


def test_whole_chunk_frame_is_not_copied() -> None:
    payload = b"y" * 1000
    decoder = FrameDecoder(max_frame_size=1000)
    assert decoder.feed(frame_header(1000)) == []
    [frame] = decoder.feed(payload)
    assert frame is payload


def test_large_frame_in_many_chunks_is_linear() -> None:
    size = 8 << 20
    payload = bytes(range(256)) * (size // 256)
    stream = encode_frame(payload) + encode_frame(b"tail")
    decoder = FrameDecoder(max_frame_size=size)
    out: list[bytes] = []
    chunk = 4096  # 2048 pieces: a quadratic decoder would copy ~8 GiB here
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i : i + chunk]))
    assert out == [payload, b"tail"]


def test_header_bounds() -> None:
    assert frame_header(0) == b"\x00\x00\x00\x00"
    assert frame_header(MAX_FRAME_LENGTH) == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="frame payload"):
        frame_header(-1)
    with pytest.raises(ValueError, match="frame payload"):
        frame_header(MAX_FRAME_LENGTH + 1)
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(-1)


def test_frames_before_a_bad_header_are_kept() -> None:
    assert FrameDecoder(max_frame_size=10).error is None
    decoder = FrameDecoder(max_frame_size=10)
    with pytest.raises(FrameError) as info:
        decoder.feed(encode_frame(b"a") + encode_frame(b"bb") + frame_header(11) + b"zz")
    assert decoder.error is info.value
    assert decoder.frames_before_error == [b"a", b"bb"]
    assert decoder.buffered_size <= 10 + HEADER_SIZE
