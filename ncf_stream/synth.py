"""A seeded synthetic interaction stream with a planted signal and a long tail.

The structure is known, so tests can tell learning from luck:

* items fall into ``topics`` equal clusters; within a topic and overall, item
  popularity is Zipf-like (a long tail, as in real catalogues);
* each user has a primary and a secondary topic; a share ``affinity`` of a
  user's events comes from them, the rest from global popularity (noise);
* user activity is long-tailed and users arrive over time, so the stream keeps
  introducing new users the way a live service does.

A model that learns the topics ranks a user's next item far above what
popularity alone can; one that learns nothing does not. Everything is
vectorized numpy, so 100M events take seconds per 10M, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncf_stream.errors import BadInput
from ncf_stream.events import Events


@dataclass(frozen=True)
class SynthConfig:
    users: int = 1_000
    items: int = 500
    events: int = 20_000
    seed: int = 0
    topics: int = 20  # planted clusters; a user's taste is one primary and one secondary topic
    affinity: float = 0.8  # share of events from the user's own topics; the rest is noise
    primary_share: float = 0.7  # of the topical events, the share from the primary topic
    item_zipf: float = 1.0  # popularity exponent within a topic and globally
    user_zipf: float = 0.8  # activity exponent: a few heavy users, many light ones
    start_ts: float = 1_700_000_000.0
    duration_s: float = 30 * 86_400.0

    def validate(self) -> None:
        if min(self.users, self.items, self.topics) < 1 or self.events < 0:
            raise BadInput("users, items and topics must be >= 1 and events >= 0")
        if self.topics > self.items:
            raise BadInput(f"topics ({self.topics}) cannot exceed items ({self.items})")
        if not (0.0 <= self.affinity <= 1.0 and 0.0 <= self.primary_share <= 1.0):
            raise BadInput("affinity and primary_share must lie in [0, 1]")


@dataclass(frozen=True)
class SynthStream:
    """Events as dense integer ids plus the planted truth."""

    users: np.ndarray  # (E,) int64 user id
    items: np.ndarray  # (E,) int64 item id
    ts: np.ndarray  # (E,) float64, non-decreasing
    item_topic: np.ndarray  # (I,) int64
    user_topics: np.ndarray  # (U, 2) int64: primary, secondary

    def to_events(self) -> Events:
        n = len(self.users)
        return Events(
            users=self.users.astype(str).astype(object),
            items=self.items.astype(str).astype(object),
            ts=self.ts,
            weights=np.ones(n),
            types=np.full(n, "interaction", dtype=object),
        )


def generate(cfg: SynthConfig) -> SynthStream:
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    item_topic = rng.permutation(cfg.items) % cfg.topics
    user_topics = _user_topics(rng, cfg)
    users = _draw_users(rng, cfg)
    ts = _times(rng, cfg, users)
    items = _draw_items(rng, cfg, item_topic, user_topics[users])
    order = np.argsort(ts, kind="stable")
    return SynthStream(users[order], items[order], ts[order], item_topic, user_topics)


def _user_topics(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    primary = rng.integers(0, cfg.topics, cfg.users)
    # The secondary differs from the primary whenever there are two topics to choose from.
    shift = rng.integers(1, cfg.topics, cfg.users) if cfg.topics > 1 else 0
    return np.stack([primary, (primary + shift) % cfg.topics], axis=1)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(w)


def _draw_users(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    activity = _zipf_weights(cfg.users, cfg.user_zipf, rng)
    cdf = np.cumsum(activity)
    return np.searchsorted(cdf, rng.random(cfg.events) * cdf[-1], side="right").clip(
        max=cfg.users - 1
    )


def _times(rng: np.random.Generator, cfg: SynthConfig, users: np.ndarray) -> np.ndarray:
    # Users arrive during the first 70% of the window and stay active to its end.
    arrival = rng.random(cfg.users) * 0.7
    start = arrival[users]
    frac = start + (1.0 - start) * rng.random(len(users))
    return cfg.start_ts + np.round(frac * cfg.duration_s)


def _draw_items(
    rng: np.random.Generator, cfg: SynthConfig, item_topic: np.ndarray, topics: np.ndarray
) -> np.ndarray:
    n = len(topics)
    popularity = _zipf_weights(cfg.items, cfg.item_zipf, rng)
    # Items grouped by topic; one cumulative distribution per topic, laid end to
    # end with topic t's spanning [t, t + 1), so one searchsorted serves all topics.
    by_topic = np.argsort(item_topic, kind="stable")
    counts = np.bincount(item_topic, minlength=cfg.topics)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    w = popularity[by_topic]
    topic_sum = np.add.reduceat(w, starts)
    within = np.cumsum(w) - np.repeat(np.cumsum(topic_sum) - topic_sum, counts)
    flat_cdf = item_topic[by_topic] + within / np.repeat(topic_sum, counts)
    flat_cdf[starts + counts - 1] = np.arange(cfg.topics) + 1.0  # exact ends: no spill-over

    u = rng.random(n)
    topical = u < cfg.affinity
    chosen = np.where(u < cfg.affinity * cfg.primary_share, topics[:, 0], topics[:, 1])
    # Keep the draw strictly below the topic's end, so it lands inside the topic.
    draw = chosen + np.minimum(rng.random(n), 1.0 - 1e-9)
    items = by_topic[np.searchsorted(flat_cdf, draw, side="right")]

    global_cdf = np.cumsum(popularity)
    noise = np.searchsorted(global_cdf, rng.random(n) * global_cdf[-1], side="right")
    return np.where(topical, items, noise.clip(max=cfg.items - 1))


def write(stream: SynthStream, path: str | Path, chunk: int = 1_000_000) -> int:
    """Write as CSV (``user,item,ts,weight``) or, for ``.jsonl``, as JSON events."""
    path = Path(path)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json")
    with open(path, "w", encoding="utf-8") as f:
        if not jsonl:
            f.write("user,item,ts,weight\n")
        for lo in range(0, len(stream.users), chunk):
            sl = slice(lo, lo + chunk)
            rows = zip(stream.users[sl].tolist(), stream.items[sl].tolist(),
                       stream.ts[sl].tolist(), strict=True)
            if jsonl:
                f.writelines(f'{{"user":"{u}","item":"{i}","ts":{t}}}\n' for u, i, t in rows)
            else:
                f.writelines(f"{u},{i},{t},1\n" for u, i, t in rows)
    return len(stream.users)
