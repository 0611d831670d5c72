"""bench/quality.py's protocol code against brute-force references on tiny synthetic
data: the selection split, per-user metrics averaged over seeds, the paired
bootstrap and its verdicts, the trials, and EASE's closed form through the users."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import bench_module  # tests/conftest.py

from ncf_stream.events import Events
from ncf_stream.ids import IdMap
from ncf_stream.settings import Settings
from ncf_stream.store import InteractionStore
from ncf_stream.synth import SynthConfig, generate, write

quality = bench_module("quality")


def _events(rows: list[tuple[str, str, float]]) -> Events:
    return Events.from_rows([(u, i, ts, "rating", 1.0) for u, i, ts in rows])


def _holdouts(events: Events) -> dict[str, str]:
    """What the store holds out at the end of a stream: {user: item}."""
    users, items = IdMap(), IdMap()
    store = InteractionStore()
    store.append(users.rows(events.users), items.rows(events.items), events.ts)
    ho = store.holdout()
    return dict(zip(users.ids(ho.users).tolist(), items.ids(ho.items).tolist(), strict=True))


def events_rows(events: Events) -> list[tuple[str, str, float]]:
    return list(zip(events.users.tolist(), events.items.tolist(), events.ts.tolist(),
                    strict=True))


def test_selection_split_removes_each_users_newest_event() -> None:
    rows = [("a", "1", 1.0), ("b", "1", 2.0), ("a", "2", 3.0), ("c", "9", 3.5),
            ("a", "3", 4.0), ("b", "2", 5.0), ("b", "3", 6.0), ("a", "4", 7.0),
            ("b", "4", 6.0)]  # b's 3 and 4 tie in time: the later arrival is the newer
    events = _events(rows)
    assert _holdouts(events) == {"a": "4", "b": "4"}  # the test hold-out

    kept = quality.drop_newest(events)
    assert events_rows(kept) == [r for r in rows if r not in {("a", "4", 7.0), ("b", "4", 6.0),
                                                      ("c", "9", 3.5)}]
    # The validation hold-out is the second-newest; c had one event and is gone.
    assert _holdouts(kept) == {"a": "3", "b": "3"}


def test_selection_split_on_random_streams_matches_a_sort_per_user() -> None:
    rng = np.random.default_rng(1)
    rows = [(f"u{rng.integers(5)}", f"i{n}", float(rng.integers(20))) for n in range(200)]
    order = np.argsort([ts for _, _, ts in rows], kind="stable")  # as read_events delivers
    events = _events([rows[i] for i in order])
    kept = quality.drop_newest(events)
    for user in {u for u, _, _ in rows}:
        mine = [(ts, n, item) for n, (u, item, ts) in enumerate(events_rows(events)) if u == user]
        expected = [item for _, _, item in sorted(mine)[:-1]]
        got = [i for u, i in zip(kept.users, kept.items, strict=True) if u == user]
        assert sorted(got) == sorted(expected)
        second_newest = sorted(mine)[-2][2] if len(mine) >= 3 else None
        assert _holdouts(kept).get(user) == second_newest


def test_per_user_averages_each_users_gain_over_seeds() -> None:
    runs = [{"sampled": np.array([0, 9, 10, 3]), "full": np.array([50, 1, 0, 12])},
            {"sampled": np.array([2, 11, 0, 3]), "full": np.array([5, 100, 9, 10])}]
    got = quality.per_user(runs)

    def ndcg(rank: int) -> float:
        return 1.0 / np.log2(rank + 2) if rank < 10 else 0.0

    for metric, kind in (("hr10", "sampled"), ("ndcg10", "sampled"),
                         ("full_hr10", "full"), ("full_ndcg10", "full")):
        for user in range(4):
            seeds = [int(run[kind][user]) for run in runs]
            gains = [float(r < 10) if metric.endswith("hr10") else ndcg(r) for r in seeds]
            assert got[metric][user] == pytest.approx(sum(gains) / len(gains))
    assert got["hr10"].tolist() == [1.0, 0.5, 0.5, 1.0]
    assert got["full_ndcg10"][0] == pytest.approx(0.5 / np.log2(7))


def test_bootstrap_interval_matches_a_loop_over_resamples() -> None:
    values = np.array([0.0, 1.0, 0.5, 0.25, 1.0])
    idx = quality.resamples(len(values), n=200, seed=3)
    assert idx.shape == (200, 5) and idx.min() >= 0 and idx.max() < 5
    means = [sum(values[i] for i in row) / len(row) for row in idx]
    assert quality.interval(values, idx) == pytest.approx(
        [np.percentile(means, 2.5), np.percentile(means, 97.5)])
    assert np.array_equal(idx, quality.resamples(5, n=200, seed=3))  # fixed rng


def test_paired_bootstrap_sees_a_constant_gap_through_noisy_users() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(50)  # users differ a lot: each method's own interval is wide
    stream = base + 0.01  # but the stream is ahead on every user
    idx = quality.resamples(50, n=1000)
    own = quality.interval(stream, idx)
    assert own[0] < base.mean() < own[1]  # unpaired, the gap would look like a tie
    diff = quality.interval(stream - base, idx)
    assert diff == pytest.approx([0.01, 0.01])
    assert quality.verdict(diff) == "win"
    assert quality.verdict(quality.interval(base - stream, idx)) == "loss"
    assert quality.verdict([-0.01, 0.02]) == "tie"
    assert quality.verdict([0.0, 0.02]) == "tie"  # an interval touching 0 is no win


def test_trials_are_seeded_distinct_and_from_the_grid() -> None:
    for method, grid in quality.GRIDS.items():
        picked = quality.trials(method, 4)
        assert picked == quality.trials(method, 4)
        assert len({tuple(c.items()) for c in picked}) == 4
        points = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
        assert all(c in points for c in picked)
    with pytest.raises(SystemExit):
        quality.trials("ease", len(quality.GRIDS["ease"]["lam"]) + 1)


def test_the_docstring_states_the_grids_in_use() -> None:
    assert quality.grid_text() in quality.__doc__


def test_ease_through_the_users_equals_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    x = sp.csr_matrix((rng.random((6, 15)) < 0.3).astype(np.float32))
    lam = 3.0
    xd = x.toarray().astype(np.float64)
    p = np.linalg.inv(xd.T @ xd + lam * np.eye(15))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    assert quality.ease_scores(x, lam) == pytest.approx(xd @ b, abs=1e-9)


def test_the_quality_profile_is_the_chosen_stream_configuration() -> None:
    """deploy/quality.toml, what users run, is what bench/quality.py measured."""
    root = Path(__file__).resolve().parents[1]
    chosen = json.loads((root / "bench" / "chosen.json").read_text())
    profile = Settings.load(root / "deploy" / "quality.toml")
    stream = chosen["methods"]["stream"]
    want = {**stream["config"], "replay_ratio": stream["replay_ratio"]}
    assert {name: getattr(profile, name) for name in want} == want


def test_batch_curve_runs_each_batch_size_on_the_same_hold_outs(tmp_path: Path) -> None:
    """bench/batch_curve.py end to end on a tiny planted stream: one entry per batch
    size, the first its own baseline (a zero difference), the larger batch polled in
    full steps, every run trained to about the same number of samples."""
    data = tmp_path / "tiny.csv"
    write(generate(SynthConfig(users=60, items=40, events=1500, topics=4, seed=2)), data)
    script = Path(__file__).resolve().parents[1] / "bench" / "batch_curve.py"
    out = subprocess.run([sys.executable, str(script), str(data), "--quick",
                          "--batches", "512,4096", "--replay-samples", "60000"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    curve = result["curve"]
    assert [c["batch_size"] for c in curve] == [512, 4096]
    assert all(v == [0.0, 0.0] for v in curve[0]["diff_ci"].values())
    for c in curve:
        assert 0.0 <= c["full_hr10"] <= 1.0 and c["samples_per_s"] > 0
        assert c["full_hr10_ci"][0] <= c["full_hr10"] <= c["full_hr10_ci"][1]
    small, large = (c["samples_total"][0] for c in curve)
    assert abs(large - small) <= 4096 * 3  # equal budgets, up to a few large steps
    batch_curve = bench_module("batch_curve")
    assert batch_curve.budget_for(4096, 1).poll == 1000  # at least the quality bench's poll
    assert batch_curve.budget_for(1 << 20, 1).poll == (1 << 20) // 5
