"""The device-resident training step: what a step draws from, kept on the trainer's device.

The store (:class:`~ncf_stream.store.InteractionStore`) stays the truth, on the
host. With the ``device_step`` setting on, the trainer's device holds a mirror
of it, and a step (:meth:`ncf_stream.trainer.Trainer.step`) takes everything it
needs there: the fresh positives from a device queue, the replayed ones and
the negatives from the mirror, and its row de-duplication is done by device
sorts. The host hands over only what an ingest released to training, once per
ingest, as whole arrays; a step queues kernels and reads nothing back.

**The mirror** (:class:`DeviceMirror`) holds the pairs released to training as
sorted int64 keys ``user << 32 | item`` (:func:`~ncf_stream.store.pair_keys`):
a sorted base and a small sorted delta, each in a buffer whose capacity
doubles. An append sorts its keys into the delta; past ``merge_share`` of the
base the two are merged by one ``torch.sort``. A membership test is one
``torch.searchsorted`` per part. Beside the keys: per-item counts of the
training positives (popularity, kept as keys arrive), each user's current
hold-out item (-1 for none) and each item's deletion mark, all in buffers that
double as users and items arrive. A key is appended once: the host leaves out
the pairs it knows are mirrored (stored before and not the hold-out), and the
device turns any other key it already holds into a sentinel that sorts last,
is never counted, and is dropped at the next merge.

**The hold-out is invisible here**, as in :mod:`ncf_stream.sampler`: a user's
current hold-out is never a replayed positive, is allowed as a negative, and
is not counted in popularity. A hold-out is normally not in the mirror at all;
one that was trained on before it became the newest again (a repeat: 113 of
300 hold-outs on the stream of tests/conftest.py's ``trained``) stays in the
keys, and the hold-out tensor takes it out: it is subtracted from its item's
count while it is the hold-out, a membership test for negatives ignores it,
and a replay draw of it is redrawn.

**Sync-free rules.** Everything a step's shapes depend on is a host integer
known without asking the device: the batch size, the number of fresh
positives queued, the mirror's slots (keys plus sentinels). What only the
device knows stays a tensor: how many keys are valid, which candidates were
rejected, the shortfall. Rejection is run for a fixed number of rounds
(``rounds``): every round redraws the whole batch and keeps the new draw where
the old one was rejected; what is still rejected after the last round is
masked (-1), never trained on, and counted in :attr:`DeviceNegativeSampler.shortfall`,
a device tensor read only when asked. A user who has trained on almost the
whole catalogue gets a few negatives short rather than the host sampler's
exact draw from their complement. Replay draws uniformly over the mirror's
valid keys by ``rand * count`` (the count a device scalar) and redraws a draw
that hits a hold-out the same way.

**What still syncs** (rare, never per step): a merge reads the count of keys
back to drop the sentinels (once per ``merge_share`` of growth, in an ingest);
forgetting a user or an item and a retention sweep rebuild the mirror from the
store (:meth:`DeviceMirror.rebuild_from`, an upload), and forgetting filters
the fresh queue on the host (a download of the queue);
:meth:`ncf_stream.trainer.Trainer.negative_shortfall` reads the counters. An
ingest otherwise only uploads its arrays, without waiting for the device. A
store replaced under the trainer (a checkpoint restore) is rebuilt from too,
and the queue emptied: pending positives are not checkpointed, on either path;
they are in the restored store, so replay reaches them. Optimizer state is
checkpointed as on the host path (the scratch rows, above the live rows, never
are), the device generator and the shortfall counters are not (nor are the
host path's generators).

**Not device-resident yet**: the history input (``history_length`` > 0) needs
each replayed positive's event time and the users' recent items, which live on
the host: the device step refuses it (``device_step`` on) or is off (auto).
The mirror keeps no event times for that reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ncf_stream.errors import ConfigError
from ncf_stream.model import Table
from ncf_stream.optim import RowAdagrad, RowAdam
from ncf_stream.sampler import REFRESH_SHARE
from ncf_stream.store import ITEM_BITS, ITEM_MASK, AppendResult, InteractionStore, pair_keys

SENTINEL = torch.iinfo(torch.int64).max  # sorts after every key; never a pair
MERGE_SHARE = 0.03  # merge the delta into the base past this share of it
MIN_DELTA = 4096  # ... and never for fewer keys than this (a small base merges cheaply anyway)
ROUNDS = 8  # rejection rounds for negatives: a 50%-touched user is 0.4% short
REPLAY_ROUNDS = 4  # replay redraws only the rare hold-out that is mirrored


def enabled(mode: str, device: torch.device, history_length: int) -> bool:
    """Whether the ``device_step`` setting turns the device step on for this trainer."""
    if mode == "on" and history_length:
        raise ConfigError("device_step on needs history_length 0: the history input still "
                          "reads event times and recent items on the host")
    if mode == "auto":
        return device.type == "cuda" and not history_length
    return mode == "on"


def upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host rows as int64 on the device. ``non_blocking``: a plain ``.to`` waits for the
    stream (every queued step) to finish; from pageable memory the copy is staged at
    once, so the array may go right after."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device,
                                                                          non_blocking=True)


class _Buffer:
    """A 1-D device tensor whose capacity doubles; the caller tracks how much is live."""

    def __init__(self, dtype: torch.dtype, device: torch.device, fill: int | bool) -> None:
        self.fill = fill
        self.data = torch.full((0,), fill, dtype=dtype, device=device)

    def ensure(self, n: int) -> None:
        if n > len(self.data):
            grown = torch.full((max(n, 2 * len(self.data), 1024),), self.fill,
                               dtype=self.data.dtype, device=self.data.device)
            grown[: len(self.data)] = self.data
            self.data = grown

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class DeviceMirror:
    """The training positives on the device: sorted keys, popularity, hold-outs, deletions."""

    def __init__(self, device: torch.device | str, merge_share: float = MERGE_SHARE,
                 min_delta: int = MIN_DELTA) -> None:
        self.device = dev = torch.device(device)
        self.merge_share, self.min_delta = merge_share, min_delta
        self._base = _Buffer(torch.int64, dev, SENTINEL)
        self._delta = _Buffer(torch.int64, dev, SENTINEL)
        self.base_slots = 0  # keys and sentinels in the base (host): shapes depend on it
        self.delta_slots = 0
        self._base_valid = torch.zeros((), dtype=torch.int64, device=dev)  # keys, sentinels not
        self._delta_valid = torch.zeros((), dtype=torch.int64, device=dev)
        self._counts = _Buffer(torch.int64, dev, 0)  # per item: mirrored pairs
        self._holdout = _Buffer(torch.int64, dev, -1)  # per user: hold-out item, -1 none
        self._dead = _Buffer(torch.bool, dev, False)  # per item: deleted
        self.n_users = self.n_items = 0
        self.version = 0  # rebuilds so far: a popularity table of an older one is stale
        self.merges = 0
        self.store: InteractionStore | None = None  # the store last rebuilt from
        self.removed = 0  # its removals then

    @property
    def slots(self) -> int:
        return self.base_slots + self.delta_slots

    def count(self) -> torch.Tensor:
        """Keys held, a device scalar (``int()`` of it syncs)."""
        return self._base_valid + self._delta_valid

    def keys(self) -> np.ndarray:
        """Every key, sorted, on the host (a sync: for tests and checks)."""
        both = torch.cat([self._base.data[: self.base_slots], self._delta.data[: self.delta_slots]])
        both = torch.sort(both).values
        return both[both != SENTINEL].cpu().numpy()

    def counts(self) -> torch.Tensor:
        """(n_items,) mirrored pairs per item, on the device."""
        return self._counts.data[: self.n_items]

    def holdouts(self) -> torch.Tensor:
        return self._holdout.data[: self.n_users]

    def grow(self, n_users: int, n_items: int) -> None:
        """Room for rows [0, n_users) and [0, n_items); capacities double."""
        self.n_users, self.n_items = max(self.n_users, n_users), max(self.n_items, n_items)
        self._holdout.ensure(self.n_users)
        self._counts.ensure(self.n_items)
        self._dead.ensure(self.n_items)

    # ---- membership --------------------------------------------------------------------------

    @staticmethod
    def _in(part: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if len(part) == 0:
            return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
        pos = torch.searchsorted(part, keys).clamp_(max=len(part) - 1)
        return part[pos] == keys

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """Whether each key is mirrored (a device bool tensor)."""
        found = (self._in(self._base.data[: self.base_slots], keys)
                 | self._in(self._delta.data[: self.delta_slots], keys))
        return found & (keys != SENTINEL)

    def trained(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) may not be a negative: trained on and not the user's
        current hold-out, or a deleted item. Rows must be below n_users, n_items."""
        hit = self.contains((users << ITEM_BITS) | items) & (self._holdout.data[users] != items)
        return hit | self._dead.data[items]

    # ---- appending and rebuilding ----------------------------------------------------------------

    def append(self, keys: np.ndarray) -> None:
        """Add training positives (host keys, rows within :meth:`grow`'s); a key already
        held, or repeated in ``keys``, becomes a sentinel, counted nowhere."""
        if len(keys) == 0:
            return
        k = torch.sort(upload(keys, self.device)).values
        present = self.contains(k)
        present[1:] |= k[1:] == k[:-1]  # a repeat within the batch: its first one counts
        fresh = ~present
        self._counts.data.index_add_(0, torch.where(present, 0, k & ITEM_MASK), fresh.long())
        k = torch.where(present, SENTINEL, k)
        n = self.delta_slots + len(k)
        self._delta.ensure(n)
        self._delta.data[:n] = torch.sort(torch.cat([self._delta.data[: self.delta_slots], k])
                                          ).values
        self.delta_slots = n
        self._delta_valid += fresh.sum()
        if self.delta_slots > max(self.min_delta, self.merge_share * self.base_slots):
            self.merge()

    def merge(self) -> None:
        """The delta sorted into the base. Sentinels sort last, and the merge drops them:
        it reads the count of keys back, its one sync (once per ``merge_share`` of
        growth, in an ingest, never in a step)."""
        n = self.base_slots + self.delta_slots
        self._base.ensure(n)
        self._base.data[:n] = torch.sort(torch.cat([self._base.data[: self.base_slots],
                                                    self._delta.data[: self.delta_slots]])).values
        self._base_valid += self._delta_valid
        self._delta_valid.zero_()
        self.base_slots, self.delta_slots = int(self._base_valid), 0
        self.merges += 1

    def set_holdouts(self, users: np.ndarray, items: np.ndarray) -> None:
        """Users' current hold-out items (-1: none); ``users`` unique. A mirrored pair
        that becomes a hold-out leaves the counts, and one that stops being it (still
        mirrored) comes back: popularity counts training positives only."""
        if not len(users):
            return
        u, new = upload(users, self.device), upload(items, self.device)
        old = self._holdout.data[u]
        changed = old != new
        for item, sign in ((old, 1), (new, -1)):
            some = item.clamp(min=0)
            held = (item >= 0) & changed & self.contains((u << ITEM_BITS) | some)
            self._counts.data.index_add_(0, some, held.long() * sign)
        self._holdout.data.index_copy_(0, u, new)

    def rebuild_from(self, store: InteractionStore) -> None:
        """Everything again from the store's training pairs (after removals: deletions,
        retention; or a store replaced by a checkpoint restore). An upload, not per step."""
        users, items = store.training_pairs()  # sorted by key
        keys = pair_keys(users, items)
        self.grow(store.n_users, store.n_items)
        self._base.ensure(len(keys))
        self._base.data[: len(keys)] = upload(keys, self.device)
        self.base_slots, self.delta_slots = len(keys), 0
        self._base_valid.fill_(len(keys))
        self._delta_valid.zero_()
        counts = np.bincount(items, minlength=store.n_items).astype(np.int64)
        self._counts.data.zero_()
        self._counts.data[: store.n_items] = upload(counts, self.device)
        ho = store.holdout()
        self._holdout.data.fill_(-1)
        self.set_holdouts(ho.users, ho.items)
        self._dead.data.zero_()
        dead = upload(store.dead_items(), self.device)
        self._dead.data[dead] = True
        self.store, self.removed = store, store.removed
        self.version += 1

    # ---- replay ------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) keys drawn uniformly from the mirror; SENTINEL where it holds none."""
        dev = self.device
        total = self.count()
        r = torch.rand(n, dtype=torch.float64, generator=generator, device=dev)
        idx = torch.minimum((r * total).long(), (total - 1).clamp(min=0))
        out = torch.full((n,), SENTINEL, dtype=torch.int64, device=dev)
        if self.base_slots:
            base = self._base.data[idx.clamp(max=self.base_slots - 1)]
            out = torch.where(idx < self._base_valid, base, out)
        if self.delta_slots:
            rest = (idx - self._base_valid).clamp(min=0, max=self.delta_slots - 1)
            out = torch.where(idx >= self._base_valid, self._delta.data[rest], out)
        return torch.where(total > 0, out, SENTINEL)

    def nbytes(self) -> int:
        """Device memory held (capacities, not just the live part)."""
        return sum(b.nbytes() for b in (self._base, self._delta, self._counts, self._holdout,
                                        self._dead)) + 16


class DeviceNegativeSampler:
    """k negatives per positive, drawn on the device from the mirror's popularity.

    count^alpha by a CDF and ``torch.searchsorted`` (uniform when alpha is 0),
    refreshed when the catalogue or the mirror grew by :data:`~ncf_stream.sampler.REFRESH_SHARE`
    or the mirror was rebuilt; new items wait for the next refresh, as on the host.
    Items with no count are never drawn, unless nothing is counted (then uniform)."""

    def __init__(self, mirror: DeviceMirror, alpha: float, generator: torch.Generator,
                 rounds: int = ROUNDS) -> None:
        self.mirror, self.alpha, self.generator, self.rounds = mirror, alpha, generator, rounds
        dev = mirror.device
        self.shortfall = torch.zeros((), dtype=torch.int64, device=dev)  # masked, a device count
        self._table: tuple[int, int, int, torch.Tensor, torch.Tensor] | None = None

    def _popularity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, cdf) of the current table, float64 on the device."""
        m, t = self.mirror, self._table
        if t is None or t[0] != m.version or m.n_items > t[1] * (1 + REFRESH_SHARE) or (
                m.slots > t[2] * (1 + REFRESH_SHARE)):
            w = m.counts().double() ** self.alpha
            w = torch.where(w.sum() > 0, w, torch.ones_like(w))  # nothing counted: uniform
            t = self._table = (m.version, m.n_items, m.slots, w, torch.cumsum(w, 0))
        return t[3], t[4]

    def _draw(self, n: int) -> torch.Tensor:
        g, dev = self.generator, self.mirror.device
        if self.alpha == 0.0:
            return torch.randint(0, self.mirror.n_items, (n,), generator=g, device=dev)
        w, cdf = self._popularity()
        x = torch.rand(n, dtype=torch.float64, generator=g, device=dev) * cdf[-1]
        return torch.searchsorted(cdf, x, right=True).clamp_(max=len(w) - 1)

    def sample(self, users: torch.Tensor, k: int) -> torch.Tensor:
        """(len(users), k) negatives; -1 where none was found in ``rounds`` draws."""
        n = len(users) * k
        if n == 0 or self.mirror.n_items == 0:
            return torch.full((len(users), k), -1, dtype=torch.int64, device=users.device)
        rows = users[:, None].expand(len(users), k).reshape(-1)  # no repeats tensor: no sync
        out = self._draw(n)
        bad = self.mirror.trained(rows, out)
        for _ in range(self.rounds - 1):
            out = torch.where(bad, self._draw(n), out)
            bad = self.mirror.trained(rows, out)
        self.shortfall += bad.sum()
        return torch.where(bad, -1, out).view(len(users), k)

    def log_q(self, items: torch.Tensor) -> torch.Tensor:
        """log of each item's draw weight (unnormalized; float32): the table's for items
        in it, count^alpha for newer ones. Uniform: zeros."""
        if self.alpha == 0.0:
            return torch.zeros(items.shape, device=items.device)
        w, _ = self._popularity()
        table = w[items.clamp(max=len(w) - 1)]
        now = self.mirror.counts()[items].double() ** self.alpha
        weight = torch.where(items < len(w), table, now)
        return torch.log(weight.clamp(min=1e-12)).float()


class DeviceQueue:
    """Fresh positives waiting to be trained, in arrival order, on the device."""

    def __init__(self, device: torch.device) -> None:
        self._users = _Buffer(torch.int64, device, 0)
        self._items = _Buffer(torch.int64, device, 0)
        self.head = self.tail = 0  # host counts: the queue is [head, tail)

    def __len__(self) -> int:
        return self.tail - self.head

    def push(self, users: np.ndarray, items: np.ndarray) -> None:
        m = len(users)
        if m == 0:
            return
        if self.tail + m > len(self._users.data) and self.head:  # the front is free: reuse it
            n = len(self)
            for b in (self._users, self._items):
                b.data[:n] = b.data[self.head: self.tail].clone()
            self.head, self.tail = 0, n
        dev = self._users.data.device
        for b, a in ((self._users, users), (self._items, items)):
            b.ensure(self.tail + m)
            b.data[self.tail: self.tail + m] = upload(a, dev)
        self.tail += m

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The oldest min(n, len) positives (copies), dropped from the queue."""
        n = min(n, len(self))
        u = self._users.data[self.head: self.head + n].clone()
        i = self._items.data[self.head: self.head + n].clone()
        self.head += n
        if self.head == self.tail:
            self.head = self.tail = 0
        return u, i

    def filter(self, match: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> int:
        """Drop the positives ``match(users, items)`` selects (a round trip to the host:
        deletions only); returns how many."""
        u = self._users.data[self.head: self.tail].cpu().numpy()
        i = self._items.data[self.head: self.tail].cpu().numpy()
        keep = ~match(u, i)
        self.head = self.tail = 0
        self.push(u[keep], i[keep])
        return int(len(u) - keep.sum())

    def clear(self) -> None:
        self.head = self.tail = 0

    def nbytes(self) -> int:
        return self._users.nbytes() + self._items.nbytes()


def unique_padded(values: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique, inverse) without a sync: ``unique`` has len(values) entries, the sorted
    distinct values first and ``pad`` after them; ``unique[inverse] == values``.

    One sort, first-of-run flags and their cumulative sum give each value its slot;
    every value of a run scatters the same value to it, so the result does not depend
    on the order a device applies them."""
    sorted_values, order = torch.sort(values)
    first = torch.ones_like(sorted_values, dtype=torch.bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    slot = torch.cumsum(first, 0) - 1
    unique = torch.full_like(values, pad).scatter_(0, slot, sorted_values)
    inverse = torch.empty_like(slot).scatter_(0, order, slot)
    return unique, inverse


Optimizer = RowAdagrad | RowAdam


class DeviceStep:
    """The mirror, the device sampler, the fresh queue and the scratch rows of one trainer.

    **Scratch rows.** A masked sample (a negative not found, a replay draw not
    resolved) and the padding of :func:`unique_padded` point at a scratch row of
    each table: its last row of capacity, kept above the live rows, zeroed, with
    its optimizer state reset whenever the capacity changes (the old scratch row
    is headroom again, and a new row there is initialized when it goes live).
    Masked samples weigh 0, so their gradient is exactly 0, and every padded
    copy of the scratch row computes the same update: ``index_copy_`` with its
    repeated index writes one value whichever copy lands last, with or without
    weight decay."""

    def __init__(self, store: InteractionStore, device: torch.device, alpha: float, seed: int,
                 rounds: int = ROUNDS, merge_share: float = MERGE_SHARE,
                 min_delta: int = MIN_DELTA) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.mirror = DeviceMirror(device, merge_share, min_delta)
        self.sampler = DeviceNegativeSampler(self.mirror, alpha, self.generator, rounds)
        self.queue = DeviceQueue(device)
        self.replay_shortfall = torch.zeros((), dtype=torch.int64, device=device)
        self._scratch: dict[int, int] = {}  # id(table): its scratch row
        self.mirror.rebuild_from(store)

    def follow(self, store: InteractionStore) -> None:
        """Rebuild after removals the mirror has not seen (a retention sweep calls the
        store directly), or from a store that replaced its own (a checkpoint restore:
        the queue's positives are not checkpointed, and it empties)."""
        if store is not self.mirror.store:
            self.queue.clear()
            self.mirror.rebuild_from(store)
        elif store.removed != self.mirror.removed:
            self.mirror.rebuild_from(store)

    def known(self, store: InteractionStore, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Sorted keys of the events' pairs the mirror holds already: stored, and not
        the hold-out (every other stored pair was released to training). Before the append."""
        self.follow(store)
        sel = (users < store.n_users) & (items < store.n_items)
        u, i = users[sel], items[sel]
        held = store.contains(u, i) & ~store.is_holdout(u, i)
        return np.unique(pair_keys(u[held], i[held]))

    def ingested(self, store: InteractionStore, users: np.ndarray, result: AppendResult,
                 known: np.ndarray) -> None:
        """After ``store.append``: new rows, hold-outs, the released pairs and the queue."""
        m = self.mirror
        m.grow(store.n_users, store.n_items)
        bu = np.unique(users)
        m.set_holdouts(bu, store.holdout_items(bu))
        keys = np.unique(pair_keys(result.train_users, result.train_items))
        if len(known):
            pos = np.searchsorted(known, keys).clip(max=len(known) - 1)
            keys = keys[known[pos] != keys]
        m.append(keys)
        self.queue.push(result.train_users, result.train_items)

    def positives(self, n_fresh: int, n_replay: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(users, items, ok): ``n_fresh`` from the queue then ``n_replay`` from the
        mirror; ok is False for a replay draw left unresolved (its rows are 0)."""
        dev = self.device
        fu, fi = self.queue.take(n_fresh)
        keys = self.mirror.sample(n_replay, self.generator)
        for _ in range(REPLAY_ROUNDS):
            bad = self._not_replayable(keys)
            keys = torch.where(bad, self.mirror.sample(n_replay, self.generator), keys)
        bad = self._not_replayable(keys)
        self.replay_shortfall += bad.sum()
        keys = torch.where(bad, 0, keys)
        ok = torch.cat([torch.ones(len(fu), dtype=torch.bool, device=dev), ~bad])
        return (torch.cat([fu, keys >> ITEM_BITS]), torch.cat([fi, keys & ITEM_MASK]), ok)

    def _not_replayable(self, keys: torch.Tensor) -> torch.Tensor:
        none = keys == SENTINEL
        safe = torch.where(none, 0, keys)
        users, items = safe >> ITEM_BITS, safe & ITEM_MASK
        return none | (self.mirror.holdouts()[users] == items)

    def scratch(self, table: Table, optimizers: list[Optimizer]) -> int:
        """The table's scratch row (see the class), kept above its live rows."""
        table.ensure_capacity(table.rows + 1)
        row = len(table.weight) - 1
        old = self._scratch.get(id(table))
        if old != row:
            with torch.no_grad():
                for opt in optimizers:
                    if old is not None:
                        opt.reset(old)  # headroom again: a new row there starts clean
                    opt.reset(row)
                table.weight[row] = 0
            self._scratch[id(table)] = row
        return row

    def nbytes(self) -> int:
        return self.mirror.nbytes() + self.queue.nbytes()
