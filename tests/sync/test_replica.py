"""Document replication between Swarm nodes on the simulated network."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pycrdt
import pytest

from crdtswarm import Identity, PeerDisconnected, Swarm, SwarmConfig
from crdtswarm.mesh import MeshConfig
from crdtswarm.protocol.wire import encode_var_string
from crdtswarm.sync.protocol import SyncStep1, Update, encode_message
from crdtswarm.sync.replica import PROTOCOL, ReplicaConfig
from crdtswarm.testing import SimulatedNetwork
from crdtswarm.transport.framing import encode_frame

WAIT = 10.0


async def eventually(condition: Callable[[], bool], *docs: pycrdt.Doc) -> None:
    """Wait until ``condition()`` holds: re-checked on every change of ``docs``, or
    whenever all tasks are idle when no doc is given."""
    with anyio.fail_after(WAIT):
        while not condition():
            changed = anyio.Event()
            notify = changed.set
            subscriptions = [(d, d.observe(lambda _event, n=notify: n())) for d in docs]
            try:
                if condition():
                    return
                if docs:
                    await changed.wait()
                else:
                    await anyio.wait_all_tasks_blocked()
            finally:
                for doc, subscription in subscriptions:
                    doc.unobserve(subscription)


FAST = SwarmConfig(replica=ReplicaConfig(batch_interval=0.0))


def notes(node: Swarm) -> pycrdt.Map:
    return node.doc("notes").get("notes", type=pycrdt.Map)


async def test_offline_edits_merge_on_connect(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=1)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
    ):
        notes(a)["from_a"] = "hello"
        notes(b)["from_b"] = "world"
        await a.call(bob.public_key)
        expected = {"from_a": "hello", "from_b": "world"}
        await eventually(
            lambda: notes(a).to_py() == expected == notes(b).to_py(), a.doc("notes"), b.doc("notes")
        )


async def test_live_and_concurrent_edits_converge(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=2)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
    ):
        await a.call(bob.public_key)
        text_a = a.doc("notes").get("text", type=pycrdt.Text)
        text_b = b.doc("notes").get("text", type=pycrdt.Text)
        text_a += "abc"
        await eventually(lambda: str(text_b) == "abc", b.doc("notes"))
        text_a.insert(0, "A")
        text_b.insert(3, "B")  # concurrent with A's edit
        await eventually(
            lambda: str(text_a) == str(text_b) and len(str(text_a)) == 5,
            a.doc("notes"),
            b.doc("notes"),
        )
        assert set(str(text_a)) == set("AabcB")


async def test_a_doc_opened_later_receives_the_state(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=3)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
    ):
        await a.call(bob.public_key)
        notes(a)["x"] = 1.0
        other = a.doc("other").get("m", type=pycrdt.Map)
        other["y"] = 2.0
        await anyio.wait_all_tasks_blocked()
        assert b._replicator.names == ["crdtswarm/directory"]  # only what b opened itself
        await eventually(lambda: notes(b).to_py() == {"x": 1.0}, b.doc("notes"))
        assert "other" not in b._replicator.names


async def test_updates_cross_a_partial_mesh(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    net = SimulatedNetwork(seed=4)
    net.block(alice.public_key, carol.public_key)  # a and c only meet through b
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
        Swarm(carol, [net.transport()], config=FAST) as c,
    ):
        for node in (a, b, c):
            notes(node)
        await b.call(alice.public_key)
        await b.call(carol.public_key)
        notes(a)["a"] = 1.0
        notes(c)["c"] = 3.0
        expected = {"a": 1.0, "c": 3.0}
        await eventually(
            lambda: all(notes(n).to_py() == expected for n in (a, b, c)),
            *(n.doc("notes") for n in (a, b, c)),
        )


async def test_no_echo_back_to_the_sender(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=5)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
    ):
        notes(a)
        notes(b)
        await a.call(bob.public_key)
        await eventually(lambda: a.statistics().replication.messages_received >= 2)
        await anyio.wait_all_tasks_blocked()
        before_a = a.statistics().replication
        before_b = b.statistics().replication
        notes(a)["k"] = "v"
        await eventually(lambda: notes(b).to_py() == {"k": "v"}, b.doc("notes"))
        await anyio.wait_all_tasks_blocked()
        after_a = a.statistics().replication
        after_b = b.statistics().replication
        assert after_a.updates_sent == before_a.updates_sent + 1
        assert after_b.updates_sent == before_b.updates_sent  # b applied it, sent nothing back
        assert after_a.messages_received == before_a.messages_received


async def test_a_burst_of_small_edits_is_batched(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=6)
    async with (
        Swarm(alice, [net.transport()]) as a,
        Swarm(bob, [net.transport()]) as b,
    ):
        notes(a)
        notes(b)
        await a.call(bob.public_key)
        await eventually(lambda: a.statistics().replication.messages_received >= 2)
        before = a.statistics().replication.updates_sent
        for i in range(200):
            notes(a)[f"k{i}"] = float(i)
        await eventually(lambda: len(notes(b).to_py()) == 200, b.doc("notes"))
        assert a.statistics().replication.updates_sent - before < 20


async def test_a_garbage_update_drops_the_link_and_keeps_the_doc(
    alice: Identity, bob: Identity
) -> None:
    net = SimulatedNetwork(seed=7)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()], config=FAST) as b,
    ):
        notes(a)["safe"] = True
        events = a.events()
        peer = await b.call(alice.public_key)
        await eventually(lambda: notes(b).to_py() == {"safe": True}, b.doc("notes"))
        before = a.doc("notes").get_update()
        # bob turns hostile: a sync message carrying an update pycrdt cannot apply
        stream = await peer._require().mux.open_stream(PROTOCOL)
        message = encode_message(Update(update=b"\x01\x02garbage"))
        await stream.send(encode_frame(encode_var_string("notes") + message))
        with anyio.fail_after(WAIT):
            async for event in events:
                if isinstance(event, PeerDisconnected):
                    break
        assert a.doc("notes").get_update() == before
        assert notes(a).to_py() == {"safe": True}


def test_doc_names_are_validated() -> None:
    node = Swarm(transports=[SimulatedNetwork(seed=1).transport()])
    with pytest.raises(ValueError, match="document names"):
        node.doc("")
    with pytest.raises(ValueError, match="document names"):
        node.doc("x" * 300)
    assert node.doc("a") is node.doc("a")


async def test_restart_keeps_key_and_docs_and_merges_offline_edits(
    tmp_path: Path, bob: Identity
) -> None:
    net = SimulatedNetwork(seed=8)
    data_dir = tmp_path / "node-a"
    async with Swarm(transports=[net.transport()], data_dir=data_dir, config=FAST) as a:
        key = a.public_key
        notes(a)["before"] = 1.0
    assert (data_dir / "identity.key").exists()
    async with Swarm(bob, [net.transport()], config=FAST) as b:
        notes(b)["meanwhile"] = 2.0  # made while a is down
        async with Swarm(transports=[net.transport()], data_dir=data_dir, config=FAST) as a:
            assert a.public_key == key
            assert notes(a).to_py() == {"before": 1.0}  # came back from disk
            notes(a)["offline"] = 3.0  # made before reconnecting
            await a.call(bob.public_key)
            expected = {"before": 1.0, "meanwhile": 2.0, "offline": 3.0}
            await eventually(
                lambda: notes(a).to_py() == expected == notes(b).to_py(),
                a.doc("notes"),
                b.doc("notes"),
            )
    async with Swarm(transports=[net.transport()], data_dir=data_dir, config=FAST) as a:
        assert notes(a).to_py() == expected  # what arrived from b was persisted too


async def test_the_store_is_compacted_while_running(tmp_path: Path) -> None:
    net = SimulatedNetwork(seed=9)
    config = SwarmConfig(replica=ReplicaConfig(batch_interval=0.0, compact_after=20))
    async with Swarm(transports=[net.transport()], data_dir=tmp_path, config=config) as a:
        for i in range(200):
            notes(a)[f"k{i}"] = float(i)
            await anyio.wait_all_tasks_blocked()  # let the upkeep task run between edits
        store = a._store
        assert store is not None
        rows = store._db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
        assert rows <= 21
    async with Swarm(transports=[net.transport()], data_dir=tmp_path, config=config) as a:
        assert len(notes(a).to_py()) == 200


async def test_a_sync_step1_flood_drops_the_link(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=10)
    async with (
        Swarm(alice, [net.transport()], config=FAST) as a,
        Swarm(bob, [net.transport()]) as b,
    ):
        notes(a)["big"] = "x" * 10_000
        events = a.events()
        peer = await b.call(alice.public_key)  # bob turns hostile
        hostile = await peer._require().mux.open_stream(PROTOCOL)
        step1 = encode_frame(
            encode_var_string("notes") + encode_message(SyncStep1(state_vector=b"\x00"))
        )
        await hostile.send(step1 * 1000)  # each asks a for the whole document
        with anyio.fail_after(WAIT):
            async for event in events:
                if isinstance(event, PeerDisconnected):
                    break
        assert a.statistics().peers == 0


ROUTED = SwarmConfig(
    replica=ReplicaConfig(batch_interval=0.0),
    mesh=MeshConfig(max_peers=3, tick_interval=0.05, retry_interval=0.05, min_link_age=0.2),
    link_publish_delay=0.05,
    link_publish_interval=0.1,
)


def rows_settled(nodes: list[Swarm]) -> bool:
    """Every node's link graph shows every live link, and all nodes agree on it."""
    first = nodes[0]._rows
    return all(
        node._rows == first
        and set(first.get(node.public_key, {})) == set(node.peers)
        and all(p.rtt is not None for p in node.peers.values())
        for node in nodes
    )


async def wait_rows_settled(nodes: list[Swarm]) -> None:
    """Wait until `rows_settled`, re-checking on every directory change and peer event."""
    send, receive = anyio.create_memory_object_stream[None](1000)

    def poke(_event: object = None) -> None:
        with contextlib.suppress(anyio.WouldBlock):
            send.send_nowait(None)

    async def forward(node: Swarm) -> None:
        async for _ in node.events():
            poke()

    directories = [node.doc("crdtswarm/directory") for node in nodes]
    subscriptions = [(d, d.observe(poke)) for d in directories]
    try:
        with send, receive, anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for node in nodes:
                    tg.start_soon(forward, node)
                while not rows_settled(nodes):
                    await receive.receive()
                tg.cancel_scope.cancel()
    finally:
        for doc, subscription in subscriptions:
            doc.unobserve(subscription)


def totals(nodes: list[Swarm]) -> tuple[int, int, int]:
    stats = [node.statistics().replication for node in nodes]
    return (
        sum(s.updates_sent for s in stats),
        sum(s.duplicates for s in stats),
        sum(s.floods for s in stats),
    )


@contextlib.asynccontextmanager
async def routed_swarm(*, seed: int, keys: range) -> AsyncIterator[list[Swarm]]:
    """Nodes that all called the first one, with "notes" open, once their rows settled."""
    net = SimulatedNetwork(seed=seed)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                Swarm(Identity(bytes([i]) * 32), [net.transport()], config=ROUTED)
            )
            for i in keys
        ]
        for node in nodes:
            notes(node)
        for node in nodes[1:]:
            await node.call(nodes[0].public_key)
        await wait_rows_settled(nodes)
        yield nodes


async def test_with_a_settled_link_graph_each_node_gets_an_update_once() -> None:
    async with routed_swarm(seed=11, keys=range(1, 9)) as nodes:
        docs = [n.doc("notes") for n in nodes]
        notes(nodes[0])["warm-up"] = True  # lets directory traffic still in flight land
        await eventually(lambda: all("warm-up" in notes(n) for n in nodes), *docs)
        await anyio.wait_all_tasks_blocked()
        before = totals(nodes)
        for index, node in enumerate(nodes):
            notes(node)[f"k{index}"] = index
            await eventually(lambda i=index: all(f"k{i}" in notes(n) for n in nodes), *docs)
        await anyio.wait_all_tasks_blocked()
        sent, duplicates, floods = (b - a for a, b in zip(before, totals(nodes), strict=True))
        # 8 edits, each sent exactly once to each of the 7 other nodes, along a tree
        assert (sent, duplicates, floods) == (8 * 7, 0, 0)


async def test_a_wrong_link_graph_costs_copies_never_updates() -> None:
    async with routed_swarm(seed=12, keys=range(11, 17)) as nodes:
        # every node believes in a made-up star around node 5, which has no such links
        keys = [n.public_key for n in nodes]
        star = {keys[5]: dict.fromkeys(keys[:5], 0.001)} | {k: {keys[5]: 0.001} for k in keys[:5]}
        for node in nodes:
            node._replicator.set_link_rows(star)
        for index, node in enumerate(nodes):
            notes(node)[f"w{index}"] = index
        await eventually(
            lambda: all(len(notes(n)) == len(nodes) for n in nodes),
            *(n.doc("notes") for n in nodes),
        )
        assert totals(nodes)[2] > 0  # it took the flooding fallback


def forget_docs(data_dir: Path) -> None:
    assert (data_dir / "contacts.json").exists()
    (data_dir / "docs.sqlite3").unlink()


async def test_a_restarted_node_calls_its_former_peers_by_itself(
    alice: Identity, bob: Identity, carol: Identity, tmp_path: Path
) -> None:
    net = SimulatedNetwork(seed=13)
    async with Swarm(carol, [net.transport()], config=FAST):
        async with Swarm(alice, [net.transport()], config=FAST) as a:
            await a.call(carol.public_key)
            async with Swarm(bob, [net.transport()], data_dir=tmp_path, config=FAST) as b:
                await b.call(alice.public_key)
        forget_docs(tmp_path)  # b will come back with no directory: only its contacts
        # a comes back with no memory of b, and not alone (so it looks for nobody)
        async with Swarm(alice, [net.transport()], config=FAST) as a:
            await a.call(carol.public_key)
            events = a.events()
            async with Swarm(bob, [net.transport()], data_dir=tmp_path, config=FAST) as b:
                with anyio.fail_after(WAIT):
                    while bob.public_key not in a.peers:
                        await anext(events)
                assert alice.public_key in b.peers


async def test_an_unreadable_contacts_file_is_ignored(
    alice: Identity, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "contacts.json").write_text("{not json")
    net = SimulatedNetwork(seed=14)
    async with Swarm(alice, [net.transport()], data_dir=tmp_path, config=FAST) as a:
        assert a.peers == {}
    assert "ignoring unreadable contacts file" in caplog.text


@pytest.mark.parametrize("trial", range(8))
async def test_an_edit_survives_two_nodes_calling_each_other_at_once(trial: int) -> None:
    from crdtswarm.transport.tcp import TcpTransport

    config = SwarmConfig(auto_mesh=False)
    async with (
        Swarm(transports=[TcpTransport()], config=config) as a,
        Swarm(transports=[TcpTransport()], config=config) as b,
    ):
        notes(b)  # open on both sides before they link
        notes(a)["offline"] = trial
        async with anyio.create_task_group() as tg:  # one of the two links is dropped
            tg.start_soon(a.call, b.public_key, b.addresses[0])
            tg.start_soon(b.call, a.public_key, a.addresses[0])
        # anti-entropy runs every 30 s: the edit must come long before that
        await eventually(lambda: notes(b).get("offline") == trial, b.doc("notes"))
