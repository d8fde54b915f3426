"""Mesh policy: which members to link to, so that one call is enough to join everybody.

The directory (`crdtswarm.sync.directory`) tells every node who the members are and
where they can be dialled. `MeshPolicy` decides, from that picture and the links that
are up, whom to dial next. It is a plain synchronous class (time comes in as ``now``,
randomness from an injected ``random.Random``), in the spirit of HyParView:

* the *active view* is the set of direct links; it is kept at ``max_peers`` links
  (a full mesh while the swarm has at most ``max_peers + 1`` members);
* the *passive view* is every other valid member of the directory; when the active
  view is short (a link died, a member left) the policy picks replacements from it
  at random, so that the links form a random graph, which stays connected under
  churn with high probability;
* a member whose dial failed is not tried again before an exponential backoff
  (``retry_interval`` doubling up to ``max_retry_interval``), so a dead address does
  not cost a dial every tick;
* at most ``max_concurrent_dials`` dials run at once.

Updates to documents (the directory included) travel across this partial mesh by
forwarding (see `crdtswarm.sync.replica`), so every member hears about every other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from crdtswarm.identity import PublicKey

__all__ = ["MeshConfig", "MeshPolicy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshConfig:
    """How many links a node keeps and how it retries."""

    max_peers: int = 8
    """Target number of direct links (default 8): a full mesh up to 9 members."""
    max_concurrent_dials: int = 4
    """Dials the mesh runs at once (default 4)."""
    retry_interval: float = 1.0
    """Seconds before a member whose dial failed is tried again; doubles (default 1)."""
    max_retry_interval: float = 60.0
    """Cap of the retry backoff, in seconds (default 60)."""
    tick_interval: float = 2.0
    """Seconds between two looks at the mesh when nothing happened (default 2)."""
    min_link_age: float = 5.0
    """Seconds a link opened to us is kept before it may be shed for being surplus
    (default 5): time for the newcomer to receive the directory and look elsewhere."""
    shuffle_interval: float = 30.0
    """Seconds between two dials to a random member while we already have
    ``max_peers`` links (default 30; 0 disables), like HyParView's shuffle: a mesh
    that split into full groups (after a partition, say) joins up again."""
    relay_hubs: int = 0
    """Latency mesh: also link to this many elected relay hubs ("super nodes", the
    members carrying the most one-relay shortcuts in the link graph, see
    `crdtswarm.protocol.topology`); a hub accepts links from everybody. Default 0
    (off); 16 gave routes within 3 % of the one-relay optimum on PlanetLab RTTs
    (``benchmarks/routing.py``), at the price of more links, probes and rows."""
    near_peers: int = 0
    """Latency mesh: also keep links to this many lowest-RTT members, found by
    dialling the candidates whose RTTs to the hubs are closest to ours, one per
    election, measuring them and keeping the nearest (default 0: off; needs hubs)."""
    election_interval: float = 30.0
    """Seconds between two hub elections / near-peer trials (default 30)."""

    def __post_init__(self) -> None:
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers}")
        if self.relay_hubs < 0 or self.near_peers < 0:
            raise ValueError("relay_hubs and near_peers must be >= 0")
        if self.election_interval <= 0:
            raise ValueError(f"election_interval must be > 0, got {self.election_interval}")


@dataclass(slots=True)
class _Backoff:
    next_try: float = 0.0
    interval: float = 0.0


@dataclass(slots=True)
class MeshPolicy:
    """Chooses whom to dial; feed it results with `dial_failed` / `dial_succeeded`."""

    local_key: PublicKey
    config: MeshConfig = field(default_factory=MeshConfig)
    rng: random.Random = field(default_factory=random.Random)
    _backoff: dict[PublicKey, _Backoff] = field(default_factory=dict)
    _dialing: set[PublicKey] = field(default_factory=set)
    _last_shuffle: float | None = None

    def plan(
        self,
        now: float,
        members: Iterable[PublicKey],
        linked: Iterable[PublicKey],
        preferred: Iterable[PublicKey] = (),
    ) -> list[PublicKey]:
        """The members to dial now (and marks them as being dialled).

        Args:
            now: the current time in seconds (any monotonic clock).
            members: every valid member the directory knows (ourselves included or not).
            linked: the members we have a direct link to.
            preferred: members to link to whatever the count (the latency mesh's
                hubs and near peers), dialled first; they do not count toward
                ``max_peers``.
        """
        active = set(linked)
        room = self.config.max_concurrent_dials - len(self._dialing)
        known = set(members)
        first = [
            key
            for key in dict.fromkeys(preferred)
            if key in known
            and key != self.local_key
            and key not in active
            and key not in self._dialing
            and self.may_dial(key, now)
        ][: max(room, 0)]
        self._dialing.update(first)
        room -= len(first)
        extra = set(preferred)
        want = self.config.max_peers - len(active - extra) - len(self._dialing - extra)
        if self._last_shuffle is None:
            self._last_shuffle = now
        interval = self.config.shuffle_interval
        shuffle_due = interval > 0 and now - self._last_shuffle >= interval
        if want <= 0 and not self._dialing and shuffle_due:
            self._last_shuffle = now
            want = 1  # one link beyond max_peers; surplus links get shed
        if want <= 0 or room <= 0:
            return first
        passive = sorted(
            key
            for key in known
            if key != self.local_key
            and key not in active
            and key not in self._dialing
            and self.may_dial(key, now)
        )
        self.rng.shuffle(passive)
        chosen = passive[: min(want, room)]
        self._dialing.update(chosen)
        return first + chosen

    def dial_succeeded(self, key: PublicKey) -> None:
        """The dial to ``key`` produced a link."""
        self._dialing.discard(key)
        self._backoff.pop(key, None)

    def dial_failed(self, key: PublicKey, now: float) -> None:
        """The dial to ``key`` failed: back off before trying it again."""
        self._dialing.discard(key)
        backoff = self._backoff.setdefault(key, _Backoff())
        backoff.interval = min(
            max(backoff.interval * 2, self.config.retry_interval), self.config.max_retry_interval
        )
        backoff.next_try = now + backoff.interval * (0.5 + self.rng.random())

    def may_dial(self, key: PublicKey, now: float) -> bool:
        """Whether ``key`` is out of its backoff (a dial to it failed recently)."""
        return self._backoff.get(key, _Backoff()).next_try <= now

    def forget(self, keys: Iterable[PublicKey]) -> None:
        """Drop the backoff state of members that left the directory."""
        for key in keys:
            self._backoff.pop(key, None)

    @property
    def dialing(self) -> frozenset[PublicKey]:
        """Members being dialled now."""
        return frozenset(self._dialing)
