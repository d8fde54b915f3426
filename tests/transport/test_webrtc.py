"""WebRTC specifics: signalling, failures, limits, protocol violations and cleanup.

The conformance suite (test_conformance.py) checks the Link contract over WebRTC; these
tests check what only WebRTC has. Every node runs on loopback (conftest's
``_loopback_ice``) with an in-memory signaler.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from crdtswarm.errors import ConnectError, FlowControlError, FrameError
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.transport.abc import Link, LinkAttribute
from crdtswarm.transport.webrtc import (
    MESSAGE_COST,
    IceServer,
    WebRTCConfig,
    WebRTCLink,
    WebRTCStatistics,
    WebRTCTransport,
)

WAIT = 5.0

Filter = Callable[[PublicKey, PublicKey, bytes], "bytes | None"]


class Hub:
    """In-memory signaling: ``filter(src, dst, payload)`` may alter or (None) drop a signal."""

    def __init__(self, filter: Filter | None = None) -> None:
        self.transports: dict[PublicKey, WebRTCTransport] = {}
        self.filter = filter
        self.sent: list[tuple[PublicKey, PublicKey, bytes]] = []

    def signaler(self, key: PublicKey) -> HubSignaler:
        return HubSignaler(self, key)


class HubSignaler:
    def __init__(self, hub: Hub, key: PublicKey) -> None:
        self.hub = hub
        self.key = key

    async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.hub.sent.append((self.key, remote_key, payload))
        target = self.hub.transports.get(remote_key)
        if target is None:
            raise ConnectError(f"{remote_key.short} is unknown")
        if self.hub.filter is not None:
            filtered = self.hub.filter(self.key, remote_key, payload)
            if filtered is None:
                return
            payload = filtered
        target.receive_signal(self.key, payload)


class Node:
    def __init__(self, key: PublicKey, transport: WebRTCTransport) -> None:
        self.key = key
        self.transport = transport
        self._send, self._accepted = anyio.create_memory_object_stream[WebRTCLink](100)
        self.links: list[Link] = []

    async def handler(self, link: Link) -> None:
        assert isinstance(link, WebRTCLink)
        self.links.append(link)
        await self._send.send(link)

    async def accept(self) -> WebRTCLink:
        with anyio.fail_after(WAIT):
            return await self._accepted.receive()

    async def dial(self, other: Node) -> WebRTCLink:
        link = await self.transport.dial(other.key)
        self.links.append(link)
        return link

    async def connect(self, other: Node) -> tuple[WebRTCLink, WebRTCLink]:
        with anyio.fail_after(WAIT):
            ours = await self.dial(other)
            return ours, await other.accept()


@asynccontextmanager
async def nodes(
    hub: Hub, *configs: WebRTCConfig | None, count: int = 2
) -> AsyncIterator[list[Node]]:
    configs = configs or (None,) * count
    out: list[Node] = []
    async with anyio.create_task_group() as tg:
        for config in configs:
            key = Identity.generate().public_key
            transport = WebRTCTransport(signaler=hub.signaler(key), config=config)
            node = Node(key, transport)
            hub.transports[key] = transport
            await tg.start(transport.serve, key, node.handler)
            out.append(node)
        try:
            yield out
        finally:
            for node in out:
                for link in node.links:
                    await anyio.aclose_forcefully(link)
                node._send.close()
                node._accepted.close()
            tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` by letting the event loop turn (callers bound it in time)."""
    while not condition():
        await anyio.lowlevel.checkpoint()


# -- data ----------------------------------------------------------------------------


async def test_large_messages_round_trip_intact() -> None:
    rng = random.Random(7)
    async with nodes(Hub()) as (a, b):
        ours, theirs = await a.connect(b)
        assert ours.max_message_size == theirs.max_message_size == (1 << 20) + 64
        messages = [rng.randbytes(size) for size in (1 << 20, (1 << 20) + 64, 0, 65_535, 3)]
        with anyio.fail_after(20):
            for message in messages:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ours.send, message)
                    assert await theirs.receive() == message
                async with anyio.create_task_group() as tg:
                    tg.start_soon(theirs.send, message)
                    assert await ours.receive() == message


async def test_many_messages_arrive_in_order() -> None:
    count = 5000
    async with nodes(Hub()) as (a, b):
        ours, theirs = await a.connect(b)

        async def sender() -> None:
            for i in range(count):
                await ours.send(i.to_bytes(4, "big") * (i % 7))
            await ours.send_eof()

        got: list[bytes] = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                while True:
                    try:
                        got.append(await theirs.receive())
                    except anyio.EndOfStream:
                        break
        assert got == [i.to_bytes(4, "big") * (i % 7) for i in range(count)]


async def test_link_reports_keys_candidates_and_fingerprint() -> None:
    async with nodes(Hub()) as (a, b):
        ours, theirs = await a.connect(b)
        assert (ours.local_key, ours.remote_key) == (a.key, b.key)
        assert (theirs.local_key, theirs.remote_key) == (b.key, a.key)
        assert ours.extra(LinkAttribute.remote_address) == f"webrtc://{b.key}"
        assert ours.extra(LinkAttribute.local_address) == f"webrtc://{a.key}"
        assert ours.candidate_types == theirs.candidate_types == ("host", "host")
        sdp = theirs._pc.localDescription.sdp
        match = re.search(r"a=fingerprint:sha-256 (\S+)", sdp)
        assert match is not None
        assert ours.remote_fingerprint == match.group(1).upper()
        assert a.transport.addresses == [f"webrtc://{a.key}"]


# -- dialling ------------------------------------------------------------------------


async def test_dial_times_out_when_signals_are_dropped() -> None:
    hub = Hub(filter=lambda src, dst, payload: None)
    config = WebRTCConfig(connect_timeout=0.3)
    async with nodes(hub, config, config) as (a, b):
        with anyio.fail_after(WAIT), pytest.raises(ConnectError, match="timed out") as info:
            await a.transport.dial(b.key)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert a.transport.statistics().peer_connections == 0
        assert a.transport.statistics().pending_dials == 0


def tamper_fingerprint(src: PublicKey, dst: PublicKey, payload: bytes) -> bytes:
    body = json.loads(payload)
    if body["t"] == "answer":

        def flip(match: re.Match[str]) -> str:
            first = match.group(2)[0]
            return match.group(1) + ("0" if first != "0" else "1") + match.group(2)[1:]

        body["sdp"] = re.sub(r"(a=fingerprint:sha-256 )(\S+)", flip, body["sdp"])
    return json.dumps(body).encode()


def garble_answer(src: PublicKey, dst: PublicKey, payload: bytes) -> bytes:
    body = json.loads(payload)
    if body["t"] == "answer":
        body["sdp"] = "v=0\r\nm=nonsense\r\n"
    return json.dumps(body).encode()


@pytest.mark.parametrize(("tamper", "cause"), [(tamper_fingerprint, "DTLS"), (garble_answer, "")])
async def test_a_tampered_answer_fails_the_dial(tamper: Filter, cause: str) -> None:
    config = WebRTCConfig(connect_timeout=10)
    async with nodes(Hub(filter=tamper), config, config) as (a, b):
        with anyio.fail_after(WAIT), pytest.raises(ConnectError) as info:
            await a.transport.dial(b.key)
        assert info.value.__cause__ is not None
        assert cause in str(info.value.__cause__)
        assert a.transport.statistics().peer_connections == 0
        assert a.links == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError("down"), ConnectError("no")])
async def test_a_failing_signaler_gives_connect_error(error: Exception) -> None:
    class Failing:
        async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
            raise error

    async with nodes(Hub()) as (a, b):
        a.transport.signaler = Failing()
        with anyio.fail_after(WAIT), pytest.raises(ConnectError) as info:
            await a.transport.dial(b.key)
        assert info.value.__cause__ is error
        assert a.transport.statistics().peer_connections == 0


async def test_dial_argument_and_state_errors(alice: Identity, bob: Identity) -> None:
    transport = WebRTCTransport()
    assert not transport.can_dial(None)
    assert transport.can_dial(f"webrtc://{bob.public_key}")
    assert not transport.can_dial("tcp://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="serve"):
        await transport.dial(bob.public_key)
    with pytest.raises(ValueError, match="not a WebRTC address"):
        await transport.dial(bob.public_key, "tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="not the address"):
        await transport.dial(bob.public_key, f"webrtc://{alice.public_key}")
    async with anyio.create_task_group() as tg:
        await tg.start(transport.serve, alice.public_key, lambda link: link.aclose())
        with pytest.raises(ConnectError, match="no signaler") as info:
            await transport.dial(bob.public_key)
        assert info.value.__cause__ is not None
        with pytest.raises(RuntimeError, match="already serving"):
            await transport.serve(alice.public_key, lambda link: link.aclose())
        transport.signaler = Hub().signaler(alice.public_key)
        assert transport.can_dial(None)
        tg.cancel_scope.cancel()


async def test_dials_in_both_directions_at_once() -> None:
    async with nodes(Hub()) as (a, b):
        links: list[WebRTCLink] = []

        async def dial(src: Node, dst: Node) -> None:
            links.append(await src.dial(dst))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(dial, a, b)
                    tg.start_soon(dial, b, a)
            accepted = [await a.accept() for _ in range(4)] + [await b.accept() for _ in range(4)]
            for i, link in enumerate(links):
                await link.send(b"%d" % i)
            got = sorted([await link.receive() for link in accepted])
        assert got == sorted(b"%d" % i for i in range(8))
        assert sorted(link.remote_key == b.key for link in links) == [False] * 4 + [True] * 4


async def test_stopping_serve_fails_a_pending_dial() -> None:
    hub = Hub(filter=lambda src, dst, payload: None)  # the answer never comes
    async with nodes(hub) as (_, b):
        a_key = Identity.generate().public_key
        a = WebRTCTransport(signaler=hub.signaler(a_key), config=WebRTCConfig(connect_timeout=30))
        outcome: list[BaseException] = []

        async def dial() -> None:
            try:
                await a.dial(b.key)
            except ConnectError as exc:
                outcome.append(exc)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def serve(task_status: anyio.abc.TaskStatus[None]) -> None:
                    with scope:
                        await a.serve(a_key, lambda link: link.aclose(), task_status=task_status)

                await tg.start(serve)
                tg.start_soon(dial)
                await until(lambda: bool(hub.sent))
                scope.cancel()
        assert len(outcome) == 1
        assert isinstance(outcome[0].__cause__, ConnectionAbortedError)
        assert a.statistics().peer_connections == 0


# -- signals -------------------------------------------------------------------------


async def test_malformed_signals_are_dropped(alice: Identity) -> None:
    sender = alice.public_key
    good = {"v": 1, "t": "offer", "id": "0123456789abcdef", "sdp": "v=0", "mms": 10, "win": 100}
    bad: list[object] = [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b"[" * 10_000 + b"]" * 10_000,
        b" " * 70_000,
        "text, not bytes",
        {**good, "v": 2},
        {**good, "t": "hello"},
        {**good, "id": "XYZ"},
        {**good, "id": 5},
        {**good, "sdp": ""},
        {**good, "mms": -1},
        {**good, "mms": True},
        {**good, "win": 1},
        {**good, "win": "big"},
        {**good, "t": "answer"},  # to no dial of ours
    ]
    async with nodes(Hub()) as (a, b):
        for payload in bad:
            if isinstance(payload, dict):
                payload = json.dumps(payload).encode()
            b.transport.receive_signal(sender, payload)  # type: ignore[arg-type]
        assert b.transport.statistics().signals_dropped == len(bad)
        # Well-formed, but not SDP: the answer fails and cleans up after itself.
        b.transport.receive_signal(sender, json.dumps(good).encode())
        b.transport.receive_signal(sender, json.dumps(good).encode())  # duplicate
        assert b.transport.statistics().signals_dropped == len(bad) + 1
        with anyio.fail_after(WAIT):
            await until(lambda: b.transport.statistics().pending_answers == 0)
        assert b.transport.statistics().peer_connections == 0
        # and serve still works
        ours, theirs = await a.connect(b)
        await ours.send(b"ping")
        assert await theirs.receive() == b"ping"


async def test_an_offer_flood_is_bounded() -> None:
    release = anyio.Event()

    class Stalling:  # answers wait in the signaler until released
        async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
            await release.wait()
            raise ConnectError("gone")

    async with nodes(Hub()) as (a, _):
        b_key = Identity.generate().public_key
        b = WebRTCTransport(signaler=Stalling(), config=WebRTCConfig(max_pending_answers=4))
        # one real offer, replayed under many dial ids
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("x", negotiated=True, id=0)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        async with anyio.create_task_group() as tg:
            await tg.start(b.serve, b_key, lambda link: link.aclose())
            for i in range(20):
                offer = {"v": 1, "t": "offer", "id": f"{i:016x}", "sdp": sdp, "mms": 9, "win": 99}
                b.receive_signal(a.key, json.dumps(offer).encode())
            stats = b.statistics()
            assert (stats.pending_answers, stats.signals_dropped) == (4, 16)
            with anyio.fail_after(WAIT):
                await until(lambda: b.statistics().peer_connections == 4)
                await anyio.wait_all_tasks_blocked()
                assert b.statistics().pending_answers == 4
                release.set()
                await until(lambda: b.statistics().pending_answers == 0)
            assert b.statistics().peer_connections == 0
            tg.cancel_scope.cancel()


# -- protocol violations by the peer --------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "cause"),
    [
        (b"\x07", FrameError),  # unknown kind
        (b"\x03\x00", FrameError),  # short CREDIT
        (b"\x03\xff\xff\xff\xff", FlowControlError),  # more credit than a window
        (b"\x01" + bytes(2000), FrameError),  # over max_message_size
        ("text", FrameError),
    ],
)
async def test_a_peer_breaking_the_protocol_breaks_the_link(
    chunk: bytes | str, cause: type[Exception]
) -> None:
    config = WebRTCConfig(max_message_size=1000)
    async with nodes(Hub(), config, config) as (a, b):
        ours, theirs = await a.connect(b)
        await ours.send(b"first")
        ours._channel.send(chunk)  # behind the link's back
        with anyio.fail_after(WAIT):
            with pytest.raises(anyio.BrokenResourceError) as info:  # noqa: PT012
                while True:
                    await theirs.receive()
            assert isinstance(info.value.__cause__, cause)
            with pytest.raises(anyio.BrokenResourceError):
                await theirs.send(b"x")
            # theirs closed the channel: ours sees the link broken too
            with pytest.raises(anyio.BrokenResourceError):
                await ours.receive()


async def test_a_peer_ignoring_credit_breaks_the_link() -> None:
    window = 1000 + MESSAGE_COST
    small = WebRTCConfig(max_message_size=1000, max_receive_buffer_size=window)
    async with nodes(Hub(), None, small) as (a, b):
        ours, theirs = await a.connect(b)
        assert ours.max_message_size == 1000
        for _ in range(2):  # the second is beyond b's window: only a liar sends it
            ours._channel.send(b"\x01" + bytes(900))
        with anyio.fail_after(WAIT):
            await until(lambda: theirs._broken is not None)
        with pytest.raises(anyio.BrokenResourceError) as info:
            await theirs.receive()
        assert isinstance(info.value.__cause__, FlowControlError)


async def test_credit_holds_the_sender_back() -> None:
    small = WebRTCConfig(max_message_size=1000, max_receive_buffer_size=4000)
    async with nodes(Hub(), None, small) as (a, b):
        ours, theirs = await a.connect(b)
        sent = 0
        with anyio.fail_after(WAIT):
            while True:
                with anyio.move_on_after(0.1) as scope:
                    await ours.send(bytes(1000))
                if scope.cancelled_caught:
                    break
                sent += 1
        assert sent == 4000 // (1000 + MESSAGE_COST)
        with anyio.fail_after(WAIT):
            for _ in range(sent):
                assert await theirs.receive() == bytes(1000)
            # the reader granted its window back: the sender goes on
            for _ in range(2 * sent):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ours.send, bytes(1000))
                    assert await theirs.receive() == bytes(1000)


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connect_timeout": 0},
        {"close_timeout": float("nan")},
        {"max_message_size": -1},
        {"max_receive_buffer_size": 100},
        {"max_receive_buffer_size": 1 << 31},
        {"send_low_watermark": 10, "send_high_watermark": 5},
        {"chunk_size": 1},
        {"chunk_size": 65537},
        {"max_pending_answers": 0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        WebRTCConfig(**kwargs)  # type: ignore[arg-type]


def test_ice_servers() -> None:
    turn = IceServer("turn:turn.example:3478?transport=tcp", username="u", credential="p")
    assert turn.to_aiortc() == RTCIceServer(
        urls="turn:turn.example:3478?transport=tcp", username="u", credential="p"
    )
    WebRTCTransport(["stun:stun.example:3478", turn, RTCIceServer(urls=["turns:t.example"])])
    for bad in ("http://x", "stun:", "turn:h:1?transport=sctp_but_weird:"):
        with pytest.raises(ValueError, match="ICE server URL"):
            WebRTCTransport([bad])
    with pytest.raises(ValueError, match="ICE server URL"):
        WebRTCTransport([RTCIceServer(urls="ftp://x")])


# -- cleanup -------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_peer_connections() -> int:
    gc.collect()
    return sum(isinstance(o, RTCPeerConnection) for o in gc.get_objects())


async def settle(tasks: int, fds: int) -> None:
    """Let aiortc's own tasks and socket closes finish (loop turns, no real-time waiting)."""
    for _ in range(1000):
        if len(asyncio.all_tasks()) <= tasks and open_fds() <= fds:
            return
        await anyio.lowlevel.checkpoint()


async def test_connect_close_cycles_leak_nothing() -> None:
    async with nodes(Hub()) as (a, b):

        async def cycle(i: int) -> None:
            ours, theirs = await a.connect(b)
            await ours.send(b"%d" % i)
            assert await theirs.receive() == b"%d" % i
            if i % 2:
                await ours.aclose()
                with pytest.raises(anyio.EndOfStream):
                    await theirs.receive()
                await theirs.aclose()
            else:
                await anyio.aclose_forcefully(theirs)
                with pytest.raises(anyio.BrokenResourceError):
                    await ours.receive()
                await ours.aclose()
            a.links.clear()
            b.links.clear()

        await cycle(0)  # warm-up: imports, caches
        await settle(0, 0)
        tasks, fds, pcs = len(asyncio.all_tasks()), open_fds(), live_peer_connections()
        started = anyio.current_time()
        with anyio.fail_after(60):
            for i in range(50):
                await cycle(i)
        elapsed = anyio.current_time() - started
        ours, theirs = await a.connect(b)  # the counts do see a connection
        assert open_fds() > fds
        assert len(asyncio.all_tasks()) > tasks
        assert live_peer_connections() == 2
        await ours.aclose()
        await theirs.aclose()
        del ours, theirs
        a.links.clear()
        b.links.clear()
        await settle(tasks, fds)
        assert len(asyncio.all_tasks()) == tasks
        assert open_fds() == fds
        assert live_peer_connections() == pcs == 0
        for node in (a, b):
            stats = node.transport.statistics()
            assert stats.peer_connections == stats.accepted_links == 0
        print(f"50 connect/close cycles: {elapsed:.2f} s")


async def test_stopping_serve_closes_accepted_links_and_answers() -> None:
    silent = Hub(filter=lambda src, dst, payload: payload if b'"offer"' in payload else None)
    async with nodes(silent) as (a, b):
        # a link, and an offer b answers but never hears back about
        silent.filter = None
        ours, theirs = await a.connect(b)
        silent.filter = lambda src, dst, payload: payload if b'"offer"' in payload else None
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.transport.dial, b.key)
            with anyio.fail_after(WAIT):
                await until(lambda: b.transport.statistics().pending_answers == 1)
            tg.cancel_scope.cancel()
        assert b.transport.statistics().peer_connections == 2
        b.links.clear()  # theirs is left to b's serve to close
    assert b.transport.statistics() == WebRTCStatistics(
        peer_connections=0,
        pending_dials=0,
        pending_answers=0,
        accepted_links=0,
        signals_dropped=0,
    )
    with pytest.raises(anyio.ClosedResourceError):
        await theirs.send(b"x")
    with pytest.raises(anyio.ClosedResourceError):
        await ours.receive()  # closed by nodes() on the way out
