"""Checkpoints: the whole learning state and the source offsets it includes, written atomically.

A checkpoint is a directory ``ckpt-<seq>`` holding plain files:

* ``model.pt``, ``optim.pt``: tensors and numbers only, loaded with
  ``torch.load(weights_only=True)`` (no pickled code is ever executed);
* ``store.npz``, ``users.npz``, ``items.npz``: numpy arrays, loaded with
  ``allow_pickle=False``; a deleted id's row is an empty string in the id files
  (a tombstone, :mod:`ncf_stream.ids`), so no file holds a deleted id;
* ``catalogue.npz``: the stream's item state for serving (the unavailable items,
  :mod:`ncf_stream.catalogue`); optional, so checkpoints from before it still load
  (with an empty one);
* ``partitions.npz``: the partition each user row's events arrived in
  (:class:`ncf_stream.source.UserPartitions`), what a group needs to deal the users
  out again at another size (:mod:`ncf_stream.reshard`); optional likewise (an
  empty one: every user's partition unknown);
* ``meta.json``: the offsets (next offset per topic partition) whose events
  the state includes, counters, the model shape, and a SHA-256 per file.

It is written to a temporary directory, every file and the directory fsynced,
then renamed into place (atomic on POSIX), and only then are older ones beyond
``keep`` removed. Loading takes the newest checkpoint whose files match their
checksums; a damaged one is skipped with its reason logged. Checkpoints are
read only from the configured directory.

Restoring the state and seeking the source to the checkpoint's offsets makes
every event's effect on the store happen exactly once across crashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncf_stream.catalogue import Catalogue
from ncf_stream.errors import NcfStreamError
from ncf_stream.faults import crash_point
from ncf_stream.history import RecentItems
from ncf_stream.ids import IdMap
from ncf_stream.model import NeuMF
from ncf_stream.source import Partition, UserPartitions
from ncf_stream.store import InteractionStore
from ncf_stream.trainer import Trainer

log = logging.getLogger(__name__)

FORMAT = 1
FILES = ("model.pt", "optim.pt", "store.npz", "users.npz", "items.npz")
CATALOGUE = "catalogue.npz"  # checksummed when present; absent from older checkpoints
PARTITIONS = "partitions.npz"  # likewise
OPTIONAL = (CATALOGUE, PARTITIONS)


class CheckpointError(NcfStreamError):
    pass


@dataclass
class Restored:
    path: Path
    offsets: dict[Partition, int]
    counters: dict[str, int] = field(default_factory=dict)
    catalogue: Catalogue = field(default_factory=Catalogue)
    # Empty (every row unknown) when the checkpoint has none.
    partitions: UserPartitions = field(default_factory=UserPartitions)


def save(directory: str | Path, trainer: Trainer, offsets: dict[Partition, int],
         counters: dict[str, int] | None = None, keep: int | None = 3,
         catalogue: Catalogue | None = None, group: dict[str, int] | None = None,
         partitions: UserPartitions | None = None) -> Path:
    """Write a checkpoint of ``trainer`` (and ``catalogue``, ``partitions``) covering
    ``offsets``; returns its path. ``group``: a group trainer's ``{"epoch": E, "size": N}``,
    the exchange it was written after (ncf_stream.group). ``partitions``: by user row,
    the partition each user's events arrived in (the engine's ``user_partitions``)."""
    root = Path(directory)
    seq, tmp = begin(root, "ckpt")
    _write_state(tmp, trainer)
    files: tuple[str, ...] = FILES
    if catalogue is not None:
        catalogue.save(tmp / CATALOGUE)
        files = (*files, CATALOGUE)
    if partitions is not None:
        partitions.save(tmp / PARTITIONS)
        files = (*files, PARTITIONS)
    meta = {
        "format": FORMAT, "seq": seq, "created": time.time(),
        "offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
        "counters": counters or {}, "model": _shape(trainer),
        **({"group": group} if group is not None else {}),
    }
    seal(tmp, files, meta)
    crash_point("checkpoint-written")
    final = root / f"ckpt-{seq:08d}"
    os.rename(tmp, final)
    fsync(root)
    crash_point("checkpoint-renamed")  # the caller commits the offsets after this
    if keep is not None:
        prune(root, keep)
    return final


def prune(directory: str | Path, keep: int,
          protect: Sequence[dict[str, int]] = ()) -> None:
    """Remove all but the newest ``keep`` checkpoints, and never one whose group tag is in
    ``protect`` (a trainer of a group: the epochs its group's manifest may name)."""
    for old in sorted(Path(directory).glob("ckpt-*"))[:-keep]:
        try:
            tag = json.loads((old / "meta.json").read_text()).get("group")
        except (OSError, ValueError):
            tag = None  # unreadable: nothing restores from it
        if tag is None or tag not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _write_state(directory: Path, trainer: Trainer) -> None:
    model = trainer.model
    optim: dict[str, Any] = {
        "users": trainer.opt_users.state_dict(), "items": trainer.opt_items.state_dict(),
        "tower": trainer.opt_tower.state_dict(),
        "steps": trainer.steps, "samples": trainer.samples_trained,
        "fresh_samples": trainer.fresh_samples,
    }
    if trainer.opt_context is not None:  # the history input
        optim["context"] = trainer.opt_context.state_dict()
    torch.save(model_weights(model), directory / "model.pt")
    torch.save(optim, directory / "optim.pt")
    trainer.store.save(directory / "store.npz")
    trainer.user_ids.save(directory / "users.npz")
    trainer.item_ids.save(directory / "items.npz")


def model_weights(model: NeuMF) -> dict[str, Any]:
    """The model's live rows and tower as tensors (for ``torch.load(weights_only=True)``):
    what :func:`load_weights` puts back. Also the snapshot export's (ncf_stream.export)."""
    weights: dict[str, Any] = {
        "users": model.users.weight[: model.n_users].cpu(),
        "items": model.items.weight[: model.n_items].cpu(),
        "tower": {k: v.cpu() for k, v in model.tower.state_dict().items()},
    }
    if model.context is not None and model.recent is not None:  # the history input
        weights["context"] = model.context.weight[: model.context.rows].cpu()
        weights |= {k: torch.from_numpy(v.copy()) for k, v in model.recent.arrays().items()}
    return weights


def load_weights(model: NeuMF, weights: dict[str, Any]) -> None:
    """Put :func:`model_weights` into a fresh ``model`` of the same shape."""
    model.grow(len(weights["users"]), len(weights["items"]))
    with torch.no_grad():
        model.users.weight[: len(weights["users"])] = weights["users"].to(model.device)
        model.items.weight[: len(weights["items"])] = weights["items"].to(model.device)
        if model.context is not None:
            model.context.weight[: len(weights["context"])] = weights["context"].to(model.device)
            model.recent = RecentItems.from_arrays(weights["recent_items"].numpy(),
                                                   weights["recent_ts"].numpy())
            model.recent.ensure(len(weights["users"]))
    model.tower.load_state_dict(weights["tower"])


def load_latest(directory: str | Path, trainer: Trainer,
                group: dict[str, int] | None = None) -> Restored | None:
    """Restore the newest valid checkpoint into a fresh ``trainer``; None if there is none.
    ``group``: only one written at that group epoch and size (see :func:`save`)."""
    root = Path(directory)
    for path in sorted(root.glob("ckpt-*"), reverse=True):
        try:
            meta = _verify(path, trainer)
            if group is not None and meta.get("group") != group:
                continue  # another epoch's: not the aligned one
            state = _read_files(path, meta["sha256"])
        except (CheckpointError, OSError, ValueError, KeyError, RuntimeError,
                pickle.UnpicklingError) as e:
            log.warning("skipping checkpoint %s: %s", path, str(e).splitlines()[0][:300])
            continue
        _apply(state, trainer)
        offsets = {(t, int(p)): int(o) for t, p, o in meta["offsets"]}
        log.info("restored %s: %d interactions, offsets %s", path.name, len(trainer.store),
                 offsets)
        return Restored(path, offsets, {k: int(v) for k, v in meta["counters"].items()},
                        state["catalogue"], state["partitions"])
    return None


def _verify(path: Path, trainer: Trainer) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"format {meta.get('format')}, expected {FORMAT}")
    if meta["model"] != _shape(trainer):
        raise CheckpointError(f"model shape {meta['model']} differs from {_shape(trainer)}")
    check_files(path, meta, (*FILES, *(f for f in OPTIONAL if f in meta["sha256"])))
    return meta


def _read_files(path: Path, present: Mapping[str, str]) -> dict[str, Any]:
    """Everything read and checked before anything in the trainer changes. ``present``:
    the files the checkpoint has (its checksums), for the optional ones."""
    return {
        "catalogue": Catalogue.load(path / CATALOGUE) if CATALOGUE in present else Catalogue(),
        "partitions": (UserPartitions.load(path / PARTITIONS) if PARTITIONS in present
                       else UserPartitions()),
        "weights": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
        "optim": torch.load(path / "optim.pt", map_location="cpu", weights_only=True),
        "users": IdMap.load(path / "users.npz"), "items": IdMap.load(path / "items.npz"),
        "store": InteractionStore.load(path / "store.npz"),
    }


def _apply(state: dict[str, Any], trainer: Trainer) -> None:
    weights, optim, store = state["weights"], state["optim"], state["store"]
    trainer.user_ids, trainer.item_ids = state["users"], state["items"]
    trainer.store = store
    trainer.sampler.store = store
    load_weights(trainer.model, weights)
    if trainer.opt_context is not None:
        trainer.opt_context.load_state_dict(optim["context"])
    trainer.opt_users.load_state_dict(optim["users"])
    trainer.opt_items.load_state_dict(optim["items"])
    trainer.opt_tower.load_state_dict(optim["tower"])
    trainer.steps, trainer.samples_trained = int(optim["steps"]), int(optim["samples"])
    # Checkpoints from before the replay budget count every sample as fresh: a budget
    # set on them starts full rather than spent.
    trainer.fresh_samples = int(optim.get("fresh_samples", optim["samples"]))


def _shape(trainer: Trainer) -> dict[str, Any]:
    m = trainer.model.cfg
    shape = {"factors": m.factors, "mlp_layers": list(m.mlp_layers),
             "optimizer": trainer.cfg.optimizer, "min_history": trainer.cfg.min_history}
    # Only when on, so checkpoints of the paper's model written before it still load.
    return shape | ({"history_length": m.history_length} if m.history_length else {})


def begin(root: Path, prefix: str) -> tuple[int, Path]:
    """The next sequence number of ``root``'s ``<prefix>-<seq>`` directories, and a fresh
    temporary directory to write it in (those left by a crash mid-write are removed)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = [int(p.name.split("-")[1]) for p in root.glob(f"{prefix}-*")
                if p.name.split("-")[1].isdigit()]
    seq = max(existing, default=0) + 1
    tmp = root / f".tmp-{seq:08d}-{os.getpid()}"
    tmp.mkdir()
    return seq, tmp


def seal(directory: Path, files: Sequence[str], meta: dict[str, Any],
         known: Mapping[str, str] | None = None) -> None:
    """Finish a directory written under a temporary name: ``meta`` with a SHA-256 of each
    of ``files`` as meta.json, then every file and the directory fsynced. The caller
    renames it into place (atomic on POSIX) and fsyncs the parent. ``known``: digests
    already known (files linked from a sealed directory), not computed again."""
    known = known or {}
    meta["sha256"] = {name: known.get(name) or _digest(directory / name) for name in files}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    for name in (*files, "meta.json"):
        fsync(directory / name)
    fsync(directory)


def check_files(path: Path, meta: dict[str, Any], files: Sequence[str]) -> None:
    """Raise :class:`CheckpointError` unless each of ``files`` matches its checksum in the
    ``meta`` that :func:`seal` wrote (a truncated or altered file does not)."""
    for name in files:
        if _digest(path / name) != meta["sha256"].get(name):
            raise CheckpointError(f"{name} does not match its checksum")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
