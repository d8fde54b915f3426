"""TCP specifics: addresses, listening errors and what a raw socket can do to a link."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import pytest
from anyio.abc import SocketAttribute

from crdtswarm.errors import ConnectError, FrameError
from crdtswarm.transport.framing import encode_frame, frame_header
from crdtswarm.transport.tcp import TcpLink, TcpTransport, format_address, parse_address

if TYPE_CHECKING:
    from anyio.abc import SocketStream

    from crdtswarm.identity import Identity
    from crdtswarm.transport.abc import Link

WAIT = 5.0


class Server:
    def __init__(self, transport: TcpTransport) -> None:
        self.transport = transport
        self.addresses: list[str] = []
        self.host, self.port = "", 0
        self._send, self._accepted = anyio.create_memory_object_stream[TcpLink](16)

    def started(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.host, self.port = parse_address(addresses[0])

    async def handler(self, link: Link) -> None:
        assert isinstance(link, TcpLink)
        await self._send.send(link)

    async def accept(self) -> TcpLink:
        with anyio.fail_after(WAIT):
            return await self._accepted.receive()

    def close(self) -> None:
        self._send.close()
        self._accepted.close()


@pytest.fixture
async def server(bob: Identity) -> AsyncIterator[Server]:
    transport = TcpTransport(max_message_size=1000)
    async with anyio.create_task_group() as tg:
        srv = Server(transport)
        srv.started(await tg.start(transport.serve, bob.public_key, srv.handler))
        try:
            yield srv
        finally:
            tg.cancel_scope.cancel()
            srv.close()


async def raw_connect(srv: Server) -> SocketStream:
    return await anyio.connect_tcp(srv.host, srv.port)


def test_address_format() -> None:
    assert format_address("127.0.0.1", 80) == "tcp://127.0.0.1:80"
    assert format_address("::1", 80) == "tcp://[::1]:80"
    assert parse_address("tcp://127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("tcp://[::1]:4242") == ("::1", 4242)
    assert parse_address("tcp://example.org:65535") == ("example.org", 65535)


@pytest.mark.parametrize(
    "address",
    [
        "udp://127.0.0.1:80",
        "127.0.0.1:80",
        "tcp://127.0.0.1",
        "tcp://:80",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:http",
        "tcp://127.0.0.1:-1",
        "tcp://127.0.0.1:\uff180",  # a fullwidth digit
        "tcp://::1:80",
        "tcp://[::1:80",
        "tcp://[nothost]:80",
        "tcp://a/b:80",
        "tcp://user@host:80",
        "mem://x",
    ],
)
async def test_bad_addresses_raise_value_error(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(address)
    with pytest.raises(ValueError, match="address"):
        await TcpTransport().dial(None, address)  # type: ignore[arg-type]


async def test_dial_needs_an_address(bob: Identity) -> None:
    transport = TcpTransport()
    assert not transport.can_dial(None)
    assert transport.can_dial("tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="address"):
        await transport.dial(bob.public_key)


async def test_serve_reports_the_bound_port(server: Server) -> None:
    assert server.addresses == server.transport.addresses
    assert server.host == "127.0.0.1"
    assert server.port != 0
    ours = await TcpTransport().dial(None, server.addresses[0])  # type: ignore[arg-type]
    theirs = await server.accept()
    raw = ours.extra(SocketAttribute.raw_socket)
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert theirs.extra(SocketAttribute.raw_socket).getsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY
    )
    await ours.aclose()
    await theirs.aclose()


async def test_a_wildcard_listener_announces_dialable_interface_addresses(bob: Identity) -> None:
    transport = TcpTransport("0.0.0.0")
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(transport.serve, bob.public_key, lambda link: link.aclose())
        hosts = [parse_address(a)[0] for a in addresses]
        assert "0.0.0.0" not in hosts
        assert hosts[-1] == "127.0.0.1"  # loopback last: others try the real ones first
        assert len({parse_address(a)[1] for a in addresses}) == 1  # one bound port
        for address in addresses:  # every announced address reaches the listener
            link = await TcpTransport().dial(bob.public_key, address)
            await link.aclose()
        tg.cancel_scope.cancel()


async def test_announced_addresses_replace_the_listened_one(bob: Identity) -> None:
    transport = TcpTransport(announce=["tcp://203.0.113.5:4242"])
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(transport.serve, bob.public_key, lambda link: link.aclose())
        assert addresses == transport.addresses == ["tcp://203.0.113.5:4242"]
        tg.cancel_scope.cancel()
    assert transport.addresses == []


async def test_ipv6(bob: Identity) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    transport = TcpTransport("::1")
    async with anyio.create_task_group() as tg:
        try:
            addresses = await tg.start(transport.serve, bob.public_key, lambda link: link.aclose())
        except OSError:
            pytest.skip("cannot listen on ::1")
        assert addresses[0].startswith("tcp://[::1]:")
        link = await TcpTransport().dial(bob.public_key, addresses[0])
        await link.aclose()
        tg.cancel_scope.cancel()


async def test_port_in_use_raises_oserror(bob: Identity) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def never(link: Link) -> None:
            raise AssertionError("no link expected")

        async with anyio.create_task_group() as tg:
            with pytest.raises(OSError, match="in use") as info:
                await tg.start(TcpTransport(port=port).serve, bob.public_key, never)
        assert not isinstance(info.value, ConnectError)


async def test_wire_format_is_length_prefixed(server: Server) -> None:
    raw = await raw_connect(server)
    link = await server.accept()
    await link.send(b"abc")
    await link.send(b"")
    expected = b"\x00\x00\x00\x03abc\x00\x00\x00\x00"
    got = b""
    with anyio.fail_after(WAIT):
        while len(got) < len(expected):
            got += await raw.receive()
    assert got == expected
    # and frames split at odd places come back whole
    stream = encode_frame(b"hello") + encode_frame(b"x" * 1000) + encode_frame(b"")
    for i in range(0, len(stream), 7):
        await raw.send(stream[i : i + 7])
    with anyio.fail_after(WAIT):
        assert await link.receive() == b"hello"
        assert await link.receive() == b"x" * 1000
        assert await link.receive() == b""
    await raw.send_eof()
    with pytest.raises(anyio.EndOfStream):
        await link.receive()
    await raw.aclose()
    await link.aclose()


async def test_oversized_header_is_a_frame_error(server: Server) -> None:
    raw = await raw_connect(server)
    link = await server.accept()
    await raw.send(encode_frame(b"fine") + frame_header(1001))
    with anyio.fail_after(WAIT):
        assert await link.receive() == b"fine"
        with pytest.raises(FrameError):
            await link.receive()
        with pytest.raises(anyio.BrokenResourceError) as info:
            await link.receive()
        assert isinstance(info.value.__cause__, FrameError)
        with pytest.raises(anyio.BrokenResourceError):
            await link.send(b"x")
        # the socket was closed: the raw peer sees the end
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await raw.receive()
    await raw.aclose()
    await link.aclose()


async def test_garbage_is_a_frame_error_on_the_dialling_side(bob: Identity) -> None:
    async def garbage(stream: SocketStream) -> None:
        async with stream:
            await stream.send(b"\xde\xad\xbe\xef" * 4)
            await anyio.sleep_forever()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, garbage)
        port = listener.extra(SocketAttribute.local_port)
        link = await TcpTransport().dial(bob.public_key, f"tcp://127.0.0.1:{port}")
        with anyio.fail_after(WAIT), pytest.raises(FrameError):
            await link.receive()
        await link.aclose()
        tg.cancel_scope.cancel()


async def test_peer_closing_mid_frame_breaks_the_link(server: Server) -> None:
    raw = await raw_connect(server)
    link = await server.accept()
    await raw.send(encode_frame(b"whole") + frame_header(100) + b"only ten b")
    await raw.aclose()
    with anyio.fail_after(WAIT):
        assert await link.receive() == b"whole"
        with pytest.raises(anyio.BrokenResourceError) as info:
            await link.receive()
    assert isinstance(info.value.__cause__, FrameError)
    await link.aclose()


async def test_send_refuses_oversized_messages(server: Server) -> None:
    link = await TcpTransport(max_message_size=10).dial(None, server.addresses[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_size"):
        await link.send(b"x" * 11)
    await link.aclose()


async def test_connect_timeout(bob: Identity) -> None:
    # A listener whose accept queue is full drops new SYNs: connecting hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect_ex(("127.0.0.1", port))
            transport = TcpTransport(connect_timeout=0.3)
            with anyio.fail_after(WAIT), pytest.raises(ConnectError) as info:
                await transport.dial(bob.public_key, f"tcp://127.0.0.1:{port}")
            assert isinstance(info.value.__cause__, TimeoutError)
        finally:
            for filler in fillers:
                filler.close()


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="port"):
        TcpTransport(port=70000)
    with pytest.raises(ValueError, match="connect_timeout"):
        TcpTransport(connect_timeout=0)
    with pytest.raises(ValueError, match="max_message_size"):
        TcpTransport(max_message_size=-1)
    with pytest.raises(ValueError, match="not a TCP address"):
        TcpTransport(announce=["203.0.113.5:4242"])
