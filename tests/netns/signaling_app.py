"""crdtswarm's `SignalingServer` as a process, for the netns tests.

Run in the public namespace: ``python signaling_app.py --host 192.0.2.1 --port 8765``.
Prints ``{"event": "ready", "url": "ws://..."}`` once listening, then serves until
SIGTERM or SIGINT (a test that wants the server to vanish kills it instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import anyio

from crdtswarm.signaling import SignalingServer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)7.0f ms %(levelname)s %(name)s %(message)s"
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with SignalingServer(args.host, args.port) as server:
            sys.stdout.write(json.dumps({"event": "ready", "url": server.url}) + "\n")
            sys.stdout.flush()
            async for _ in signals:
                break


if __name__ == "__main__":
    anyio.run(main)
