"""crdtswarm Swarm nodes through hostile networks: NATs, blocked UDP, a cut, a dead server.

Each node is a swarm_app.py process (a real `crdtswarm.Swarm` over `WebRTCTransport`)
in the host namespace of its own NAT site (see conftest.py and topology.py); the
`signaling` fixture runs crdtswarm's `SignalingServer` in the public namespace, next
to coturn. test_nat.py shows the same networks with raw aiortc; here the whole stack
runs: sealed signals through the server or the swarm, ICE, the Noise handshake, the
mux and its keepalive, the directory, the mesh and document replication.

Figures (connect, detection and reconnection times) are printed: run with ``-s``.
"""

from __future__ import annotations

import time

import anyio

CONNECT = 20.0  # seconds a call that should work may take (0.2 to 3; 10.6 with UDP blocked)
CROSS = 10.0  # seconds a doc edit may take to reach a linked node
KEEPALIVE = (1.0, 5.0)  # SwarmConfig.keepalive_interval, peer_timeout
FAST_MESH = {"tick_interval": 0.5, "retry_interval": 0.5, "max_retry_interval": 2.0}
A_TCP_PORT = 4242  # node a's TcpTransport in test (e), port-forwarded by a's NAT


def key(node) -> str:
    return node.seen("ready")[0]["key"]


async def call(caller, callee, address: str | None = None, timeout: float = CONNECT):
    """``caller`` calls ``callee`` by key (at ``address`` if given).

    Returns ``caller``'s call_ok and ``callee``'s peer_connected reports.
    """
    await caller.command("call", key=key(callee), address=address, timeout=timeout)
    ok = await caller.expect("call_ok", timeout + 5, fail_on=("call_failed",), peer=key(callee))
    await caller.expect("peer_connected", 5, peer=key(callee))
    other = await callee.expect("peer_connected", 10, peer=key(caller))
    print(f"{caller.name} -> {callee.name}: linked in {ok['elapsed_ms']} ms over "
          f"{ok['transport']} {ok.get('candidate_types')}")  # fmt: skip
    return ok, other


async def assert_doc_crosses(writer, readers, field: str, value: str) -> float:
    """``writer`` sets ``field`` in doc "notes"; every reader must see it. Returns seconds."""
    start = time.monotonic()
    await writer.command("set", doc="notes", key=field, value=value)
    latest = start
    for reader in readers:
        event = await reader.expect("doc_changed", CROSS, doc="notes", changes={field: value})
        latest = max(latest, event["mono"])
    return latest - start


async def expect_after(node, event: str, since: float, timeout: float, **match):
    """The first ``event`` (matching ``match``) that ``node`` reported after ``since``."""
    with anyio.fail_after(timeout):
        while True:
            report = await node.expect(event, timeout, **match)
            if report["mono"] > since:
                return report


def assert_direct(report, me, other) -> None:
    """A WebRTC link from ``me``'s host straight to ``other``'s NAT, no relay."""
    assert report["transport"] == "webrtc"
    assert report["candidate_type"] in ("srflx", "prflx")
    assert "relay" not in report["candidate_types"]
    assert report["local"] == {**report["local"], "type": "host", "ip": me.host_ip}
    assert report["remote"]["ip"] == other.wan_ip


async def test_port_preserving_nats_link_directly_through_stun(internet, site, signaling, nodes):
    a_site, b_site = site("a", "port-preserving"), site("b", "port-preserving")
    ice = internet.ice_servers("stun")  # STUN only: see test_nat.py on TURN racing
    a = await nodes.spawn_swarm(a_site, "a", ice, signaling=(signaling.url,))
    b = await nodes.spawn_swarm(b_site, "b", ice, signaling=(signaling.url,))
    await nodes.ready()

    on_b, on_a = await call(b, a)  # by key: offer and answer through the signaling server

    assert_direct(on_b, b_site, a_site)
    assert_direct(on_a, a_site, b_site)
    assert (on_b["initiator"], on_a["initiator"]) == (True, False)
    assert on_b["remote_address"] == f"webrtc://{key(a)}"
    # the NAT preserved the port: b's srflx candidate is its host port on its NAT's address
    offer = await b.expect("gathered", 5, peer=key(a), role="offerer")
    host = [c for c in offer["candidates"] if c["type"] == "host"]
    srflx = [c for c in offer["candidates"] if c["type"] == "srflx"]
    assert [(c["ip"], c["port"]) for c in srflx] == [(b_site.wan_ip, host[0]["port"])]
    crossed = await assert_doc_crosses(a, [b], "from-a", "hello b")
    back = await assert_doc_crosses(b, [a], "from-b", "hello a")
    print(f"doc edits crossed in {crossed * 1000:.0f} ms and {back * 1000:.0f} ms")


async def test_symmetric_nats_link_through_turn_over_udp(internet, site, signaling, nodes):
    a_site, b_site = site("a", "symmetric"), site("b", "symmetric")
    ice = internet.ice_servers("stun", "turn-udp")
    a = await nodes.spawn_swarm(a_site, "a", ice, signaling=(signaling.url,))
    b = await nodes.spawn_swarm(b_site, "b", ice, signaling=(signaling.url,))
    await nodes.ready()

    on_b, on_a = await call(b, a)

    for report in (on_a, on_b):
        assert report["transport"] == "webrtc"
        assert report["candidate_type"] == "relay"
    # a side may reach the other's relay from its own address (its local end is then
    # not a relay): whichever relays are used are TURN allocations over UDP
    assert {on_a["turn_transport"], on_b["turn_transport"]} <= {"udp", None}
    assert "relay" in {on_a["candidate_types"][0], on_b["candidate_types"][0]}
    await assert_doc_crosses(b, [a], "relayed", "through coturn")
    await assert_doc_crosses(a, [b], "relayed-back", "and back")


async def test_blocked_udp_links_through_turn_over_tcp(internet, site, signaling, nodes):
    """TURN over TCP when no UDP gets out.

    Slow by nature: aiortc gathers every candidate before an offer or answer leaves
    (no trickle ICE) and aioice waits 5 s for the STUN answer that never comes, once
    on each side, so the call takes about 10.6 s (CONNECT allows 20).
    """
    a_site, b_site = site("a", "port-preserving"), site("b", "port-preserving")
    a_site.block_udp()
    b_site.block_udp()
    ice = internet.ice_servers("stun", "turn-tcp")
    a = await nodes.spawn_swarm(a_site, "a", ice, signaling=(signaling.url,))
    b = await nodes.spawn_swarm(b_site, "b", ice, signaling=(signaling.url,))
    await nodes.ready()

    on_b, on_a = await call(b, a)

    for report in (on_a, on_b):
        # no UDP leaves either host: both ends are TURN relays, each reached over TCP
        assert report["transport"] == "webrtc"
        assert report["candidate_types"][0] == "relay"
        assert report["turn_transport"] == "tcp"
    await assert_doc_crosses(b, [a], "over-tcp", "through coturn")
    await assert_doc_crosses(a, [b], "over-tcp-back", "and back")


async def test_cut_peer_is_declared_dead_and_the_mesh_relinks(internet, site, signaling, nodes):
    """a's uplink dies silently; both sides notice by keepalive, and relink by themselves.

    The cut lasts until each mesh has seen a redial fail and started the next one; an
    edit made on a meanwhile must reach b on the new link (the sync on reconnection).
    """
    a_site, b_site = site("a", "port-preserving"), site("b", "port-preserving")
    ice = internet.ice_servers("stun")
    # dial_timeout: more than the 5 s aioice spends gathering when STUN does not answer
    options = {"signaling": (signaling.url,), "keepalive": KEEPALIVE, "mesh": FAST_MESH,
               "dial_timeout": 6.0}  # fmt: skip
    a = await nodes.spawn_swarm(a_site, "a", ice, **options)
    b = await nodes.spawn_swarm(b_site, "b", ice, **options)
    await nodes.ready()
    await call(b, a)
    await assert_doc_crosses(a, [b], "before", "the cut")

    a_site.cut()
    cut_at = time.monotonic()
    interval, peer_timeout = KEEPALIVE
    lost = {}
    for node, other in ((b, a), (a, b)):
        event = await node.expect("peer_disconnected", peer_timeout + 10, peer=key(other))
        lost[node.name] = event["mono"] - cut_at
        print(f"{node.name} declared {other.name} dead {lost[node.name]:.2f} s after the cut: "
              f"{event['reason']}")  # fmt: skip
        assert event["reason"] == "keepalive timeout"  # the mux's, not ICE's (30 s)
        # silence started at most one keepalive interval before the cut
        assert peer_timeout - interval - 0.5 <= lost[node.name] <= peer_timeout + interval + 1
    # an edit made on the cut-off side while the link is down
    await a.command("set", doc="notes", key="during", value="the cut")
    # keep the cut until both meshes have seen a redial fail and started the next one
    for node, other in ((a, b), (b, a)):
        failed = await node.expect("dial_failed", 20, peer=key(other))
        await expect_after(node, "dial", failed["mono"], 10, peer=key(other))
    print(f"redials failed on both sides; restored {time.monotonic() - cut_at:.2f} s after the cut")

    a_site.restore()
    restored_at = time.monotonic()
    # nobody calls: both meshes redial the member they lost (signals via the server)
    relinked = {}
    for node, other in ((a, b), (b, a)):
        event = await node.expect("peer_connected", 30, peer=key(other))
        relinked[node.name] = event["mono"] - restored_at
        assert event["transport"] == "webrtc"
        assert event["candidate_type"] in ("srflx", "prflx")  # direct again
    print(f"relinked {max(relinked.values()):.2f} s after the restore")
    await b.expect("doc_changed", CROSS, doc="notes", changes={"during": "the cut"})
    await assert_doc_crosses(b, [a], "after", "the restore")
    await assert_doc_crosses(a, [b], "after-back", "and back")
    for node in (a, b):
        await node.command("stats")
        stats = await node.expect("stats", 5)
        print(f"{node.name}: {stats['dials']} dials, {stats['duplicate_links']} duplicate links")


async def test_no_single_point_of_failure(internet, site, signaling, nodes):
    """A newcomer joins by one TCP call after the signaling server died, and meshes.

    a and b sit behind NATs and link over WebRTC through the signaling server. Then the
    server is killed. c (behind a third NAT, knowing no server at all) calls a at
    a's TCP bootstrap address: a's NAT port-forwards ``A_TCP_PORT`` to a (DNAT), the
    way a home router exposes a service. c learns b from the directory and links to b
    over WebRTC, the offer and answer carried by a (in-swarm signaling).
    """
    a_site, b_site, c_site = (site(n, "port-preserving") for n in "abc")
    a_site.forward_tcp(A_TCP_PORT)
    ice = internet.ice_servers("stun")
    a = await nodes.spawn_swarm(a_site, "a", ice, signaling=(signaling.url,),
                                tcp=f"{a_site.host_ip}:{A_TCP_PORT}", mesh=FAST_MESH)  # fmt: skip
    b = await nodes.spawn_swarm(b_site, "b", ice, signaling=(signaling.url,), mesh=FAST_MESH)
    await nodes.ready()
    on_b, _ = await call(b, a)
    assert on_b["transport"] == "webrtc"

    await signaling.kill()
    c = await nodes.spawn_swarm(c_site, "c", ice, tcp=f"{c_site.host_ip}:0", mesh=FAST_MESH)
    await nodes.ready()
    joined_at = time.monotonic()
    on_c, on_a = await call(c, a, address=f"tcp://{a_site.wan_ip}:{A_TCP_PORT}")
    assert on_c["transport"] == on_a["transport"] == "tcp"
    assert on_c["remote_address"] == f"tcp://{a_site.wan_ip}:{A_TCP_PORT}"

    # nobody calls b: c's mesh (or b's) dials by key, signals travel through a
    c_to_b = await c.expect("peer_connected", 30, peer=key(b))
    b_to_c = await b.expect("peer_connected", 10, peer=key(c))
    print(f"c linked to b {c_to_b['mono'] - joined_at:.2f} s after calling a")
    for report in (c_to_b, b_to_c):
        assert report["transport"] == "webrtc"
        assert "relay" not in report["candidate_types"]
    stats = {}
    for node in (a, b, c):
        await node.command("stats")
        stats[node.name] = (await node.expect("stats", 5))["signals"]
    print(f"signal counters: {stats}")
    assert stats["a"]["forwarded"] + sum(s["via_directory"] for s in stats.values()) >= 2
    await assert_doc_crosses(c, [a, b], "from-c", "hello all")
    await assert_doc_crosses(b, [a, c], "from-b", "hello c")
    # c's link to b is its own: cutting a leaves it up (and the doc still crosses)
    a_site.cut()
    await assert_doc_crosses(b, [c], "without-a", "still here")
    a_site.restore()
    assert not c.seen("peer_disconnected", peer=key(b))
