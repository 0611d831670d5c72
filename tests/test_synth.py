"""The synthetic stream: seeded, long-tailed, with the planted structure it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ncf_stream.errors import BadInput
from ncf_stream.readers import read_events
from ncf_stream.synth import SynthConfig, generate, write

CFG = SynthConfig(users=2000, items=1000, events=100_000, seed=7, topics=20)


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a, b = generate(CFG), generate(CFG)
    c = generate(SynthConfig(**{**CFG.__dict__, "seed": 8}))
    assert np.array_equal(a.users, b.users) and np.array_equal(a.items, b.items)
    assert np.array_equal(a.ts, b.ts)
    assert not np.array_equal(a.items, c.items)


def test_shape_and_order() -> None:
    s = generate(CFG)
    assert len(s.users) == len(s.items) == len(s.ts) == CFG.events
    assert s.users.min() >= 0 and s.users.max() < CFG.users
    assert s.items.min() >= 0 and s.items.max() < CFG.items
    assert np.all(np.diff(s.ts) >= 0)


def test_planted_topics_carry_the_expected_share() -> None:
    s = generate(CFG)
    topic = s.item_topic[s.items]
    own = s.user_topics[s.users]
    primary = np.mean(topic == own[:, 0])
    secondary = np.mean(topic == own[:, 1])
    noise = 1 - CFG.affinity
    # Topical draws land in the chosen topic; noise lands in it 1/topics of the time.
    assert primary == pytest.approx(CFG.affinity * CFG.primary_share + noise / CFG.topics, abs=0.01)
    assert secondary == pytest.approx(
        CFG.affinity * (1 - CFG.primary_share) + noise / CFG.topics, abs=0.01)


def test_popularity_has_a_long_tail() -> None:
    s = generate(CFG)
    counts = np.sort(np.bincount(s.items, minlength=CFG.items))[::-1]
    top_decile_share = counts[: CFG.items // 10].sum() / counts.sum()
    assert top_decile_share > 0.4  # uniform would give 0.1
    assert (counts > 0).sum() > CFG.items * 0.8  # yet most of the catalogue appears


def test_users_arrive_over_time() -> None:
    s = generate(CFG)
    first_seen = np.full(CFG.users, np.inf)
    np.minimum.at(first_seen, s.users, s.ts)
    first_seen = first_seen[np.isfinite(first_seen)]
    span = s.ts[-1] - s.ts[0]
    late = np.mean(first_seen > s.ts[0] + 0.3 * span)
    assert late > 0.3


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(BadInput):
        generate(SynthConfig(users=0))
    with pytest.raises(BadInput):
        generate(SynthConfig(items=5, topics=10))


@pytest.mark.parametrize("name", ["s.csv", "s.jsonl"])
def test_written_file_reads_back(tmp_path: Path, name: str) -> None:
    s = generate(SynthConfig(users=50, items=30, events=500, seed=1, topics=3))
    path = tmp_path / name
    assert write(s, path) == 500
    result = read_events(path)
    assert result.bad_lines == []
    assert result.events.users.tolist() == s.users.astype(str).tolist()
    assert result.events.items.tolist() == s.items.astype(str).tolist()
    assert result.events.ts.tolist() == s.ts.tolist()
