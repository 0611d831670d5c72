"""bench/load.py's rules that keep its figures honest: the open-loop schedule,
percentiles reported only where enough requests carry them, requests for
"known" users only to users the served snapshot includes, and, with ``--replicas``,
the same clients for every replica count, spread over all the replicas."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from conftest import bench_module  # tests/conftest.py

load = bench_module("load")


def test_min_requests_leaves_ten_above_the_quantile() -> None:
    assert load.min_requests(99) == 1000
    assert load.min_requests(99.9) == 10_000
    assert load.min_requests(50) == 20


@pytest.mark.parametrize(("pct", "enough"), [(99, 1000), (99.9, 10_000)])
def test_percentile_is_null_below_enough_requests(pct: float, enough: int) -> None:
    ms = np.arange(enough, dtype=float)
    assert load.percentile_ms(ms[:-1], pct) is None
    assert load.percentile_ms(ms, pct) == round(float(np.percentile(ms, pct)), 2)


def test_summary_reports_null_tails_and_the_count() -> None:
    n = 999  # one short of a p99
    due = np.arange(n) / 100
    run = {"due": due.tolist(), "sent": due.tolist(), "done": (due + 0.002).tolist(),
           "unknown": [0.0] * n, "cold": [0.0] * n, "ingesting": [0.0] * n}
    out = load.summarize([run])
    assert out["requests"] == n
    assert out["p99_ms"] is None and out["p99_ci95_ms"] is None and out["p999_ms"] is None
    assert out["p50_ms"] == pytest.approx(2.0)
    assert out["max_ms"] == pytest.approx(2.0)


def test_latency_counts_from_the_schedule_not_the_send() -> None:
    # A 1 s stall on request 0 holds up the ~110 due behind it (every 10 ms, answered in
    # 1 ms each once it clears): their service time stays 1 ms, their latency is the wait
    # behind the stall plus that.
    due = np.arange(1000) / 100
    done, sent, t = [], [], 0.0
    for i, d in enumerate(due):
        s = max(d, t)
        t = s + (1.0 if i == 0 else 0.001)
        sent.append(s)
        done.append(t)
    run = {"due": due.tolist(), "sent": sent, "done": done,
           "unknown": [0.0] * 1000, "cold": [0.0] * 1000, "ingesting": [0.0] * 1000}
    out = load.summarize([run])
    assert out["service_time"]["p99_ms"] == pytest.approx(1.0)
    assert out["service_time"]["over_10ms"] == pytest.approx(0.001)
    late = np.asarray(sent) - due
    assert np.sum(late > 0.001) == 110  # request i waits 0.999 - 0.009 i s
    assert out["sent_late_share"] == pytest.approx(np.mean(late > 0.001))
    assert out["over_10ms"] == pytest.approx(np.mean(np.asarray(done) - due > 0.010))
    assert out["over_10ms"] > 0.1
    assert out["p99_ms"] > 900


def test_cold_start_shares() -> None:
    n = 1000
    unknown = [1.0 if i % 20 == 0 else 0.0 for i in range(n)]  # 5%
    cold = [1.0 if u or i % 10 == 1 else 0.0 for i, u in enumerate(unknown)]
    due = (np.arange(n) / 100).tolist()
    ingesting = [1.0 if i < 250 else 0.0 for i in range(n)]
    run = {"due": due, "sent": due, "done": due, "unknown": unknown, "cold": cold,
           "ingesting": ingesting}
    out = load.summarize([run])
    assert out["unknown_share"] == pytest.approx(0.05)
    assert out["cold_start_share"] == pytest.approx(0.15)
    assert out["cold_start_share_of_known"] == pytest.approx(100 / 950, abs=1e-4)
    assert out["sent_during_ingest_share"] == pytest.approx(0.25)


def test_schedule_is_open_loop_at_the_target_rate() -> None:
    due = load.due_times(100, 5)
    assert len(due) == 500
    assert due[0] == 0 and due[-1] == pytest.approx(4.99)
    assert np.allclose(np.diff(due), 0.01)
    assert len(load.due_times(30, 1000 / 30)) == 1000  # no request lost or added to rounding
    with pytest.raises(ValueError):
        load.due_times(0, 5)


def _stream() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 300, 2000)  # users repeat, first events spread over the stream


def test_first_seen_orders_users_by_their_first_event() -> None:
    users = np.array([5, 3, 5, 9, 3, 1])
    by_first, first = load.first_seen(users)
    assert by_first.tolist() == [5, 3, 9, 1]
    assert first.tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("covered", [1, 2, 17, 500, 1999, 2000, 5000])
def test_known_users_are_those_the_covered_prefix_names(covered: int) -> None:
    stream = _stream()
    by_first, first = load.first_seen(stream)
    known = load.covered_users(first, covered)
    assert set(by_first[:known].tolist()) == set(stream[:covered].tolist())


@pytest.mark.parametrize("covered", [1, 2, 3, 17, 500, 1999])
def test_pick_known_never_picks_a_user_not_yet_covered(covered: int) -> None:
    stream = _stream()
    by_first, first = load.first_seen(stream)
    named = set(stream[:covered].tolist())
    rng = np.random.default_rng(0)
    picks = {int(load.pick_known(rng, by_first, first, covered)) for _ in range(3000)}
    assert picks <= named
    if len(named) <= 100:  # 30 draws a user: every one of them comes up
        assert picks == named


def test_the_event_at_index_covered_is_not_covered() -> None:
    # Users 0 and 1 first appear at indices 0 and 1; covering one event names user 0 only.
    by_first, first = load.first_seen(np.array([0, 1, 0, 1]))
    rng = np.random.default_rng(0)
    assert {int(load.pick_known(rng, by_first, first, 1)) for _ in range(100)} == {0}
    with pytest.raises(ValueError):
        load.pick_known(rng, by_first, first, 0)


def test_clients_are_spread_evenly_over_the_servers() -> None:
    assert load.spread(4, 4) == [0, 1, 2, 3]
    assert load.spread(5, 2) == [0, 1, 0, 1, 0]
    assert load.spread(3, 1) == [0, 0, 0]  # no replicas: all on the trainer
    assert load.spread(0, 2) == []
    with pytest.raises(ValueError):
        load.spread(2, 0)


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 7])
def test_with_at_least_as_many_clients_as_replicas_every_replica_is_queried(
        replicas: int) -> None:
    clients = load.replica_clients(1, [0, replicas])
    assert set(load.spread(clients, replicas)) == set(range(replicas))


def test_replica_mode_gives_every_count_the_same_clients() -> None:
    # The offered load is the same for each count, so their figures compare.
    assert load.replica_clients(1, [0, 1, 2, 4]) == 4
    assert load.replica_clients(6, [0, 1, 2, 4]) == 6
    assert load.replica_clients(1, [0]) == 1


def test_replica_counts_parse() -> None:
    assert load.replica_counts("0,1,2,4") == [0, 1, 2, 4]
    assert load.replica_counts("3") == [3]
    for bad in ("", "1,,2", "-1", "a", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            load.replica_counts(bad)
