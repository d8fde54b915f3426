"""One suite for every transport (trio's check_two_way_stream, for message links).

Each test gets a `Harness` (see conftest.py) for one transport kind and checks the
`Link` contract of crdtswarm.transport.abc: ordering, message boundaries, size limit,
EOF, closed vs broken, back-pressure, concurrency and cleanup.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import anyio
import pytest

from crdtswarm.errors import ConnectError
from crdtswarm.transport.abc import LinkAttribute

if TYPE_CHECKING:
    from crdtswarm.transport.abc import Link
    from tests.transport.conftest import Harness

WAIT = 5.0  # generous bound for things that should happen at once


async def receive_all(link: Link) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(await link.receive())
        except anyio.EndOfStream:
            return out


async def test_messages_arrive_in_order_both_ways(harness: Harness) -> None:
    a, b = await harness.connect()
    count = 200
    got: dict[str, list[bytes]] = {}

    async def pump(name: str, src: Link, dst: Link) -> None:
        async def sender() -> None:
            for i in range(count):
                await src.send(f"{name}{i}".encode())
            await src.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            got[name] = await receive_all(dst)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, "a", a, b)
            tg.start_soon(pump, "b", b, a)
    assert got["a"] == [f"a{i}".encode() for i in range(count)]
    assert got["b"] == [f"b{i}".encode() for i in range(count)]


async def test_message_boundaries_are_preserved(harness: Harness) -> None:
    a, b = await harness.connect()
    sizes = [0, 1, 0, 2, 3, 4, 5, 7, 1000, 0, 65_536, 99_999, 1, 0]
    messages = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:

            async def sender() -> None:
                for message in messages:
                    await a.send(message)
                await a.send_eof()

            tg.start_soon(sender)
            assert await receive_all(b) == messages


async def test_max_message_size(harness: Harness) -> None:
    a, b = await harness.connect()
    limit = harness.max_message_size
    assert a.max_message_size == b.max_message_size == limit
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, b"x" * limit)
            assert await b.receive() == b"x" * limit
        with pytest.raises(ValueError, match="max_message_size"):
            await a.send(b"y" * (limit + 1))
        with pytest.raises(ValueError, match="max_message_size"):
            await b.send(b"y" * (limit + 1))
        await a.send(b"still fine")
        assert await b.receive() == b"still fine"
        await b.send(b"both ways")
        assert await a.receive() == b"both ways"


async def test_send_eof_half_closes(harness: Harness) -> None:
    a, b = await harness.connect()
    with anyio.fail_after(WAIT):
        await a.send(b"one")
        await a.send(b"two")
        await a.send_eof()
        with pytest.raises(anyio.ClosedResourceError):
            await a.send(b"after eof")
        assert await b.receive() == b"one"
        assert await b.receive() == b"two"
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        with pytest.raises(anyio.EndOfStream):
            await b.receive()  # and it stays that way
        # the other direction still works
        await b.send(b"reply")
        assert await a.receive() == b"reply"
        await b.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await a.receive()


async def test_eof_after_aclose_comes_after_all_data(harness: Harness) -> None:
    a, b = await harness.connect()
    messages = [bytes([i]) * (i * 100) for i in range(8)]
    with anyio.fail_after(WAIT):
        for message in messages:
            await a.send(message)
        await a.aclose()
        assert await receive_all(b) == messages


async def test_using_a_closed_link_raises_closed_resource_error(harness: Harness) -> None:
    a, _ = await harness.connect()
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(anyio.ClosedResourceError):
        await a.send(b"x")
    with pytest.raises(anyio.ClosedResourceError):
        await a.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await a.send_eof()


async def test_closing_wakes_our_own_blocked_receiver(harness: Harness) -> None:
    a, _ = await harness.connect()
    errors: list[BaseException] = []

    async def receiver(task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await a.receive()
        except anyio.ClosedResourceError as exc:
            errors.append(exc)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            await tg.start(receiver)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()
    assert len(errors) == 1


async def test_peer_dying_breaks_the_link(harness: Harness) -> None:
    a, b = await harness.connect()
    await a.send(b"hello")
    assert await b.receive() == b"hello"
    await harness.kill(a)
    with anyio.fail_after(WAIT):
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await b.receive()
        # Sending to a dead peer fails too (TCP may accept a few writes first).
        with pytest.raises(anyio.BrokenResourceError):  # noqa: PT012
            for _ in range(1000):
                await b.send(b"anyone there?")
                await anyio.lowlevel.checkpoint()


async def test_peer_dying_wakes_a_blocked_receiver(harness: Harness) -> None:
    a, b = await harness.connect()
    outcome: list[type[BaseException]] = []

    async def receiver(task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await b.receive()
        except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            outcome.append(type(exc))

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            await tg.start(receiver)
            await anyio.wait_all_tasks_blocked()
            await harness.kill(a)
    assert outcome


async def test_back_pressure(harness: Harness) -> None:
    a, b = await harness.connect()
    message_size = 16_384
    sent = 0
    with anyio.fail_after(30):
        # b does not read: a must eventually block.
        while True:
            assert sent < 20_000, "the sender never blocked"
            with anyio.move_on_after(0.2) as scope:
                await a.send(struct.pack(">I", sent) + bytes(message_size - 4))
            if scope.cancelled_caught:
                break
            sent += 1
        assert sent > 0
        # A cancelled send either went out whole or not at all: the numbering below lets
        # the receiver accept both.

        async def reader(task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            expected = 0
            while True:
                message = await b.receive()
                (number,) = struct.unpack_from(">I", message)
                if number == 0xFFFF_FFFF:
                    assert expected in (sent, sent + 1)
                    return
                assert number == expected
                assert len(message) == message_size
                expected += 1

        async with anyio.create_task_group() as tg:
            await tg.start(reader)
            with anyio.fail_after(WAIT):
                await a.send(struct.pack(">I", 0xFFFF_FFFF))


async def test_cancelled_receive_loses_nothing(harness: Harness) -> None:
    a, b = await harness.connect()
    with anyio.move_on_after(0.05):
        await b.receive()
    with anyio.fail_after(WAIT):
        await a.send(b"kept")
        assert await b.receive() == b"kept"


async def test_concurrent_senders(harness: Harness) -> None:
    a, b = await harness.connect()
    senders, count = 5, 40

    async def sender(n: int) -> None:
        for i in range(count):
            await a.send(struct.pack(">II", n, i) + bytes([n]) * (1000 * n))

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for n in range(senders):
                tg.start_soon(sender, n)
            seen: dict[int, list[int]] = {n: [] for n in range(senders)}
            for _ in range(senders * count):
                message = await b.receive()
                n, i = struct.unpack_from(">II", message)
                assert message[8:] == bytes([n]) * (1000 * n)
                seen[n].append(i)
    assert seen == {n: list(range(count)) for n in range(senders)}


async def test_many_links_at_once(harness: Harness) -> None:
    links = 30

    async def echo(link: Link) -> None:
        try:
            while True:
                await link.send(await link.receive())
        except anyio.EndOfStream:
            await link.aclose()

    async def client(n: int) -> None:
        ours, theirs = await harness.connect()
        tg.start_soon(echo, theirs)
        for i in range(10):
            await ours.send(f"{n}:{i}".encode())
            assert await ours.receive() == f"{n}:{i}".encode()
        await ours.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await ours.receive()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(links):
                tg.start_soon(client, n)


async def test_serve_cancellation_closes_accepted_links(harness: Harness) -> None:
    a, b = await harness.connect()
    await harness.stop_server()
    assert harness.server.addresses == []
    with pytest.raises(anyio.ClosedResourceError):
        await b.send(b"x")
    with anyio.fail_after(WAIT):
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await a.receive()
        with pytest.raises(ConnectError):
            await harness.dial()


async def test_dial_to_nobody_fails_quickly(harness: Harness) -> None:
    with anyio.fail_after(2), pytest.raises(ConnectError) as info:
        await harness.dial_unreachable()
    assert info.value.__cause__ is not None


async def test_link_attributes(harness: Harness) -> None:
    a, b = await harness.connect()
    scheme = harness.server.scheme
    for link in (a, b):
        assert link.extra(LinkAttribute.transport) == scheme
        assert link.extra(LinkAttribute.local_address).startswith(f"{scheme}://")
        assert link.extra(LinkAttribute.remote_address).startswith(f"{scheme}://")
    assert a.extra(LinkAttribute.local_address) == b.extra(LinkAttribute.remote_address)
    assert a.extra(LinkAttribute.remote_address) == b.extra(LinkAttribute.local_address)
    assert harness.server.addresses == harness.server_addresses
    assert harness.server.can_dial(harness.server_addresses[0])
