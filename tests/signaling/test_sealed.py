"""End to end: sealed signals through an honest server, and through a malicious one.

`EvilServer` speaks the signaling wire protocol but keeps every blob it is asked to
forward, and lets the test deliver anything to anyone: altered, replayed,
redirected, forged, expired. Whatever it does, the recipient's `open_signal`
accepts exactly the genuine signals, once each.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import nacl.public
import pytest
import websockets.asyncio.server
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from crdtswarm.errors import FrameError, RemoteProtocolError, SignatureError
from crdtswarm.identity import Identity
from crdtswarm.protocol.signal import (
    SIGNAL_DOMAIN,
    ReplayCache,
    SignalExpiredError,
    SignalReplayError,
    open_signal,
    seal_signal,
)
from crdtswarm.signaling import SignalingClient, SignalingClientConfig, SignalingServer
from crdtswarm.signaling.server import FrameType

FAST = SignalingClientConfig(min_reconnect_delay=0.02, max_reconnect_delay=0.1, send_timeout=1)
MALLORY = Identity(bytes(range(3, 35)))


class EvilServer:
    """A signaling server that reads, keeps, alters, replays and misroutes blobs."""

    def __init__(self) -> None:
        self.clients: dict[bytes, ServerConnection] = {}
        self.captured_send, self.captured = anyio.create_memory_object_stream[tuple[bytes, bytes]](
            100
        )

    async def handle(self, ws: ServerConnection) -> None:
        await ws.send(bytes((FrameType.CHALLENGE,)) + os.urandom(32))
        message = await ws.recv()
        assert isinstance(message, bytes)
        self.clients[message[1:33]] = ws  # no signature check: it does not care
        await ws.send(bytes((FrameType.REGISTERED,)))
        try:
            async for frame in ws:
                assert isinstance(frame, bytes)
                if frame[0] == FrameType.FORWARD:
                    self.captured_send.send_nowait((frame[1:33], frame[33:]))
        except ConnectionClosed:
            pass

    async def deliver(self, to: Identity, blob: bytes) -> None:
        await self.clients[bytes(to.public_key)].send(bytes((FrameType.DELIVER,)) + blob)


@asynccontextmanager
async def evil_server() -> AsyncIterator[tuple[EvilServer, str]]:
    evil = EvilServer()
    async with websockets.asyncio.server.serve(evil.handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        try:
            yield evil, f"ws://127.0.0.1:{port}"
        finally:
            evil.captured_send.close()
            evil.captured.close()


async def test_sealed_signals_through_an_honest_server(alice: Identity, bob: Identity) -> None:
    replay = ReplayCache()
    async with (
        SignalingServer() as server,
        SignalingClient(alice, [server.url], config=FAST) as a,
        SignalingClient(bob, [server.url], config=FAST) as b,
    ):
        with anyio.fail_after(5):
            await b.wait_connected()
            offer = seal_signal(alice, bob.public_key, b"v=0 offer", now=time.time())
            await a.send(bob.public_key, offer)
            opened = open_signal(bob, await b.receive(), now=time.time(), replay=replay)
        assert opened.sender == alice.public_key
        assert opened.payload == b"v=0 offer"


async def test_a_malicious_server_gets_nothing_past_open_signal(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    now = time.time()
    replay_b, replay_c = ReplayCache(), ReplayCache()
    async with (
        evil_server() as (evil, url),
        SignalingClient(alice, [url], config=FAST) as a,
        SignalingClient(bob, [url], config=FAST) as b,
        SignalingClient(carol, [url], config=FAST) as c,
    ):
        with anyio.fail_after(5):
            for client in (a, b, c):
                await client.wait_connected()
            await a.send(bob.public_key, seal_signal(alice, bob.public_key, b"offer 1", now=now))
            await a.send(bob.public_key, seal_signal(alice, bob.public_key, b"offer 2", now=now))
            to_1, first = await evil.captured.receive()
            to_2, second = await evil.captured.receive()
        assert to_1 == to_2 == bytes(bob.public_key)  # the routing key is all it learns

        # Reads: the blob shows neither payload nor sender, and only bob can open it.
        assert b"offer" not in first
        assert bytes(alice.public_key) not in first
        with pytest.raises(FrameError):
            open_signal(MALLORY, first, now=now, replay=ReplayCache())

        flipped = bytearray(first)
        flipped[len(flipped) // 2] ^= 1
        forged_inner = (
            b"\x01"
            + bytes(alice.public_key)
            + bytes(bob.public_key)
            + os.urandom(16)
            + int((now + 60) * 1000).to_bytes(8, "big")
            + b"evil offer"
        )
        forged = seal_signal(MALLORY, bob.public_key, b"evil offer", now=now)  # honest sender
        claimed = _seal_raw(bob, forged_inner + MALLORY.sign(SIGNAL_DOMAIN + forged_inner))
        attempts_on_bob = [
            bytes(flipped),  # altered
            first[:-10],  # truncated
            first,  # the genuine one: accepted once
            first,  # replayed
            second + b"\0",  # extended
            claimed,  # forged: claims alice, signed by mallory
            second,  # the second genuine one
            second,  # replayed
        ]
        # Redirects: alice's signals to bob, delivered to carol instead.
        attempts_on_carol = [first, second]

        with anyio.fail_after(5):
            for blob in attempts_on_bob:
                await evil.deliver(bob, blob)
            for blob in attempts_on_carol:
                await evil.deliver(carol, blob)
            got_b = [await b.receive() for _ in attempts_on_bob]
            got_c = [await c.receive() for _ in attempts_on_carol]
        assert got_b == attempts_on_bob  # the transport is faithful; the checks are not lax

        accepted: list[bytes] = []
        errors: list[type[RemoteProtocolError]] = []
        for blob in got_b:
            try:
                opened = open_signal(bob, blob, now=now + 1, replay=replay_b)
            except RemoteProtocolError as exc:
                errors.append(type(exc))
            else:
                assert opened.sender == alice.public_key
                accepted.append(opened.payload)
        assert accepted == [b"offer 1", b"offer 2"]
        assert errors == [
            FrameError,
            FrameError,
            SignalReplayError,
            FrameError,
            SignatureError,
            SignalReplayError,
        ]
        for blob in got_c:
            with pytest.raises(FrameError):
                open_signal(carol, blob, now=now + 1, replay=replay_c)

        # Held back until it expired: refused even though nobody opened it before.
        late = seal_signal(alice, bob.public_key, b"offer 3", now=now, ttl=30)
        await a.send(bob.public_key, late)
        with anyio.fail_after(5):
            _, held = await evil.captured.receive()
            await evil.deliver(bob, held)
            with pytest.raises(SignalExpiredError):
                open_signal(bob, await b.receive(), now=now + 31, replay=replay_b)
        # A signal honestly from mallory is fine: it is accepted as mallory's.
        assert open_signal(bob, forged, now=now, replay=replay_b).sender == MALLORY.public_key


def _seal_raw(recipient: Identity, plaintext: bytes) -> bytes:
    key = nacl.public.PublicKey(recipient.public_key.x25519())
    return nacl.public.SealedBox(key).encrypt(plaintext)
