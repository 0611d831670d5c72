"""A group of trainers: each owns some of the topic's partitions, all share the items.

Events are keyed by user, so a partition holds all of its users' events. A
trainer of the group (rank ``r`` of ``group_size``) consumes the partitions p
with ``p % group_size == r`` and owns their users outright: store rows (so
negatives stay exact and local), user rows, history, hold-outs and offsets.
What every trainer touches is shared: the item rows (own and context) and the
tower. They are kept in step over ``torch.distributed`` (gloo, on CPU tensors,
so the same code serves CUDA trainers) by an **exchange** every
``group_sync_every_steps`` training steps (or ``group_sync_every_s``), local
steps in between ("local SGD"):

1. *Header* (``all_gather_object``): the item ids new to the group that each
   trainer holds back, the item deletions it was asked for, and its flags (a
   checkpoint is due, stop, done, its loss is finite). Every trainer derives the
   same decisions from the same gathered headers.
2. *Updates.* Each trainer's change to the shared tensors since the last
   exchange is added to the common base: the **sum** of the deltas, so every
   trainer's steps take full effect, as if all the steps had been taken in
   sequence by one trainer (a mean would divide each item's learning rate by
   the group's size, since most item rows are touched by few trainers between
   two exchanges). Item rows travel sparse: each trainer sends only the rows it
   changed, as a padded variable-size ``all_gather`` (NCCL has no sparse
   all-reduce, and gloo's sparse one would need the rows as one sparse tensor of
   the whole table); the tower, touched by every step, as one dense
   ``all_reduce``. Optimizer state stays local (each trainer's own
   gradients): see :meth:`Group._tables` for why.
3. *New items* get rows in one deterministic order on every trainer: the union
   of the held-back ids, sorted. Their initial values are rank 0's, broadcast.
   An event whose item the group does not know yet waits (its whole batch, so
   each user's events keep their order) until this exchange: the wait is
   bounded by ``group_sync_every_s``.
4. *Item availability and deletions* from any trainer are applied by all of
   them, at the exchange (after the held batches, so an interaction consumed
   before a deletion is deleted with the item; availability before deletions,
   so a deleted item's id is kept nowhere). Each trainer's availability
   events keep their stream order; two trainers' are applied in rank order.

Checkpoints are **aligned**: when rank 0's timer says so (or at a stop), every
trainer writes its state right after an exchange, when the shared tensors are
identical everywhere, tagged with the exchange's number (its *epoch*); once all
have written, rank 0 records the epoch in ``group.json``. A group restarts from
the epoch ``group.json`` names: every trainer restores its own checkpoint of
that epoch and resumes its partitions at that checkpoint's offsets, so every
event's effect on the stores happens exactly once, and the shared tensors are
those of one replayed prefix.

Membership is static, as ``torch.distributed``'s is: a trainer that dies makes
the others' next collective fail (or time out after ``group_timeout_s``); they
raise :class:`GroupError`, stop training and exit, while replicas go on serving
the last exported snapshots; ``ncf-stream serve --workers N`` then starts a new
generation of the group from the last aligned checkpoint. Serving never waits
on a collective: requests read published snapshots only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from ncf_stream.errors import ConfigError, GroupError
from ncf_stream.events import Events
from ncf_stream.settings import Settings
from ncf_stream.trainer import Trainer

log = logging.getLogger(__name__)

MANIFEST = "group.json"
STARTUP_TIMEOUT_S = 1800.0  # how long the trainers wait for each other to restore and meet


def rank_dir(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its checkpoints or exports its snapshots."""
    return Path(directory) / f"rank-{rank}"


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_manifest(directory: str | Path, epoch: int, size: int) -> None:
    """Record the last epoch every trainer checkpointed (atomically: write, fsync, rename)."""
    root = Path(directory)
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"epoch": epoch, "size": size, "written": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


@dataclass
class Header:
    """What one trainer brings to an exchange."""

    epoch: int
    new_items: list[str] = field(default_factory=list)
    delete_items: list[str] = field(default_factory=list)
    availability: list[tuple[str, bool]] = field(default_factory=list)  # in stream order
    checkpoint: bool = False  # rank 0's timer: checkpoint after this exchange
    dirty: bool = False  # this trainer's state changed since its last checkpoint
    stop: bool = False  # stop the group after this exchange
    done: bool = False  # this trainer has nothing left (the group stops when all are)
    finite: bool = True  # this trainer's last loss was finite


@dataclass(frozen=True)
class Decision:
    """What every trainer does after an exchange: the same on each."""

    new_items: list[str]  # sorted: their rows, in this order
    delete_items: list[str]
    availability: list[tuple[str, bool]]  # every trainer's, in rank order
    checkpoint: bool
    stop: bool
    diverged: bool  # some trainer's loss was not finite: nobody trains on


class Group:
    """This process's membership: the collectives that keep the shared state in step."""

    def __init__(self, settings: Settings, trainer: Trainer) -> None:
        s = settings
        if s.group_rank >= s.group_size:
            raise ConfigError(f"group_rank {s.group_rank} must be below group_size "
                              f"{s.group_size}")
        if trainer.device_step is not None:
            raise ConfigError("a group of trainers runs the host step: set device_step off")
        self.rank, self.size = s.group_rank, s.group_size
        self.trainer = trainer
        self.every_s = s.group_sync_every_s
        self.every_steps = s.group_sync_every_steps
        self._steps_at_sync = trainer.steps
        self.epoch = 0
        host, _, port = s.group_address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"group_address must be host:port, not {s.group_address!r}")
        timeout = timedelta(seconds=s.group_timeout_s)
        try:
            self.pg = _init(f"tcp://{host}:{port}", self.rank, self.size, timeout)
        except (RuntimeError, ValueError) as e:
            raise GroupError(f"could not form the group at {s.group_address} as rank "
                             f"{self.rank} of {self.size}: {e}") from e
        self._base: list[torch.Tensor] = []  # the shared tensors at the last exchange
        self._base_tower = torch.empty(0)
        self.bytes_sent = 0  # by this trainer at the last exchange
        self.last_sync = time.monotonic()

    # ---- the shared tensors -----------------------------------------------------------------

    def _tables(self) -> list[torch.Tensor]:
        """The item-indexed tables every trainer shares: item rows and context rows.

        Their Adagrad accumulators stay local, by measurement: summed like the rows
        (so that each trainer's item steps shrink as one trainer's would), two trainers
        lost 0.01 sampled HR@10 against one (bench/scale.py, 3 seeds); local, each
        trainer's item steps are larger by about sqrt(N), which makes up for rows up to
        one exchange stale, at half the bytes."""
        m = self.trainer.model
        tables = [m.items.weight]
        if m.context is not None:
            tables.append(m.context.weight)
        return tables

    def _tower(self) -> Iterable[torch.nn.Parameter]:
        return self.trainer.model.tower.parameters()

    @torch.no_grad()
    def _set_tower(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the tower's parameters, in place: they must never become
        views of it (vector_to_parameters would make them so, and training would then
        move the base along with them)."""
        at = 0
        for p in self._tower():
            p.copy_(flat[at: at + p.numel()].view_as(p))
            at += p.numel()

    def _rebase(self) -> None:
        n = self.trainer.model.n_items
        self._base = [t[:n].detach().cpu().clone() for t in self._tables()]
        self._base_tower = parameters_to_vector(self._tower()).detach().cpu().clone()

    def join(self, restored_epoch: int | None) -> None:
        """Start in step: every trainer must have restored the same epoch (or none) with
        the same item ids (compared by digest); the shared tensors are then made rank 0's
        everywhere."""
        ids = hashlib.sha256("\0".join(
            "" if i is None else i for i in self.trainer.item_ids.all_ids().tolist()
        ).encode()).hexdigest()
        starts = self._gather_objects((restored_epoch, ids))
        if len({epoch for epoch, _ in starts}) != 1:
            raise GroupError(f"the trainers restored different checkpoints (epochs "
                             f"{[epoch for epoch, _ in starts]}); restart the whole group")
        if len({digest for _, digest in starts}) != 1:
            raise GroupError("the trainers' item ids differ: their checkpoints are not of one "
                             "group; restart the whole group from an aligned checkpoint")
        self.epoch = 0 if restored_epoch is None else restored_epoch
        n = self.trainer.model.n_items
        with torch.no_grad():
            for table in self._tables():
                rows = table[:n].detach().cpu().contiguous()
                self._broadcast(rows)
                table[:n] = rows.to(table.device)
            tower = parameters_to_vector(self._tower()).detach().cpu().contiguous()
            self._broadcast(tower)
        self._set_tower(tower)
        self._rebase()
        self.synced()

    def due(self) -> bool:
        """Whether this trainer's next exchange is due: by its steps since the last one,
        or by time. Each trainer decides alone; a collective waits for the others to
        reach theirs, so the group moves at the pace of the slowest."""
        return (self.trainer.steps - self._steps_at_sync >= self.every_steps
                or time.monotonic() - self.last_sync >= self.every_s)

    def synced(self) -> None:
        """The exchange is complete: the cadence counts from here."""
        self.last_sync = time.monotonic()
        self._steps_at_sync = self.trainer.steps

    def unknown_items(self, events: Events) -> list[str]:
        """The batch's item ids the group has no row for yet (distinct, sorted)."""
        if not len(events):
            return []
        rows = self.trainer.item_ids.rows(events.items, add=False)
        return sorted(set(np.asarray(events.items)[rows < 0].tolist()))

    # ---- the exchange -------------------------------------------------------------------------

    def exchange(self, header: Header) -> Decision:
        """Steps 1 and 2 of the module's exchange: the headers, then the updates."""
        header.epoch = self.epoch
        headers: list[Header] = self._gather_objects(header)
        if any(h.epoch != self.epoch for h in headers):
            raise GroupError(f"out of step: epochs {[h.epoch for h in headers]}")
        diverged = not all(h.finite for h in headers)
        decision = Decision(
            new_items=sorted({i for h in headers for i in h.new_items}),
            delete_items=sorted({i for h in headers for i in h.delete_items}),
            availability=[a for h in headers for a in h.availability],
            checkpoint=(headers[0].checkpoint or any(h.stop for h in headers)
                        or all(h.done for h in headers)) and any(h.dirty for h in headers)
            and not diverged,
            stop=any(h.stop for h in headers) or all(h.done for h in headers),
            diverged=diverged)
        # A non-finite delta would spread to every trainer.
        self.bytes_sent = 0 if diverged else self._add_updates()
        self.epoch += 1
        return decision

    def _add_updates(self) -> int:
        """Step 2 of the module's exchange; returns the bytes this trainer sent."""
        n = len(self._base[0]) if self._base else 0
        tables = self._tables()
        cur = [t[:n].detach().cpu() for t in tables]
        deltas = torch.cat([c - b for c, b in zip(cur, self._base, strict=True)], dim=1)
        rows = torch.nonzero(deltas.ne(0).any(1)).squeeze(1)
        counts = self._all_gather(torch.tensor([len(rows)], dtype=torch.int64))
        width = max(int(c) for c in counts)
        sent = 0
        if width:
            pad_rows = torch.full((width,), -1, dtype=torch.int64)
            pad_rows[: len(rows)] = rows
            pad = torch.zeros((width, deltas.shape[1]), dtype=deltas.dtype)
            pad[: len(rows)] = deltas[rows]
            all_rows = torch.cat(self._all_gather(pad_rows))
            all_deltas = torch.cat(self._all_gather(pad))
            keep = all_rows >= 0
            total = torch.zeros_like(deltas)
            total.index_add_(0, all_rows[keep], all_deltas[keep])
            merged = torch.cat(self._base, dim=1) + total
            sent = pad_rows.numel() * 8 + pad.numel() * pad.element_size()
            with torch.no_grad():
                at = 0
                for table, base in zip(tables, self._base, strict=True):
                    width_t = base.shape[1]
                    value = merged[:, at: at + width_t]
                    table[:n] = value.to(table.device)
                    base.copy_(value)
                    at += width_t
        tower = parameters_to_vector(self._tower()).detach().cpu()
        delta = (tower - self._base_tower).contiguous()
        self._all_reduce(delta)
        self._base_tower += delta
        self._set_tower(self._base_tower)
        sent += delta.numel() * delta.element_size()
        return sent

    def assign(self, new_items: Sequence[str]) -> None:
        """Step 3: rows for the group's new item ids, in the decision's order, with rank
        0's initial values."""
        if not new_items:
            return
        t = self.trainer
        lo = t.model.n_items
        rows = t.item_ids.rows(list(new_items))
        if int(rows.min()) != lo or int(rows.max()) != lo + len(new_items) - 1:
            raise GroupError("new item rows are not the next ones: the item ids are out of step")
        t.model.grow(len(t.user_ids), len(t.item_ids))
        hi = t.model.n_items
        with torch.no_grad():
            for table in self._tables():
                init = table[lo:hi].detach().cpu().contiguous()
                self._broadcast(init)
                table[lo:hi] = init.to(table.device)
        self._rebase()

    def pending(self, deletes: Sequence[str], availability: Sequence[tuple[str, bool]],
                ) -> tuple[list[str], list[tuple[str, bool]]]:
        """Every trainer's item deletions and availability events not yet exchanged (those
        the held batches carried), gathered: before a checkpoint that covers their offsets."""
        gathered = self._gather_objects((list(deletes), list(availability)))
        return (sorted({i for d, _ in gathered for i in d}),
                [a for _, av in gathered for a in av])

    def forgotten(self) -> None:
        """After step 4's deletions: the zeroed rows are the new base everywhere."""
        self._rebase()

    def checkpointed(self, ok: bool) -> bool:
        """Whether every trainer wrote its checkpoint of this epoch."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        self._all_reduce(flag, dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        try:
            dist.destroy_process_group()  # the exchanges' group and the default one
        except (RuntimeError, ValueError, AssertionError) as e:  # already broken
            log.debug("destroying the process group: %s", e)

    # ---- collectives, each turning a peer's failure into a GroupError ---------------------------

    def _gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.pg)
        except (RuntimeError, ValueError) as e:
            raise _lost(e) from e
        return out

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        try:
            dist.all_gather(out, tensor, group=self.pg)
        except (RuntimeError, ValueError) as e:
            raise _lost(e) from e
        return out

    def _all_reduce(self, tensor: torch.Tensor,
                    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        try:
            dist.all_reduce(tensor, op=op, group=self.pg)
        except (RuntimeError, ValueError) as e:
            raise _lost(e) from e

    def _broadcast(self, tensor: torch.Tensor) -> None:
        try:
            dist.broadcast(tensor, src=0, group=self.pg)
        except (RuntimeError, ValueError) as e:
            raise _lost(e) from e


def _lost(error: Exception) -> GroupError:
    return GroupError(f"a collective of the group failed (a trainer died, timed out or left): "
                      f"{str(error).splitlines()[0][:300]}")


def _init(url: str, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroup:
    """The process group the exchanges run on, with ``timeout`` on every collective.

    torch.distributed keeps one default group per process, and a trainer is its only
    user. It is formed with STARTUP_TIMEOUT_S: the trainers meet only once each has
    restored its state, and one restoring (or resharding) a large checkpoint may come
    minutes after the others; then the exchanges get a group of their own with the
    group's timeout."""
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed")
    if dist.is_initialized():
        raise GroupError("torch.distributed is already initialised in this process: one "
                         "trainer of a group per process")
    startup = max(timeout, timedelta(seconds=STARTUP_TIMEOUT_S))
    if size == 1:  # a group of one (a group's state resumed alone): nobody to meet
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=startup)
    else:
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=size,
                                timeout=startup)
    pg = dist.new_group(backend="gloo", timeout=timeout)
    assert isinstance(pg, dist.ProcessGroup)
    return pg
