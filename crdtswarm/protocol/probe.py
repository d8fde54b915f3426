"""Link measurement: when to probe each link, and what the answers say (sans-IO).

A node measures each of its direct links with probes (pings). `ProbeScheduler` (one
per node) decides when each link is probed, digests the answers into a
`LinkEstimate` per link (`LinkProbe` holds one link's state), and tells when the
node's latency row (the one published in the directory and read by
`crdtswarm.protocol.routing`) should be published again. Time comes in as ``now``
(seconds, any monotonic clock); nothing here reads a clock or does I/O.

A driver runs this loop::

    wait until scheduler.get_timer(), or until a probe is answered
    scheduler.handle_timer(now)                  # or: scheduler.probe_answered(id, now)
    for link in scheduler.probes_due(now):
        probe_id = scheduler.probe_sent(link, now)   # then send the ping
    if (row := scheduler.row_update(now)) is not None:
        directory.publish_latency(row)

Rules:

1. Estimates (RFC 6298 for the round trip, RFC 3550 for jitter). The first answer
   sets ``srtt = R`` and ``rttvar = R / 2``; later ones ``rttvar += beta * (|srtt - R|
   - rttvar)`` then ``srtt += alpha * (R - srtt)`` (``rtt_gain`` 1/8, ``rttvar_gain``
   1/4). Jitter is the smoothed difference between consecutive samples, ``jitter
   += (|R - R_prev| - jitter) / 16``. Loss is the share of the last ``loss_window``
   resolved probes that were not answered within their timeout.
2. Timeouts. A probe is lost when unanswered ``srtt + 4 * rttvar`` after it was sent
   (clamped to [``min_timeout``, ``max_timeout``]; ``initial_timeout`` before the
   first answer). An answer that comes later still feeds the round-trip estimate
   and shows the link is alive, but the probe stays counted as lost. Late answers
   are accepted for ``max_timeout`` seconds after the timeout.
3. Adaptive interval. A link is probed every ``min_interval`` while it is new (fewer
   than ``settle_samples`` answers) or after a surprising sample (one that differs
   from ``srtt`` by more than ``max(change_margin, change_ratio * srtt)``); each
   unsurprising answer multiplies the interval by ``backoff`` up to
   ``max_interval``. The next probe is due one interval (spread by
   ``interval_jitter``) after the previous one was answered. After a loss the next
   probe is due at once; after ``down_after`` losses in a row the link is *down*
   and is probed with a backoff from ``min_interval`` to ``max_interval`` until it
   answers again.
4. Budget. At most one probe is in flight per link, and `probes_due` hands out no
   more probes than a token bucket allows (``max_probe_rate`` per second, bursts of
   ``probe_burst``), most overdue link first. `probe_sent` always records (a caller
   may ping outside the schedule); its token is still taken, so the average rate of
   scheduled probes plus extra pings stays within the budget.
5. The row. It lists every link that has an estimate, is not down, and is not
   lossy (``loss >= loss_threshold`` over at least ``min_loss_probes`` resolved
   probes), with ``srtt`` rounded to 1 ms (the directory's resolution). It is
   *significantly changed* from the last published row when a link appears or
   disappears (so a link crossing the loss threshold, either way, counts) or a
   round trip moves by more than ``max(publish_margin, publish_ratio * old)``
   (2 ms and 25 %, the swarm's rule). `row_update` returns the row when it changed
   significantly, at most once per ``min_publish_interval``, or when
   ``refresh_interval`` has passed since the last publication (so the row does not
   expire); otherwise None. The first non-empty row is returned at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "LinkEstimate",
    "LinkProbe",
    "ProbeConfig",
    "ProbeScheduler",
    "ProbeStatistics",
    "quantise",
]

Link = TypeVar("Link", bound=Hashable)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeConfig:
    """How links are probed and when the latency row is republished (see the module rules)."""

    min_interval: float = 1.0
    """Seconds between probes of a new, changing or lossy link (1 s)."""
    max_interval: float = 15.0
    """Seconds between probes of a stable link, after backing off (15 s)."""
    backoff: float = 2.0
    """Factor by which the interval grows after each unsurprising answer (2)."""
    settle_samples: int = 3
    """Answers a new link gets at ``min_interval`` before its interval backs off (3)."""
    change_ratio: float = 0.1
    """A sample further than this share of ``srtt`` from it is surprising (10 %) ..."""
    change_margin: float = 0.002
    """... and further than this many seconds too (2 ms)."""
    interval_jitter: float = 0.1
    """Each interval is spread uniformly by this share either way (10 %), so that the
    probes of links set up together do not stay in step."""
    initial_timeout: float = 3.0
    """Seconds a probe waits for its answer before the link has any estimate (3 s)."""
    min_timeout: float = 1.0
    """Least seconds a probe waits for its answer, RFC 6298's minimum RTO (1 s)."""
    max_timeout: float = 5.0
    """Most seconds a probe waits for its answer (5 s)."""
    loss_window: int = 16
    """Resolved probes (answered or lost) the loss share is computed over (16)."""
    min_loss_probes: int = 4
    """Resolved probes needed before a link can count as lossy (4)."""
    down_after: int = 3
    """Consecutive lost probes after which a link is down (3)."""
    max_probe_rate: float = 8.0
    """Most probes per second one node sends across all its links (8)."""
    probe_burst: float = 8.0
    """Most probes sent at once after an idle spell: the token bucket's size (8)."""
    probe_size: int = 128
    """Bytes one probe costs on the wire, request and answer together (128: two
    ~64-byte RPC messages with their mux and Noise framing, without IP, UDP, DTLS
    or SCTP headers). Only used for `ProbeStatistics.bytes_sent`."""
    rtt_gain: float = 1 / 8
    """RFC 6298 alpha: weight of a new sample in ``srtt`` (1/8)."""
    rttvar_gain: float = 1 / 4
    """RFC 6298 beta: weight of a new deviation in ``rttvar`` (1/4)."""
    jitter_gain: float = 1 / 16
    """RFC 3550 gain of the jitter estimate (1/16)."""
    publish_ratio: float = 0.25
    """A round trip moving by more than this share of the published one ... (25 %)"""
    publish_margin: float = 0.002
    """... and by more than this many seconds makes the row significantly changed (2 ms)."""
    loss_threshold: float = 0.25
    """Loss share at or above which a link is left out of the row (25 %)."""
    min_publish_interval: float = 5.0
    """Least seconds between two publications of a changed row (5 s)."""
    refresh_interval: float = 40.0
    """Seconds after which the row is published again even if unchanged (40 s: a
    third of the directory's default ``latency_ttl``)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("intervals must satisfy 0 < min_interval <= max_interval")
        if self.backoff < 1:
            raise ValueError(f"backoff must be >= 1, got {self.backoff}")
        if not 0 <= self.interval_jitter < 1:
            raise ValueError(f"interval_jitter must be in [0, 1), got {self.interval_jitter}")
        if not 0 < self.min_timeout <= self.max_timeout or self.initial_timeout <= 0:
            raise ValueError("timeouts must satisfy 0 < min_timeout <= max_timeout, initial > 0")
        for name in ("settle_samples", "loss_window", "min_loss_probes", "down_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_probe_rate <= 0 or self.probe_burst < 1:
            raise ValueError("max_probe_rate must be > 0 and probe_burst >= 1")
        for name in ("rtt_gain", "rttvar_gain", "jitter_gain"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 < self.loss_threshold <= 1:
            raise ValueError(f"loss_threshold must be in (0, 1], got {self.loss_threshold}")
        if min(self.change_ratio, self.change_margin, self.publish_ratio) < 0:
            raise ValueError("change and publish thresholds must be >= 0")
        if self.publish_margin < 0 or self.probe_size < 0:
            raise ValueError("publish_margin and probe_size must be >= 0")
        if not 0 <= self.min_publish_interval <= self.refresh_interval:
            raise ValueError("intervals must satisfy 0 <= min_publish_interval <= refresh_interval")


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkEstimate:
    """What the probes of one link say (times in seconds)."""

    rtt: float | None
    """Smoothed round-trip time (RFC 6298 ``srtt``); None before the first answer."""
    rttvar: float | None
    """Mean deviation of the round trip (RFC 6298 ``rttvar``); None before the first answer."""
    jitter: float | None
    """Smoothed difference between consecutive samples (RFC 3550); None before two answers."""
    loss: float
    """Share of the last ``loss_window`` resolved probes that went unanswered (0 to 1)."""
    samples: int
    """Round-trip samples taken so far (late answers included)."""
    is_down: bool
    """Whether the last ``down_after`` probes were all lost (and nothing answered since)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeStatistics:
    """Counters of a `ProbeScheduler` since it was made."""

    links: int
    """Links measured now."""
    probes_sent: int
    """Probes recorded by `ProbeScheduler.probe_sent`."""
    probes_answered: int
    """Probes answered within their timeout."""
    probes_lost: int
    """Probes that timed out (a late answer does not take one back)."""
    late_answers: int
    """Answers that came after their probe's timeout."""
    rows_published: int
    """Rows returned by `ProbeScheduler.row_update`."""
    bytes_sent: int
    """``probes_sent * probe_size``: the probes' cost on the wire, answers included."""


class LinkProbe:
    """The measurement state of one link: estimates and the probe schedule (rules 1-3).

    `ProbeScheduler` drives it; it can also be fed directly with `answered` and `lost`.
    """

    __slots__ = (
        "_config",
        "_consecutive_losses",
        "_interval",
        "_last_sample",
        "_outcomes",
        "_rng",
        "jitter",
        "next_probe_at",
        "rttvar",
        "samples",
        "srtt",
    )

    def __init__(self, config: ProbeConfig, now: float, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self.srtt: float | None = None
        """Smoothed round trip in seconds (None before the first answer)."""
        self.rttvar: float | None = None
        """Mean deviation of the round trip in seconds (None before the first answer)."""
        self.jitter: float | None = None
        """Smoothed difference of consecutive samples (None before two answers)."""
        self.samples = 0
        """Round-trip samples taken."""
        self.next_probe_at = now
        """When the next probe is due."""
        self._interval = config.min_interval
        self._last_sample: float | None = None
        self._consecutive_losses = 0
        self._outcomes: deque[bool] = deque(maxlen=config.loss_window)  # True: lost

    @property
    def interval(self) -> float:
        """The current probe interval in seconds, before jitter."""
        return self._interval

    @property
    def loss(self) -> float:
        """Share of the resolved probes in the window that were lost."""
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    @property
    def is_down(self) -> bool:
        """Whether the last ``down_after`` probes were all lost."""
        return self._consecutive_losses >= self._config.down_after

    @property
    def is_lossy(self) -> bool:
        """Whether the loss share has reached ``loss_threshold`` (over enough probes)."""
        config = self._config
        return len(self._outcomes) >= config.min_loss_probes and self.loss >= config.loss_threshold

    def timeout(self) -> float:
        """Seconds a probe sent now waits for its answer (rule 2)."""
        config = self._config
        if self.srtt is None or self.rttvar is None:
            return config.initial_timeout
        return min(max(self.srtt + 4 * self.rttvar, config.min_timeout), config.max_timeout)

    def estimate(self) -> LinkEstimate:
        """The link's estimates now."""
        return LinkEstimate(
            rtt=self.srtt,
            rttvar=self.rttvar,
            jitter=self.jitter,
            loss=self.loss,
            samples=self.samples,
            is_down=self.is_down,
        )

    def answered(self, rtt: float, now: float, *, in_time: bool = True) -> None:
        """Digest a round-trip sample; ``in_time=False`` for a late answer (rule 2).

        Raises:
            ValueError: if ``rtt`` is negative or not finite.
        """
        if not (math.isfinite(rtt) and rtt >= 0):
            raise ValueError(f"a round trip is a finite number of seconds >= 0, got {rtt!r}")
        config = self._config
        surprising = self._is_surprising(rtt)
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar += config.rttvar_gain * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += config.rtt_gain * (rtt - self.srtt)
        if self._last_sample is not None:
            step = abs(rtt - self._last_sample)
            self.jitter = (
                step
                if self.jitter is None
                else (self.jitter + config.jitter_gain * (step - self.jitter))
            )
        self._last_sample = rtt
        self.samples += 1
        self._consecutive_losses = 0
        if not in_time:  # its loss is counted and the next probe is already scheduled
            return
        self._outcomes.append(False)
        if self.samples < config.settle_samples or surprising:
            self._interval = config.min_interval
        else:
            self._interval = min(self._interval * config.backoff, config.max_interval)
        self.next_probe_at = now + self._spread(self._interval)

    def lost(self, now: float) -> None:
        """A probe went unanswered within its timeout (rules 1 and 3)."""
        config = self._config
        self._outcomes.append(True)
        self._consecutive_losses += 1
        beyond = self._consecutive_losses - config.down_after
        if beyond < 0:  # not down yet: find out at once
            self._interval = config.min_interval
            self.next_probe_at = now
        else:  # down: back off until it answers again
            self._interval = min(config.min_interval * config.backoff**beyond, config.max_interval)
            self.next_probe_at = now + self._spread(self._interval)

    def _is_surprising(self, rtt: float) -> bool:
        if self.srtt is None:
            return True
        config = self._config
        return abs(rtt - self.srtt) > max(config.change_margin, config.change_ratio * self.srtt)

    def _spread(self, interval: float) -> float:
        spread = self._config.interval_jitter
        return interval * (1 + spread * (2 * self._rng.random() - 1)) if spread else interval


@dataclass(slots=True)
class _Probe(Generic[Link]):
    link: Link
    sent_at: float
    deadline: float
    timed_out: bool = False


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    late: int = 0
    rows: int = 0


class ProbeScheduler(Generic[Link]):
    """Probes a node's links within a budget and says when to republish its row.

    See the module docstring for the driver loop and the rules.
    """

    def __init__(self, config: ProbeConfig | None = None, *, rng: random.Random | None = None):
        self._config = config or ProbeConfig()
        self._rng = rng if rng is not None else random.Random()
        self._links: dict[Link, LinkProbe] = {}
        self._row_cache: dict[Link, float] | None = None
        self._probes: dict[int, _Probe[Link]] = {}
        self._in_flight: dict[Link, int] = {}  # link -> probes awaiting an answer in time
        self._deadlines: list[tuple[float, int]] = []  # heap: (deadline or forget time, id)
        self._ids = itertools.count(1)
        self._tokens = self._config.probe_burst
        self._tokens_at = -math.inf
        self._published: dict[Link, float] | None = None
        self._published_at = -math.inf
        self._counters = _Counters()

    @property
    def config(self) -> ProbeConfig:
        """The probing rules."""
        return self._config

    @property
    def links(self) -> list[Link]:
        """The links being measured."""
        return list(self._links)

    def __contains__(self, link: object) -> bool:
        return link in self._links

    # -- links -------------------------------------------------------------------------

    def add_link(self, link: Link, now: float) -> None:
        """Start measuring ``link``; its first probe is due at once (no-op if known)."""
        if link not in self._links:
            self._links[link] = LinkProbe(self._config, now, self._rng)
            self._row_cache = None

    def remove_link(self, link: Link, now: float) -> None:
        """Stop measuring ``link`` (no-op if unknown); answers to its probes are ignored."""
        if self._links.pop(link, None) is None:
            return
        self._row_cache = None
        self._in_flight.pop(link, None)
        for probe_id in [i for i, p in self._probes.items() if p.link == link]:
            del self._probes[probe_id]

    def link_probe(self, link: Link) -> LinkProbe:
        """The measurement state of ``link``.

        Raises:
            ValueError: if ``link`` is not measured.
        """
        probe = self._links.get(link)
        if probe is None:
            raise ValueError(f"unknown link {link!r}")
        return probe

    def estimate(self, link: Link) -> LinkEstimate:
        """The estimates of ``link``.

        Raises:
            ValueError: if ``link`` is not measured.
        """
        return self.link_probe(link).estimate()

    def estimates(self) -> dict[Link, LinkEstimate]:
        """The estimates of every link."""
        return {link: probe.estimate() for link, probe in self._links.items()}

    # -- probes ------------------------------------------------------------------------

    def probes_due(self, now: float) -> list[Link]:
        """The links to probe now, most overdue first, within the budget (rule 4).

        A query: nothing changes until `probe_sent` records each probe.
        """
        budget = math.floor(self._tokens_now(now))
        if budget <= 0:
            return []
        due = [
            (probe.next_probe_at, index, link)
            for index, (link, probe) in enumerate(self._links.items())
            if probe.next_probe_at <= now and link not in self._in_flight
        ]
        return [link for _, _, link in heapq.nsmallest(budget, due)]

    def probe_sent(self, link: Link, now: float) -> int:
        """Record a probe sent on ``link`` now; returns the id to answer it with.

        Raises:
            ValueError: if ``link`` is not measured.
        """
        probe = self.link_probe(link)
        self._tokens = self._tokens_now(now) - 1
        self._tokens_at = now
        probe_id = next(self._ids)
        deadline = now + probe.timeout()
        self._probes[probe_id] = _Probe(link, now, deadline)
        self._in_flight[link] = self._in_flight.get(link, 0) + 1
        heapq.heappush(self._deadlines, (deadline, probe_id))
        self._counters.sent += 1
        return probe_id

    def probe_answered(self, probe_id: int, now: float) -> float | None:
        """Record the answer to probe ``probe_id``; returns its round trip in seconds.

        Returns None for an unknown id: answered already, of a removed link, or later
        than ``max_timeout`` after its timeout. An answer after the timeout still
        gives a sample (rule 2).
        """
        sent = self._probes.pop(probe_id, None)
        if sent is None:
            return None
        rtt = max(0.0, now - sent.sent_at)
        probe = self._links[sent.link]
        if sent.timed_out:
            self._counters.late += 1
            probe.answered(rtt, now, in_time=False)
        else:
            self._counters.answered += 1
            self._release(sent.link)
            probe.answered(rtt, now)
        self._row_cache = None
        return rtt

    def handle_timer(self, now: float) -> None:
        """Time out the probes whose deadline has passed (and forget very late ones)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, probe_id = heapq.heappop(self._deadlines)
            sent = self._probes.get(probe_id)
            if sent is None:
                continue
            if sent.timed_out:  # even a late answer is no longer expected
                del self._probes[probe_id]
                continue
            sent.timed_out = True
            self._counters.lost += 1
            self._release(sent.link)
            self._links[sent.link].lost(now)
            self._row_cache = None
            heapq.heappush(self._deadlines, (now + self._config.max_timeout, probe_id))

    def get_timer(self) -> float | None:
        """When `handle_timer`, `probes_due` or `row_update` next has something to do.

        None when nothing is scheduled. The first row becomes due with the first
        answer, so call `row_update` after every input, as the driver loop does.
        """
        times: list[float] = []
        while self._deadlines and self._deadlines[0][1] not in self._probes:
            heapq.heappop(self._deadlines)  # answered or removed: drop lazily
        if self._deadlines:
            times.append(self._deadlines[0][0])
        next_due = min(
            (p.next_probe_at for k, p in self._links.items() if k not in self._in_flight),
            default=None,
        )
        if next_due is not None:
            if self._tokens < 1:  # wait for a token
                refill = self._tokens_at + (1 - self._tokens) / self._config.max_probe_rate
                next_due = max(next_due, refill)
            times.append(next_due)
        if self._published is not None:
            times.append(self._published_at + self._config.refresh_interval)
            if self._is_significant(self._row()):
                times.append(self._published_at + self._config.min_publish_interval)
        return min(times, default=None)

    # -- the row -----------------------------------------------------------------------

    def row_update(self, now: float) -> dict[Link, float] | None:
        """The row to publish now (link -> seconds, 1 ms resolution), or None (rule 5)."""
        config = self._config
        row = self._row()
        elapsed = now - self._published_at
        if self._published is None:
            due = bool(row)
        else:
            due = elapsed >= config.refresh_interval or (
                elapsed >= config.min_publish_interval and self._is_significant(row)
            )
        if not due:
            return None
        self._published, self._published_at = row, now
        self._counters.rows += 1
        return dict(row)

    @property
    def published(self) -> dict[Link, float] | None:
        """The row last returned by `row_update` (None before the first)."""
        return None if self._published is None else dict(self._published)

    def statistics(self) -> ProbeStatistics:
        """Counters since the scheduler was made."""
        c = self._counters
        return ProbeStatistics(
            links=len(self._links),
            probes_sent=c.sent,
            probes_answered=c.answered,
            probes_lost=c.lost,
            late_answers=c.late,
            rows_published=c.rows,
            bytes_sent=c.sent * self._config.probe_size,
        )

    # -- internals ---------------------------------------------------------------------

    def _tokens_now(self, now: float) -> float:
        config = self._config
        if self._tokens_at == -math.inf:
            return config.probe_burst
        refilled = self._tokens + max(0.0, now - self._tokens_at) * config.max_probe_rate
        return min(config.probe_burst, refilled)

    def _release(self, link: Link) -> None:
        count = self._in_flight.get(link, 0) - 1
        if count > 0:
            self._in_flight[link] = count
        else:
            self._in_flight.pop(link, None)

    def _row(self) -> dict[Link, float]:
        """The current row (cached until a link is added, removed, answered or lost)."""
        if self._row_cache is None:
            self._row_cache = {
                link: quantise(probe.srtt)
                for link, probe in self._links.items()
                if probe.srtt is not None and not probe.is_down and not probe.is_lossy
            }
        return self._row_cache

    def _is_significant(self, row: dict[Link, float]) -> bool:
        published = self._published
        if published is None:
            return bool(row)
        if published.keys() != row.keys():
            return True
        ratio, margin = self._config.publish_ratio, self._config.publish_margin
        return any(abs(row[k] - old) > max(margin, ratio * old) for k, old in published.items())


def quantise(seconds: float) -> float:
    """``seconds`` rounded to the directory's 1 ms resolution."""
    return round(seconds * 1000) / 1000
