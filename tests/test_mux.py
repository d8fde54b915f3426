"""The anyio multiplexer driver (crdtswarm/mux.py) over an in-memory message channel."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.streams.stapled import StapledObjectStream

from crdtswarm.errors import ErrorCode, FrameError, StreamResetError
from crdtswarm.mux import MuxConnection, MuxStream, StreamHandler
from crdtswarm.protocol.mux import MuxConfig

WAIT = 10.0


def channel_pair(size: int = 16) -> tuple[StapledObjectStream[bytes], StapledObjectStream[bytes]]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](size)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](size)
    return StapledObjectStream(a_send, a_receive), StapledObjectStream(b_send, b_receive)


async def echo(stream: MuxStream) -> None:
    async for chunk in stream:
        await stream.send(chunk)


@asynccontextmanager
async def connected(
    handlers: dict[str, StreamHandler] | None = None,
    config: MuxConfig | None = None,
) -> AsyncIterator[tuple[MuxConnection, MuxConnection]]:
    handlers = handlers if handlers is not None else {"echo": echo}
    left, right = channel_pair()
    a = MuxConnection(left, is_initiator=True, accept=handlers.get, config=config)
    b = MuxConnection(right, is_initiator=False, accept=handlers.get, config=config)
    async with a, b:
        yield a, b


async def test_echo_and_half_close() -> None:
    async with connected() as (a, _):
        stream = await a.open_stream("echo")
        assert stream.protocol == "echo"
        await stream.send(b"hello")
        assert await stream.receive() == b"hello"
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"after eof")
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()


async def test_unknown_protocol_resets_at_the_opener() -> None:
    async with connected() as (a, _):
        stream = await a.open_stream("nope")
        with pytest.raises(StreamResetError) as info:
            await stream.receive()
        assert info.value.code == ErrorCode.UNKNOWN_PROTOCOL
        assert info.value.remote


async def test_failing_handler_resets_the_stream() -> None:
    async def broken(stream: MuxStream) -> None:
        raise RuntimeError("boom")

    async with connected({"broken": broken}) as (a, _):
        stream = await a.open_stream("broken")
        with pytest.raises(StreamResetError) as info:
            await stream.receive()
        assert info.value.code == ErrorCode.INTERNAL_ERROR


async def test_reset_reaches_the_peer_with_code_and_message() -> None:
    reset_seen = anyio.Event()
    codes: list[object] = []

    async def wait_reset(stream: MuxStream) -> None:
        try:
            await stream.receive()
        except StreamResetError as exc:
            codes.append((exc.code, exc.message))
            reset_seen.set()

    async with connected({"r": wait_reset}) as (a, _):
        stream = await a.open_stream("r")
        await stream.send(b"x")
        await stream.reset(ErrorCode.CANCELLED, "changed my mind")
        with anyio.fail_after(WAIT):
            await reset_seen.wait()
        assert codes == [(ErrorCode.CANCELLED, "changed my mind")]
        with pytest.raises(StreamResetError):
            await stream.send(b"y")


async def test_many_concurrent_streams_keep_their_bytes() -> None:
    rng = random.Random(7)
    async with connected() as (a, _):

        async def one(i: int) -> None:
            stream = await a.open_stream("echo")
            payload = rng.randbytes(rng.randrange(1, 300_000))
            received = bytearray()

            async def reader() -> None:
                while len(received) < len(payload):
                    received.extend(await stream.receive())

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                view = memoryview(payload)
                offset = 0
                while offset < len(payload):
                    step = rng.randrange(1, 70_000)
                    await stream.send(bytes(view[offset : offset + step]))
                    offset += step
            assert bytes(received) == payload
            await stream.aclose()

        with anyio.fail_after(WAIT * 3):
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, i)


async def test_connection_death_breaks_streams() -> None:
    left, right = channel_pair()
    hold = anyio.Event()

    async def hang(stream: MuxStream) -> None:
        await hold.wait()

    a = MuxConnection(left, is_initiator=True, accept={"hang": hang}.get)
    b = MuxConnection(right, is_initiator=False, accept={"hang": hang}.get)
    async with a:
        async with b:
            stream = await a.open_stream("hang")
            await stream.send(b"x")
            await anyio.wait_all_tasks_blocked()
        # b has gone away (GOAWAY then close): a's streams break, a ends
        with anyio.fail_after(WAIT):
            await a.wait_closed()
        with pytest.raises(anyio.BrokenResourceError):
            await stream.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await a.open_stream("hang")
        hold.set()


async def test_keepalive_detects_a_silent_peer() -> None:
    config = MuxConfig(keepalive_interval=0.05, keepalive_timeout=0.3)
    left, right = channel_pair(size=1000)
    a = MuxConnection(left, is_initiator=True, accept=lambda p: None, config=config)
    async with a:  # nobody ever answers on `right`
        start = anyio.current_time()
        with anyio.fail_after(WAIT):
            await a.wait_closed()
        assert 0.25 <= anyio.current_time() - start < 3  # clock started at construction
        assert isinstance(a.error, TimeoutError)
    await right.aclose()


async def test_keepalive_keeps_an_idle_healthy_link() -> None:
    config = MuxConfig(keepalive_interval=0.02, keepalive_timeout=0.1)
    async with connected(config=config) as (a, b):
        # 20 timeout periods of idleness: pings keep both sides alive
        with anyio.move_on_after(2.0):
            await a.wait_closed()
        assert not a.is_closed
        assert not b.is_closed
        assert a.last_rtt is not None


async def test_malformed_frame_drops_the_connection() -> None:
    left, right = channel_pair()
    a = MuxConnection(left, is_initiator=True, accept=lambda p: None)
    async with a:
        await right.send(b"\xff\xff\xff garbage")
        with anyio.fail_after(WAIT):
            await a.wait_closed()
        assert isinstance(a.error, FrameError)
        goaway = await right.receive()  # the GOAWAY carrying the error code
        assert goaway
    await right.aclose()


async def test_reader_closing_early_stops_the_sender() -> None:
    got_first = anyio.Event()
    stopped: list[BaseException] = []

    async def read_once(stream: MuxStream) -> None:
        await stream.receive()
        got_first.set()
        await stream.aclose()

    async with connected({"once": read_once}) as (a, _):
        stream = await a.open_stream("once")
        await stream.send(b"first")
        with anyio.fail_after(WAIT):
            await got_first.wait()
            try:
                while True:
                    await stream.send(bytes(65536))
            except (StreamResetError, anyio.ClosedResourceError) as exc:
                stopped.append(exc)
        assert stopped
