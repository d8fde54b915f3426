"""SignalingServer, driven by raw websockets clients that speak the wire protocol by hand."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest
import websockets.asyncio.client
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from crdtswarm.identity import Identity, PublicKey
from crdtswarm.signaling import SignalingServer, SignalingServerConfig
from crdtswarm.signaling.server import REGISTER_DOMAIN, FrameType

CHALLENGE = bytes((FrameType.CHALLENGE,))
REGISTER = bytes((FrameType.REGISTER,))
REGISTERED = bytes((FrameType.REGISTERED,))
FORWARD = bytes((FrameType.FORWARD,))
DELIVER = bytes((FrameType.DELIVER,))
NOT_HERE = bytes((FrameType.NOT_HERE,))
KEEPALIVE = bytes((FrameType.KEEPALIVE,))


@asynccontextmanager
async def raw(url: str, **kwargs: object) -> AsyncIterator[ClientConnection]:
    options: dict[str, object] = {"proxy": None, "compression": None, "max_size": None}
    options.update(kwargs)
    async with websockets.asyncio.client.connect(url, **options) as ws:  # type: ignore[arg-type]
        yield ws


async def challenge_of(ws: ClientConnection) -> bytes:
    message = await ws.recv()
    assert isinstance(message, bytes)
    assert message[:1] == CHALLENGE
    assert len(message) == 33
    return message[1:]


async def register(ws: ClientConnection, identity: Identity, challenge: bytes = b"") -> None:
    challenge = challenge or await challenge_of(ws)
    signature = identity.sign(REGISTER_DOMAIN + challenge)
    await ws.send(REGISTER + bytes(identity.public_key) + signature)
    assert await ws.recv() == REGISTERED


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes the connection; the code it sent."""
    with anyio.fail_after(10):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


def forward(recipient: Identity | PublicKey | bytes, blob: bytes) -> bytes:
    if isinstance(recipient, Identity):
        recipient = recipient.public_key
    return FORWARD + bytes(recipient) + blob


async def test_register_and_forward(alice: Identity, bob: Identity) -> None:
    async with SignalingServer() as server, raw(server.url) as a, raw(server.url) as b:
        assert server.url.startswith("ws://127.0.0.1:")
        assert server.port > 0
        await register(a, alice)
        await register(b, bob)
        with anyio.fail_after(5):
            await a.send(forward(bob, b"sealed offer"))
            assert await b.recv() == DELIVER + b"sealed offer"
            await b.send(forward(alice, b"sealed answer"))
            assert await a.recv() == DELIVER + b"sealed answer"
            await a.send(KEEPALIVE)
            await a.send(forward(alice, b"to myself"))
            assert await a.recv() == DELIVER + b"to myself"
        stats = server.statistics()
        assert stats.connections == 2
        assert stats.registered == 2
        assert stats.signals_forwarded == 3
        assert stats.signals_dropped == 0
    with pytest.raises(RuntimeError):
        _ = server.url


async def test_wrong_signature_is_refused(alice: Identity, bob: Identity) -> None:
    async with SignalingServer() as server:
        async with raw(server.url) as ws:  # signed by someone else
            challenge = await challenge_of(ws)
            signature = bob.sign(REGISTER_DOMAIN + challenge)
            await ws.send(REGISTER + bytes(alice.public_key) + signature)
            assert await close_code(ws) == 1008
        async with raw(server.url) as ws:  # a signature of another challenge
            await challenge_of(ws)
            signature = alice.sign(REGISTER_DOMAIN + bytes(32))
            await ws.send(REGISTER + bytes(alice.public_key) + signature)
            assert await close_code(ws) == 1008
        async with raw(server.url) as ws:  # no domain prefix
            challenge = await challenge_of(ws)
            await ws.send(REGISTER + bytes(alice.public_key) + alice.sign(challenge))
            assert await close_code(ws) == 1008
        async with raw(server.url) as ws:  # not a key
            challenge = await challenge_of(ws)
            await ws.send(REGISTER + bytes(32) + bytes(64))
            assert await close_code(ws) == 1008
        stats = server.statistics()
        assert stats.clients_closed_for_abuse == 4
        assert stats.registered == 0


async def test_frames_before_registration_are_refused(alice: Identity) -> None:
    async with SignalingServer() as server:
        async with raw(server.url) as ws:
            await challenge_of(ws)
            await ws.send(forward(alice, b"x"))
            assert await close_code(ws) == 1008
        async with raw(server.url) as ws:
            await challenge_of(ws)
            await ws.send("text")
            assert await close_code(ws) == 1003


async def test_unknown_recipient_gets_not_here(alice: Identity, carol: Identity) -> None:
    async with SignalingServer() as server, raw(server.url) as a:
        await register(a, alice)
        with anyio.fail_after(5):
            await a.send(forward(carol, b"anyone?"))
            assert await a.recv() == NOT_HERE + bytes(carol.public_key)
        assert server.statistics().signals_not_here == 1
        assert server.statistics().signals_forwarded == 0


async def test_newer_registration_replaces_the_older(alice: Identity, bob: Identity) -> None:
    async with (
        SignalingServer() as server,
        raw(server.url) as old,
        raw(server.url) as new,
        raw(server.url) as b,
    ):
        await register(old, alice)
        await register(b, bob)
        await register(new, alice)
        assert await close_code(old) == 4000
        with anyio.fail_after(5):
            await b.send(forward(alice, b"hi"))
            assert await new.recv() == DELIVER + b"hi"
        assert server.statistics().registered == 2


async def test_oversize_frame_closes_only_that_client(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    config = SignalingServerConfig(max_signal_size=1000, max_queued_bytes=4096)
    async with (
        SignalingServer(config=config) as server,
        raw(server.url) as a,
        raw(server.url) as b,
        raw(server.url) as c,
    ):
        for ws, ident in ((a, alice), (b, bob), (c, carol)):
            await register(ws, ident)
        with anyio.fail_after(5):
            await a.send(forward(bob, b"x" * 1000))  # the largest allowed
            assert await b.recv() == DELIVER + b"x" * 1000
        await a.send(forward(bob, b"x" * 1001))
        assert await close_code(a) == 1009
        with anyio.fail_after(5):
            await c.send(forward(bob, b"still here"))
            assert await b.recv() == DELIVER + b"still here"
        assert server.statistics().clients_closed_for_abuse == 1
        assert server.statistics().registered == 2


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"", 1002),
        (b"\xff junk", 1002),
        (FORWARD + bytes(32), 1002),  # no blob
        (FORWARD + bytes(5), 1002),  # truncated key
        (KEEPALIVE + b"x", 1002),
        (REGISTERED, 1008),  # a server frame
        (REGISTER + bytes(96), 1008),  # a second registration
        ("text", 1003),
    ],
    ids=[
        "empty",
        "unknown-type",
        "no-blob",
        "short-key",
        "long-keepalive",
        "server-frame",
        "re-register",
        "text",
    ],
)
async def test_garbage_closes_only_that_client(
    alice: Identity, bob: Identity, carol: Identity, garbage: bytes | str, code: int
) -> None:
    async with (
        SignalingServer() as server,
        raw(server.url) as a,
        raw(server.url) as b,
        raw(server.url) as c,
    ):
        for ws, ident in ((a, alice), (b, bob), (c, carol)):
            await register(ws, ident)
        await a.send(garbage)
        assert await close_code(a) == code
        with anyio.fail_after(5):
            await c.send(forward(bob, b"fine"))
            assert await b.recv() == DELIVER + b"fine"
            await b.send(forward(carol, b"fine too"))
            assert await c.recv() == DELIVER + b"fine too"
        assert server.statistics().clients_closed_for_abuse == 1


async def test_rate_limit_drops_then_closes(alice: Identity, bob: Identity) -> None:
    # One token in 1000 s: the bucket does not refill during the test.
    config = SignalingServerConfig(signal_rate=0.001, signal_burst=5, max_rate_violations=10)
    async with SignalingServer(config=config) as server, raw(server.url) as a, raw(server.url) as b:
        await register(a, alice)
        await register(b, bob)
        for i in range(40):
            try:
                await a.send(forward(bob, b"%d" % i))
            except ConnectionClosed:
                break
        assert await close_code(a) == 1008
        with anyio.fail_after(5):
            received = [await b.recv() for _ in range(5)]
        assert received == [DELIVER + b"%d" % i for i in range(5)]
        stats = server.statistics()
        assert stats.signals_forwarded == 5
        assert stats.signals_dropped == 11
        assert stats.clients_closed_for_abuse == 1


async def test_max_connections(alice: Identity) -> None:
    config = SignalingServerConfig(max_connections=2)
    async with SignalingServer(config=config) as server, raw(server.url) as a, raw(server.url) as b:
        challenge = await challenge_of(a)
        await challenge_of(b)
        async with raw(server.url) as c:
            assert await close_code(c) == 1013
        assert server.statistics().connections_refused == 1
        assert server.statistics().connections == 2
        await register(a, alice, challenge)  # those already in are unaffected
    # Once one leaves, a new one gets in.
    async with SignalingServer(config=config) as server:
        async with raw(server.url) as a:
            await challenge_of(a)
        async with raw(server.url) as b, raw(server.url) as c:
            await challenge_of(b)
            await challenge_of(c)


async def test_unregistered_idle_connection_is_closed() -> None:
    config = SignalingServerConfig(registration_timeout=0.2)
    async with SignalingServer(config=config) as server, raw(server.url) as ws:
        await challenge_of(ws)
        assert await close_code(ws) == 1008
        assert server.statistics().clients_timed_out == 1
        assert server.statistics().connections == 0


async def test_registered_idle_connection_is_closed(alice: Identity) -> None:
    config = SignalingServerConfig(idle_timeout=0.3)
    async with SignalingServer(config=config) as server, raw(server.url) as ws:
        await register(ws, alice)
        assert await close_code(ws) == 1001
        assert server.statistics().registered == 0


async def test_queue_bound_with_a_recipient_that_never_reads(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    config = SignalingServerConfig(
        signal_rate=1e9,
        signal_burst=10_000,
        max_queued_signals=8,
        max_queued_bytes=200_000,
    )
    blob = os.urandom(60_000)
    async with (
        SignalingServer(config=config) as server,
        raw(server.url) as a,
        raw(server.url, max_queue=1, close_timeout=0.5) as b,
        raw(server.url) as c,
    ):
        for ws, ident in ((a, alice), (b, bob), (c, carol)):
            await register(ws, ident)
        stuck = server._registered[bytes(bob.public_key)]  # the server's side of b
        high_water = 0
        with anyio.fail_after(30):
            for _ in range(400):  # 24 MB: far more than the socket buffers hold
                await a.send(forward(bob, blob))
                high_water = max(high_water, stuck.queued_bytes)
            # The sender's reader was never blocked: its next signal gets through.
            await a.send(forward(carol, b"not blocked"))
            assert await c.recv() == DELIVER + b"not blocked"
        stats = server.statistics()
        assert stats.signals_dropped > 0
        assert stats.signals_forwarded + stats.signals_dropped == 401
        assert high_water <= config.max_queued_bytes
        assert stuck.queued_bytes <= config.max_queued_bytes
        assert stuck.outbox_send.statistics().current_buffer_used <= config.max_queued_signals


async def test_server_stop_closes_clients_and_leaves_no_tasks(
    alice: Identity, bob: Identity
) -> None:
    before = asyncio.all_tasks()
    async with AsyncExitStack() as clients:
        async with SignalingServer() as server:
            a = await clients.enter_async_context(raw(server.url))
            b = await clients.enter_async_context(raw(server.url))
            idle = await clients.enter_async_context(raw(server.url))
            await register(a, alice)
            await register(b, bob)
            await challenge_of(idle)
            await a.send(forward(bob, b"x"))
            assert await b.recv() == DELIVER + b"x"
        # Stopped with clients still connected: each was told the server is going away.
        assert server.statistics().connections == 0
        for ws in (a, b, idle):
            assert await close_code(ws) == 1001
    assert asyncio.all_tasks() - before == set()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        SignalingServerConfig(max_connections=0)
    with pytest.raises(ValueError, match="signal_rate"):
        SignalingServerConfig(signal_rate=0)
    with pytest.raises(ValueError, match="max_queued_bytes"):
        SignalingServerConfig(max_queued_bytes=10)
    with pytest.raises(ValueError, match="ping_interval"):
        SignalingServerConfig(ping_interval=-1)
    with pytest.raises(ValueError, match="port"):
        SignalingServer(port=70000)
