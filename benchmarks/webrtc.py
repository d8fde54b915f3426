"""How fast does crdtswarm set up and use WebRTC links, next to raw aiortc?

Setup: aiortc data channels, host candidates only (no STUN/TURN) for crdtswarm and
raw alike, over the machine's own interface address (aioice skips 127.0.0.1; the
kernel routes it like loopback); anyio on asyncio. Unless a row says "2 processes",
every node and raw peer connection lives in this one process and event loop: one
core does the work of both ends of every link (ICE, DTLS, SCTP; for crdtswarm also
Noise, mux, directory, signals), so join and mesh times are CPU-bound. Each raw
baseline is measured in the same run, interleaved with what it is compared to.
Nodes are started and registered on the signaling server before any clock starts.

* Raw connect: two RTCPeerConnections with one pre-negotiated data channel each (as
  crdtswarm makes them), offer and answer handed over in-process (no signaling
  server, no Noise), until both channels are open; ``k`` of them one after another
  (``seq``) and all at once (``par``, with its process CPU time).
* Join (N = 3 is the seed scenario): N - 1 nodes linked in a full mesh, idle for
  1.5 s; a newcomer calls node1 (the offer goes through the SignalingServer); time
  from that call until the newcomer has an authenticated link (in ``peers``) to all
  N - 1 others, the later ones set up through the directory and in-swarm signals.
  Baseline: the N - 1 raw connects it needs, ``seq`` and ``par``. The true floor
  lies between: the first link must be up before the newcomer learns whom else to
  dial, then up to ``max_concurrent_dials`` (4) go at once; for N = 3 it is ``seq``.
* Mesh formation: N nodes (5, 10, 20), ``MeshConfig(max_peers=max(8, N - 1))`` so
  that a full mesh is the policy's target (default 8 kept for N <= 9). Node i calls
  a random earlier node (seeded), one call after the other; time from the first call
  until every node is linked to every other. Baselines: N - 1 raw connects in turn
  (the chain of calls, ``raw N-1``) and all N(N-1)/2 at once (``raw all``). Also:
  process CPU time, and dials made by all nodes (``Swarm.statistics``; more dials
  than links means duplicate or failed dials). Whom the mesh dials is not seedable.
* Stream: ``--megabytes`` (32 MiB) in 64 KiB writes; the receiver counts bytes and
  answers one byte, which stops the clock. crdtswarm: two Swarm nodes with only
  WebRTCTransport, one ``open_stream`` (Noise ChaCha20-Poly1305, mux framing and
  flow control, over DTLS/SCTP). Raw: one data channel, 64 KiB messages, the sender
  waiting while ``bufferedAmount`` > 1 MiB until <= 256 KiB (crdtswarm's watermarks);
  with 2 processes its clock starts once the receiver said "ready" on the channel.
  CPU s/MB: process CPU time (user + system) over the transfer per MB moved; in one
  process both ends' work; with 2 processes (receiver in a child process, as
  deployed) the sender's plus the receiver's, which the child reports. Medians.
  Caveat: aiortc's SCTP bursts beyond aioice's 256 KiB UDP receive buffer, so
  datagrams are dropped even here (``udp_drops``: the kernel's UDP RcvbufErrors per
  run, whole network namespace), and a loss fast retransmit does not repair stalls
  for an SCTP retransmission timeout (>= 1 s in aiortc): single runs vary up to 2x,
  raw and crdtswarm alike; short (``--quick``) 2-process runs are dominated by it.

Run: ``python -m benchmarks.webrtc [--megabytes 32] [--runs 5] [--quick]``. Prints a
table, one JSON line per result, and writes ``benchmarks/results/webrtc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from anyio.streams.buffered import BufferedByteReceiveStream

from crdtswarm import PublicKey, Swarm, SwarmConfig
from crdtswarm.mesh import MeshConfig
from crdtswarm.signaling import SignalingServer
from crdtswarm.transport.webrtc import WebRTCConfig, WebRTCTransport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from anyio.abc import TaskGroup

    from crdtswarm import Stream

CHUNK = 64 * 1024
HIGH = WebRTCConfig().send_high_watermark
LOW = WebRTCConfig().send_low_watermark
SETTLE = 1.5  # idle seconds before a join is timed (the mesh publishes its latency rows)
RESULTS = Path(__file__).resolve().parent / "results"
Pair = tuple[RTCPeerConnection, RTCPeerConnection, RTCDataChannel, RTCDataChannel]


# -- raw aiortc ------------------------------------------------------------------------


def new_pc() -> RTCPeerConnection:
    """Host candidates only, as crdtswarm's (without iceServers aiortc asks Google STUN)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def _channel(pc: RTCPeerConnection) -> tuple[RTCDataChannel, anyio.Event]:
    """The pre-negotiated channel crdtswarm uses, and an event set when it opens."""
    channel = pc.createDataChannel("bench", negotiated=True, id=0)
    opened = anyio.Event()
    channel.on("open", opened.set)
    return channel, opened


async def raw_pair() -> Pair:
    """Two connected peer connections, offer and answer exchanged in-process."""
    a, b = new_pc(), new_pc()
    (ca, oa), (cb, ob) = _channel(a), _channel(b)
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    await oa.wait()
    await ob.wait()
    return a, b, ca, cb


async def _close(pairs: Sequence[Pair]) -> None:
    for a, b, _, _ in pairs:
        await a.close()
        await b.close()


async def bench_raw_connects(count: int, parallel: bool) -> tuple[float, float]:
    """(seconds, CPU seconds) to connect ``count`` raw pairs, in turn or all at once."""
    pairs: list[Pair] = []

    async def connect() -> None:
        pairs.append(await raw_pair())

    with anyio.fail_after(120):
        start, cpu = time.perf_counter(), time.process_time()
        if parallel:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(connect)
        else:
            for _ in range(count):
                await connect()
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
    await _close(pairs)
    return took, cpu


class RawSender:
    """Sends on a raw channel with crdtswarm's buffer watermarks."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.low = anyio.Event()
        channel.bufferedAmountLowThreshold = LOW
        channel.on("bufferedamountlow", lambda: self.low.set())

    async def send(self, data: bytes) -> None:
        if self.channel.bufferedAmount > HIGH:
            self.low = anyio.Event()
            await self.low.wait()
        self.channel.send(data)


def _counter(channel: RTCDataChannel, total: int, done: Callable[[float], None]) -> None:
    """Count what ``channel`` receives; at ``total`` answer b"k" and report CPU seconds."""
    state = {"got": 0, "cpu": 0.0}

    def on_message(message: bytes) -> None:
        if state["got"] == 0:
            state["cpu"] = time.process_time()
        state["got"] += len(message)
        if state["got"] >= total:
            channel.send(b"k")
            done(time.process_time() - state["cpu"])

    channel.on("message", on_message)


async def timed_send(
    send: Callable[[bytes], Awaitable[None]], ack: Callable[[], Awaitable[Any]], total: int
) -> tuple[float, float]:
    """Send ``total`` bytes in CHUNK writes, await the ack: (seconds, CPU seconds)."""
    chunk = random.Random(total).randbytes(CHUNK)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(0, total, CHUNK):
        await send(chunk)
    await ack()
    return time.perf_counter() - start, time.process_time() - cpu


async def bench_raw_stream(total: int) -> tuple[float, float]:
    a, b, ca, cb = await raw_pair()
    ack = anyio.Event()
    _counter(cb, total, lambda _: None)
    ca.on("message", lambda _: ack.set())
    result = await timed_send(RawSender(ca).send, ack.wait, total)
    await _close([(a, b, ca, cb)])
    return result


# -- crdtswarm -------------------------------------------------------------------------


def udp_drops() -> int:
    """UDP datagrams the kernel dropped for a full receive buffer (Linux; else 0)."""
    try:
        rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
        names, values = [row for row in rows if row[0] == "Udp:"][:2]
        return int(values[names.index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


def swarm(url: str, config: SwarmConfig | None = None) -> Swarm:
    return Swarm(transports=[WebRTCTransport()], signaling=[url], config=config)


async def registered(server: SignalingServer, count: int) -> None:
    """Wait until ``count`` nodes are registered on ``server`` (see the module docstring)."""
    for _ in range(2000):  # the server has no event for it: poll, for up to 10 s
        if server.statistics().registered >= count:
            return
        await anyio.sleep(0.005)
    raise TimeoutError(f"{count} nodes did not register on the signaling server")


class Watch:
    """Wakes the benchmark whenever a watched node emits an event (subscribed at once)."""

    def __init__(self, nodes: Sequence[Swarm], tg: TaskGroup) -> None:
        self.changed = anyio.Event()
        for node in nodes:
            tg.start_soon(self._pump, node.events())

    async def _pump(self, events: Any) -> None:
        async for _ in events:
            self.changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.changed = anyio.Event()
            with anyio.move_on_after(0.05):  # a safety net only: events wake us
                await self.changed.wait()


def full_mesh(nodes: Sequence[Swarm]) -> bool:
    keys = {node.public_key for node in nodes}
    return all(set(node.peers) >= keys - {node.public_key} for node in nodes)


async def bench_join(size: int, settle: float) -> dict[str, float]:
    """From a newcomer's call to node1 until it is linked with the N - 1 others: seconds,
    CPU seconds, dials made by all nodes."""
    async with SignalingServer(host="127.0.0.1", port=0) as server, AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(swarm(server.url)) for _ in range(size)]
        await registered(server, size)
        tg = await stack.enter_async_context(anyio.create_task_group())
        old, newcomer = nodes[:-1], nodes[-1]
        watch = Watch(nodes, tg)
        with anyio.fail_after(60):
            for node in old[1:]:
                await node.call(old[0].public_key)
            await watch.until(lambda: full_mesh(old))
            await anyio.sleep(settle)
            dials = sum(node.statistics().dials for node in nodes)
            start, cpu = time.perf_counter(), time.process_time()
            await newcomer.call(old[0].public_key)
            await watch.until(lambda: all(node.public_key in newcomer.peers for node in old))
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
        dials = sum(node.statistics().dials for node in nodes) - dials
        tg.cancel_scope.cancel()
    return {"took": took, "cpu": cpu, "dials": dials}


async def bench_mesh(size: int, seed: int) -> dict[str, float]:
    """From the first call until the full mesh: seconds, CPU seconds, dials made; and
    seconds until every call had returned."""
    rng = random.Random(seed)
    config = SwarmConfig(mesh=MeshConfig(max_peers=max(8, size - 1)))
    async with SignalingServer(host="127.0.0.1", port=0) as server, AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(swarm(server.url, config)) for _ in range(size)]
        await registered(server, size)
        tg = await stack.enter_async_context(anyio.create_task_group())
        watch = Watch(nodes, tg)
        with anyio.fail_after(300):
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(1, size):
                await nodes[i].call(nodes[rng.randrange(i)].public_key)
            calls = time.perf_counter() - start
            await watch.until(lambda: full_mesh(nodes))
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
        dials = sum(node.statistics().dials for node in nodes)
        tg.cancel_scope.cancel()
    return {"took": took, "cpu": cpu, "dials": dials, "calls": calls}


def _sink(total: int, done: Callable[[float], None]) -> Any:
    async def sink(stream: Stream, remote: PublicKey) -> None:
        got = len(await stream.receive(1 << 20))
        cpu = time.process_time()
        while got < total:
            got += len(await stream.receive(1 << 20))
        await stream.send(b"k")
        done(time.process_time() - cpu)

    return sink


async def bench_swarm_stream(total: int) -> tuple[float, float]:
    async with (
        SignalingServer(host="127.0.0.1", port=0) as server,
        swarm(server.url) as a,
        swarm(server.url) as b,
    ):
        b.handle("sink", _sink(total, lambda _: None))
        await registered(server, 2)
        await a.call(b.public_key)
        stream = await a.open_stream(b.public_key, "sink")
        result = await timed_send(stream.send, stream.receive, total)
        await stream.aclose()
    return result


# -- two processes ---------------------------------------------------------------------


def _print(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _serve(kind: str, total: int, url: str | None) -> None:
    """Child process: receive ``total`` bytes, ack, report CPU, exit when stdin closes."""
    done = anyio.Event()
    cpu: list[float] = []

    def finished(seconds: float) -> None:
        cpu.append(seconds)
        done.set()

    if kind == "raw":
        offer = json.loads(await anyio.to_thread.run_sync(sys.stdin.readline))
        pc = new_pc()
        channel, _ = _channel(pc)
        channel.on("open", lambda: channel.send(b"r"))  # ready: the link is warm both ways
        _counter(channel, total, finished)
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        _print(sdp=pc.localDescription.sdp)
        await done.wait()
        _print(cpu=cpu[0])
        await anyio.to_thread.run_sync(sys.stdin.read)
        await pc.close()
        return
    assert url is not None
    async with swarm(url) as node:
        node.handle("sink", _sink(total, finished))
        _print(key=str(node.public_key))
        await done.wait()
        _print(cpu=cpu[0])
        await anyio.to_thread.run_sync(sys.stdin.read)


async def bench_two_process(kind: str, total: int) -> tuple[float, float]:
    """(seconds, sender + receiver CPU seconds) with the receiver in a child process."""
    command = [sys.executable, "-m", "benchmarks.webrtc", "--serve", kind, "--total", str(total)]
    async with SignalingServer(host="127.0.0.1", port=0) as server, AsyncExitStack() as stack:
        if kind == "crdtswarm":
            command += ["--signaling", server.url]
        process = await stack.enter_async_context(
            await anyio.open_process(command, stdin=subprocess.PIPE, stderr=None)
        )
        assert process.stdin is not None
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)

        async def read() -> dict[str, Any]:
            return json.loads(await lines.receive_until(b"\n", 1 << 20))

        # after a failure: the child would wait for us
        stack.callback(lambda: process.returncode is None and process.kill())
        with anyio.fail_after(120):
            if kind == "raw":
                pc = new_pc()
                channel, _ = _channel(pc)
                ready, ack = anyio.Event(), anyio.Event()
                channel.on("message", lambda _: ack.set() if ready.is_set() else ready.set())
                await pc.setLocalDescription(await pc.createOffer())
                await process.stdin.send(
                    json.dumps({"sdp": pc.localDescription.sdp}).encode() + b"\n"
                )
                answer = await read()
                await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
                await ready.wait()
                took, cpu = await timed_send(RawSender(channel).send, ack.wait, total)
                await process.stdin.aclose()
                child_cpu = (await read())["cpu"]
                await pc.close()
            else:
                key = PublicKey.parse((await read())["key"])
                await registered(server, 1)
                async with swarm(server.url) as node:
                    await node.call(key)
                    stream = await node.open_stream(key, "sink")
                    took, cpu = await timed_send(stream.send, stream.receive, total)
                    await process.stdin.aclose()
                    child_cpu = (await read())["cpu"]
            await process.wait()
    return took, cpu + child_cpu


# -- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=32, help="MiB moved per stream run")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--serve", choices=["raw", "crdtswarm"], help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--signaling", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(_serve, args.serve, args.total, args.signaling)
        return
    total = (2 if args.quick else args.megabytes) * 1024 * 1024
    runs = 1 if args.quick else args.runs
    join_sizes = [3] if args.quick else [3, 5, 9]
    mesh_sizes = [5] if args.quick else [5, 10, 20]
    settle = 0.2 if args.quick else SETTLE

    results: list[dict[str, Any]] = []

    def record(name: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
        row = {"name": name, "value": round(value, 3), "unit": unit, **extra}
        results.append(row)
        print(json.dumps(row), flush=True)
        return row

    def ms(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    setups = []
    for kind, size in [("join", n) for n in join_sizes] + [("mesh", n) for n in mesh_sizes]:
        links = size - 1 if kind == "join" else size * (size - 1) // 2
        seq, par, ours = [], [], []
        for run in range(runs):  # interleaved so that machine noise hits all alike
            seq.append(anyio.run(bench_raw_connects, size - 1, False))
            par.append(anyio.run(bench_raw_connects, links, True))
            if kind == "join":
                ours.append(anyio.run(bench_join, size, settle))
            else:
                ours.append(anyio.run(bench_mesh, size, args.seed + run))
        seq_ms, par_ms, par_cpu = (
            ms([t for t, _ in seq]),
            ms([t for t, _ in par]),
            ms([c for _, c in par]),
        )
        base = {"baseline_for": f"{kind} N={size}", "runs": runs}
        record("raw_connect_seq", seq_ms, "ms", links=size - 1, **base)
        record("raw_connect_par", par_ms, "ms", links=links, cpu_ms=round(par_cpu, 3), **base)
        took = ms([o["took"] for o in ours])
        row = record(
            f"crdtswarm_{kind}",
            took,
            "ms",
            n=size,
            links=links,
            runs=runs,
            max_peers=max(8, size - 1) if kind == "mesh" else 8,
            cpu_ms=round(ms([o["cpu"] for o in ours]), 3),
            dials=statistics.median(o["dials"] for o in ours),
            ratio_vs_raw_seq=round(took / seq_ms, 3),
            ratio_vs_raw_par=round(took / par_ms, 3),
            **({"calls_ms": round(ms([o["calls"] for o in ours]), 3)} if kind == "mesh" else {}),
        )
        setups.append((kind, row, seq_ms, par_ms, par_cpu))

    streams = []
    for label, processes in (("1 process", 1), ("2 processes", 2)):
        samples: dict[str, list[tuple[float, float, int]]] = {"raw": [], "crdtswarm": []}
        for _ in range(runs):  # interleaved
            for kind, bench in (("raw", bench_raw_stream), ("crdtswarm", bench_swarm_stream)):
                drops = udp_drops()
                if processes == 1:
                    took, cpu = anyio.run(bench, total)
                else:
                    took, cpu = anyio.run(bench_two_process, kind, total)
                samples[kind].append((took, cpu, udp_drops() - drops))
        figures = {}
        for kind, runs_ in samples.items():
            rate = statistics.median(total / took / 1e6 for took, _, _ in runs_)
            figures[kind] = rate, statistics.median(cpu / (total / 1e6) for _, cpu, _ in runs_)
            record(
                f"{kind}_webrtc_stream_{processes}proc",
                rate,
                "MB/s",
                cpu_s_per_mb=round(figures[kind][1], 5),
                runs=[round(total / took / 1e6, 2) for took, _, _ in runs_],
                udp_drops=[drops for _, _, drops in runs_],
                **({} if kind == "raw" else {"ratio_vs_raw": round(rate / figures["raw"][0], 3)}),
            )
        streams.append((label, figures["crdtswarm"], figures["raw"]))

    print()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"webrtc: aiortc {version('aiortc')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load {load}), host candidates, one process unless noted, "
        f"median of {runs} run(s)"
    )
    heads = {"join": ("raw seq", "raw par"), "mesh": ("raw N-1", "raw all")}
    last = None
    for kind, row, seq_ms, par_ms, par_cpu in setups:
        if kind != last:
            last, (seq_head, par_head) = kind, heads[kind]
            print(f"{kind + ' ms':<22}{'crdtswarm':>12}{seq_head:>10}{'ratio':>7}", end="")
            print(f"{par_head:>10}{'ratio':>7}  CPU ms (raw par), dials")
        value, label = row["value"], f"N={row['n']} ({row['links']} links)"
        print(
            f"{label:<22}{value:>12.1f}{seq_ms:>10.1f}{value / seq_ms:>7.2f}{par_ms:>10.1f}"
            f"{value / par_ms:>7.2f}  {row['cpu_ms']:.0f} ({par_cpu:.0f}), {row['dials']:.0f}"
            + (f"; calls done at {row['calls_ms']:.0f} ms" if kind == "mesh" else "")
        )
    print(f"{f'stream {total >> 20} MiB':<22}{'crdtswarm':>12}{'raw':>10}{'ratio':>7}")
    for label, (rate, cpu), (raw_rate, raw_cpu) in streams:
        print(f"{'MB/s, ' + label:<22}{rate:>12.1f}{raw_rate:>10.1f}{rate / raw_rate:>7.2f}")
        print(f"{'CPU s/MB, ' + label:<22}{cpu:>12.4f}{raw_cpu:>10.4f}{cpu / raw_cpu:>7.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "webrtc.json"
    machine = {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    out.write_text(
        json.dumps({"benchmark": "webrtc", "machine": machine, "results": results}, indent=2)
    )
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
