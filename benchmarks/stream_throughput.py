"""How fast is one crdtswarm stream over TCP, next to a raw TCP socket?

Setup: two processes' worth of work in ONE process and event loop (anyio on
asyncio), loopback TCP, 64 KiB application writes. Measured in the same run:

* sans-IO cores without I/O: Noise transport encrypt+decrypt, mux session
  send_data -> data_to_send -> receive_message -> consume;
* raw TCP: an anyio SocketStream pair moving the same bytes (the baseline);
* crdtswarm: one application stream between two Swarm nodes over TcpTransport
  (Noise XX + ChaCha20-Poly1305, mux framing, flow control);
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
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

from crdtswarm import PublicKey, Stream, Swarm
from crdtswarm.identity import Identity
from crdtswarm.protocol.handshake import HandshakeSession
from crdtswarm.protocol.mux import DataReceived, MuxSession
from crdtswarm.transport.tcp import TcpTransport

CHUNK = 64 * 1024
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
        chunk = os.urandom(CHUNK)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            await client.send(chunk)
            sent += len(chunk)
        await client.receive(1)
        elapsed = time.perf_counter() - start
        await done.wait()
        await client.aclose()
        tg.cancel_scope.cancel()
    return total / elapsed / 1e6


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
        chunk = os.urandom(CHUNK)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            await stream.send(chunk)
            sent += len(chunk)
        await stream.receive(1)
        elapsed = time.perf_counter() - start
        await stream.aclose()
    return total / elapsed / 1e6


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
    async with Swarm(transports=[TcpTransport()]) as hub:
        nodes = [Swarm(transports=[TcpTransport()]) for _ in range(count)]
        async with anyio.create_task_group() as tg:
            entered = []
            for node in nodes:
                entered.append(await node.__aenter__())
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for node in entered:
                peer = await node.call(hub.public_key, hub.addresses[0])
                await peer.ping()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            for node in reversed(entered):
                await node.__aexit__(None, None, None)
            tg.cancel_scope.cancel()
    return (after - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=128, help="bytes moved per run (MB)")
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput figure")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
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
    raw = [anyio.run(bench_raw_tcp, total) for _ in range(runs)]
    ours = [anyio.run(bench_crdtswarm, total) for _ in range(runs)]
    raw_mb, ours_mb = statistics.median(raw), statistics.median(ours)
    record("raw_tcp_stream", raw_mb, "MB/s", runs=raw)
    record("crdtswarm_tcp_stream", ours_mb, "MB/s", runs=ours, ratio_vs_raw=ours_mb / raw_mb)
    swarm_hs, tcp_hs = anyio.run(bench_handshakes, handshakes)
    record("raw_tcp_connect", statistics.median(tcp_hs) * 1000, "ms", samples=len(tcp_hs))
    record("crdtswarm_call", statistics.median(swarm_hs) * 1000, "ms", samples=len(swarm_hs))
    per_peer = anyio.run(bench_idle_memory, idle)
    record("memory_per_idle_link", per_peer / 1024, "KiB", peers=idle, note="both ends")

    print()
    print(f"stream_throughput: {total / 2**20:.0f} MiB per run, median of {runs} run(s),")
    print(f"64 KiB writes, loopback TCP, Python {platform.python_version()}")
    print(f"{'measure':<28}{'crdtswarm':>14}{'baseline':>14}{'ratio':>8}")
    print(f"{'stream MB/s':<28}{ours_mb:>14.0f}{raw_mb:>14.0f}{ours_mb / raw_mb:>8.2f}")
    hs, tc = statistics.median(swarm_hs) * 1000, statistics.median(tcp_hs) * 1000
    print(f"{'connect ms (call vs TCP)':<28}{hs:>14.2f}{tc:>14.2f}{hs / tc:>8.1f}")
    print(f"{'noise enc+dec MB/s (core)':<28}{results[0]['value']:>14.0f}")
    print(f"{'mux session MB/s (core)':<28}{results[1]['value']:>14.0f}")
    print(f"{'memory per idle link KiB':<28}{per_peer / 1024:>14.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "stream_throughput.json"
    out.write_text(json.dumps({"benchmark": "stream_throughput", "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
