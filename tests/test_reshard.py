"""Re-dealing a group's users: their partitions checkpointed and renumbered, trainers
merged and split by user (the stores' part: test_store_merge.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ncf_stream import checkpoint
from ncf_stream.events import Events
from ncf_stream.model import NeuMFConfig
from ncf_stream.source import UserPartitions
from ncf_stream.trainer import Trainer, TrainerConfig

# ---- user partitions --------------------------------------------------------------------


def test_user_partitions_round_trip_and_merge(tmp_path: Path) -> None:
    parts = UserPartitions()
    assert len(parts) == 0 and parts.partition_of(np.array([0, 5])).tolist() == [-1, -1]
    assert parts.observe(np.array([0, 2, 4, 4, 2000]), np.array([3, 1, 2, 2, 5])) == 0
    assert parts.observe(np.array([2, -1]), np.array([0, 7])) == 1  # row 2: split
    assert len(parts) == 2001
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
    assert restored is not None and len(restored.partitions) == 0
    checkpoint.save(tmp_path / "new", trainer, {("t", 0): 5}, partitions=parts)
    restored = checkpoint.load_latest(tmp_path / "new", Trainer(CFG))
    assert restored is not None
    assert restored.partitions.arrays()["partition"].tolist() == (
        parts.arrays()["partition"].tolist())
    (ckpt,) = (tmp_path / "new").glob("ckpt-*")
    (ckpt / checkpoint.PARTITIONS).write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path / "new", Trainer(CFG)) is None  # checksummed
