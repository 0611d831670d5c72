"""Forgetting (delete_user / delete_item) and retention, against brute force.

The promise (docs/operations.md, "Forgetting"): within one snapshot a deleted
user or item is gone from the store, the id maps, the model's rows and optimizer
state, the history buffers, the catalogue, every answer, and the next checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ncf_stream import checkpoint
from ncf_stream.engine import Engine
from ncf_stream.errors import ConfigError
from ncf_stream.events import Availability, Deletions, Events, decode_batch, segments
from ncf_stream.ids import IdMap, RowMapper
from ncf_stream.keyset import KeySet
from ncf_stream.recommend import Recommender, UnknownUser
from ncf_stream.sampler import NegativeSampler, SamplerConfig, eval_negatives
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Snapshot, SnapshotHolder
from ncf_stream.source import EventBatch, MemorySource
from ncf_stream.store import ITEM_MASK, InteractionStore, split_keys
from ncf_stream.trainer import Trainer

# Ids unlike any other, so a byte search of the checkpoint finds them only if kept.
GONE_USER = "user-to-forget-7f3a"
GONE_ITEM = "item-to-forget-c21e"


def settings(tmp_path: Path | None, **kw: Any) -> Settings:
    return Settings(device="cpu", factors=8, mlp_layers=(16, 8), batch_size=256,
                    eval_interval_s=3600.0, replay=True, publish_every_s=1e-6,
                    history_length=4, holdout_fraction=1.0, min_history=2,
                    checkpoint_dir=None if tmp_path is None else str(tmp_path), **kw)


def stream(seed: int = 3, n: int = 3000, users: int = 60, items: int = 80,
           t0: float = 1e6) -> Events:
    """Random events in time order; GONE_USER and GONE_ITEM among them."""
    rng = np.random.default_rng(seed)
    u = [f"u{x}" for x in rng.integers(0, users, n)]
    i = [f"i{x}" for x in rng.integers(0, items, n)]
    for j in range(0, n, 17):
        u[j] = GONE_USER
    for j in range(5, n, 13):
        i[j] = GONE_ITEM
    ts = t0 + np.arange(n, dtype=np.float64)
    return Events.from_rows([(a, b, float(t), "interaction", 1.0)
                             for a, b, t in zip(u, i, ts, strict=True)])


def drain(engine: Engine) -> None:
    for _ in range(400):
        engine.cycle()
        if engine.source is not None and engine.source.lag() == 0 and not engine.trainer.pending:
            break
    for _ in range(3):  # a few replay steps after the last event, then publish
        engine.cycle()


def deletions(*pairs: tuple[str, str]) -> Deletions:
    return Deletions.from_rows([(k, i, 0) for k, i in pairs])


# ---- the contract ----------------------------------------------------------------------------


def test_delete_events_decode_in_their_place_among_interactions() -> None:
    values = [b'{"user": "a", "item": "x", "ts": 1}', b'{"user": "a", "type": "delete_user"}',
              b'{"user": "a", "item": "y", "ts": 2}', b'{"item": 7, "type": "delete_item"}',
              b'{"type": "delete_item"}', b'{"user": [], "type": "delete_user"}',
              b'{"item": "z", "type": "item_unavailable"}']
    r = decode_batch(values)
    assert r.events.users.tolist() == ["a", "a"]
    assert list(zip(r.deletions.kinds, r.deletions.ids, r.deletions.at.tolist(),
                    strict=True)) == [("user", "a", 1), ("item", "7", 2)]
    assert [(x.index, x.reason.value) for x in r.rejected] == [(4, "missing_field"),
                                                               (5, "wrong_type")]
    parts = segments(r.events, r.deletions)
    assert [(len(e), d.ids.tolist()) for e, d in parts] == [(1, ["a"]), (1, ["7"])]


def test_a_user_deleted_mid_batch_and_seen_again_is_a_new_user() -> None:
    rows = [("a", "x", 1.0, "interaction", 1.0), ("a", "y", 2.0, "interaction", 1.0),
            ("a", "z", 3.0, "interaction", 1.0)]
    events = Events.from_rows(rows)
    dels = Deletions.from_rows([("user", "a", 2)])
    engine = Engine(settings(None), MemorySource())
    old_row = int(engine.trainer.user_ids.rows(["a"])[0])  # a row to tombstone
    engine.trainer.user_ids.forget("a")
    mapper = RowMapper(engine.trainer.user_ids.all_ids().tolist(),
                       engine.trainer.item_ids.all_ids().tolist())
    mapper.follow(events, dels)
    for part, d in segments(events, dels):
        engine._ingest_events(part)
        for kind, i in zip(d.kinds, d.ids, strict=True):
            engine.forget(kind, i)
    t = engine.trainer
    assert t.user_ids.rows(["a"], add=False).tolist() == [old_row + 2]  # third row
    assert t.user_ids.tombstones().tolist() == [old_row, old_row + 1]
    assert t.store.seen(old_row + 2).tolist() == t.item_ids.rows(["z"]).tolist()
    assert len(t.store) == 1
    # The source's mapper, following the same batch, ends equal to the engine's maps.
    assert mapper.users.all_ids().tolist() == t.user_ids.all_ids().tolist()
    assert mapper.items.all_ids().tolist() == t.item_ids.all_ids().tolist()


def test_idmap_tombstones_survive_save_and_load(tmp_path: Path) -> None:
    m = IdMap()
    m.rows(["a", "b", "c"])
    assert m.forget("b") == 1 and m.forget("b") == -1 and m.forget("nope") == -1
    assert m.rows(["b"]).tolist() == [3]  # back: a new row, the old one never reused
    m.save(tmp_path / "m.npz")
    back = IdMap.load(tmp_path / "m.npz")
    assert back.all_ids().tolist() == ["a", None, "c", "b"]
    assert (len(back), back.live) == (4, 3)
    assert back.rows(["b", "d"]).tolist() == [3, 4]


# ---- the store, against brute force ----------------------------------------------------------


def brute(events: list[tuple[int, int, float]]) -> dict[tuple[int, int], float]:
    pairs: dict[tuple[int, int], float] = {}
    for u, i, t in events:
        pairs[u, i] = max(pairs.get((u, i), -np.inf), t)
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_store_forgets_and_expires_like_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    store = InteractionStore(min_history=2)
    log: list[tuple[int, int, float]] = []
    gone_u: set[int] = set()
    gone_i: set[int] = set()
    for step in range(30):
        # A deleted row is a tombstone: ids map to new rows, so it never comes back.
        n = int(rng.integers(1, 200))
        u = rng.choice([x for x in range(40) if x not in gone_u], n)
        i = rng.choice([x for x in range(50) if x not in gone_i], n)
        t = float(step * 100) + rng.uniform(0, 100, n).round()
        store.append(u, i, t)
        log += list(zip(u.tolist(), i.tolist(), t.tolist(), strict=True))
        action = step % 3
        if action == 0:
            x = int(rng.integers(0, 40))
            store.forget_user(x)
            gone_u.add(x)
            log = [e for e in log if e[0] != x]
        elif action == 1:
            x = int(rng.integers(0, 50))
            store.forget_item(x)
            gone_i.add(x)
            log = [e for e in log if e[1] != x]
        else:
            cutoff = step * 100 - 400.0
            store.expire(cutoff)
            log = [e for e in log if round(e[2]) >= cutoff]
        want = brute(log)
        keys, vals = store._pairs.arrays()
        users, items = split_keys(keys)
        got = dict(zip(zip(users.tolist(), items.tolist(), strict=True),
                       (vals.astype(np.float64) + (store._t0 or 0)).tolist(), strict=True))
        assert got == {k: float(round(v)) for k, v in want.items()}
        counts = np.bincount(users, minlength=store.n_users)
        assert store.user_counts().tolist() == counts.tolist()
        assert store.item_counts().tolist() == np.bincount(items,
                                                           minlength=store.n_items).tolist()
        ho = store.holdout()
        # Every hold-out is a stored pair, and it is never replayed.
        assert store.contains(ho.users, ho.items).all()
        if len(store):
            ru, ri = store.sample_positives(rng, 500)
            assert not store.is_holdout(ru, ri).any()
        assert store.dead_items().tolist() == sorted(x for x in gone_i if x < store.n_items)


def test_a_users_hold_out_removed_with_its_item_is_none_until_the_next_event() -> None:
    store = InteractionStore(min_history=2)
    store.append(np.array([0, 0, 0]), np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    assert store.holdout().items.tolist() == [3]
    store.forget_item(3)
    assert len(store.holdout().users) == 0 and store.count_of(np.array([0])).tolist() == [2]
    r = store.append(np.array([0]), np.array([4]), np.array([4.0]))
    assert store.holdout().items.tolist() == [4] and r.released == 0


def test_removed_keys_free_their_memory_and_views_stay_intact() -> None:
    ks = KeySet()
    for lo in range(0, 200_000, 10_000):
        keys = np.arange(lo, lo + 10_000, dtype=np.int64)
        ks.insert(keys, (keys % 1000).astype(np.int32))
    before, view = ks.nbytes(), ks.view()
    gone = ks.remove_where(lambda _, v: v < 900)
    assert len(gone) == 180_000 and len(ks) == 20_000
    assert ks.nbytes() < before / 5  # arrays and filter shrink with the set
    assert view.contains(np.array([0, 5, 999])).all()  # an older view still answers
    assert ks.contains(np.array([0, 5, 999])).tolist() == [False, False, True]


# ---- the engine: nothing derived from a deleted id remains -------------------------------------


def assert_user_gone(snap: Snapshot, row: int) -> None:
    assert snap.user_row(GONE_USER) is None
    assert GONE_USER not in snap.user_ids.all_ids().tolist()
    assert len(snap.store.seen(row)) == 0
    assert row not in snap.store.holdout.users.tolist()
    assert torch.count_nonzero(snap.model.users.weight[row]) == 0
    assert snap.model.recent is not None and (snap.model.recent.items[row] == -1).all()


def assert_item_gone(snap: Snapshot, row: int) -> None:
    assert snap.item_rows([GONE_ITEM]).tolist() == [-1]
    assert GONE_ITEM not in snap.item_ids.all_ids().tolist()
    keys = snap.store.keys.range(0, 1 << 62)
    assert not ((keys & ITEM_MASK) == row).any()
    assert row not in snap.store.holdout.items.tolist()
    assert snap.store.item_counts[row] == 0
    assert torch.count_nonzero(snap.model.items.weight[row]) == 0
    assert snap.model.context is not None
    assert torch.count_nonzero(snap.model.context.weight[row]) == 0
    assert snap.model.recent is not None and not (snap.model.recent.items == row).any()
    assert row not in snap.popular.tolist() and row not in snap.recent.tolist()
    assert row in snap.unavailable.tolist()  # hidden from every answer and the index's
    # The index and the item cache hold what a zero row gives, nothing of the old row:
    # the GMF part of its vector is the row itself, the first-layer half has no bias.
    f = snap.model.cfg.factors
    assert snap.index_version == snap.version and not snap.index.vectors[row, :f].any()
    assert snap.model.item_hidden is not None
    assert torch.count_nonzero(snap.model.item_hidden[row]) == 0
    r = Recommender(snap_holder(snap), candidates=200, max_k=100)
    for user in ("u1", "u2", "u3"):
        assert GONE_ITEM not in r.recommend(user, 100, "none").items
    assert GONE_ITEM not in r.popular(100).items
    assert GONE_ITEM not in r.recommend("never-seen", 100).items  # cold start too
    assert GONE_ITEM not in r.similar("i1", 100).items


def snap_holder(snap: Snapshot) -> SnapshotHolder:
    holder = SnapshotHolder()
    holder.set(snap)
    return holder


def test_after_deletion_nothing_of_the_ids_is_served_or_checkpointed(tmp_path: Path) -> None:
    events = stream()
    source = MemorySource(events, batch_size=500)
    engine = Engine(settings(tmp_path), source)
    drain(engine)
    t = engine.trainer
    user_row = int(t.user_ids.rows([GONE_USER], add=False)[0])
    item_row = int(t.item_ids.rows([GONE_ITEM], add=False)[0])
    assert len(t.store.seen(user_row)) > 0 and t.store.item_counts()[item_row] > 0
    source.push(Availability.from_rows([(GONE_ITEM, False)]))
    source.push(Deletions.from_rows([("user", GONE_USER, 0), ("item", GONE_ITEM, 0),
                                     ("item", "never-seen", 0)]))
    drain(engine)
    snap = engine.holder.get()
    assert snap is not None and snap.events == engine.counters.consumed
    assert_user_gone(snap, user_row)
    assert_item_gone(snap, item_row)
    assert GONE_ITEM not in engine.catalogue.availability
    for opt, row in ((t.opt_users, user_row), (t.opt_items, item_row),
                     (t.opt_context, item_row)):
        assert opt is not None and torch.count_nonzero(opt.state[row]) == 0  # type: ignore[union-attr]
    m = engine.metrics.registry
    assert m.get_sample_value("ncf_stream_deletions_total",
                              {"kind": "item", "outcome": "unknown"}) == 1
    assert engine.status().users == t.user_ids.live == len(t.user_ids) - 1
    # Unknown as a user: 404 where the API names a user.
    with pytest.raises(UnknownUser):
        engine.recommender.score(GONE_USER, ["i1"])
    assert engine.recommender.score("u1", [GONE_ITEM]).scores == [None]
    # Training goes on without ever touching the tombstones.
    for _ in range(30):
        t.step()
    assert torch.count_nonzero(t.model.items.weight[item_row]) == 0
    assert torch.count_nonzero(t.model.users.weight[user_row]) == 0
    engine.close()
    # The checkpoint on disk: no file holds either id's bytes, and it restores without them.
    ckpt = sorted(tmp_path.glob("ckpt-*"))[-1]
    for f in ckpt.iterdir():
        data = f.read_bytes()
        assert GONE_USER.encode() not in data and GONE_ITEM.encode() not in data, f.name
    back = Trainer(t.cfg)
    checkpoint.load_latest(tmp_path, back)
    assert GONE_USER not in back.user_ids and GONE_ITEM not in back.item_ids
    assert len(back.user_ids) == len(t.user_ids)  # the tombstones keep their rows
    assert back.store.dead_items().tolist() == [item_row]
    assert torch.equal(back.model.items.weight[: back.model.n_items],
                       t.model.items.weight[: t.model.n_items])
    # A restart from it serves the same: the ids are still gone, a new event starts over.
    again = Engine(settings(tmp_path), MemorySource(Events.from_rows(
        [(GONE_USER, "i1", 2e6, "interaction", 1.0)]), offset=engine.counters.consumed))
    drain(again)
    snap = again.holder.get()
    assert snap is not None
    new_row = snap.user_row(GONE_USER)
    assert new_row is not None and new_row >= len(t.user_ids)  # a new row, never the old


def test_admin_requests_are_applied_by_the_loop_and_force_a_checkpoint(tmp_path: Path) -> None:
    engine = Engine(settings(tmp_path), MemorySource(stream(n=800), batch_size=400))
    drain(engine)
    engine.checkpoint()
    version = engine.publisher.version
    engine.request_delete("user", GONE_USER)
    with pytest.raises(ValueError, match="kind"):
        engine.request_delete("group", "x")
    assert GONE_USER in engine.trainer.user_ids  # only queued
    engine.cycle()
    snap = engine.holder.get()
    assert snap is not None and snap.version > version and snap.user_row(GONE_USER) is None
    before = sorted(tmp_path.glob("ckpt-*"))
    engine.checkpoint()  # no new offsets, but a deletion: written
    assert sorted(tmp_path.glob("ckpt-*")) != before


def test_retention_bounds_the_store_to_the_window() -> None:
    window = 500.0
    engine = Engine(settings(None, retention_s=window), MemorySource(
        stream(n=6000, t0=0.0), batch_size=250))
    drain(engine)
    store = engine.trainer.store
    _, vals = store._pairs.arrays()
    newest = 5999.0
    # Nothing older than the window and one sweep interval; everything inside kept.
    assert (vals + (store._t0 or 0) >= newest - window * (1 + 1 / 8) - 1).all()
    ev = stream(n=6000, t0=0.0)
    recent = ev.ts >= newest - window
    u = engine.trainer.user_ids.rows(ev.users[recent], add=False)
    i = engine.trainer.item_ids.rows(ev.items[recent], add=False)
    ok = (u >= 0) & (i >= 0)
    assert store.contains(u[ok], i[ok]).all()
    assert (engine.metrics.registry.get_sample_value("ncf_stream_store_expired_total") or 0) > 0


def test_answers_from_the_snapshot_before_a_deletion_leave_the_item_out() -> None:
    """The served snapshot shares the live id maps: between a deletion and the next
    publish, the deleted item's row is still in its answers but has no id any more; it
    is left out, never answered as null (a 5xx in the API's response models)."""
    engine = Engine(settings(None), MemorySource(stream(n=1500), batch_size=500))
    drain(engine)
    snap = engine.holder.get()
    assert snap is not None
    r = engine.recommender
    # An item every list holds: the most popular, in the recent window too.
    item = str(snap.item_ids.ids(snap.popular[:1])[0])
    user = next(u for u in ("u1", "u2", "u3", "u4")
                if item in r.recommend(u, 100, "none").items)
    engine.forget("item", item)
    assert engine.holder.get() is snap  # not published yet
    for answer in (r.recommend(user, 100, "none").items, r.popular(100).items,
                   r.recommend("never-seen", 100).items, r.similar("i1", 100).items,
                   r.known_items(user, 0, 1000).items):
        assert item not in answer and None not in answer


def test_availability_and_deletions_of_one_item_take_effect_in_stream_order() -> None:
    values = [b'{"user": "a", "item": "x", "ts": 1}', b'{"user": "a", "item": "y", "ts": 2}',
              b'{"item": "y", "type": "item_unavailable"}', b'{"item": "x", "type": "delete_item"}',
              b'{"item": "y", "type": "delete_item"}', b'{"item": "x", "type": "item_unavailable"}',
              b'{"user": "a", "item": "x", "ts": 3}']
    r = decode_batch(values)
    assert r.availability.after.tolist() == [0, 2]
    engine = Engine(settings(None), MemorySource())
    engine._ingest(EventBatch(r.events, {("t", 0): (0, len(values))},
                              availability=r.availability, deletions=r.deletions))
    # y: flagged, then deleted: its id is kept nowhere. x: deleted, then flagged: the new x
    # (a new row, its event after the deletion) is unavailable.
    assert engine.catalogue.availability.ids() == ["x"]
    t = engine.trainer
    assert t.item_ids.rows(["x"], add=False).tolist() == [2]
    assert t.item_ids.tombstones().tolist() == [0, 1]


def test_a_deleted_item_is_never_a_negative_for_training_or_evaluation() -> None:
    store = InteractionStore(min_history=2)
    rng = np.random.default_rng(1)
    store.append(rng.integers(0, 30, 400), rng.integers(0, 12, 400), np.arange(400.0))
    for item in (3, 7):
        store.forget_item(item)
    sampler = NegativeSampler(store, SamplerConfig(k=8, alpha=0.0, seed=2))
    assert not np.isin(sampler.sample(np.repeat(np.arange(30), 50)), [3, 7]).any()
    ho = store.view().holdout
    neg = eval_negatives(store.view(), np.arange(len(ho.users)), n=20)
    assert len(ho.users) and not np.isin(neg, [3, 7]).any()


def test_an_invalid_admin_token_is_refused_without_being_echoed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCF_STREAM_ADMIN_TOKEN", "short-secret")
    with pytest.raises(ConfigError, match=r"admin_token: .*16 characters") as e:
        Settings.load()
    assert "short-secret" not in str(e.value)
    monkeypatch.setenv("NCF_STREAM_ADMIN_TOKEN", "a-long-enough-secret")
    s = Settings.load()
    assert s.admin_token is not None and "a-long" not in repr(s)
