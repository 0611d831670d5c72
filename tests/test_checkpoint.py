"""Checkpoints: exact restore, atomic writes, damaged ones skipped, nothing executed on load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ncf_stream import checkpoint
from ncf_stream.model import NeuMFConfig
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer, TrainerConfig

CFG = TrainerConfig(batch_size=512, model=NeuMFConfig(factors=4, mlp_layers=(8, 4)))
OFFSETS = {("t", 0): 120, ("t", 1): 7}


def trained(optimizer: str = "adagrad") -> Trainer:
    trainer = Trainer(CFG if optimizer == "adagrad" else TrainerConfig(
        batch_size=512, optimizer="adam", lr=1e-3, model=CFG.model))
    trainer.ingest(generate(SynthConfig(users=80, items=60, events=2000, seed=1,
                                        topics=3)).to_events())
    for _ in range(20):
        trainer.step()
    return trainer


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_restore_is_exact(tmp_path: Path, optimizer: str) -> None:
    before = trained(optimizer)
    checkpoint.save(tmp_path, before, OFFSETS, {"consumed": 2000})
    after = Trainer(before.cfg)
    restored = checkpoint.load_latest(tmp_path, after)
    assert restored is not None
    assert restored.offsets == OFFSETS and restored.counters == {"consumed": 2000}
    assert after.user_ids.all_ids().tolist() == before.user_ids.all_ids().tolist()
    assert after.item_ids.all_ids().tolist() == before.item_ids.all_ids().tolist()
    users = torch.arange(before.model.n_users)
    assert torch.equal(after.model.score_matrix(users), before.model.score_matrix(users))
    u, i = np.repeat(np.arange(80), 60), np.tile(np.arange(60), 80)
    assert np.array_equal(after.store.contains(u, i), before.store.contains(u, i))
    assert np.array_equal(after.store.holdout().items, before.store.holdout().items)
    for a, b in ((after.opt_users, before.opt_users), (after.opt_items, before.opt_items)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor)
                   else sa[k] == sb[k] for k in sa)
    assert after.steps == before.steps
    after.step()  # it trains on from there


def test_restore_is_exact_with_the_history_input(tmp_path: Path) -> None:
    """The context rows, their optimizer state and every user's recent items come back;
    the restored trainer then takes the same step as the one that never stopped."""
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, history_length=4))
    trainer = Trainer(cfg)
    trainer.ingest(generate(SynthConfig(users=80, items=60, events=2000, seed=1,
                                        topics=3)).to_events())
    while trainer.pending:  # the engine checkpoints what is trained (its watermark)
        trainer.step()
    checkpoint.save(tmp_path, trainer, OFFSETS, {})
    after = Trainer(cfg)
    assert checkpoint.load_latest(tmp_path, after) is not None
    assert after.model.recent is not None and trainer.model.recent is not None
    users = np.arange(trainer.model.n_users)
    assert np.array_equal(after.model.recent.of(users), trainer.model.recent.of(users))
    assert np.array_equal(after.model.recent.ts[users], trainer.model.recent.ts[users])
    rows = torch.from_numpy(users)
    assert torch.equal(after.model.score_matrix(rows), trainer.model.score_matrix(rows))
    for t in (trainer, after):  # the same replay draws and negatives on both
        t.rng, t.sampler.rng = np.random.default_rng(5), np.random.default_rng(6)
        t.step()
    assert torch.equal(after.model.score_matrix(rows), trainer.model.score_matrix(rows))
    # Without the history input, the same checkpoint is another model: refused.
    assert checkpoint.load_latest(tmp_path, Trainer(CFG)) is None


def test_keeps_the_last_n_and_writes_atomically(tmp_path: Path) -> None:
    t = trained()
    (tmp_path / ".tmp-00000009-1").mkdir(parents=True)  # a crash mid-save left this
    paths = [checkpoint.save(tmp_path, t, {("t", 0): n}, keep=2) for n in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths[-2:]]
    restored = checkpoint.load_latest(tmp_path, Trainer(CFG))
    assert restored is not None and restored.offsets == {("t", 0): 3}


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop a file", "bad meta"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = trained()
    checkpoint.save(tmp_path, t, {("t", 0): 1})
    newest = checkpoint.save(tmp_path, t, {("t", 0): 2})
    target = newest / "store.npz"
    if damage == "flip a byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "drop a file":
        target.unlink()
    else:
        (newest / "meta.json").write_text("{not json")
    restored = checkpoint.load_latest(tmp_path, Trainer(CFG))
    assert restored is not None and restored.offsets == {("t", 0): 1}
    assert "skipping checkpoint" in caplog.text and newest.name in caplog.text


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, trained(), {("t", 0): 1})
    other = Trainer(TrainerConfig(model=NeuMFConfig(factors=8, mlp_layers=(8, 4))))
    assert checkpoint.load_latest(tmp_path, other) is None


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert checkpoint.load_latest(tmp_path / "nothing-here", Trainer(CFG)) is None


def test_loading_never_unpickles(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 caplog: pytest.LogCaptureFixture) -> None:
    """A model.pt carrying a pickled callable is refused, not run (weights_only)."""
    t = trained()
    path = checkpoint.save(tmp_path, t, {("t", 0): 1})

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"users": Boom()}, path / "model.pt")
    meta = (path / "meta.json").read_text()
    digest = checkpoint._digest(path / "model.pt")
    import json

    m = json.loads(meta)
    m["sha256"]["model.pt"] = digest  # even with a matching checksum
    (path / "meta.json").write_text(json.dumps(m))
    fresh = Trainer(CFG)
    assert checkpoint.load_latest(tmp_path, fresh) is None
    assert "this must never run" not in capsys.readouterr().out
    assert "skipping checkpoint" in caplog.text
    assert len(fresh.store) == 0 and len(fresh.user_ids) == 0  # untouched


def test_the_catalogue_round_trips_and_older_checkpoints_load_without_one(
        tmp_path: Path) -> None:
    from ncf_stream.catalogue import Catalogue, ItemAvailability

    before = trained()
    checkpoint.save(tmp_path / "old", before, OFFSETS)  # as before the catalogue existed
    restored = checkpoint.load_latest(tmp_path / "old", Trainer(CFG))
    assert restored is not None and len(restored.catalogue.availability) == 0
    off = ["7", "no-such-item", "\u00e9t\u00e9"]
    checkpoint.save(tmp_path / "new", before, OFFSETS,
                    catalogue=Catalogue(ItemAvailability(off)))
    restored = checkpoint.load_latest(tmp_path / "new", Trainer(CFG))
    assert restored is not None and restored.catalogue.availability.ids() == sorted(off)
    (ckpt,) = (tmp_path / "new").glob("ckpt-*")
    (ckpt / checkpoint.CATALOGUE).write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path / "new", Trainer(CFG)) is None  # checksummed
