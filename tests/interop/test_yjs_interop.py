"""crdtswarm.sync.protocol against the real JavaScript implementation (yjs + y-protocols).

`peer.mjs` is a Yjs peer on stdin/stdout (one JSON line per request and per response,
see its header). Skipped only when ``node`` is not on PATH; with node present, a
missing ``node_modules`` is an error: run ``npm ci --prefix tests/interop``.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pycrdt
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from crdtswarm.sync.protocol import (
    AwarenessClient,
    AwarenessUpdate,
    SyncSession,
    SyncStep1,
    decode_awareness_update,
    decode_message,
    encode_awareness_update,
    encode_message,
    validate_update,
)

HERE = Path(__file__).resolve().parent
PEER = HERE / "peer.mjs"
NODE = shutil.which("node")
TIMEOUT = 5.0  # seconds for one request; a response normally takes a millisecond
MAX_LINE = 16 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the Yjs interop tests need Node.js"
)


class NodePeer:
    """The Yjs peer in a node process, one request at a time."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)
        self.client_id = 0

    async def request(self, op: str, **fields: Any) -> tuple[list[bytes], Any]:
        """Send one request; return the messages the peer wants to send and the result."""
        with anyio.fail_after(TIMEOUT):
            await self._stdin.send(json.dumps({"op": op, **fields}).encode() + b"\n")
            line = await self._stdout.receive_until(b"\n", MAX_LINE)
        response = json.loads(line)
        if "error" in response:
            raise AssertionError(f"the node peer failed: {response['error']}")
        messages = [base64.b64decode(message) for message in response["messages"]]
        for message in messages:  # everything yjs sends, we decode and re-encode identically
            assert encode_message(decode_message(message)) == message
        return messages, response["result"]

    async def receive(self, messages: list[bytes]) -> list[bytes]:
        """Deliver our messages; return the peer's replies."""
        replies: list[bytes] = []
        for message in messages:
            out, _ = await self.request("receive", data=base64.b64encode(message).decode())
            replies.extend(out)
        return replies

    async def edit(self, *edits: dict[str, Any]) -> list[bytes]:
        messages, _ = await self.request("edit", edits=list(edits))
        return messages

    async def state(self) -> dict[str, Any]:
        _, result = await self.request("state")
        assert isinstance(result, dict)
        return result


@asynccontextmanager
async def open_peer(client_id: int) -> AsyncIterator[NodePeer]:
    assert NODE is not None
    if not (HERE / "node_modules" / "yjs").is_dir():
        pytest.fail(
            "tests/interop/node_modules is missing: run `npm ci --prefix tests/interop`",
            pytrace=False,
        )
    async with await anyio.open_process([NODE, str(PEER), str(client_id)]) as process:
        peer = NodePeer(process)
        peer.client_id = client_id
        try:
            yield peer
        finally:
            assert process.stdin is not None
            await process.stdin.aclose()
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == 0


def new_doc(client_id: int) -> pycrdt.Doc[Any]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
    doc["map"] = pycrdt.Map()
    doc["text"] = pycrdt.Text()
    doc["array"] = pycrdt.Array()
    return doc


def contents(doc: pycrdt.Doc[Any]) -> dict[str, Any]:
    return {
        "map": doc.get("map", type=pycrdt.Map).to_py(),
        "text": str(doc.get("text", type=pycrdt.Text)),
        "array": doc.get("array", type=pycrdt.Array).to_py(),
    }


class LocalUpdates:
    """Forwards every local change of ``doc`` to ``session`` (what a replica driver does)."""

    def __init__(self, doc: pycrdt.Doc[Any], session: SyncSession) -> None:
        self.applying = False
        self._session = session
        doc.observe(self._changed)

    def _changed(self, event: pycrdt.TransactionEvent) -> None:
        if not self.applying:
            self._session.send_update(event.update)


async def exchange(
    session: SyncSession, local: LocalUpdates, node: NodePeer, inbox: list[bytes]
) -> None:
    """Deliver ``inbox`` (node's messages) to ``session`` and ours to node, until quiet."""
    while True:
        for message in inbox:
            local.applying = True
            try:
                session.receive_message(message)
            finally:
                local.applying = False
        while session.next_event() is not None:
            pass
        outgoing = session.data_to_send()
        if not outgoing:
            return
        inbox = await node.receive(outgoing)


async def test_sync_both_ways_then_concurrent_edits() -> None:
    doc = new_doc(101)
    session = SyncSession(doc)
    local = LocalUpdates(doc, session)
    with doc.transaction():
        doc.get("map", type=pycrdt.Map)["py"] = "python"
        doc.get("map", type=pycrdt.Map)["shared"] = pycrdt.Map({"from": "py"})
        doc.get("text", type=pycrdt.Text).insert(0, "wörld 🎉")
        doc.get("array", type=pycrdt.Array).extend([1, "two", {"three": 3}])
    session.data_to_send()  # edits made before the sync are sent by step 2, not as updates

    async with open_peer(202) as node:
        await node.edit(
            {"kind": "map_set", "key": "js", "value": {"nested": [1, 2, None, True]}},
            {"kind": "nested_map", "key": "jsmap", "entries": {"a": 1}},
            {"kind": "text_insert", "index": 0, "text": "héllo 😀 "},
            {"kind": "array_push", "values": [4.5, "five"]},
        )
        # both sides start: each answers the other's step 1 with a step 2
        session.start()
        started, _ = await node.request("start")
        await exchange(session, local, node, started)
        assert session.is_synced
        before = await node.state()
        assert before["json"] == contents(doc)
        assert "jsmap" in before["json"]["map"]
        assert "py" in before["json"]["map"]

        # concurrent edits on both sides, including children of the other side's nested map
        node_updates = await node.edit(
            {"kind": "map_set", "key": "py", "value": "overwritten by js"},
            {"kind": "nested_set", "key": "shared", "subkey": "js", "value": 1},
            {"kind": "text_insert", "index": 3, "text": "JS"},
            {"kind": "text_delete", "index": 0, "length": 1},
            {"kind": "array_insert", "index": 1, "values": ["js"]},
            {"kind": "array_delete", "index": 0, "length": 1},
        )
        with doc.transaction():
            doc.get("map", type=pycrdt.Map)["py2"] = [True, None]
            doc.get("map", type=pycrdt.Map)["jsmap"]["py"] = "child of a js map"
            doc.get("text", type=pycrdt.Text).insert(2, "PY")
            doc.get("array", type=pycrdt.Array).append("py")
            del doc.get("array", type=pycrdt.Array)[0]
        assert len(node_updates) == 1
        await exchange(session, local, node, node_updates)

        after = await node.state()
        assert after["json"] == contents(doc)
        assert after["json"]["map"]["jsmap"] == {"a": 1, "py": "child of a js map"}
        assert after["json"]["map"]["shared"] == {"from": "py", "js": 1}
        assert "JS" in after["json"]["text"]
        assert "PY" in after["json"]["text"]


async def test_encoded_updates_apply_both_ways() -> None:
    async with open_peer(303) as node:
        await node.edit(
            {"kind": "map_set", "key": "k", "value": ["v", 1, 2.5, None]},
            {"kind": "nested_map", "key": "n", "entries": {"deep": {"er": [1]}}},
            {"kind": "text_insert", "index": 0, "text": "ça va 🙂"},
            {"kind": "array_push", "values": [{"a": "b"}, False]},
        )
        js = await node.state()
        from_js = base64.b64decode(js["update"])  # Y.encodeStateAsUpdate
        validate_update(from_js)
        doc = new_doc(404)
        doc.apply_update(from_js)
        assert contents(doc) == js["json"]

        doc.get("text", type=pycrdt.Text).insert(0, "py ")
        doc.get("array", type=pycrdt.Array).append(7)
        await node.request("apply_update", update=base64.b64encode(doc.get_update()).decode())
        assert (await node.state())["json"] == contents(doc)


async def test_step1_of_an_empty_doc_matches_byte_for_byte() -> None:
    async with open_peer(505) as node:
        [step1], _ = await node.request("start")
    assert step1 == b"\x00\x00\x01\x00"
    assert step1 == encode_message(SyncStep1(state_vector=pycrdt.Doc().get_state()))


async def test_awareness_messages_interoperate() -> None:
    async with open_peer(606) as node:
        [message], _ = await node.request("set_awareness", state={"user": {"name": "ada 🙂"}})
        decoded = decode_message(message)
        assert isinstance(decoded, AwarenessUpdate)
        [client] = decode_awareness_update(decoded.data)
        assert client.client_id == node.client_id
        assert client.state == {"user": {"name": "ada 🙂"}}
        assert client.clock >= 1

        session = SyncSession(new_doc(707))
        session.receive_message(message)
        event = session.next_event()
        assert event is not None
        assert getattr(event, "data", None) == decoded.data

        ours = AwarenessClient(client_id=707, clock=1, state={"user": {"name": "grace"}})
        session.send_awareness(encode_awareness_update([ours]))
        await node.receive(session.data_to_send())
        _, states = await node.request("awareness")
        assert states["707"] == {"user": {"name": "grace"}}


def random_js_edits(rng: random.Random, state: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Edits for the node peer, valid against its current ``state`` JSON."""
    edits: list[dict[str, Any]] = []
    text_length = len(state["text"].encode("utf-16-le")) // 2  # yjs counts UTF-16 units
    array_length = len(state["array"])
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            value = rng.choice([1, "js", 2.5, None, False, [1, {"a": "b"}]])
            edits.append({"kind": "map_set", "key": f"k{rng.randrange(4)}", "value": value})
        elif kind == 1:
            edits.append(
                {"kind": "text_insert", "index": rng.randint(0, text_length), "text": "js"}
            )
            text_length += 2
        elif kind == 2 and text_length:
            edits.append({"kind": "text_delete", "index": 0, "length": 1})
            text_length -= 1
        elif kind == 3:
            edits.append(
                {
                    "kind": "array_insert",
                    "index": rng.randint(0, array_length),
                    "values": [rng.randrange(9)],
                }
            )
            array_length += 1
        elif kind == 4 and array_length:
            edits.append(
                {"kind": "array_delete", "index": rng.randrange(array_length), "length": 1}
            )
            array_length -= 1
    return edits


def random_py_edits(doc: pycrdt.Doc[Any], rng: random.Random, count: int) -> None:
    map_ = doc.get("map", type=pycrdt.Map)
    text = doc.get("text", type=pycrdt.Text)
    array = doc.get("array", type=pycrdt.Array)
    with doc.transaction():
        for _ in range(count):
            kind = rng.randrange(5)
            if kind == 0:
                map_[f"k{rng.randrange(4)}"] = rng.choice([1, "py", 2.5, None, True, ["x"]])
            elif kind == 1:
                text.insert(len(text), "py")  # pycrdt counts UTF-8 bytes: stay at the end
            elif kind == 2 and len(text):
                del text[len(text) - 1 :]
            elif kind == 3:
                array.insert(rng.randint(0, len(array)), rng.randrange(9))
            elif kind == 4 and len(array):
                del array[rng.randrange(len(array))]


async def test_random_concurrent_rounds_converge() -> None:
    rng = random.Random(2024)
    doc = new_doc(808)
    session = SyncSession(doc)
    local = LocalUpdates(doc, session)
    async with open_peer(909) as node:
        session.start()
        started, _ = await node.request("start")
        await exchange(session, local, node, started)
        for _ in range(20):
            js_state = await node.state()
            node_updates = await node.edit(
                *random_js_edits(rng, js_state["json"], rng.randint(1, 6))
            )
            random_py_edits(doc, rng, rng.randint(1, 6))
            await exchange(session, local, node, node_updates)
            assert (await node.state())["json"] == contents(doc)
