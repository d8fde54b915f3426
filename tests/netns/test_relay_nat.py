"""Two nodes that cannot link directly reach each other through a relay node of the swarm.

a and b each sit behind an address-and-port-dependent NAT (``symmetric``:
``MASQUERADE --random-fully``) with STUN only and no TURN server: as test_nat.py shows
with raw aiortc, no direct WebRTC link can form between them. r sits behind a
port-preserving NAT that forwards ``R_TCP_PORT`` to it (as a home router exposes a
service), so both reach r over TCP at its public address ``tcp://<r's wan>:R_TCP_PORT``.
(WebRTC to r would not do: a symmetric NAT's fresh port is filtered by r's NAT too.)

Then a's direct WebRTC call to b fails (the offer and answer cross through the
signaling server; ICE finds no pair), and a's call by key gets a relayed link
``relay://<r>/<b>`` through r instead (`crdtswarm.relay`): an application stream, and
doc edits, cross it both ways, end to end encrypted, r only copying ciphertext.

Figures are printed: run with ``-s``.
"""

from __future__ import annotations

import time

R_TCP_PORT = 4343  # r's TcpTransport, port-forwarded by r's NAT
CONNECT_TIMEOUT = 4.0  # WebRTCConfig.connect_timeout: the doomed direct dials give up fast
DIAL_TIMEOUT = 5.0  # SwarmConfig.dial_timeout (the mesh's direct dials)
CALL = 20.0  # seconds a call that should work may take
# The relayed call waits first for the mesh's direct dials to b then under way (a call
# shares a pending dial to the same node): webrtc://b (CONNECT_TIMEOUT), b's private
# tcp:// address (DIAL_TIMEOUT), b by key (CONNECT_TIMEOUT), about 10 s seen, 13 s at most.
RELAYED_CALL = 30.0
CROSS = 10.0  # seconds a doc edit may take to reach another node


def key(node) -> str:
    return node.seen("ready")[0]["key"]


async def linked(caller, callee, address: str | None, timeout: float = CALL):
    """``caller`` calls ``callee`` (at ``address``); returns both sides' link reports."""
    await caller.command("call", key=key(callee), address=address, timeout=timeout)
    ok = await caller.expect("call_ok", timeout + 5, fail_on=("call_failed",), peer=key(callee))
    other = await callee.expect("peer_connected", 10, peer=key(caller))
    print(f"{caller.name} -> {callee.name}: linked in {ok['elapsed_ms']} ms over "
          f"{ok['transport']} at {ok['remote_address'][:20]}...")  # fmt: skip
    return ok, other


async def doc_crosses(writer, readers, field: str, value: str) -> float:
    """``writer`` sets ``field`` in doc "notes"; every reader must see it. Returns seconds."""
    start = time.monotonic()
    await writer.command("set", doc="notes", key=field, value=value)
    latest = start
    for reader in readers:
        event = await reader.expect("doc_changed", CROSS, doc="notes", changes={field: value})
        latest = max(latest, event["mono"])
    return latest - start


async def echo(sender, receiver, data: str) -> dict:
    """``sender`` opens an echo stream to ``receiver`` by key; returns sender's echo_ok."""
    await sender.command("echo", key=key(receiver), data=data, timeout=CALL)
    ok = await sender.expect("echo_ok", CALL + 5, fail_on=("echo_failed",), peer=key(receiver))
    assert ok["data"] == data
    await receiver.expect("echoed", 5, peer=key(sender), bytes=len(data.encode()))
    print(f"{sender.name} -> {receiver.name}: echo in {ok['elapsed_ms']} ms over {ok['transport']}")
    return ok


async def test_symmetric_nats_without_turn_reach_each_other_through_a_relay(
    internet, site, signaling, nodes
):
    started = time.monotonic()
    a_site, b_site = site("a", "symmetric"), site("b", "symmetric")
    r_site = site("r", "port-preserving")
    r_site.forward_tcp(R_TCP_PORT)
    r_address = f"tcp://{r_site.wan_ip}:{R_TCP_PORT}"
    ice = internet.ice_servers("stun")  # STUN only: no TURN server anywhere
    timeouts = {"dial_timeout": DIAL_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
    r = await nodes.spawn_swarm(r_site, "r", ice, tcp=f"{r_site.host_ip}:{R_TCP_PORT}", **timeouts)
    a = await nodes.spawn_swarm(a_site, "a", ice, signaling=(signaling.url,),
                                tcp=f"{a_site.host_ip}:0", **timeouts)  # fmt: skip
    b = await nodes.spawn_swarm(b_site, "b", ice, signaling=(signaling.url,),
                                tcp=f"{b_site.host_ip}:0", **timeouts)  # fmt: skip
    await nodes.ready()

    # a and b each link to r, over TCP at r's public (port-forwarded) address
    for node in (a, b):
        on_node, on_r = await linked(node, r, r_address)
        assert on_node["transport"] == on_r["transport"] == "tcp"
        assert on_node["remote_address"] == r_address

    # a direct WebRTC link between a and b cannot form: the offer and answer cross
    # (through the signaling server), but no ICE pair gets through both NATs
    direct = f"webrtc://{key(b)}"
    await a.command("call", key=key(b), address=direct, timeout=CALL)
    failed = await a.expect("call_failed", CALL + 5, fail_on=("call_ok",), peer=key(b))
    print(f"a -> b direct: failed after {failed['elapsed_ms']} ms: {failed['reason']}")
    assert "timed out" in failed["reason"]
    assert a.seen("gathered", peer=key(b), role="offerer")
    assert b.seen("gathered", peer=key(a), role="answerer")

    # a calls b by key: the relayed link through r
    on_a, on_b = await linked(a, b, None, RELAYED_CALL)
    assert on_a["transport"] == on_b["transport"] == "relay"
    assert on_a["remote_address"] == f"relay://{key(r)}/{key(b)}"
    assert on_b["remote_address"] == f"relay://{key(r)}/{key(a)}"

    # an application stream crosses it both ways, and so do doc edits
    for sender, receiver in ((a, b), (b, a)):
        ok = await echo(sender, receiver, f"hello {receiver.name}, from {sender.name}")
        assert ok["transport"] == "relay"
        assert ok["remote_address"] == f"relay://{key(r)}/{key(receiver)}"
    crossed = await doc_crosses(a, [b, r], "from-a", "hello b")
    back = await doc_crosses(b, [a, r], "from-b", "hello a")
    print(f"doc edits crossed in {crossed * 1000:.0f} ms and {back * 1000:.0f} ms")

    # r relayed the circuit (ciphertext); a and b never got a direct link
    await r.command("stats")
    relay = (await r.expect("stats", 5))["relay"]
    print(f"r relayed: {relay}")
    assert relay["circuits_opened"] >= 1
    assert relay["bytes_relayed"] > 0
    for node, other in ((a, b), (b, a)):
        assert all(e["transport"] == "relay" for e in node.seen("peer_connected", peer=key(other)))
        assert not node.seen("peer_disconnected", peer=key(other))
    print(f"test took {time.monotonic() - started:.1f} s")
