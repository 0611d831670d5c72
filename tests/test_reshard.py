"""Re-dealing a group's users: their partitions checkpointed and renumbered, trainers
merged and split by user (the stores' part: test_store_merge.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import same_content  # tests/conftest.py

from ncf_stream import checkpoint
from ncf_stream.events import Events
from ncf_stream.model import NeuMFConfig
from ncf_stream.optim import RowAdagrad, RowAdam
from ncf_stream.reshard import merge_partitions, merge_trainers
from ncf_stream.source import UserPartitions
from ncf_stream.store import split_keys
from ncf_stream.trainer import Trainer, TrainerConfig

# ---- user partitions --------------------------------------------------------------------


def test_user_partitions_round_trip_and_merge(tmp_path: Path) -> None:
    parts = UserPartitions()
    assert parts.rows_observed == 0 and parts.partition_of(np.array([0, 5])).tolist() == [-1, -1]
    assert parts.observe(np.array([0, 2, 4, 4, 2000]), np.array([3, 1, 2, 2, 5])) == 0
    assert parts.observe(np.array([2, -1]), np.array([0, 7])) == 1  # row 2: split
    assert parts.rows_observed == 2001
    assert parts.partition_of(np.array([0, 1, 2, 4, 2000, 2001, 10**9])).tolist() == [
        3, -1, UserPartitions.SPLIT, 2, 5, -1, -1]
    assert parts.owned_rows(2, 1).tolist() == [0, 2000]  # 3 and 5; never the split row
    assert parts.owned_rows(3, 2).tolist() == [4, 2000]
    parts.save(tmp_path / "p.npz")
    loaded = UserPartitions.load(tmp_path / "p.npz")
    assert loaded.arrays()["partition"].tolist() == parts.arrays()["partition"].tolist()
    assert loaded.observe(np.array([4]), np.array([1])) == 1  # goes on as the original
    other = UserPartitions.from_arrays(np.array([9, 8], dtype=np.int32))
    merged = UserPartitions.merged([(parts, np.array([4, 1, 0])), (other, np.array([1]))])
    assert merged.partition_of(np.arange(5)).tolist() == [2, -1, 3, 8, -1]
    with pytest.raises(ValueError):
        UserPartitions.from_arrays(np.array([-3]))


CFG = TrainerConfig(batch_size=256, model=NeuMFConfig(factors=4, mlp_layers=(8, 4)),
                    holdout_fraction=1.0)


def stream(users: range, seed: int, n: int = 600) -> Events:
    rng = np.random.default_rng(seed)
    u = rng.choice(np.array([f"u{x}" for x in users]), n)
    i = rng.integers(0, 40, n)
    t = np.sort(rng.integers(0, 500, n)).astype(np.float64) + 1_700_000_000
    return Events.from_rows([(a, f"i{b}", c, "click", 1.0) for a, b, c in
                             zip(u.tolist(), i.tolist(), t.tolist(), strict=True)])


def test_partitions_round_trip_in_a_checkpoint_and_older_ones_load_without(
        tmp_path: Path) -> None:
    trainer = Trainer(CFG)
    trainer.ingest(stream(range(10), 1))
    parts = UserPartitions()
    parts.observe(np.arange(len(trainer.user_ids)), np.arange(len(trainer.user_ids)) % 3)
    checkpoint.save(tmp_path / "old", trainer, {("t", 0): 5})  # as before partitions
    restored = checkpoint.load_latest(tmp_path / "old", Trainer(CFG))
    assert restored is not None and restored.partitions.rows_observed == 0
    checkpoint.save(tmp_path / "new", trainer, {("t", 0): 5}, partitions=parts)
    restored = checkpoint.load_latest(tmp_path / "new", Trainer(CFG))
    assert restored is not None
    assert restored.partitions.arrays()["partition"].tolist() == (
        parts.arrays()["partition"].tolist())
    (ckpt,) = (tmp_path / "new").glob("ckpt-*")
    (ckpt / checkpoint.PARTITIONS).write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path / "new", Trainer(CFG)) is None  # checksummed


# ---- trainers -------------------------------------------------------------------------------

ITEMS = [f"i{x}" for x in range(40)]


def part(cfg: TrainerConfig, users: range, seed: int) -> Trainer:
    """A trainer of ``users`` with the whole catalogue's item ids, trained a little."""
    trainer = Trainer(cfg)
    trainer.item_ids.rows(ITEMS)  # one item numbering, as a group's trainers have
    trainer.ingest(stream(users, seed))
    for _ in range(12):
        trainer.step()
    return trainer


def copy_item_side(src: Trainer, dst: Trainer) -> None:
    """``src``'s item rows, context rows and tower into ``dst`` (an aligned group's shared
    tensors after an exchange); its item optimizer state differs, as a group's does."""
    with torch.no_grad():
        n = src.model.n_items
        dst.model.items.weight[:n] = src.model.items.weight[:n]
        if src.model.context is not None and dst.model.context is not None:
            dst.model.context.weight[:n] = src.model.context.weight[:n]
        dst.model.tower.load_state_dict(src.model.tower.state_dict())


def opt_rows(opt: RowAdagrad | RowAdam, rows: np.ndarray) -> list[torch.Tensor]:
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    if isinstance(opt, RowAdagrad):
        return [opt.state[idx]]
    return [opt.m[idx], opt.v[idx]]


def user_state(t: Trainer, user: str) -> dict[str, object]:
    row = int(t.user_ids.rows([user], add=False)[0])
    assert row >= 0
    store = t.store
    ho = store.holdout()
    at = np.flatnonzero(ho.users == row)
    seen = store.seen(row)
    out: dict[str, object] = {
        "row": t.model.users.weight[row].tolist(),
        "opt": [x.tolist() for x in opt_rows(t.opt_users, np.array([row]))],
        "seen": dict(zip(t.item_ids.ids(seen).tolist(),
                         store.last_ts(np.full(len(seen), row), seen).tolist(), strict=True)),
        "holdout": None if not len(at) else (t.item_ids.ids(ho.items[at]).tolist(),
                                             ho.ts[at].tolist(), ho.seq[at].tolist()),
        "count": int(store.count_of(np.array([row]))[0]),
    }
    if t.model.recent is not None:
        items = t.model.recent.items[row]
        out["recent"] = [None if i < 0 else t.item_ids.ids([i])[0] for i in items.tolist()]
        out["recent_ts"] = t.model.recent.ts[row].tolist()
    return out


def plain(x: object) -> object:
    """Nested dicts, lists and tensors as plain Python values, to compare."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


def item_side(t: Trainer) -> dict[str, object]:
    n = t.model.n_items
    out: dict[str, object] = {
        "ids": t.item_ids.all_ids().tolist(), "rows": t.model.items.weight[:n].tolist(),
        "tower": {k: v.tolist() for k, v in t.model.tower.state_dict().items()},
        "opt_items": [x.tolist() for x in opt_rows(t.opt_items, np.arange(n))],
        "opt_tower": plain(t.opt_tower.state_dict()),
        "counters": (t.steps, t.samples_trained, t.fresh_samples),
    }
    if t.model.context is not None:
        assert t.opt_context is not None
        out["context"] = t.model.context.weight[:n].tolist()
        out["opt_context"] = [x.tolist() for x in opt_rows(t.opt_context, np.arange(n))]
    if isinstance(t.opt_users, RowAdam):
        out["adam_t"] = t.opt_users.t
    return out


CONFIGS = {
    "adagrad": CFG,
    "adam": dataclasses.replace(CFG, optimizer="adam", lr=1e-3),
    "history": dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, history_length=4)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def parts(request: pytest.FixtureRequest) -> tuple[TrainerConfig, Trainer, Trainer]:
    cfg = CONFIGS[request.param]
    a, b = part(cfg, range(0, 20), 1), part(cfg, range(20, 45), 2)
    copy_item_side(a, b)
    b.forget_user("u21")  # a tombstone: never merged
    return cfg, a, b


def test_merging_every_user_keeps_each_user_as_its_trainer_had_it(
        parts: tuple[TrainerConfig, Trainer, Trainer]) -> None:
    cfg, a, b = parts
    merged, origin = merge_trainers([(a, np.arange(len(a.user_ids))),
                                     (b, np.arange(len(b.user_ids)))], cfg, "cpu")
    a_ids = [x for x in a.user_ids.all_ids().tolist() if x is not None]
    b_ids = [x for x in b.user_ids.all_ids().tolist() if x is not None]
    assert "u21" not in b_ids and "u21" not in merged.user_ids
    assert merged.user_ids.all_ids().tolist() == a_ids + b_ids  # in order, no tombstone
    assert len(merged.user_ids) == merged.store.n_users == merged.model.n_users
    for src, ids in ((a, a_ids), (b, b_ids)):
        for user in ids:
            assert user_state(merged, user) == user_state(src, user), user
    assert item_side(merged) == item_side(a)
    # origin: (part, old row) of each new row
    assert origin.shape == (len(merged.user_ids), 2)
    for new, (p, old) in enumerate(origin.tolist()):
        assert merged.user_ids.ids([new])[0] == (a, b)[p].user_ids.ids([old])[0]
    # Item counts over the merged users: those of the two trainers' stores summed.
    counts = np.zeros(merged.store.n_items, dtype=np.int64)
    for t in (a, b):
        counts[: t.store.n_items] += t.store.item_counts()
    assert merged.store.item_counts().tolist() == counts.tolist()
    before = item_side(a), [user_state(a, u) for u in a_ids]
    merged.ingest(stream(range(40, 50), 9))  # it goes on, sharing nothing with its parts
    for _ in range(3):
        merged.step()
    assert (item_side(a), [user_state(a, u) for u in a_ids]) == before


def test_a_subset_keeps_only_those_users(
        parts: tuple[TrainerConfig, Trainer, Trainer]) -> None:
    cfg, a, b = parts
    a_rows = a.user_ids.rows(["u7", "u3"], add=False)
    b_rows = b.user_ids.rows(["u44", "u20", "u30"], add=False)
    merged, origin = merge_trainers([(b, b_rows), (a, a_rows)], cfg, "cpu")
    assert merged.user_ids.all_ids().tolist() == ["u44", "u20", "u30", "u7", "u3"]
    assert origin.tolist() == [[0, r] for r in b_rows.tolist()] + [
        [1, r] for r in a_rows.tolist()]
    for src, ids in ((a, ["u7", "u3"]), (b, ["u44", "u20", "u30"])):
        for user in ids:
            assert user_state(merged, user) == user_state(src, user), user
    assert item_side(merged) == item_side(b)  # the first part's
    keys, _ = merged.store._pairs.arrays()
    assert set(split_keys(keys)[0].tolist()) <= set(range(5))
    # UserPartitions follow the same renumbering.
    pa = UserPartitions.from_arrays(np.arange(len(a.user_ids), dtype=np.int32) + 100)
    pb = UserPartitions.from_arrays(np.arange(len(b.user_ids), dtype=np.int32) + 200)
    got = merge_partitions([pb, pa], origin)
    assert got.partition_of(np.arange(5)).tolist() == [
        *(200 + b_rows).tolist(), *(100 + a_rows).tolist()]


def test_a_merged_trainer_round_trips_through_a_checkpoint(
        parts: tuple[TrainerConfig, Trainer, Trainer], tmp_path: Path) -> None:
    cfg, a, b = parts
    merged, _ = merge_trainers([(a, np.arange(len(a.user_ids))),
                                (b, np.arange(len(b.user_ids)))], cfg, "cpu")
    checkpoint.save(tmp_path, merged, {("t", 0): 1})
    loaded = Trainer(cfg)
    assert checkpoint.load_latest(tmp_path, loaded) is not None
    same_content(loaded, merged)
    assert item_side(loaded) == item_side(merged)
    for user in merged.user_ids.all_ids().tolist():
        assert user_state(loaded, user) == user_state(merged, user)


def test_a_user_in_two_parts_or_other_items_are_refused(
        parts: tuple[TrainerConfig, Trainer, Trainer]) -> None:
    cfg, a, _ = parts
    with pytest.raises(ValueError, match="more than one part"):
        merge_trainers([(a, np.array([0, 1])), (a, np.array([1]))], cfg, "cpu")
    other = Trainer(cfg)
    other.ingest(stream(range(60, 62), 3))  # its own item numbering
    with pytest.raises(ValueError, match="item ids"):
        merge_trainers([(a, np.array([0])), (other, np.array([0]))], cfg, "cpu")


@pytest.mark.parametrize("new_size", [1, 3])
def test_a_group_of_two_re_dealt_from_its_checkpoints(
        parts: tuple[TrainerConfig, Trainer, Trainer], tmp_path: Path, new_size: int) -> None:
    """The flow of a resize at the state level: each old rank's checkpoint (with its
    partitions) loaded, each new rank keeping the users of the partitions it owns."""
    cfg, a, b = parts
    old: list[tuple[Trainer, UserPartitions]] = []
    for rank, t in enumerate((a, b)):
        rows = np.arange(len(t.user_ids))
        observed = UserPartitions()
        observed.observe(rows, 2 * (rows % 3) + rank)  # old rank r owned p % 2 == r
        if rank == 1:
            observed.observe(rows[:1], np.array([5]))  # row 0 was in 1: now split
        checkpoint.save(tmp_path / f"rank-{rank}", t, {("t", rank): 10}, partitions=observed)
        loaded = Trainer(cfg)
        restored = checkpoint.load_latest(tmp_path / f"rank-{rank}", loaded)
        assert restored is not None
        old.append((loaded, restored.partitions))
    split = b.user_ids.ids([0])[0]
    assert split is not None
    dealt: list[str] = []
    for r in range(new_size):
        selected = [(t, p.owned_rows(new_size, r)) for t, p in old]
        merged, origin = merge_trainers(selected, cfg, "cpu")
        partitions = merge_partitions([p for _, p in old], origin)
        ids = merged.user_ids.all_ids().tolist()
        assert all(p % new_size == r for p in partitions.partition_of(
            np.arange(len(ids))).tolist())
        for user in ids:
            src = a if user in a.user_ids else b
            assert user_state(merged, user) == user_state(src, user)
        dealt += ids
    live = [x for t in (a, b) for x in t.user_ids.all_ids().tolist() if x is not None]
    assert sorted(dealt) == sorted(set(live) - {split})  # each once; the split one: nowhere
