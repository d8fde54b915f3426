"""A network node for the netns tests: JSON-line commands on stdin, JSON-line events on stdout.

The test starts one per host namespace (``ip netns exec <ns> python node_app.py ...``)
and drives it. Today the node is raw aiortc: one RTCPeerConnection and one data channel
per peer, offer/answer exchanged through ``rendezvous.py``: it shows what the networks
let WebRTC itself do, independently of crdtswarm (whose node is swarm_app.py).

Arguments: ``--name a --rendezvous 192.0.2.1:7000 --ice-servers '[{"urls": ...}]'``
``[--heartbeat-interval 1 --heartbeat-timeout 5]`` (interval 0: no heartbeat, loss is
then only detected by aiortc itself: ICE consent freshness, about 30 s).

Commands (stdin):

* ``{"cmd": "connect", "peer": "b", "timeout": 20}``: dial ``b``; answered by
  ``connected`` or ``connect_failed``. Dialling again replaces the previous link.
* ``{"cmd": "send", "peer": "b", "data": "hi"}``: ``b`` reports ``message`` and echoes
  it back; this node reports ``echo`` with the round trip time.
* ``{"cmd": "close", "peer": "b"}``: close the link (reported as ``closed``).
* ``{"cmd": "quit"}``: close everything and exit 0 (also on end of stdin).

Events (stdout), every one with ``"t"``: seconds since the node started:

* ``{"event": "ready", "name": "a"}``: registered at the rendezvous, commands welcome.
* ``{"event": "gathered", "peer": "b", "role": "offerer"|"answerer", "candidates": [...]}``
  (each candidate ``{"type", "ip", "port"}``): what this side offered.
* ``{"event": "connected", "peer": "b", "role": ..., "candidate_type": ..., "local": {...},
  "remote": {...}, "turn_transport": "udp"|"tcp"|null, "rtt_ms": 1.2, "elapsed_ms": 800}``:
  the data channel is open and answered a ping. ``local``/``remote`` are the selected
  ICE pair's candidates; ``candidate_type`` sums it up: ``relay`` if either end is a
  TURN relay, else the remote end's type (``srflx``/``prflx``/``host``).
* ``{"event": "connect_failed", "peer": "b", "reason": "..."}``
* ``{"event": "disconnected", "peer": "b", "reason": "...", "silent_ms": 5003}``: an
  established link died; ``silent_ms`` is how long nothing had been received.
* ``{"event": "message", "peer": "b", "data": "hi"}``, ``{"event": "echo", "peer": "b",
  "data": "hi", "rtt_ms": 0.9}``, ``{"event": "closed", "peer": "b"}``,
  ``{"event": "error", "message": "..."}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from typing import Any

import anyio
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

MAX_LINE = 1 << 20
STARTED = time.monotonic()


def now() -> float:
    return time.monotonic()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "t": round(now() - STARTED, 3), **fields})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def candidate_info(candidate: Any) -> dict[str, Any]:
    return {"type": candidate.type, "ip": candidate.host, "port": candidate.port}


def selected_pair(pc: RTCPeerConnection) -> dict[str, Any]:
    """The nominated ICE candidate pair, read from aioice (aiortc has no public API for it).

    ``pc.sctp`` (RTCSctpTransport) ``.transport`` (RTCDtlsTransport) ``.transport``
    (RTCIceTransport) ``._connection`` is the aioice ``Connection``; its ``_nominated``
    maps component 1 to the ``CandidatePair`` carrying the data. aioice sends from the
    host socket for a server-reflexive candidate, so the local end of a direct pair is
    ``host`` and the remote end says ``srflx``/``prflx``.
    """
    sctp = pc.sctp
    if sctp is None:
        return {}
    connection = sctp.transport.transport._connection
    pair = connection._nominated.get(1)
    if pair is None:
        return {}
    local, remote = pair.local_candidate, pair.remote_candidate
    types = {local.type, remote.type}
    kind = "relay" if "relay" in types else remote.type
    return {
        "candidate_type": kind,
        "local": candidate_info(local),
        "remote": candidate_info(remote),
        "turn_transport": connection.turn_transport if local.type == "relay" else None,
    }


class Link:
    """One RTCPeerConnection to one peer, from offer/answer to its end."""

    def __init__(self, node: Node, peer: str, sid: str, role: str, timeout: float) -> None:
        self.node = node
        self.peer = peer
        self.sid = sid
        self.role = role
        self.timeout = timeout
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=node.ice_servers))
        self.channel: RTCDataChannel | None = None
        self.scope = anyio.CancelScope()
        self.started = now()
        self.last_rx = now()
        self.connected = False
        self.rtt_ms: float | None = None
        self.close_reason: str | None = None
        # aiortc callbacks post "pong", "channel closed", "connection failed" here.
        self._updates: tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]]
        self._updates = anyio.create_memory_object_stream[str](64)
        self._answer: tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]]
        self._answer = anyio.create_memory_object_stream[str](1)

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                self._post(f"connection {self.pc.connectionState}")

        @self.pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            self._attach(channel)

    def _post(self, update: str) -> None:
        with contextlib.suppress(
            anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
        ):
            self._updates[0].send_nowait(update)

    def _attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel

        @channel.on("open")
        def on_open() -> None:
            self._send({"t": "ping", "ts": now()})

        @channel.on("close")
        def on_close() -> None:
            self._post("channel closed")

        @channel.on("message")
        def on_message(raw: str | bytes) -> None:
            self.last_rx = now()
            msg = json.loads(raw)
            kind = msg.get("t")
            if kind == "ping":
                self._send({"t": "pong", "ts": msg["ts"]})
            elif kind == "pong":
                if self.rtt_ms is None:
                    self.rtt_ms = round((now() - msg["ts"]) * 1000, 3)
                    self._post("pong")
            elif kind == "msg":
                emit("message", peer=self.peer, data=msg["data"])
                self._send({"t": "echo", "data": msg["data"], "ts": msg["ts"]})
            elif kind == "echo":
                rtt = round((now() - msg["ts"]) * 1000, 3)
                emit("echo", peer=self.peer, data=msg["data"], rtt_ms=rtt)
            # "hb" only refreshes last_rx

        if channel.readyState == "open":  # the answerer's channel arrives already open
            on_open()

    def _send(self, msg: dict[str, Any]) -> bool:
        if self.channel is None or self.channel.readyState != "open":
            return False
        self.channel.send(json.dumps(msg))
        return True

    def send_data(self, data: Any) -> bool:
        return self.connected and self._send({"t": "msg", "data": data, "ts": now()})

    def answer(self, sdp: str) -> None:
        with contextlib.suppress(anyio.WouldBlock):  # a duplicate answer
            self._answer[0].send_nowait(sdp)

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.scope.cancel()

    async def run(self, offer_sdp: str | None = None) -> None:
        try:
            with self.scope:
                await self._run(offer_sdp)
        finally:
            if self.node.links.get(self.peer) is self:
                del self.node.links[self.peer]
            # Report first: closing can take long on a dead network (aioice deletes its
            # TURN allocation with a STUN transaction that must time out).
            if self.close_reason == "closed by command":
                emit("closed", peer=self.peer)
            elif self.connected and self.close_reason not in (None, "quit"):
                emit("disconnected", peer=self.peer, reason=self.close_reason,
                     silent_ms=round((now() - self.last_rx) * 1000))  # fmt: skip
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.pc.close()

    async def _run(self, offer_sdp: str | None) -> None:
        try:
            with anyio.fail_after(self.timeout):
                await self._negotiate(offer_sdp)
                update = await self._updates[1].receive()
        except TimeoutError:
            update = f"timeout after {self.timeout} s"
        except Exception as exc:  # a bad SDP, a lost rendezvous: this link fails, not the node
            update = f"{type(exc).__name__}: {exc}"
        if update != "pong":
            emit("connect_failed", peer=self.peer, role=self.role, reason=update)
            return
        self.connected = True
        self.last_rx = now()
        emit("connected", peer=self.peer, role=self.role, rtt_ms=self.rtt_ms,
             elapsed_ms=round((now() - self.started) * 1000), **selected_pair(self.pc))  # fmt: skip
        await self._monitor()

    async def _negotiate(self, offer_sdp: str | None) -> None:
        pc = self.pc
        if offer_sdp is None:
            self._attach(pc.createDataChannel("netns"))
            await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
            self._report_gathered()
            await self.node.signal(self.peer, kind="offer", sid=self.sid, sdp=self._sdp())
            answer = await self._answer[1].receive()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        else:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            self._report_gathered()
            await self.node.signal(self.peer, kind="answer", sid=self.sid, sdp=self._sdp())

    def _sdp(self) -> str:
        assert self.pc.localDescription is not None
        return self.pc.localDescription.sdp

    def _report_gathered(self) -> None:
        candidates = []
        for line in self._sdp().splitlines():
            if line.startswith("a=candidate:"):
                parts = line.split()
                candidates.append({"type": parts[7], "ip": parts[4], "port": int(parts[5])})
        emit("gathered", peer=self.peer, role=self.role, candidates=candidates)

    async def _monitor(self) -> None:
        """Wait for the link to die: aiortc says so, or the heartbeat goes silent."""
        interval, limit = self.node.heartbeat_interval, self.node.heartbeat_timeout
        while True:
            update = None
            with anyio.move_on_after(interval if interval > 0 else None):
                update = await self._updates[1].receive()
            if update is not None and update != "pong":
                self.close_reason = update
                return
            if interval > 0:
                self._send({"t": "hb"})
                if now() - self.last_rx > limit:
                    self.close_reason = f"heartbeat timeout ({limit} s)"
                    return


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.name
        host, _, port = args.rendezvous.rpartition(":")
        self.rendezvous = (host, int(port))
        self.ice_servers = [RTCIceServer(**server) for server in json.loads(args.ice_servers)]
        self.heartbeat_interval: float = args.heartbeat_interval
        self.heartbeat_timeout: float = args.heartbeat_timeout
        self.answer_timeout: float = args.answer_timeout
        self.links: dict[str, Link] = {}
        self.tg: TaskGroup | None = None
        self.stream: SocketStream | None = None
        self.send_lock = anyio.Lock()

    async def signal(self, to: str, **data: Any) -> None:
        line = json.dumps({"op": "send", "to": to, "data": data}).encode() + b"\n"
        async with self.send_lock:
            assert self.stream is not None
            await self.stream.send(line)

    def start_link(
        self, peer: str, sid: str, role: str, timeout: float, offer_sdp: str | None
    ) -> None:
        if self.tg is None:
            return  # quitting
        old = self.links.pop(peer, None)
        if old is not None:
            old.close("replaced by a new connection")
        link = Link(self, peer, sid, role, timeout)
        self.links[peer] = link
        self.tg.start_soon(link.run, offer_sdp)

    async def serve_rendezvous(self, ready: anyio.Event) -> None:
        assert self.stream is not None
        reader = BufferedByteReceiveStream(self.stream)
        await self.signal_register()
        ready.set()
        while True:
            msg = json.loads(await reader.receive_until(b"\n", MAX_LINE))
            if msg.get("op") != "signal":
                continue
            peer, data = msg["from"], msg["data"]
            if data["kind"] == "offer":
                self.start_link(peer, data["sid"], "answerer", self.answer_timeout, data["sdp"])
            elif data["kind"] == "answer":
                link = self.links.get(peer)
                if link is not None and link.sid == data["sid"]:
                    link.answer(data["sdp"])

    async def signal_register(self) -> None:
        assert self.stream is not None
        line = json.dumps({"op": "register", "name": self.name}).encode() + b"\n"
        async with self.send_lock:
            await self.stream.send(line)

    def command(self, cmd: dict[str, Any]) -> bool:
        """Run one command; False when the node should quit."""
        name = cmd.get("cmd")
        if name == "quit":
            return False
        peer = str(cmd.get("peer"))
        if name == "connect":
            timeout = float(cmd.get("timeout", 30))
            self.start_link(peer, secrets.token_hex(4), "offerer", timeout, None)
        elif name == "send":
            link = self.links.get(peer)
            if link is None or not link.send_data(cmd.get("data")):
                emit("error", message=f"send: not connected to {peer}")
        elif name == "close":
            link = self.links.get(peer)
            if link is not None:
                link.close("closed by command")
        else:
            emit("error", message=f"unknown command {cmd!r}")
        return True


async def read_stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--rendezvous", required=True, help="host:port")
    parser.add_argument("--ice-servers", default="[]", help="JSON list of RTCIceServer dicts")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--answer-timeout", type=float, default=30.0)
    parser.add_argument("--debug", action="store_true", help="aiortc/aioice logs on stderr")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(relativeCreated)7.0f ms %(levelname)s %(name)s %(message)s",
    )

    node = Node(args)
    stdin = await read_stdin()
    node.stream = await anyio.connect_tcp(*node.rendezvous)
    async with node.stream, anyio.create_task_group() as tg:
        ready = anyio.Event()
        async with anyio.create_task_group() as links:
            node.tg = links
            tg.start_soon(node.serve_rendezvous, ready)
            await ready.wait()
            emit("ready", name=node.name)
            while line := await stdin.readline():
                try:
                    cmd = json.loads(line)
                except ValueError:
                    emit("error", message=f"not JSON: {line!r}")
                    continue
                if not node.command(cmd):
                    break
            node.tg = None
            for link in list(node.links.values()):
                link.close("quit")
        # every link task has closed its peer connection; only the rendezvous is left
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
