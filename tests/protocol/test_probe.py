import heapq
import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtswarm.protocol.probe import (
    LinkProbe,
    ProbeConfig,
    ProbeScheduler,
    quantise,
)

STEADY = ProbeConfig(interval_jitter=0.0)

RttOf = Callable[[str, float], float | None]  # (link, now) -> round trip, or None: lost


def constant(rtts: dict[str, float | None]) -> RttOf:
    return lambda link, now: rtts[link]


def run(
    scheduler: ProbeScheduler[str],
    rtt_of: RttOf,
    start: float,
    until: float,
) -> tuple[list[tuple[float, str]], list[tuple[float, dict[str, float]]]]:
    """Drive ``scheduler`` as a node would, answers arriving after ``rtt_of``.

    Returns the probes sent (time, link) and the rows published (time, row).
    """
    sent: list[tuple[float, str]] = []
    rows: list[tuple[float, dict[str, float]]] = []
    answers: list[tuple[float, int]] = []
    now = start
    while now <= until:
        while answers and answers[0][0] <= now:
            _, probe_id = heapq.heappop(answers)
            scheduler.probe_answered(probe_id, now)
        scheduler.handle_timer(now)
        for link in scheduler.probes_due(now):
            probe_id = scheduler.probe_sent(link, now)
            sent.append((now, link))
            rtt = rtt_of(link, now)
            if rtt is not None:
                heapq.heappush(answers, (now + rtt, probe_id))
        row = scheduler.row_update(now)
        if row is not None:
            rows.append((now, row))
        timer = scheduler.get_timer()
        wake = min(t for t in (timer, answers[0][0] if answers else None) if t is not None)
        assert wake > now or scheduler.probes_due(now) == [], "busy loop"
        now = max(wake, now + 1e-9)
    return sent, rows


def probe_times(sent: list[tuple[float, str]], link: str) -> list[float]:
    return [t for t, k in sent if k == link]


# -- estimates -------------------------------------------------------------------------


def test_first_sample_sets_srtt_and_rttvar_then_ewma() -> None:
    probe = LinkProbe(STEADY, 0.0, random.Random(0))
    assert probe.estimate().rtt is None
    probe.answered(0.100, 0.1)
    assert probe.srtt == pytest.approx(0.100)
    assert probe.rttvar == pytest.approx(0.050)
    probe.answered(0.200, 1.2)
    # RFC 6298: rttvar first, with the old srtt; then srtt
    assert probe.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * 0.100)
    assert probe.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.200)


def test_ewma_converges_to_a_new_level() -> None:
    probe = LinkProbe(STEADY, 0.0, random.Random(0))
    for i in range(20):
        probe.answered(0.100, float(i))
    assert probe.srtt == pytest.approx(0.100)
    for i in range(20, 60):
        probe.answered(0.200, float(i))
    assert probe.srtt == pytest.approx(0.200, rel=0.01)
    assert probe.rttvar is not None
    assert probe.rttvar < 0.005  # the deviation decays once the level is steady
    assert probe.estimate().samples == 60


def test_jitter_is_the_smoothed_step_between_samples() -> None:
    probe = LinkProbe(STEADY, 0.0, random.Random(0))
    probe.answered(0.100, 0.0)
    assert probe.jitter is None  # one sample has no step
    for i in range(200):
        probe.answered(0.120 if i % 2 == 0 else 0.100, float(i))
    assert probe.jitter == pytest.approx(0.020, rel=0.01)
    for i in range(200):
        probe.answered(0.100, float(i))
    assert probe.jitter is not None
    assert probe.jitter < 0.001


def test_negative_samples_are_refused() -> None:
    probe = LinkProbe(STEADY, 0.0, random.Random(0))
    with pytest.raises(ValueError, match="finite"):
        probe.answered(-0.1, 0.0)
    with pytest.raises(ValueError, match="finite"):
        probe.answered(math.inf, 0.0)


# -- timeouts and loss -----------------------------------------------------------------


def test_a_probe_is_lost_at_its_deadline_not_before() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    probe_id = s.probe_sent("a", 0.0)
    assert s.get_timer() == STEADY.initial_timeout  # no estimate yet
    s.handle_timer(2.999)
    assert s.estimate("a").loss == 0.0
    s.handle_timer(3.0)
    assert s.estimate("a").loss == 1.0
    assert s.probes_due(3.0) == ["a"]  # after a loss: probe again at once
    # a late answer is a sample and shows the link is alive, but stays a loss
    assert s.probe_answered(probe_id, 3.5) == pytest.approx(3.5)
    estimate = s.estimate("a")
    assert estimate.rtt == pytest.approx(3.5)
    assert estimate.loss == 1.0
    assert s.statistics().late_answers == 1
    assert s.probe_answered(probe_id, 3.6) is None  # answered twice


def test_timeout_follows_srtt_and_rttvar_within_bounds() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    s.probe_answered(s.probe_sent("a", 0.0), 0.4)  # srtt 0.4, rttvar 0.2: 1.2 s
    assert s.link_probe("a").timeout() == pytest.approx(1.2)
    s.add_link("b", 0.0)
    s.probe_answered(s.probe_sent("b", 0.0), 0.01)  # 0.03 s: clamped to 1 s
    assert s.link_probe("b").timeout() == STEADY.min_timeout
    s.add_link("c", 0.0)
    s.probe_answered(s.probe_sent("c", 0.0), 2.0)  # 6 s: clamped to 5 s
    assert s.link_probe("c").timeout() == STEADY.max_timeout


def test_loss_is_a_sliding_window_of_resolved_probes() -> None:
    config = ProbeConfig(interval_jitter=0.0, loss_window=8, down_after=100)
    lost_between = (30.0, 34.0)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    s.add_link("a", 0.0)

    def rtt_of(link: str, now: float) -> float | None:
        return None if lost_between[0] <= now < lost_between[1] else 0.05

    run(s, rtt_of, 0.0, 29.0)
    assert s.estimate("a").loss == 0.0
    run(s, rtt_of, 29.0 + 1e-6, 36.0)
    lost = s.statistics().probes_lost
    assert lost >= 2
    assert s.estimate("a").loss == pytest.approx(lost / 8)
    # eight answered probes later, the losses have left the window
    run(s, rtt_of, 36.0 + 1e-6, 300.0)
    assert s.estimate("a").loss == 0.0


def test_consecutive_losses_make_a_link_down_and_an_answer_brings_it_back() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    alive = True
    sent, _ = run(s, lambda link, now: 0.05 if alive else None, 0.0, 60.0)
    alive = False
    sent, _ = run(s, lambda link, now: None, 60.0 + 1e-6, 120.0)
    assert s.estimate("a").is_down
    times = probe_times(sent, "a")
    # the first loss is followed by probes at once (a 1 s timeout each) ...
    assert times[1] - times[0] <= STEADY.max_timeout
    assert times[2] - times[1] == pytest.approx(STEADY.min_timeout)
    # ... then, down, by a backoff up to max_interval
    gaps = [b - a for a, b in itertools.pairwise(times[2:])]
    assert gaps == sorted(gaps)
    assert max(gaps) == pytest.approx(STEADY.max_interval + STEADY.min_timeout)
    sent, _ = run(s, lambda link, now: 0.05, 120.0 + 1e-6, 150.0)
    assert not s.estimate("a").is_down


# -- adaptive interval -----------------------------------------------------------------


def test_interval_is_fast_while_new_then_backs_off() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    sent, _ = run(s, constant({"a": 0.1}), 0.0, 200.0)
    times = probe_times(sent, "a")
    # a probe is due one interval after the previous answer (0.1 s later)
    intervals = [round(b - a - 0.1, 6) for a, b in itertools.pairwise(times)]
    assert intervals[:7] == [1.0, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert set(intervals[6:]) == {15.0}


def test_a_changed_rtt_makes_probing_fast_again() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    run(s, constant({"a": 0.1}), 0.0, 100.0)
    assert s.link_probe("a").interval == STEADY.max_interval
    sent, _ = run(s, constant({"a": 0.3}), 100.0 + 1e-6, 140.0)
    assert s.link_probe("a").interval < STEADY.max_interval
    times = probe_times(sent, "a")
    assert any(b - a < 1.5 for a, b in itertools.pairwise(times))


def test_noise_below_the_change_threshold_keeps_backing_off() -> None:
    rng = random.Random(3)
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    run(s, lambda link, now: 0.1 * (1 + rng.uniform(-0.05, 0.05)), 0.0, 200.0)
    assert s.link_probe("a").interval == STEADY.max_interval


def test_interval_jitter_spreads_probes_within_bounds() -> None:
    config = ProbeConfig(interval_jitter=0.1)
    s: ProbeScheduler[str] = ProbeScheduler(config, rng=random.Random(1))
    s.add_link("a", 0.0)
    sent, _ = run(s, constant({"a": 0.0}), 0.0, 600.0)
    times = probe_times(sent, "a")
    late = [b - a for a, b in itertools.pairwise(times[10:])]
    assert all(13.5 - 1e-9 <= gap <= 16.5 + 1e-9 for gap in late)
    assert len({round(gap, 6) for gap in late}) > 1


# -- budget ----------------------------------------------------------------------------


def max_in_window(times: list[float], window: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] < t - window + 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_budget_is_respected_with_many_links() -> None:
    config = ProbeConfig(interval_jitter=0.0, max_probe_rate=5.0, probe_burst=5.0)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    links = [f"l{i}" for i in range(100)]
    for link in links:
        s.add_link(link, 0.0)
    sent, _ = run(s, lambda link, now: 0.05, 0.0, 120.0)
    times = [t for t, _ in sent]
    for window in (1.0, 5.0, 30.0):
        assert max_in_window(times, window) <= config.probe_burst + config.max_probe_rate * window
    # every link was measured, and the budget was used
    assert all(s.estimate(link).samples >= 1 for link in links)
    assert len(sent) >= 0.9 * config.max_probe_rate * 120


def test_overdue_links_go_first() -> None:
    config = ProbeConfig(interval_jitter=0.0, max_probe_rate=1.0, probe_burst=1.0)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    s.add_link("old", 0.0)
    s.add_link("new", 5.0)
    assert s.probes_due(5.0) == ["old"]
    s.probe_sent("old", 5.0)
    assert s.probes_due(5.5) == []  # no token yet
    assert s.get_timer() == pytest.approx(6.0)
    assert s.probes_due(6.0) == ["new"]  # "old" is in flight


def test_extra_pings_take_from_the_budget() -> None:
    config = ProbeConfig(interval_jitter=0.0, max_probe_rate=1.0, probe_burst=2.0)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    for link in "abc":
        s.add_link(link, 0.0)
    for link in "abc":
        s.probe_sent(link, 0.0)  # the caller pinged all three on its own
    for probe_id in (1, 2, 3):
        s.probe_answered(probe_id, 0.0)
    s.link_probe("a").next_probe_at = 0.0
    assert s.probes_due(0.5) == []  # one token owed
    assert s.probes_due(1.0) == []
    assert s.probes_due(2.0) == ["a"]


# -- rows ------------------------------------------------------------------------------


def test_rows_are_quantised_to_a_millisecond() -> None:
    assert quantise(0.0123456) == 0.012
    assert quantise(0.0125001) == 0.013
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    s.probe_answered(s.probe_sent("a", 0.0), 0.0421)
    assert s.row_update(0.0421) == {"a": 0.042}


def test_row_updates_only_on_significant_change_or_refresh() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s.add_link("a", 0.0)
    s.add_link("b", 0.0)
    level = {"a": 0.100, "b": 0.050}
    _, rows = run(s, lambda link, now: level[link], 0.0, 30.0)
    # the first row goes out at once, the second link joins it 5 s later (rate limit)
    assert rows[0][1] == {"a": 0.1} or rows[0][1] == {"b": 0.05}
    assert rows[1] == (pytest.approx(rows[0][0] + 5.0), {"a": 0.1, "b": 0.05})
    assert len(rows) == 2
    # +20 %: not significant, so only the refresh (40 s after the last row) publishes
    level["a"] = 0.120
    _, rows = run(s, lambda link, now: level[link], 30.0 + 1e-6, 80.0)
    assert len(rows) == 1
    assert rows[0][0] == pytest.approx(45.05)  # the second row went out at 5.05 s
    assert 0.1 < rows[0][1]["a"] <= 0.12  # the refresh carries the drift so far
    # +100 %: significant; published when srtt has moved by a quarter, not at refresh
    level["a"] = 0.240
    before = s.published
    assert before is not None
    _, rows = run(s, lambda link, now: level[link], 80.0 + 1e-6, 84.9)
    assert len(rows) == 1
    assert rows[0][1]["a"] > before["a"] * 1.25
    # 2 ms floor: on a 4 ms link, a 1 ms move is not significant
    s2: ProbeScheduler[str] = ProbeScheduler(STEADY)
    s2.add_link("a", 0.0)
    _, rows = run(s2, constant({"a": 0.004}), 0.0, 20.0)
    _, rows = run(s2, constant({"a": 0.005}), 20.0 + 1e-6, 39.0)
    assert rows == []


def test_a_link_that_goes_down_leaves_the_row() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    for link in "ab":
        s.add_link(link, 0.0)
    alive = {"a": True, "b": True}
    rtt_of: RttOf = lambda link, now: 0.05 if alive[link] else None  # noqa: E731
    run(s, rtt_of, 0.0, 60.0)
    assert s.published == {"a": 0.05, "b": 0.05}
    alive["b"] = False
    _, rows = run(s, rtt_of, 60.0 + 1e-6, 100.0)
    assert rows[0][1] == {"a": 0.05}
    # down within at most max_interval + the timeouts of down_after probes
    assert rows[0][0] - 60.0 <= STEADY.max_interval + 1 + 3 * STEADY.min_timeout
    # a removed link leaves too
    s.remove_link("a", 100.0)
    assert s.row_update(100.0) == {}


def test_loss_crossing_the_threshold_changes_the_row() -> None:
    config = ProbeConfig(interval_jitter=0.0, down_after=100, max_interval=2.0)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    s.add_link("a", 0.0)
    s.add_link("b", 0.0)
    rng = random.Random(5)
    lossy = {"a": 0.0, "b": 0.0}

    def rtt_of(link: str, now: float) -> float | None:
        return None if rng.random() < lossy[link] else 0.05

    run(s, rtt_of, 0.0, 60.0)
    assert s.published == {"a": 0.05, "b": 0.05}
    lossy["b"] = 0.6
    _, rows = run(s, rtt_of, 60.0 + 1e-6, 120.0)
    assert s.estimate("b").loss >= config.loss_threshold
    assert rows[0][1] == {"a": 0.05}
    lossy["b"] = 0.0
    _, rows = run(s, rtt_of, 120.0 + 1e-6, 200.0)
    assert s.published == {"a": 0.05, "b": 0.05}


def test_get_timer_covers_refresh_and_pending_changes() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    assert s.get_timer() is None
    s.add_link("a", 0.0)
    assert s.get_timer() == 0.0  # the first probe
    s.probe_answered(s.probe_sent("a", 0.0), 0.1)
    assert s.row_update(0.1) == {"a": 0.1}
    assert s.get_timer() == pytest.approx(1.1)  # the next probe
    s.add_link("b", 0.2)
    s.probe_answered(s.probe_sent("b", 0.2), 0.3)
    assert s.row_update(0.3) is None  # changed, but within min_publish_interval
    s.link_probe("a").next_probe_at = s.link_probe("b").next_probe_at = 100.0
    assert s.get_timer() == pytest.approx(5.1)
    assert s.row_update(5.1) == {"a": 0.1, "b": 0.1}
    assert s.get_timer() == pytest.approx(45.1)  # the refresh


def test_unknown_links_and_ids() -> None:
    s: ProbeScheduler[str] = ProbeScheduler(STEADY)
    with pytest.raises(ValueError, match="unknown link"):
        s.probe_sent("x", 0.0)
    with pytest.raises(ValueError, match="unknown link"):
        s.estimate("x")
    assert s.probe_answered(42, 0.0) is None
    s.add_link("a", 0.0)
    probe_id = s.probe_sent("a", 0.0)
    s.remove_link("a", 0.1)
    s.remove_link("a", 0.1)  # no-op
    assert "a" not in s
    assert s.probe_answered(probe_id, 0.2) is None
    s.handle_timer(10.0)
    assert s.statistics().probes_lost == 0


def test_statistics_count_probes_and_bytes() -> None:
    config = ProbeConfig(interval_jitter=0.0, probe_size=100)
    s: ProbeScheduler[str] = ProbeScheduler(config)
    s.add_link("a", 0.0)
    sent, rows = run(s, constant({"a": 0.02}), 0.0, 100.0)
    stats = s.statistics()
    assert stats.links == 1
    assert stats.probes_sent == len(sent) == stats.probes_answered
    assert stats.bytes_sent == 100 * len(sent)
    assert stats.rows_published == len(rows)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_interval": 0.0},
        {"min_interval": 20.0},
        {"backoff": 0.5},
        {"interval_jitter": 1.0},
        {"min_timeout": 6.0},
        {"loss_window": 0},
        {"max_probe_rate": 0.0},
        {"probe_burst": 0.5},
        {"rtt_gain": 0.0},
        {"loss_threshold": 0.0},
        {"publish_ratio": -1.0},
        {"min_publish_interval": 50.0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each field has its own message)
        ProbeConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    links=st.integers(1, 30),
    rate=st.sampled_from([0.5, 2.0, 8.0]),
    loss=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_schedule_invariants(links: int, rate: float, loss: float, seed: int) -> None:
    rng = random.Random(seed)
    config = ProbeConfig(max_probe_rate=rate, probe_burst=max(1.0, rate))
    s: ProbeScheduler[int] = ProbeScheduler(config, rng=random.Random(seed))
    for link in range(links):
        s.add_link(link, 0.0)
    answers: list[tuple[float, int]] = []
    sent: list[float] = []
    in_flight: dict[int, int] = {}
    now = 0.0
    while now < 120.0:
        while answers and answers[0][0] <= now:
            s.probe_answered(heapq.heappop(answers)[1], now)
        s.handle_timer(now)
        due = s.probes_due(now)
        assert len(set(due)) == len(due)
        for link in due:
            probe_id = s.probe_sent(link, now)
            in_flight[probe_id] = link
            sent.append(now)
            if rng.random() >= loss:
                heapq.heappush(answers, (now + rng.uniform(0.0, 2.0), probe_id))
        s.row_update(now)
        timer = s.get_timer()
        assert timer is not None
        now = max(now + 1e-6, min(timer, answers[0][0] if answers else math.inf))
    for window in (1.0, 10.0):
        assert max_in_window(sent, window) <= config.probe_burst + rate * window
    row = s.published or {}
    assert all(value == quantise(value) for value in row.values())
