"""How fast is one crdtswarm stream over TCP, next to a raw TCP socket?

Setup: loopback TCP, 64 KiB application writes, anyio on asyncio. Measured in
the same run:

* sans-IO cores without I/O: Noise transport encrypt+decrypt, mux session
  send_data -> data_to_send -> receive_message -> consume;
* raw TCP: an anyio SocketStream pair moving the same bytes (the baseline);
* crdtswarm: one application stream between two Swarm nodes over TcpTransport
  (Noise XX + ChaCha20-Poly1305, mux framing, flow control).
  Both throughputs are measured twice: with the receiver in a second process (two
  nodes, two processes, as deployed: each side's CPU work runs on its own core) and
  with both ends in one process and one event loop (one core does everything);
* handshake: time of Swarm.call() to a fresh node (TCP connect + Noise XX +
  ready) next to a raw TCP connect;
* memory per idle connected peer: tracemalloc growth per link while one hub
  node holds links to N idle nodes (both ends live in this process).

Run: ``python -m benchmarks.stream_throughput [--megabytes 64] [--quick]``.
Prints a table, one JSON line per result, and writes
``benchmarks/results/stream_throughput.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

from crdtswarm import PublicKey, Stream, Swarm, SwarmConfig
from crdtswarm.identity import Identity
from crdtswarm.protocol.handshake import HandshakeSession
from crdtswarm.protocol.mux import DataReceived, MuxSession
from crdtswarm.transport.tcp import TcpTransport

CHUNK = 64 * 1024
IDLE = SwarmConfig(auto_mesh=False)
RESULTS = Path(__file__).resolve().parent / "results"


def bench_noise(total: int) -> float:
    a, b = Identity.generate(), Identity.generate()
    init = HandshakeSession(a, initiator=True)
    resp = HandshakeSession(b, initiator=False)
    while not (init.is_complete and resp.is_complete):
        for m in init.data_to_send():
            resp.receive_message(m)
        for m in resp.data_to_send():
            init.receive_message(m)
    tx, rx = init.transport(), resp.transport()
    chunk = os.urandom(tx.MAX_PLAINTEXT_SIZE)
    start = time.perf_counter()
    moved = 0
    while moved < total:
        rx.decrypt(tx.encrypt(chunk))
        moved += len(chunk)
    return moved / (time.perf_counter() - start) / 1e6


def bench_mux(total: int) -> float:
    a = MuxSession(is_initiator=True)
    b = MuxSession(is_initiator=False)
    sid = a.open_stream("bench")
    chunk = os.urandom(CHUNK)
    moved = 0
    start = time.perf_counter()
    while moved < total:
        sent = a.send_data(sid, chunk)
        for message in a.data_to_send(0.0):
            b.receive_message(message, 0.0)
        while (event := b.next_event()) is not None:
            if isinstance(event, DataReceived):
                b.consume(event.stream_id, len(event.data))
                moved += len(event.data)
        for message in b.data_to_send(0.0):
            a.receive_message(message, 0.0)
        while a.next_event() is not None:
            pass
        if sent == 0 and moved >= total:
            break
    return moved / (time.perf_counter() - start) / 1e6


async def _timed_send(stream: anyio.abc.ByteStream, total: int) -> float:
    """Send ``total`` bytes in CHUNK writes, wait for the receiver's 1-byte ack; MB/s."""
    chunk = os.urandom(CHUNK)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        await stream.send(chunk)
        sent += len(chunk)
    await stream.receive(1)
    return total / (time.perf_counter() - start) / 1e6


async def bench_raw_tcp(total: int) -> float:
    done = anyio.Event()
    received = 0
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        nonlocal received
        async with stream:
            while received < total:
                received += len(await stream.receive(256 * 1024))
            await stream.send(b"k")
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        client = await anyio.connect_tcp("127.0.0.1", port)
        rate = await _timed_send(client, total)
        await done.wait()
        await client.aclose()
        tg.cancel_scope.cancel()
    return rate


async def bench_crdtswarm(total: int) -> float:
    async def sink(stream: Stream, remote: PublicKey) -> None:
        got = 0
        while got < total:
            got += len(await stream.receive(256 * 1024))
        await stream.send(b"k")

    async with (
        Swarm(transports=[TcpTransport()]) as a,
        Swarm(transports=[TcpTransport()]) as b,
    ):
        b.handle("sink", sink)
        await a.call(b.public_key, b.addresses[0])
        stream = await a.open_stream(b.public_key, "sink")
        rate = await _timed_send(stream, total)
        await stream.aclose()
    return rate


async def _serve_receiver(kind: str, total: int) -> None:
    """Child process: receive ``total`` bytes (raw socket or crdtswarm stream), ack."""
    done = anyio.Event()
    if kind == "raw":

        async def serve(stream: anyio.abc.SocketStream) -> None:
            got = 0
            async with stream:
                while got < total:
                    got += len(await stream.receive(256 * 1024))
                await stream.send(b"k")
            done.set()

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(json.dumps({"address": f"127.0.0.1:{port}"}), flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            await done.wait()
            tg.cancel_scope.cancel()
        return

    async def sink(stream: Stream, remote: PublicKey) -> None:
        got = 0
        while got < total:
            got += len(await stream.receive(1 << 20))
        await stream.send(b"k")
        done.set()

    async with Swarm(transports=[TcpTransport()]) as node:
        node.handle("sink", sink)
        print(json.dumps({"address": node.addresses[0], "key": str(node.public_key)}), flush=True)
        await done.wait()


async def bench_two_process(kind: str, total: int) -> float:
    """Send ``total`` bytes to a receiver in a child process; MB/s."""
    command = [sys.executable, "-m", "benchmarks.stream_throughput", "--serve", kind]
    command += ["--total", str(total)]
    process = await anyio.open_process(command, stderr=subprocess.STDOUT)
    async with process:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive(1)
        info = json.loads(line)
        if kind == "raw":
            host, port = info["address"].rsplit(":", 1)
            sock = await anyio.connect_tcp(host, int(port))
            rate = await _timed_send(sock, total)
            await sock.aclose()
        else:
            key = PublicKey.parse(info["key"])
            async with Swarm(transports=[TcpTransport()]) as node:
                await node.call(key, info["address"])
                rate = await _timed_send(await node.open_stream(key, "sink"), total)
        await process.wait()
    return rate


async def bench_handshakes(count: int) -> tuple[list[float], list[float]]:
    swarm_times: list[float] = []
    tcp_times: list[float] = []
    async with Swarm(transports=[TcpTransport()]) as hub:
        host, port = hub.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        for _ in range(count):
            start = time.perf_counter()
            sock = await anyio.connect_tcp(host, int(port))
            tcp_times.append(time.perf_counter() - start)
            await sock.aclose()
            async with Swarm(transports=[TcpTransport()]) as node:
                start = time.perf_counter()
                await node.call(hub.public_key, hub.addresses[0])
                swarm_times.append(time.perf_counter() - start)
    return swarm_times, tcp_times


async def bench_idle_memory(count: int) -> float:
    """Bytes allocated per idle link (both ends live in this process).

    The nodes do not mesh among themselves (auto_mesh=False): each has exactly one
    link, to the hub. Each still holds the replicated directory, which grows with
    the number of members, so this is the cost of one more member-with-a-link.
    """
    async with Swarm(transports=[TcpTransport()], config=IDLE) as hub:
        nodes = [Swarm(transports=[TcpTransport()], config=IDLE) for _ in range(count)]
        for node in nodes:
            await node.__aenter__()
        try:
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for node in nodes:
                peer = await node.call(hub.public_key, hub.addresses[0])
                await peer.ping()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        finally:
            for node in reversed(nodes):
                await node.__aexit__(None, None, None)
    return (after - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=128, help="bytes moved per run (MB)")
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput figure")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--serve", choices=["raw", "swarm"], help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(_serve_receiver, args.serve, args.total)
        return
    total = (4 if args.quick else args.megabytes) * 1024 * 1024
    runs = 1 if args.quick else args.runs
    handshakes = 5 if args.quick else 50
    idle = 5 if args.quick else 50

    results: list[dict[str, Any]] = []

    def record(name: str, value: float, unit: str, **extra: Any) -> None:
        row = {"name": name, "value": round(value, 3), "unit": unit, **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    record("noise_encrypt_decrypt", bench_noise(total), "MB/s", layer="sans-io")
    record("mux_session", bench_mux(total), "MB/s", layer="sans-io")
    raw2, ours2 = [], []
    for _ in range(runs):  # interleaved so that machine noise hits both alike
        raw2.append(anyio.run(bench_two_process, "raw", total))
        ours2.append(anyio.run(bench_two_process, "swarm", total))
    raw2_mb, ours2_mb = statistics.median(raw2), statistics.median(ours2)
    record("raw_tcp_stream_2proc", raw2_mb, "MB/s", runs=raw2)
    record(
        "crdtswarm_tcp_stream_2proc", ours2_mb, "MB/s", runs=ours2, ratio_vs_raw=ours2_mb / raw2_mb
    )
    raw, ours = [], []
    for _ in range(runs):
        raw.append(anyio.run(bench_raw_tcp, total))
        ours.append(anyio.run(bench_crdtswarm, total))
    raw_mb, ours_mb = statistics.median(raw), statistics.median(ours)
    record("raw_tcp_stream_1proc", raw_mb, "MB/s", runs=raw)
    record("crdtswarm_tcp_stream_1proc", ours_mb, "MB/s", runs=ours, ratio_vs_raw=ours_mb / raw_mb)
    swarm_hs, tcp_hs = anyio.run(bench_handshakes, handshakes)
    record("raw_tcp_connect", statistics.median(tcp_hs) * 1000, "ms", samples=len(tcp_hs))
    record("crdtswarm_call", statistics.median(swarm_hs) * 1000, "ms", samples=len(swarm_hs))
    per_peer = anyio.run(bench_idle_memory, idle)
    record("memory_per_idle_link", per_peer / 1024, "KiB", peers=idle, note="both ends")

    print()
    print(f"stream_throughput: {total / 2**20:.0f} MiB per run, median of {runs} run(s),")
    print(f"64 KiB writes, loopback TCP, Python {platform.python_version()}")

    def row(label: str, ours: float, base: float, digits: int = 0) -> None:
        print(f"{label:<28}{ours:>14.{digits}f}{base:>14.{digits}f}{ours / base:>8.2f}")

    print(f"{'measure':<28}{'crdtswarm':>14}{'baseline':>14}{'ratio':>8}")
    row("stream MB/s, 2 processes", ours2_mb, raw2_mb)
    row("stream MB/s, 1 process", ours_mb, raw_mb)
    hs, tc = statistics.median(swarm_hs) * 1000, statistics.median(tcp_hs) * 1000
    row("connect ms (call vs TCP)", hs, tc, 2)
    print(f"{'noise enc+dec MB/s (core)':<28}{results[0]['value']:>14.0f}")
    print(f"{'mux session MB/s (core)':<28}{results[1]['value']:>14.0f}")
    print(f"{'memory per idle link KiB':<28}{per_peer / 1024:>14.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "stream_throughput.json"
    out.write_text(json.dumps({"benchmark": "stream_throughput", "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
