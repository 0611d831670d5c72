"""Re-dealing a group's users at another size: trainers merged and split by user.

A group of N trainers (:mod:`ncf_stream.group`) checkpoints at aligned epochs:
after an exchange the item side (item ids and rows, context rows, the tower) is
the same on every trainer, and each holds the users of its partitions. To go on
at size M, new rank r loads every old rank's checkpoint of the epoch and keeps the
users whose partition p has ``p % M == r``
(:meth:`ncf_stream.source.UserPartitions.owned_rows`): :func:`merge_trainers`
builds that trainer from the old ones, and :func:`merge_partitions` its
``UserPartitions``. Pure functions of their inputs, which they leave untouched.

What the merged trainer holds:

* **Each selected user exactly as its trainer had it**, renumbered: the first
  part's listed rows become rows 0, 1, ... in the order listed, the next part's
  follow. Its id, embedding row, optimizer state row, recent items (the history
  input), and in the store its pairs with their times, count, hold-out and
  evaluated mark (:func:`ncf_stream.store.merge_stores`).
* **Tombstones are dropped**: a deleted user's row (id None) holds nothing (its
  pairs, row, optimizer state and history were cleared at the deletion), so it
  gets no row. Row numbers are new anyway: the rows of the old checkpoints mean
  nothing to the new trainer.
* **The item side of the first part**: item ids (tombstones included: item rows
  keep their numbers), item and context rows, the tower, and the optimizer state
  of all three. The rows and the tower are the same on every part of an aligned
  epoch; the optimizer state is not (each trainer keeps its own accumulators:
  docs/group.md), so the caller picks whose by putting it first. So do the
  counters: ``steps``, ``samples_trained``, ``fresh_samples`` (so the replay
  budget, ``replay_ratio * fresh - replayed``, is the first part's), and with
  Adam the user optimizer's step count ``t``, one per table, not per row.
* **Nothing in flight**: positives ingested but not yet trained are not carried,
  as a checkpoint does not carry them (they are in the store, and replay reaches
  them). The negative sampler, replay generator and device step start afresh.

Refused (ValueError): parts whose item ids differ (not one aligned epoch), a user
id selected more than once (twice in a part, or in two parts: a user whose events
reached two trainers' partitions has two partial states, which do not merge
exactly; ``UserPartitions`` marks them ``SPLIT`` and :meth:`owned_rows` leaves
them out, for the caller to decide), and parts of another model shape.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from ncf_stream.optim import RowAdam
from ncf_stream.source import UserPartitions
from ncf_stream.store import merge_stores
from ncf_stream.trainer import Trainer, TrainerConfig


def merge_trainers(parts: Sequence[tuple[Trainer, np.ndarray]], cfg: TrainerConfig,
                   device: str | torch.device = "cpu") -> tuple[Trainer, np.ndarray]:
    """A fresh trainer of ``cfg`` on ``device`` holding, of each ``(trainer, rows)``
    part, the users at ``rows`` (tombstones skipped), renumbered in order, with the
    first part's item side (see the module's docstring).

    Returns it and ``origin``, (users, 2) int64: the (part index, old row) of each new
    user row, which :func:`merge_partitions` (or any other per-user array) follows."""
    if not parts:
        raise ValueError("merge_trainers needs at least one part")
    first = parts[0][0]
    for trainer, _ in parts:
        _check(trainer, first, cfg)
    kept = [_live(trainer, rows) for trainer, rows in parts]
    user_ids = [x for (trainer, _), rows in zip(parts, kept, strict=True)
                for x in trainer.user_ids.ids(rows).tolist()]
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("a user id is selected more than once (in more than one part, "
                         "or twice in one): its states do not merge")
    origin = np.concatenate(
        [np.empty((0, 2), dtype=np.int64),
         *(np.stack([np.full(len(rows), p, dtype=np.int64), rows], axis=1)
           for p, rows in enumerate(kept))])

    store = merge_stores([(trainer.store, rows)
                          for (trainer, _), rows in zip(parts, kept, strict=True)])
    out = Trainer(cfg, device, store=store)
    out.user_ids.extend(user_ids, 0)
    out.item_ids.extend(first.item_ids.all_ids().tolist(), 0)
    n_items = first.model.n_items
    out.model.grow(len(user_ids), n_items)
    _copy_item_side(first, out, n_items)
    base = 0
    for (trainer, _), rows in zip(parts, kept, strict=True):
        _copy_users(trainer, rows, out, base)
        base += len(rows)
    return out, origin


def merge_partitions(partitions: Sequence[UserPartitions], origin: np.ndarray,
                     ) -> UserPartitions:
    """The partitions of the users of :func:`merge_trainers`: ``partitions[p]`` is the
    part p's (its trainer's ``UserPartitions``), ``origin`` what the merge returned."""
    origin = np.asarray(origin, dtype=np.int64).reshape(-1, 2)
    out = np.full(len(origin), -1, dtype=np.int32)
    for p, parts in enumerate(partitions):
        at = np.flatnonzero(origin[:, 0] == p)
        out[at] = parts.partition_of(origin[at, 1])
    return UserPartitions.from_arrays(out)


def _check(trainer: Trainer, first: Trainer, cfg: TrainerConfig) -> None:
    mine, want = trainer.cfg, cfg
    shape = (want.model.factors, tuple(want.model.mlp_layers), want.model.history_length,
             want.optimizer, want.min_history)
    got = (mine.model.factors, tuple(mine.model.mlp_layers), mine.model.history_length,
           mine.optimizer, mine.min_history)
    if got != shape:
        raise ValueError(f"a part's model (factors, layers, history, optimizer, min_history) "
                         f"{got} differs from the config's {shape}")
    if len(trainer.user_ids) > trainer.model.n_users or (
            trainer.model.n_items != len(trainer.item_ids)):
        raise ValueError("a part's model rows do not match its ids (caught mid-ingest?)")
    if trainer is not first and (trainer.item_ids.all_ids().tolist()
                                 != first.item_ids.all_ids().tolist()):
        raise ValueError("the parts' item ids differ: not one aligned epoch of a group")


def _live(trainer: Trainer, rows: np.ndarray) -> np.ndarray:
    """``rows`` without the tombstones (IndexError for a row the trainer lacks)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and rows.min() < 0:
        raise IndexError("user rows must be >= 0")
    ids = trainer.user_ids.ids(rows)
    return rows[np.array([x is not None for x in ids.tolist()], dtype=bool)]


@torch.no_grad()
def _copy_item_side(src: Trainer, dst: Trainer, n_items: int) -> None:
    model, into = src.model, dst.model
    into.items.weight[:n_items] = model.items.weight[:n_items].to(dst.device)
    if model.context is not None and into.context is not None:
        into.context.weight[:n_items] = model.context.weight[:n_items].to(dst.device)
    into.tower.load_state_dict(model.tower.state_dict())
    dst.opt_items.load_state_dict(src.opt_items.state_dict())  # copies: state_dict clones
    if src.opt_context is not None and dst.opt_context is not None:
        dst.opt_context.load_state_dict(src.opt_context.state_dict())
    # Torch's load keeps tensors already on the device: a deep copy, so the two trainers'
    # tower steps never share state.
    dst.opt_tower.load_state_dict(copy.deepcopy(src.opt_tower.state_dict()))
    if isinstance(src.opt_users, RowAdam) and isinstance(dst.opt_users, RowAdam):
        dst.opt_users.t = src.opt_users.t
    dst.steps, dst.samples_trained = src.steps, src.samples_trained
    dst.fresh_samples = src.fresh_samples


@torch.no_grad()
def _copy_users(src: Trainer, rows: np.ndarray, dst: Trainer, base: int) -> None:
    if not len(rows):
        return
    old = torch.from_numpy(rows).to(src.device)
    new = torch.arange(base, base + len(rows), device=dst.device)
    dst.model.users.weight.index_copy_(
        0, new, src.model.users.weight.index_select(0, old).to(dst.device))
    dst.opt_users.set_row_state(new, src.opt_users.row_state(old))
    if src.model.recent is not None and dst.model.recent is not None:
        dst.model.recent.items[base: base + len(rows)] = src.model.recent.items[rows]
        dst.model.recent.ts[base: base + len(rows)] = src.model.recent.ts[rows]
