"""A crdtswarm node for the netns tests: JSON-line commands on stdin, JSON-line events on stdout.

The crdtswarm counterpart of node_app.py: a real `crdtswarm.Swarm` over a
`WebRTCTransport` (plus a `TcpTransport` with ``--tcp``), signalled through the
`crdtswarm.signaling.SignalingServer` URLs given with ``--signaling``. The test starts
one per host namespace (``ip netns exec <ns> python swarm_app.py ...``) and drives it.

Arguments: ``--name a --ice-servers '[{"urls": ...}]' [--signaling ws://192.0.2.1:8765]``
``[--tcp 0.0.0.0:4242] [--keepalive-interval 1 --peer-timeout 5] [--dial-timeout 10]``
``[--connect-timeout 10] [--mesh '{"retry_interval": 0.5}'] [--doc notes] [--debug]``.

Commands (stdin):

* ``{"cmd": "call", "key": "<public key>", "address": null, "timeout": 20}``: link to
  that node (by key through the signalers, or at ``address``); answered by
  ``call_ok`` or ``call_failed``. Runs in the background.
* ``{"cmd": "set", "doc": "notes", "key": "k", "value": "v"}``: write ``k`` in the
  doc's root map ``kv``; answered by ``set_ok``.
* ``{"cmd": "get", "doc": "notes", "key": "k"}``: answered by ``value``.
* ``{"cmd": "peers"}``, ``{"cmd": "members"}``, ``{"cmd": "stats"}``: answered by
  ``peers``, ``members``, ``stats``.
* ``{"cmd": "echo", "key": "<public key>", "data": "text", "timeout": 20}``: open an
  application stream for protocol ``ECHO`` to that node (`Swarm.open_stream`: linking
  first when needed, through relays too), send ``data``, half-close and read the echo;
  answered by ``echo_ok`` (with ``data`` and the link fields) or ``echo_failed``. Every
  node serves ``ECHO`` (it sends back what it reads). Runs in the background.
* ``{"cmd": "quit"}``: leave the swarm and exit 0 (also on end of stdin).

Events (stdout), every one with ``"t"`` (seconds since the node started) and
``"mono"`` (``time.monotonic()``, the clock every process of the machine shares, so
the test can time events against its own actions):

* ``{"event": "ready", "name": "a", "key": "<public key>", "addresses": [...]}``: the
  swarm is up and registered on a signaling server (when one is configured).
* ``{"event": "peer_connected", "peer": "<key>", "transport": "webrtc"|"tcp",
  "initiator": true, "remote_address": ..., "candidate_types": ["host", "srflx"],
  "candidate_type": ..., "local": {"type", "ip", "port"}, "remote": {...},
  "turn_transport": "udp"|"tcp"|null}``: a direct link came up. The candidate fields
  are there for WebRTC links: ``candidate_types`` is `WebRTCLink.candidate_types`
  (the nominated ICE pair's local and remote types), ``candidate_type`` sums it up as
  node_app.py does (``relay`` if either end is a relay, else the remote end's type),
  ``turn_transport`` is how this side reaches its TURN server when its end is a relay.
* ``{"event": "peer_disconnected", "peer": "<key>", "reason": "...", "up_ms": 5400}``
* ``{"event": "member_joined" | "member_left", "peer": "<key>"}``
* ``{"event": "call_ok", "peer": ..., "elapsed_ms": 812, ...link fields}``,
  ``{"event": "call_failed", "peer": ..., "reason": "...", "elapsed_ms": ...}``
* ``{"event": "dial", "peer": ...}``, ``{"event": "dial_failed", "peer": ..., "reason":
  ..., "elapsed_ms": ...}``: every WebRTC dial (the test's calls and the mesh's), and
  those that failed or were given up (``CancelledError``: the caller's timeout).
* ``{"event": "gathered", "peer": ..., "role": "offerer"|"answerer", "candidates":
  [{"type", "ip", "port"}]}``: the ICE candidates of each offer or answer this node
  signals (reported as it goes out).
* ``{"event": "doc_changed", "doc": "notes", "changes": {"k": "v"}}``: keys of a doc's
  ``kv`` map changed, locally or by replication.
* ``{"event": "echo_ok", "peer": ..., "data": "text", "elapsed_ms": ..., ...link
  fields}``, ``{"event": "echo_failed", "peer": ..., "reason": ..., "elapsed_ms": ...}``
* ``{"event": "echoed", "peer": ..., "bytes": 5}``: this node served an echo stream.
* ``{"event": "error", "message": "..."}``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Any

import anyio
import pycrdt

from crdtswarm import (
    MemberJoined,
    MemberLeft,
    PeerConnected,
    PeerDisconnected,
    PublicKey,
    Swarm,
    SwarmConfig,
)
from crdtswarm.mesh import MeshConfig
from crdtswarm.transport.abc import LinkAttribute
from crdtswarm.transport.tcp import TcpTransport
from crdtswarm.transport.webrtc import IceServer, WebRTCConfig, WebRTCLink, WebRTCTransport

MAX_LINE = 1 << 20
STARTED = time.monotonic()
REGISTER_TIMEOUT = 15.0  # seconds to get registered on a signaling server before "ready"
ECHO = "netns-echo"  # the application protocol every node serves: it echoes its input


def emit(event: str, **fields: Any) -> None:
    now = time.monotonic()
    line = json.dumps({"event": event, "t": round(now - STARTED, 3), "mono": now, **fields})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def sdp_candidates(sdp: str) -> list[dict[str, Any]]:
    candidates = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            candidates.append({"type": parts[7], "ip": parts[4], "port": int(parts[5])})
    return candidates


class ReportingWebRTCTransport(WebRTCTransport):
    """A `WebRTCTransport` that reports its dials and the candidates of its signals."""

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> WebRTCLink:
        emit("dial", peer=str(remote_key))
        start = time.monotonic()
        try:
            return await super().dial(remote_key, address)
        except BaseException as exc:  # a cancellation too: the caller's timeout
            elapsed = round((time.monotonic() - start) * 1000)
            reason = f"{type(exc).__name__}: {exc}"
            emit("dial_failed", peer=str(remote_key), reason=reason, elapsed_ms=elapsed)
            raise

    async def _send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        body = json.loads(payload)
        role = "offerer" if body["t"] == "offer" else "answerer"
        emit("gathered", peer=str(remote_key), role=role, candidates=sdp_candidates(body["sdp"]))
        await super()._send_signal(remote_key, payload)


def selected_pair(link: WebRTCLink) -> dict[str, Any]:
    """The nominated ICE pair's addresses, read from aioice (as node_app.py does)."""
    try:
        connection = link._pc.sctp.transport.transport._connection
        pair = connection._nominated[1]
    except (AttributeError, KeyError):
        return {}
    local, remote = pair.local_candidate, pair.remote_candidate
    return {
        "local": {"type": local.type, "ip": local.host, "port": local.port},
        "remote": {"type": remote.type, "ip": remote.host, "port": remote.port},
        "turn_transport": connection.turn_transport if local.type == "relay" else None,
    }


def link_info(node: Swarm, key: PublicKey) -> dict[str, Any]:
    """What carries the link to ``key`` now: transport, and ICE candidates for WebRTC."""
    peer = node._peers.get(key)
    connection = peer._connection if peer is not None else None
    if connection is None:
        return {}
    channel = connection.channel  # the SecureChannel; .link is the transport's link
    info: dict[str, Any] = {
        "transport": channel.extra(LinkAttribute.transport, "?"),
        "remote_address": channel.extra(LinkAttribute.remote_address, None),
        "initiator": channel.is_initiator,
    }
    link = channel.link
    if isinstance(link, WebRTCLink):
        local, remote = link.candidate_types
        info["candidate_types"] = [local, remote]
        info["candidate_type"] = "relay" if "relay" in (local, remote) else remote
        info.update(selected_pair(link))
    return info


class App:
    def __init__(self, node: Swarm) -> None:
        self.node = node
        self.maps: dict[str, pycrdt.Map[Any]] = {}
        self.subscriptions: list[Any] = []
        self.connected_at: dict[PublicKey, float] = {}
        self.events = node.events()  # subscribed before any link can come up

    def doc_map(self, name: str) -> pycrdt.Map[Any]:
        """The ``kv`` root map of doc ``name``, opened (and watched) on first use."""
        if name not in self.maps:
            kv = self.node.doc(name).get("kv", type=pycrdt.Map)

            def changed(event: Any) -> None:
                changes = {k: v.get("newValue") for k, v in event.keys.items()}
                emit("doc_changed", doc=name, changes=changes)

            self.subscriptions.append(kv.observe(changed))
            self.maps[name] = kv
        return self.maps[name]

    async def watch(self) -> None:
        async for event in self.events:
            key = event.public_key
            if isinstance(event, PeerConnected):
                self.connected_at[key] = time.monotonic()
                emit("peer_connected", peer=str(key), **link_info(self.node, key))
            elif isinstance(event, PeerDisconnected):
                since = self.connected_at.pop(key, None)
                up_ms = None if since is None else round((time.monotonic() - since) * 1000)
                emit("peer_disconnected", peer=str(key), reason=event.reason, up_ms=up_ms)
            elif isinstance(event, MemberJoined):
                emit("member_joined", peer=str(key))
            elif isinstance(event, MemberLeft):
                emit("member_left", peer=str(key))

    async def call(self, key: str, address: str | None, timeout: float) -> None:
        start = time.monotonic()
        try:
            peer = await self.node.call(key, address, timeout=timeout)
        except Exception as exc:  # report every failure: the test decides
            elapsed = round((time.monotonic() - start) * 1000)
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            reason = f"{type(exc).__name__}: {exc}{cause}"
            emit("call_failed", peer=key, reason=reason, elapsed_ms=elapsed)
            return
        elapsed = round((time.monotonic() - start) * 1000)
        emit("call_ok", peer=key, elapsed_ms=elapsed, **link_info(self.node, peer.public_key))

    async def echo(self, key: str, data: str, timeout: float) -> None:
        start = time.monotonic()
        try:
            with anyio.fail_after(timeout):
                stream = await self.node.open_stream(key, ECHO)
                await stream.send(data.encode())
                await stream.send_eof()
                received = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        received += await stream.receive()
                await stream.aclose()
        except Exception as exc:  # report every failure: the test decides
            elapsed = round((time.monotonic() - start) * 1000)
            emit("echo_failed", peer=key, reason=f"{type(exc).__name__}: {exc}", elapsed_ms=elapsed)
            return
        elapsed = round((time.monotonic() - start) * 1000)
        info = link_info(self.node, PublicKey.parse(key))
        emit("echo_ok", peer=key, data=received.decode(), elapsed_ms=elapsed, **info)

    @staticmethod
    async def serve_echo(stream: Any, remote_key: PublicKey) -> None:
        """The ``ECHO`` handler: send back everything read, then half-close."""
        total = 0
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunk = await stream.receive()
                total += len(chunk)
                await stream.send(chunk)
        await stream.send_eof()
        emit("echoed", peer=str(remote_key), bytes=total)

    def stats(self) -> dict[str, Any]:
        stats = self.node.statistics()
        return {
            "signals": dataclasses.asdict(stats.signals),
            "dials": stats.dials,
            "dials_failed": stats.dials_failed,
            "duplicate_links": stats.duplicate_links,
            "relay": dataclasses.asdict(stats.relay),
        }

    def command(self, cmd: dict[str, Any], tg: Any) -> bool:
        """Run one command; False when the node should quit."""
        name = cmd.get("cmd")
        if name == "quit":
            return False
        if name == "call":
            tg.start_soon(self.call, cmd["key"], cmd.get("address"), float(cmd.get("timeout", 30)))
        elif name == "echo":
            timeout = float(cmd.get("timeout", 30))
            tg.start_soon(self.echo, cmd["key"], cmd.get("data", "ping"), timeout)
        elif name == "set":
            self.doc_map(cmd["doc"])[cmd["key"]] = cmd["value"]
            emit("set_ok", doc=cmd["doc"], key=cmd["key"])
        elif name == "get":
            value = self.doc_map(cmd["doc"]).get(cmd["key"])
            emit("value", doc=cmd["doc"], key=cmd["key"], value=value)
        elif name == "peers":
            peers = [{"peer": str(k), **link_info(self.node, k)} for k in self.node.peers]
            emit("peers", peers=peers)
        elif name == "members":
            emit("members", members=sorted(str(k) for k in self.node.members))
        elif name == "stats":
            emit("stats", **self.stats())
        else:
            emit("error", message=f"unknown command {cmd!r}")
        return True


async def read_stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--ice-servers", default="[]", help="JSON list of RTCIceServer dicts")
    parser.add_argument("--signaling", action="append", default=[], help="ws:// URL")
    parser.add_argument("--tcp", help="host:port to serve a TcpTransport on")
    parser.add_argument("--keepalive-interval", type=float, default=1.0)
    parser.add_argument("--peer-timeout", type=float, default=5.0)
    parser.add_argument("--dial-timeout", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=20.0, help="WebRTC")
    parser.add_argument("--mesh", default="{}", help="JSON MeshConfig fields")
    parser.add_argument("--doc", action="append", default=[], help="docs to open at start")
    parser.add_argument("--debug", action="store_true", help="crdtswarm debug logs on stderr")
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.WARNING,
        format="%(relativeCreated)7.0f ms %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("crdtswarm").setLevel(logging.DEBUG if args.debug else logging.INFO)

    ice = [IceServer(**server) for server in json.loads(args.ice_servers)]
    transports: list[Any] = [
        ReportingWebRTCTransport(ice, config=WebRTCConfig(connect_timeout=args.connect_timeout))
    ]
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        transports.append(TcpTransport(host, int(port)))
    config = SwarmConfig(
        keepalive_interval=args.keepalive_interval,
        peer_timeout=args.peer_timeout,
        dial_timeout=args.dial_timeout,
        mesh=MeshConfig(**json.loads(args.mesh)),
    )
    stdin = await read_stdin()
    async with Swarm(transports=transports, signaling=args.signaling, config=config) as node:
        app = App(node)
        node.handle(ECHO, app.serve_echo)
        for name in args.doc:
            app.doc_map(name)
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.watch)
            client = node._signaling_client
            if client is not None:
                with anyio.fail_after(REGISTER_TIMEOUT):
                    await client.wait_connected()
            emit("ready", name=args.name, key=str(node.public_key), addresses=node.addresses)
            while line := await stdin.readline():
                try:
                    cmd = json.loads(line)
                except ValueError:
                    emit("error", message=f"not JSON: {line!r}")
                    continue
                try:
                    if not app.command(cmd, tg):
                        break
                except (KeyError, TypeError, ValueError) as exc:
                    emit("error", message=f"{cmd!r}: {type(exc).__name__}: {exc}")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
