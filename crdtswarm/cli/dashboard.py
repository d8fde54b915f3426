"""How ``crdtswarm demo`` looks: the live view, the plain lines and the summary table (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import RenderableType

    from crdtswarm.cli.reports import DemoSnapshot, DemoSummary, Figures, LinkReport

__all__ = ["plain_line", "render_live", "summary_table"]

_MAX_LISTED_LINKS = 6  # more links than this are shown as a count and a median


def plain_line(elapsed: float, text: str) -> str:
    """One line of the event log, timestamped, for output that is not a terminal."""
    return f"{elapsed:8.3f} s  {text}"


def render_live(snapshot: DemoSnapshot) -> RenderableType:
    """The live view: a header, the nodes, the routes of blocked pairs, the event log."""
    title = (
        f"crdtswarm demo · {snapshot.transport} · {snapshot.node_count} nodes · "
        f"seed {snapshot.seed}"
    )
    header = Text.assemble(
        ("phase ", "dim"),
        (snapshot.phase, "bold cyan"),
        (f"   {snapshot.elapsed:5.1f} s of {snapshot.duration:g} s\n", ""),
        ("doc edits ", "dim"),
        (str(snapshot.edits), "bold"),
        ("   last convergence ", "dim"),
        (_num(snapshot.last_converge_ms, "ms"), "bold"),
        ("   bytes sent ", "dim"),
        (_size(snapshot.bytes_sent), "bold"),
    )
    if snapshot.network_bytes is not None:
        header.append("   on the wire ", "dim")
        header.append(_size(snapshot.network_bytes), "bold")
    if snapshot.signaling_url:
        header.append(f"\nsignaling server {snapshot.signaling_url}", "dim")

    nodes = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
    nodes.add_column("node")
    nodes.add_column("key", style="dim")
    nodes.add_column("state")
    nodes.add_column("members", justify="right")
    nodes.add_column("links (RTT ms)", ratio=1)
    nodes.add_column("sent", justify="right")
    nodes.add_column("received", justify="right")
    nodes.add_column("doc", justify="right")
    for node in snapshot.nodes:
        state_style = {"up": "green", "killed": "red", "stopping": "yellow"}.get(node.state, "")
        nodes.add_row(
            node.name,
            node.key[:8],
            Text(node.state, style=state_style),
            str(node.members) if node.state == "up" else "-",
            _links(node.links) if node.state == "up" else "-",
            _size(node.bytes_sent),
            _size(node.bytes_received),
            f"{node.doc_entries} · {node.doc_digest}",
        )
    parts: list[RenderableType] = [Panel(header, title=title, title_align="left"), nodes]
    dead = {node.name for node in snapshot.nodes if node.state != "up"}
    if snapshot.routes:
        routes = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, title="blocked pairs")
        routes.add_column("pair")
        routes.add_column("route()")
        routes.add_column("expected RTT", justify="right")
        routes.add_column("link")
        for route in snapshot.routes:
            routes.add_row(
                f"{route.source} -> {route.target}",
                " -> ".join(f"{hop} (dead)" if hop in dead else hop for hop in route.hops)
                or "direct",
                _num(route.expected_rtt_ms, "ms"),
                route.link_via or "none",
            )
        parts.append(routes)
    log = Text("\n".join(plain_line(t, line) for t, line in snapshot.log) or "…")
    parts.append(Panel(log, title="events", title_align="left", box=box.ROUNDED))
    return Group(*parts)


def summary_table(summary: DemoSummary) -> Table:
    """The summary of a demo run, one measure per row."""
    table = Table(
        title=f"crdtswarm demo: {summary.transport}, {summary.node_count} nodes, "
        f"seed {summary.seed}",
        box=box.SIMPLE_HEAVY,
        show_header=True,
    )
    table.add_column("measure", style="bold")
    table.add_column("value")
    where = f" (signaling {summary.signaling_url})" if summary.signaling_url else ""
    table.add_row("nodes up", f"{summary.node_count} in {_num(summary.started_ms, 'ms')}{where}")
    newcomers = summary.node_count - 1
    joined = summary.join_ms.count if summary.join_ms else 0
    table.add_row(
        "joins",
        f"{joined}/{newcomers} newcomers; call {_figures(summary.join_call_ms)}; "
        f"a member everywhere {_figures(summary.join_ms)}",
    )
    table.add_row(
        "mesh",
        f"complete {_num(summary.mesh_ms, 'ms')} after the first call"
        if summary.mesh_ms is not None
        else "not complete",
    )
    batches = len(summary.edits)
    edits = sum(len(e.by) for e in summary.edits)
    table.add_row(
        "edits",
        f"{edits} edits in {batches} batches; every node had each batch "
        f"{_figures(summary.convergence_ms)} after it was made",
    )
    relay = summary.relay
    if relay is not None:
        table.add_row(
            "relayed route",
            f"{relay.source} -> {relay.target} (blocked) via {' -> '.join(relay.hops)}: "
            f"expected RTT {_num(relay.expected_rtt_ms, 'ms')}, link up in "
            f"{_num(relay.link_ms, 'ms')}, ping through it {_num(relay.ping_ms, 'ms')}",
        )
    killed = summary.killed
    if killed is not None:
        table.add_row(
            "killed",
            f"{killed.name} at {killed.at_s:.1f} s; gone from every survivor's peers and "
            f"members after {_num(killed.gone_ms, 'ms')}",
        )
    if relay is not None and relay.failover is not None:
        failover = relay.failover
        table.add_row(
            "relay failover",
            f"{relay.source} -> {relay.target} again via {' -> '.join(failover.hops)} "
            f"{_num(failover.relink_ms, 'ms')} after {failover.killed_relay} died (ping "
            f"{_num(failover.ping_ms, 'ms')}); "
            + (
                f"route() avoided it after {_num(failover.route_ms, 'ms')}"
                if failover.route_ms
                else "route() had already moved off it"
            ),
        )
    elif relay is not None and relay.failover_skipped:
        table.add_row("relay failover", f"not shown: {relay.failover_skipped}")
    table.add_row(
        "links",
        f"{summary.links} direct link{'s' if summary.links != 1 else ''} between the "
        f"survivors; RTT {_figures(summary.rtt_ms)}",
    )
    moved = f"{_size(summary.bytes_sent)} sent (mux payload, all links of all nodes)"
    if summary.network_bytes is not None:
        moved += f"; {_size(summary.network_bytes)} on the simulated wire"
    table.add_row("bytes", moved)
    survivors = sum(1 for n in summary.nodes if n.state == "up")
    if not summary.doc_entries:
        documents = Text("no edits were made")
    elif summary.converged:
        documents = Text(
            f"{survivors} survivors hold the same {summary.doc_entries} entries "
            f"(digest {summary.doc_digest})",
            style="green",
        )
    else:
        documents = Text("the survivors' documents differ", style="red")
    table.add_row("documents", documents)
    table.add_row(
        "result",
        Text(f"OK in {summary.elapsed_s:.1f} s", style="bold green")
        if summary.ok
        else Text(f"FAILED: {summary.failure}", style="bold red"),
    )
    return table


def _links(links: tuple[LinkReport, ...]) -> str:
    if len(links) > _MAX_LISTED_LINKS:
        rtts = sorted(link.rtt_ms for link in links if link.rtt_ms is not None)
        median = f", median {rtts[len(rtts) // 2]:.1f}" if rtts else ""
        return f"{len(links)} links{median}"
    parts = []
    for link in links:
        rtt = f"{link.rtt_ms:.1f}" if link.rtt_ms is not None else "?"
        kind = f" ({link.via})" if link.transport == "relay" else ""
        parts.append(f"{link.peer} {rtt}{kind}")
    return ", ".join(parts) or "none"


def _figures(figures: Figures | None) -> str:
    if figures is None:
        return "not measured"
    return f"median {figures.median:.1f} ms, max {figures.max:.1f} ms (n={figures.count})"


def _num(value: float | None, unit: str) -> str:
    return f"{value:.1f} {unit}" if value is not None else "-"


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
