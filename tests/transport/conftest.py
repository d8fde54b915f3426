"""The transport conformance harness: one fixture, one parameter per transport.

A harness runs two nodes of one transport kind: ``server`` serves under bob's key,
``client`` (alice) dials it. To add a transport, subclass `Harness` and add it to
`HARNESSES`; every test of test_conformance.py then runs over it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

import aioice.ice
import anyio
import pytest
from anyio.abc import SocketAttribute

from crdtswarm.errors import ConnectError
from crdtswarm.transport.memory import MemoryNetwork
from crdtswarm.transport.tcp import TcpTransport
from crdtswarm.transport.webrtc import WebRTCConfig, WebRTCTransport

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from crdtswarm.identity import Identity, PublicKey
    from crdtswarm.transport.abc import Link, Transport

MAX_MESSAGE_SIZE = 100_000


class Harness:
    """Two nodes of one transport kind, a server and a client, and the links between them."""

    name: ClassVar[str]

    def __init__(
        self,
        task_group: TaskGroup,
        client_key: PublicKey,
        server_key: PublicKey,
        stranger_key: PublicKey,
    ) -> None:
        self.task_group = task_group
        self.client_key = client_key
        self.server_key = server_key
        self.stranger_key = stranger_key
        self.max_message_size = MAX_MESSAGE_SIZE
        self._accepted_send, self._accepted = anyio.create_memory_object_stream["Link"](256)
        self._links: list[Link] = []
        self._scopes: list[anyio.CancelScope] = []
        self.server_stopped = anyio.Event()

    # -- per transport ----------------------------------------------------------------

    def make_transport(self) -> Transport:
        raise NotImplementedError

    async def kill(self, link: Link) -> None:
        """The node at this end of ``link`` dies: the link goes away abruptly."""
        await anyio.aclose_forcefully(link)

    async def dial_unreachable(self) -> Link:
        """Dial something that does not answer (must raise ConnectError)."""
        raise NotImplementedError

    # -- common -----------------------------------------------------------------------

    async def start(self) -> None:
        self.server = self.make_transport()
        self.client = self.make_transport()
        self.server_scope = anyio.CancelScope()
        self.server_addresses: list[str] = await self.task_group.start(
            self._serve, self.server, self.server_key, self.server_scope, self.server_stopped
        )
        await self.task_group.start(
            self._serve, self.client, self.client_key, anyio.CancelScope(), anyio.Event()
        )

    async def _serve(
        self,
        transport: Transport,
        key: PublicKey,
        scope: anyio.CancelScope,
        stopped: anyio.Event,
        *,
        task_status: TaskStatus[list[str]],
    ) -> None:
        self._scopes.append(scope)
        try:
            with scope:
                await transport.serve(key, self._on_link, task_status=task_status)
        finally:
            stopped.set()

    async def _on_link(self, link: Link) -> None:
        self._links.append(link)
        await self._accepted_send.send(link)

    async def dial(self) -> Link:
        link = await self.client.dial(self.server_key, self.server_addresses[0])
        self._links.append(link)
        return link

    async def connect(self) -> tuple[Link, Link]:
        """A new link: (the client's end, the server's end)."""
        with anyio.fail_after(5):
            ours = await self.dial()
            theirs = await self._accepted.receive()
        return ours, theirs

    async def stop_server(self) -> None:
        self.server_scope.cancel()
        with anyio.fail_after(5):
            await self.server_stopped.wait()

    async def aclose(self) -> None:
        for link in self._links:
            await anyio.aclose_forcefully(link)
        for scope in self._scopes:
            scope.cancel()
        self._accepted_send.close()
        self._accepted.close()


class MemoryHarness(Harness):
    name = "memory"

    async def start(self) -> None:
        self.network = MemoryNetwork(seed=1, capacity=8)
        await super().start()

    def make_transport(self) -> Transport:
        return self.network.transport(max_message_size=self.max_message_size)

    async def dial_unreachable(self) -> Link:
        return await self.client.dial(self.stranger_key)


class TcpHarness(Harness):
    name = "tcp"

    def make_transport(self) -> Transport:
        return TcpTransport(max_message_size=self.max_message_size, connect_timeout=5)

    async def kill(self, link: Link) -> None:
        # A reset, as when the process dies with data in flight.
        raw = link.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await anyio.aclose_forcefully(link)

    async def dial_unreachable(self) -> Link:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return await self.client.dial(self.stranger_key, f"tcp://127.0.0.1:{port}")


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """WebRTC on loopback: aioice's only host candidate is 127.0.0.1 (it skips loopback)."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class SignalHub:
    """An in-memory signaler network: hands each payload to the addressee's transport."""

    def __init__(self) -> None:
        self.transports: dict[PublicKey, WebRTCTransport] = {}

    def attach(self, key: PublicKey, transport: WebRTCTransport) -> None:
        self.transports[key] = transport
        transport.signaler = HubSignaler(self, key)


class HubSignaler:
    def __init__(self, hub: SignalHub, key: PublicKey) -> None:
        self.hub = hub
        self.key = key

    async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        target = self.hub.transports.get(remote_key)
        if target is None or target.local_key is None:
            raise ConnectError(f"{remote_key.short} is not reachable")
        target.receive_signal(self.key, payload)


class WebRTCHarness(Harness):
    name = "webrtc"

    def make_transport(self) -> Transport:
        config = WebRTCConfig(max_message_size=self.max_message_size, connect_timeout=5)
        return WebRTCTransport(config=config)

    async def start(self) -> None:
        await super().start()
        self.hub = SignalHub()
        for key, transport in ((self.server_key, self.server), (self.client_key, self.client)):
            assert isinstance(transport, WebRTCTransport)
            self.hub.attach(key, transport)

    async def dial_unreachable(self) -> Link:
        return await self.client.dial(self.stranger_key)


HARNESSES: dict[str, type[Harness]] = {
    h.name: h for h in (MemoryHarness, TcpHarness, WebRTCHarness)
}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(
    request: pytest.FixtureRequest, alice: Identity, bob: Identity, carol: Identity
) -> AsyncIterator[Harness]:
    async with anyio.create_task_group() as task_group:
        h = HARNESSES[request.param](task_group, alice.public_key, bob.public_key, carol.public_key)
        await h.start()
        try:
            yield h
        finally:
            await h.aclose()
