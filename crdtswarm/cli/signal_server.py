"""``crdtswarm signal-server``: run a signaling server until SIGINT or SIGTERM.

Output: ``url ws://host:port`` once listening (what nodes pass to ``--signal``), and
``stopped: ...`` with the server's counters as the last line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import click

from crdtswarm.cli.app import CliError
from crdtswarm.cli.launch import listen_errors, run_until_signal, say, unwrapped_errors
from crdtswarm.signaling.server import (
    SignalingServer,
    SignalingServerConfig,
    SignalingServerStatistics,
)

if TYPE_CHECKING:
    from crdtswarm.cli.launch import Lifetime

__all__ = ["register", "run_server", "signal_server"]

DEFAULT_PORT = 8765
_DEFAULTS = SignalingServerConfig()

_EXAMPLES = """\b
A server for nodes on other machines, and two nodes that use it:
  crdtswarm signal-server --host 0.0.0.0 --port 8765
  crdtswarm node --signal ws://SERVER:8765                # prints: key K
  crdtswarm node --signal ws://SERVER:8765 --join K
"""


async def run_server(
    host: str, port: int, config: SignalingServerConfig, lifetime: Lifetime
) -> SignalingServerStatistics:
    """Serve until ``lifetime`` says stop; return the server's counters.

    Raises:
        OSError: the server cannot listen on ``host:port``.
    """
    async with SignalingServer(host, port, config=config) as server:
        say(f"url {server.url}")
        if host in ("0.0.0.0", "::"):
            say(f"note: every interface; nodes use ws://<this machine's IP>:{server.port}")
        lifetime.set_ready()
        await lifetime.stopping.wait()
        return server.statistics()


_POSITIVE = click.FloatRange(min=0, min_open=True)


@click.command("signal-server", epilog=_EXAMPLES)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on: 0.0.0.0 (or ::) for nodes on other machines.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port; 0 picks a free one (the 'url' line shows it).",
)
@click.option(
    "--max-signal-size",
    metavar="BYTES",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_signal_size,
    show_default=True,
    help="Largest signal forwarded; a client sending more is closed.",
)
@click.option(
    "--max-connections",
    metavar="N",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_connections,
    show_default=True,
    help="Open connections at once; more are refused (1013, try later).",
)
@click.option(
    "--signal-rate",
    metavar="PER_SECOND",
    type=_POSITIVE,
    default=_DEFAULTS.signal_rate,
    show_default=True,
    help="Frames each client may send per second (after --signal-burst).",
)
@click.option(
    "--signal-burst",
    metavar="N",
    type=click.IntRange(min=1),
    default=_DEFAULTS.signal_burst,
    show_default=True,
    help="Frames a client may send at once above --signal-rate.",
)
@click.option(
    "--max-rate-violations",
    metavar="N",
    type=click.IntRange(min=0),
    default=_DEFAULTS.max_rate_violations,
    show_default=True,
    help="Frames dropped for rate before that client is closed.",
)
@click.option(
    "--max-queued-signals",
    metavar="N",
    type=click.IntRange(min=0),
    default=_DEFAULTS.max_queued_signals,
    show_default=True,
    help="Frames queued towards one client; more are dropped.",
)
@click.option(
    "--max-queued-bytes",
    metavar="BYTES",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_queued_bytes,
    show_default=True,
    help="Bytes queued towards one client; more are dropped (at least --max-signal-size + 1).",
)
@click.option(
    "--registration-timeout",
    metavar="SECONDS",
    type=_POSITIVE,
    default=_DEFAULTS.registration_timeout,
    show_default=True,
    help="Seconds a new connection has to register its key.",
)
@click.option(
    "--idle-timeout",
    metavar="SECONDS",
    type=_POSITIVE,
    default=_DEFAULTS.idle_timeout,
    show_default=True,
    help="Seconds a registered client may stay silent before it is closed ('inf': never; "
    "nodes send a keepalive every 30 s).",
)
def signal_server(
    host: str,
    port: int,
    max_signal_size: int,
    max_connections: int,
    signal_rate: float,
    signal_burst: int,
    max_rate_violations: int,
    max_queued_signals: int,
    max_queued_bytes: int,
    registration_timeout: float,
    idle_timeout: float,
) -> None:
    """Run a signaling server until Ctrl-C (SIGINT) or SIGTERM.

    Nodes that are not linked yet exchange WebRTC offers and answers through it,
    by public key; it forwards signals sealed to their recipient, which it cannot
    read or forge, and stores nothing. It prints 'url ws://HOST:PORT' (what nodes
    pass to --signal), and on SIGINT or SIGTERM closes every connection, prints
    'stopped: ...' and exits 0.
    """
    try:
        config = SignalingServerConfig(
            max_signal_size=max_signal_size,
            max_connections=max_connections,
            signal_rate=signal_rate,
            signal_burst=signal_burst,
            max_rate_violations=max_rate_violations,
            max_queued_signals=max_queued_signals,
            max_queued_bytes=max_queued_bytes,
            registration_timeout=registration_timeout,
            idle_timeout=idle_timeout,
        )
    except ValueError as exc:  # limits that contradict each other
        raise CliError(f"bad limits: {exc}".replace("_", "-")) from None
    statistics: list[SignalingServerStatistics] = []

    async def main(lifetime: Lifetime) -> None:
        statistics.append(await run_server(host, port, config, lifetime))

    with listen_errors((host, port)), unwrapped_errors():
        anyio.run(run_until_signal, main)
    if not statistics:
        say("stopped: interrupted")
        return
    stats = statistics[0]
    forwarded, closed = stats.signals_forwarded, stats.connections
    say(
        f"stopped: clean shutdown ({forwarded} signal{'' if forwarded == 1 else 's'} "
        f"forwarded, {closed} connection{'' if closed == 1 else 's'} closed)"
    )


def register(group: click.Group) -> None:
    """Add ``signal-server`` to the command line."""
    group.add_command(signal_server)
