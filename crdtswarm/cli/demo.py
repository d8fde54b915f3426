"""``crdtswarm demo``: a swarm forms, edits a shared document, loses a node and carries on.

The scenario lives in `crdtswarm.cli.scenario`, its look in `crdtswarm.cli.dashboard`.
On a terminal the demo is a live view (rich); otherwise it prints timestamped
lines. Either way it ends with a summary table, exit status 0, or 1 and one error
line when a phase did not complete in time.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click
from rich.console import Console
from rich.live import Live

from crdtswarm.cli.app import CliError
from crdtswarm.cli.dashboard import plain_line, render_live, summary_table
from crdtswarm.cli.scenario import TRANSPORTS, DemoConfig, DemoScenario
from crdtswarm.cli.terminal import is_live

if TYPE_CHECKING:
    from crdtswarm.cli.reports import DemoSummary

__all__ = ["demo", "register", "run_demo"]

_REFRESH_INTERVAL = 0.25  # seconds between two frames of the live view


async def run_demo(config: DemoConfig, console: Console, *, live: bool) -> DemoSummary:
    """Run the demo scenario, shown live on ``console`` or as plain lines; return its summary.

    Raises:
        OSError: a node or the signaling server could not start.
    """
    if not live:

        def say(elapsed: float, text: str) -> None:
            print(plain_line(elapsed, text), flush=True)

        return await DemoScenario(config, on_log=say).run()

    scenario = DemoScenario(config)
    with Live(console=console, auto_refresh=False, transient=False) as view:

        async def refresh() -> None:
            while True:
                view.update(render_live(scenario.snapshot()), refresh=True)
                await anyio.sleep(_REFRESH_INTERVAL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            summary = await scenario.run()
            tg.cancel_scope.cancel()
        view.update(render_live(scenario.snapshot()), refresh=True)
    return summary


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested single-error groups (task groups wrap what they raise)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@click.command("demo", short_help="Watch a swarm join, edit, lose a node.")
@click.option(
    "--nodes",
    "node_count",
    type=click.IntRange(3, 32),
    default=5,
    show_default=True,
    help="Nodes to start (3 to 32); one of them is killed half-way. They all run in this "
    "process: beyond about 10 the CPU, not the network, sets the pace.",
)
@click.option(
    "--transport",
    type=click.Choice(TRANSPORTS),
    default="webrtc",
    show_default=True,
    help="webrtc: WebRTC data channels on this machine, offers through an embedded "
    "signaling server; tcp: loopback TCP, newcomers call a member's address; sim: the "
    "in-process simulated network, with latencies and blocked pairs, so that some "
    "routes go through relays (and fail over when one is killed).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="Seconds the demo runs: the phases go as fast as their conditions are met, a "
    "node is killed half-way, and one edit a second is timed in between. 0: run the "
    "phases back to back.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds any one phase (a join, the mesh, a convergence, a failover) may take "
    "before the demo fails.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the random choices: who calls whom, who edits, which node is killed; "
    "with sim also the keys, latencies and blocked pairs. Default: a random seed, "
    "shown in the summary.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary to this file as JSON.",
)
def demo(
    node_count: int,
    transport: str,
    duration: float,
    timeout: float,
    seed: int | None,
    json_path: Path | None,
) -> None:
    """Start a swarm on this machine and show it live: joins, links, RTTs, routes, edits.

    An embedded signaling server (webrtc) and N nodes start; each newcomer calls one
    member and meets the others through the swarm. Several nodes edit a shared
    document, one node is killed and the others carry on. Ends with a summary of
    what was measured; exit status 1 when something did not join or converge.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    config = DemoConfig(
        transport=transport, nodes=node_count, duration=duration, timeout=timeout, seed=seed
    )
    console = Console()
    try:
        summary = anyio.run(functools.partial(run_demo, live=is_live(console)), config, console)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    console.print(summary_table(summary))
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {json_path}: {exc.strerror or exc}") from exc
    if not summary.ok:
        raise CliError(f"demo failed: {summary.failure}")


def register(group: click.Group) -> None:
    """Add ``demo`` to the command group."""
    group.add_command(demo)
