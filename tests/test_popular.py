"""Popular over a recent window and a user's known items, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import drain_engine, small_engine_settings  # tests/conftest.py

from ncf_stream.catalogue import BUCKETS, Catalogue, RecentCounts
from ncf_stream.engine import Engine
from ncf_stream.errors import BadInput
from ncf_stream.events import Availability, Events
from ncf_stream.recommend import Recommender, UnknownUser
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource

WINDOW = 2400.0  # 24 buckets of 100 s


def brute_counts(items: np.ndarray, ts: np.ndarray, n_items: int) -> np.ndarray:
    """Events per item whose bucket is within BUCKETS of the newest event's bucket."""
    buckets = np.floor(ts / (WINDOW / BUCKETS))
    inside = buckets > buckets.max() - BUCKETS
    return np.bincount(items[inside], minlength=n_items)


def brute_top(counts: np.ndarray, hidden: np.ndarray, keep: int) -> tuple[list[int], list[int]]:
    counts = counts.copy()
    counts[hidden] = 0
    rows = [r for r in np.argsort(-counts, kind="stable").tolist() if counts[r] > 0][:keep]
    return rows, counts[rows].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recent_counts_equal_a_brute_force_count_whatever_the_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5000
    items = rng.zipf(1.5, n) % 300
    ts = np.sort(rng.uniform(0, 3 * WINDOW, n)) + rng.normal(0, 300, n)  # some arrive late
    recent = RecentCounts(WINDOW)
    cuts = np.sort(rng.choice(n, 40, replace=False))
    for part in np.split(np.arange(n), cuts):
        recent.add(items[part], ts[part])
        seen = part[-1] + 1 if len(part) else 0
        if seen:
            want = brute_counts(items[:seen], ts[:seen], 300)
            assert recent.total[:300].tolist() == want.tolist()
            assert recent.ring.sum(0)[:300].tolist() == want.tolist()
    hidden = np.array([int(np.argmax(recent.total))])
    rows, counts = recent.top(300, hidden, 25)
    assert (rows.tolist(), counts.tolist()) == brute_top(brute_counts(items, ts, 300), hidden, 25)


def test_a_jump_past_the_window_empties_it_and_old_events_are_dropped() -> None:
    recent = RecentCounts(WINDOW)
    recent.add(np.array([1, 1, 2]), np.array([0.0, 50.0, 99.0]))
    recent.add(np.array([3]), np.array([10 * WINDOW]))
    assert recent.top(5, np.empty(0, np.int64), 10)[0].tolist() == [3]
    recent.add(np.array([4, 4]), np.array([0.0, 9 * WINDOW + WINDOW / BUCKETS]))  # old; in
    assert recent.top(5, np.empty(0, np.int64), 10)[1].tolist() == [1, 1]


def settings(tmp_path: Path | None, window: float = WINDOW) -> Settings:
    return small_engine_settings(tmp_path, popular_window_s=window)


def stream(seed: int = 5, n: int = 3000) -> Events:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 80, n).astype(str)
    items = (rng.zipf(1.4, n) % 120).astype(str)
    ts = np.sort(rng.uniform(1.7e9, 1.7e9 + 2 * WINDOW, n)) + rng.normal(0, 200, n)
    return Events.from_rows([(str(u), str(i), float(t), "interaction", 1.0)
                             for u, i, t in zip(users, items, ts, strict=True)])


def test_popular_from_the_engine_is_a_brute_force_count_without_unavailable_items(
        tmp_path: Path) -> None:
    events = stream()
    source = MemorySource(events, batch_size=700)
    engine = Engine(settings(tmp_path), source)
    drain_engine(engine)
    rec = Recommender(engine.holder, max_k=50)
    rows = engine.trainer.item_ids.rows(events.items, add=False)
    want = brute_counts(rows, events.ts, len(engine.trainer.item_ids))
    top, counts = brute_top(want, np.empty(0, np.int64), 50)
    got = rec.popular(50)
    assert got.items == engine.trainer.item_ids.ids(np.array(top)).tolist()
    assert got.counts == counts and got.window_s == WINDOW
    source.push(Availability.from_rows([(got.items[0], False)]))
    drain_engine(engine)
    after = rec.popular(10)
    assert after.items == got.items[1:11] and after.counts == got.counts[1:11]
    with pytest.raises(BadInput):
        rec.popular(0)
    engine.close()
    again = Engine(settings(tmp_path), MemorySource(offset=len(events) + 1))
    again.publisher.publish(again.counters.consumed)
    restored = Recommender(again.holder).popular(10)
    assert (restored.items, restored.counts) == (after.items, after.counts)
    again.close(final_checkpoint=False)
    # Another window cannot reuse the counts: they start over (and say so in the log).
    other = Engine(settings(tmp_path, window=WINDOW / 2), MemorySource(offset=len(events) + 1))
    assert other.catalogue.recent.head is None and other.catalogue.recent.window_s == WINDOW / 2
    other.close(final_checkpoint=False)


def test_known_items_are_newest_first_paged_and_snapshot_consistent() -> None:
    events = stream(seed=7)
    source = MemorySource(events, batch_size=1000)
    engine = Engine(settings(None), source)
    drain_engine(engine)
    rec = Recommender(engine.holder)
    store = engine.trainer.store
    assert store._t0 is not None
    for user in ("0", "13", "42"):
        mine = events.users == user
        newest: dict[str, float] = {}
        for item, t in zip(events.items[mine].tolist(), events.ts[mine].tolist(), strict=True):
            newest[item] = max(newest.get(item, -np.inf), t)
        stored = {i: float(np.round(t - store._t0) + store._t0) for i, t in newest.items()}
        rows = {i: int(engine.trainer.item_ids.rows([i], add=False)[0]) for i in stored}
        want = sorted(stored, key=lambda i: (-stored[i], rows[i]))
        whole = rec.known_items(user, 0, 1000)
        assert whole.items == want and whole.total == len(want)
        assert whole.ts == [stored[i] for i in want]
        pages = [rec.known_items(user, offset, 3) for offset in range(0, len(want) + 3, 3)]
        assert [i for p in pages for i in p.items] == want and pages[-1].items == []
    snap = engine.holder.get()
    source.push(Events.from_rows([("0", "brand-new", 1.8e9, "interaction", 1.0)]))
    engine._ingest(source.poll())  # in the store, not yet in a snapshot
    assert engine.holder.get() is snap
    assert "brand-new" not in rec.known_items("0", 0, 1000).items
    with pytest.raises(UnknownUser):
        rec.known_items("nobody")
    for offset, limit in ((-1, 10), (0, 0), (0, 1001)):
        with pytest.raises(BadInput):
            rec.known_items("0", offset, limit)


def test_the_catalogue_file_round_trips_recent_counts(tmp_path: Path) -> None:
    cat = Catalogue(popular_window_s=WINDOW)
    cat.recent.add(np.array([0, 5, 5]), np.array([1.0, 2.0, 3.0 + WINDOW / 2]))
    cat.save(tmp_path / "c.npz")
    back = Catalogue.load(tmp_path / "c.npz")
    assert back.recent.window_s == WINDOW and back.recent.head == cat.recent.head
    assert np.array_equal(back.recent.ring, cat.recent.ring)
    assert np.array_equal(back.recent.total, cat.recent.total)
