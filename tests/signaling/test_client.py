"""SignalingClient against real SignalingServers on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import anyio
import pytest

from crdtswarm.errors import ConnectError
from crdtswarm.identity import Identity
from crdtswarm.signaling import (
    SignalingClient,
    SignalingClientConfig,
    SignalingServer,
    SignalingServerConfig,
)

FAST = SignalingClientConfig(min_reconnect_delay=0.02, max_reconnect_delay=0.1, send_timeout=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LogWaiter(logging.Handler):
    """Sets an event once ``count`` records containing ``text`` were logged."""

    def __init__(self, text: str, count: int) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.count = count
        self.seen = 0
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen >= self.count:
                self.event.set()


@contextmanager
def waiting_for_log(text: str, count: int = 1) -> Iterator[LogWaiter]:
    target = logging.getLogger("crdtswarm.signaling.client")
    waiter = LogWaiter(text, count)
    level = target.level
    target.setLevel(logging.DEBUG)
    target.addHandler(waiter)
    try:
        yield waiter
    finally:
        target.removeHandler(waiter)
        target.setLevel(level)


async def test_two_clients_exchange_blobs(alice: Identity, bob: Identity) -> None:
    async with (
        SignalingServer() as server,
        SignalingClient(alice, [server.url], config=FAST) as a,
        SignalingClient(bob, [server.url], config=FAST) as b,
    ):
        with anyio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected()
            assert a.is_connected
            assert a.connected_urls == [server.url]
            await a.send(bob.public_key, b"sealed offer")
            assert await b.receive() == b"sealed offer"
            await b.send(alice.public_key, b"sealed answer")
            async for blob in a:
                assert blob == b"sealed answer"
                break
        assert a.statistics().signals_sent == 1
        assert a.statistics().registrations == 1
        assert b.statistics().signals_received == 1
        assert server.statistics().registered == 2
    # After exit: what was buffered is still there, then EndOfStream.
    with pytest.raises(anyio.EndOfStream):
        await b.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await a.send(bob.public_key, b"late")


async def test_unknown_recipient_is_counted(alice: Identity, carol: Identity) -> None:
    async with SignalingServer() as server, SignalingClient(alice, [server.url], config=FAST) as a:
        with waiting_for_log("recipient not registered") as log, anyio.fail_after(5):
            await a.wait_connected()
            await a.send(carol.public_key, b"anyone?")
            await log.event.wait()
        assert a.statistics().not_here == 1


async def test_no_server_enter_succeeds_send_fails(alice: Identity, bob: Identity) -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    config = SignalingClientConfig(
        min_reconnect_delay=0.02, max_reconnect_delay=0.1, send_timeout=0.1
    )
    with waiting_for_log("cannot connect", count=2) as log:
        async with SignalingClient(alice, [url], config=config) as a:
            assert not a.is_connected
            assert a.connected_urls == []
            with anyio.fail_after(5):
                await log.event.wait()  # retried at least once
            with pytest.raises(ConnectError, match="not connected"):
                await a.send(bob.public_key, b"x")
            assert a.statistics().connect_failures >= 2


async def test_client_connects_when_the_server_comes_up(alice: Identity, bob: Identity) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    async with (
        SignalingClient(alice, [url], config=FAST) as a,
        SignalingClient(bob, [url], config=FAST) as b,
    ):
        assert not a.is_connected
        async with SignalingServer(port=port) as server:
            assert server.url == url
            with anyio.fail_after(5):
                await a.wait_connected()
                await b.wait_connected()
                await a.send(bob.public_key, b"late but fine")
                assert await b.receive() == b"late but fine"


async def test_two_servers_failover_and_reconnect(alice: Identity, bob: Identity) -> None:
    async with AsyncExitStack() as first_up, AsyncExitStack() as second_up:
        first = await first_up.enter_async_context(SignalingServer())
        second = await second_up.enter_async_context(SignalingServer())
        urls = [first.url, second.url]
        port = second.port
        async with (
            SignalingClient(alice, urls, config=FAST) as a,
            SignalingClient(bob, urls, config=FAST) as b,
        ):
            with anyio.fail_after(5):
                for client in (a, b):
                    await client.wait_connected(urls[0])
                    await client.wait_connected(urls[1])
            assert a.connected_urls == urls
            # Sent through both servers: bob gets it twice (open_signal dedupes).
            await a.send(bob.public_key, b"redundant")
            with anyio.fail_after(5):
                assert [await b.receive(), await b.receive()] == [b"redundant"] * 2

            await second_up.aclose()  # the second server goes down
            with anyio.fail_after(5):
                await a.send(bob.public_key, b"via the first")
                assert await b.receive() == b"via the first"

            # It comes back on the same port: both clients register there again.
            again = await second_up.enter_async_context(SignalingServer(port=port))
            assert again.url == urls[1]
            with anyio.fail_after(5):
                for client in (a, b):
                    await client.wait_connected(again.url)
            assert a.statistics().registrations >= 3
            await first_up.aclose()  # now the first goes down
            with anyio.fail_after(5):
                await a.send(bob.public_key, b"via the second")
                assert await b.receive() == b"via the second"


async def test_receive_buffer_drops_when_full(alice: Identity, bob: Identity) -> None:
    config = SignalingClientConfig(max_received_signals=2)
    async with (
        SignalingServer() as server,
        SignalingClient(alice, [server.url], config=FAST) as a,
        SignalingClient(bob, [server.url], config=config) as b,
    ):
        with waiting_for_log("receive buffer full", count=3) as log, anyio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected()
            for i in range(5):
                await a.send(bob.public_key, b"%d" % i)
            await log.event.wait()
        assert b.statistics().signals_dropped == 3
        assert b.statistics().signals_received == 2
        assert b.receive_nowait() == b"0"
    # Blobs not yet taken survive the exit, then the stream ends.
    assert await b.receive() == b"1"
    with pytest.raises(anyio.EndOfStream):
        b.receive_nowait()
    assert [blob async for blob in b] == []


async def test_a_rate_limited_client_reconnects(alice: Identity, bob: Identity) -> None:
    server_config = SignalingServerConfig(signal_rate=0.001, signal_burst=2, max_rate_violations=2)
    async with (
        SignalingServer(config=server_config) as server,
        SignalingClient(alice, [server.url], config=FAST) as a,
    ):
        with waiting_for_log("disconnected from") as log, anyio.fail_after(5):
            await a.wait_connected()
            for _ in range(10):
                try:
                    await a.send(bob.public_key, b"spam")
                except ConnectError:
                    break
            await log.event.wait()
            await a.wait_connected()  # and it comes back
        assert server.statistics().clients_closed_for_abuse == 1


async def test_client_exit_leaves_no_tasks(alice: Identity, bob: Identity) -> None:
    before = asyncio.all_tasks()
    async with (
        SignalingServer() as server,
        SignalingClient(alice, [server.url], config=FAST) as a,
        SignalingClient(bob, [server.url, "ws://127.0.0.1:9"], config=FAST) as b,
    ):
        with anyio.fail_after(5):
            await a.wait_connected()
            await b.wait_connected(server.url)
            await a.send(bob.public_key, b"x")
            assert await b.receive() == b"x"
    assert asyncio.all_tasks() - before == set()


async def test_arguments_are_checked(alice: Identity, bob: Identity) -> None:
    with pytest.raises(ValueError, match="WebSocket URL"):
        SignalingClient(alice, ["http://example.com"])
    with pytest.raises(TypeError):
        SignalingClient(alice, "ws://127.0.0.1:1")
    with pytest.raises(ValueError, match="max_reconnect_delay"):
        SignalingClientConfig(min_reconnect_delay=2, max_reconnect_delay=1)
    with pytest.raises(ValueError, match="send_timeout"):
        SignalingClientConfig(send_timeout=-1)
    client = SignalingClient(alice, ["ws://127.0.0.1:9"], config=FAST)
    with pytest.raises(ValueError, match="blob"):
        await client.send(bob.public_key, b"")
    with pytest.raises(ValueError, match="blob"):
        await client.send(bob.public_key, bytes(64 * 1024 + 1))
    with pytest.raises(ValueError, match="configured"):
        await client.wait_connected("ws://elsewhere:1")
    with pytest.raises(RuntimeError, match="enter"):
        await client.receive()
