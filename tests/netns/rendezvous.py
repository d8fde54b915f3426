"""A tiny rendezvous for the netns tests: forwards JSON-line signals between named clients.

Run in the public namespace: ``python rendezvous.py --host 192.0.2.1 --port 7000``.
It prints ``{"event": "ready", ...}`` once listening, then one line per client event.

Protocol, one JSON object per line over TCP:

* client -> ``{"op": "register", "name": "a"}``; a later registration of the same name
  replaces the earlier connection (a node that reconnected).
* client -> ``{"op": "send", "to": "b", "data": {...}}``; the server delivers
  ``{"op": "signal", "from": "a", "data": {...}}`` to ``b``, or queues it until ``b``
  registers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

MAX_LINE = 1 << 20


def log(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Rendezvous:
    def __init__(self) -> None:
        self.clients: dict[str, SocketStream] = {}
        self.pending: defaultdict[str, list[bytes]] = defaultdict(list)
        self.lock = anyio.Lock()  # one writer at a time per server: lines never interleave

    async def deliver(self, to: str, line: bytes) -> None:
        async with self.lock:
            stream = self.clients.get(to)
            if stream is None:
                self.pending[to].append(line)
                return
            try:
                await stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.pending[to].append(line)

    async def handle(self, stream: SocketStream) -> None:
        name: str | None = None
        reader = BufferedByteReceiveStream(stream)
        try:
            async with stream:
                while True:
                    msg = json.loads(await reader.receive_until(b"\n", MAX_LINE))
                    if msg["op"] == "register":
                        name = str(msg["name"])
                        async with self.lock:
                            self.clients[name] = stream
                            queued = self.pending.pop(name, [])
                            for line in queued:
                                await stream.send(line)
                        log(event="registered", name=name, delivered=len(queued))
                    elif msg["op"] == "send" and name is not None:
                        out = {"op": "signal", "from": name, "data": msg["data"]}
                        await self.deliver(str(msg["to"]), json.dumps(out).encode() + b"\n")
                        log(event="forwarded", src=name, to=msg["to"])
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            pass  # the client went away
        except (ValueError, KeyError, TypeError) as exc:
            log(event="bad request", name=name, error=repr(exc))
        finally:
            if name is not None and self.clients.get(name) is stream:
                del self.clients[name]
                log(event="gone", name=name)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    listener = await anyio.create_tcp_listener(local_host=args.host, local_port=args.port)
    log(event="ready", host=args.host, port=args.port)
    await listener.serve(Rendezvous().handle)


if __name__ == "__main__":
    try:
        anyio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
