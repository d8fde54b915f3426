"""What ``crdtswarm demo`` measures: the summary, and the snapshots the live view shows.

Frozen dataclasses only; `crdtswarm.cli.scenario` fills them in, `crdtswarm.cli.dashboard`
draws them, and `DemoSummary.to_json` is what ``crdtswarm demo --json`` writes.
Times are milliseconds (``*_ms``) or seconds (``*_s``) on the event loop's clock.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DemoSnapshot",
    "DemoSummary",
    "EditReport",
    "FailoverReport",
    "Figures",
    "KillReport",
    "LinkReport",
    "NodeReport",
    "RelayReport",
    "RouteReport",
    "figures",
    "ms",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Figures:
    """The median and maximum of some measured values."""

    median: float
    max: float
    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkReport:
    """One link of a node, as the node sees it."""

    peer: str
    """The other node's name."""
    transport: str
    """``"webrtc"``, ``"tcp"``, ``"mem"`` or ``"relay"``."""
    rtt_ms: float | None
    """Smoothed round-trip time (`crdtswarm.Peer.rtt`), None before the first ping."""
    remote_address: str | None
    via: str
    """The transport, or ``"relay via node1"`` for a relayed link."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeReport:
    """One node, now."""

    name: str
    key: str
    state: str
    """``"starting"``, ``"up"``, ``"stopping"``, ``"killed"`` or ``"stopped"``."""
    joined_via: str | None
    """The member it called to join; None for the first node."""
    call_ms: float | None
    """Its `Swarm.call` to that member, until the authenticated link was up."""
    join_ms: float | None
    """From that call until every node listed it as a member and it listed them all."""
    members: int
    links: tuple[LinkReport, ...]
    bytes_sent: int
    """Mux payload bytes it sent, summed over every link it had."""
    bytes_received: int
    bytes_relayed: int
    """Circuit bytes it forwarded as a relay for others."""
    doc_entries: int
    doc_digest: str
    """A short hash of its copy of the document: equal digests, equal documents."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RouteReport:
    """`Swarm.route` between a pair whose direct path is blocked (simulated network)."""

    source: str
    target: str
    hops: tuple[str, ...]
    """The relays, empty when direct."""
    expected_rtt_ms: float | None
    """``route.latency``: None while no path is known."""
    link: str | None
    """The address of the source's link to the target, when there is one."""
    link_via: str | None
    """That link's transport, or ``"relay via node1"``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EditReport:
    """One batch of edits made at the same instant, and how long it took to reach every node."""

    by: tuple[str, ...]
    at_s: float
    """Seconds since the start."""
    converge_ms: float
    """Until the last live node had every edit of the batch."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FailoverReport:
    """After the relay of the blocked pair was killed."""

    killed_relay: str
    hops: tuple[str, ...]
    """The relays of the new link."""
    remote_address: str | None
    relink_ms: float
    """From the kill until the pair had a new link (a second `Swarm.call`)."""
    ping_ms: float
    route_ms: float
    """From the kill until `Swarm.route` avoided the dead relay (0 when the route had
    already moved to another relay, the link not yet)."""
    route_hops: tuple[str, ...]
    expected_rtt_ms: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayReport:
    """The blocked pair of the simulated network and its relayed link."""

    source: str
    target: str
    blocked: tuple[tuple[str, str], ...]
    """Every blocked pair."""
    route_s: float
    """Seconds from the first call of the joins until `Swarm.route` found a relayed path."""
    hops: tuple[str, ...]
    expected_rtt_ms: float | None
    remote_address: str | None
    link_ms: float
    """The source's `Swarm.call` to the target, through the relay."""
    ping_ms: float
    """One ping through the relayed link."""
    failover: FailoverReport | None
    failover_skipped: str | None
    """Why no failover was shown (three nodes: no second relay)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KillReport:
    """The node that was killed."""

    name: str
    key: str
    at_s: float
    shutdown_ms: float
    """Its graceful shutdown: leaving the directory, closing its links."""
    gone_ms: float
    """From the kill until no survivor had it as a peer or a member."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSummary:
    """What the demo measured; ``ok`` when every phase met its condition in time."""

    ok: bool
    failure: str | None
    transport: str
    node_count: int
    seed: int
    duration_s: float
    elapsed_s: float
    signaling_url: str | None
    started_ms: float | None
    """All nodes up (and registered on the signaling server)."""
    join_call_ms: Figures | None
    join_ms: Figures | None
    mesh_ms: float | None
    """From the first join call until the mesh was complete."""
    links: int
    """Direct links between the survivors at the end."""
    edits: tuple[EditReport, ...]
    convergence_ms: Figures | None
    killed: KillReport | None
    relay: RelayReport | None
    rtt_ms: Figures | None
    """Over the survivors' links, both directions."""
    bytes_sent: int
    bytes_received: int
    network_bytes: int | None
    """Every byte the simulated network carried (Noise and all); None off the simulation."""
    converged: bool
    """The survivors' documents are equal and hold every edit ever made."""
    doc_entries: int
    doc_digest: str | None
    nodes: tuple[NodeReport, ...]

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready dicts and lists."""
        return cast("dict[str, Any]", _as_dict(self))


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSnapshot:
    """What the live view shows."""

    transport: str
    node_count: int
    seed: int
    duration: float
    elapsed: float
    phase: str
    signaling_url: str | None
    nodes: tuple[NodeReport, ...]
    routes: tuple[RouteReport, ...]
    edits: int
    last_converge_ms: float | None
    bytes_sent: int
    network_bytes: int | None
    log: tuple[tuple[float, str], ...]


def _as_dict(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return {name: _as_dict(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, tuple | list):
        return [_as_dict(item) for item in value]
    return value


def figures(values: Iterable[float]) -> Figures | None:
    """The median and maximum of ``values`` (rounded to 3 decimals); None when empty."""
    values = list(values)
    if not values:
        return None
    return Figures(
        median=round(statistics.median(values), 3), max=round(max(values), 3), count=len(values)
    )


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded to 3 decimals (microseconds)."""
    return round(seconds * 1000, 3)
