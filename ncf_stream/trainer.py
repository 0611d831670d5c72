"""The online trainer: events in, micro-batches of positives and sampled negatives out.

``ingest`` maps external ids to rows (growing the model), or takes rows
mapped upstream (:class:`~ncf_stream.ids.MappedEvents`), appends to the
store, and queues the positives the store releases to training (the newest
interaction of each user is held out). ``step`` trains one micro-batch:
fresh positives first, up to ``fresh_share`` of the positive slots, the rest
**replayed** from the store, so the model keeps learning between bursts and
does not forget; with no fresh events a step is all replay. Each positive gets
``negatives`` sampled items the user never touched. Loss: binary
cross-entropy, as in the paper, or (``loss`` softmax) a sampled softmax over
each positive and its negatives. With the history input, each positive and its
negatives see the user's recent items from before the positive's event time
(:meth:`Trainer._history`), so a step needs the positives' times: fresh ones
carry theirs, replayed ones are looked up in the store.

On CUDA the tables, optimizer state and tower live on the device; a step moves
only the batch's row indices and labels there, and reads nothing back (the
loss stays a device tensor until someone asks for it). With ``device_step`` on
(auto: on CUDA without the history input) even those stay there: fresh
positives, replay and negatives come from a mirror of the store on the device
and the rows are de-duplicated by device sorts (:mod:`ncf_stream.device_step`),
so the host only hands over each ingest's positives. Off, the step below is the
host's, unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ncf_stream.device_step import DeviceStep, enabled, unique_padded
from ncf_stream.events import Events
from ncf_stream.history import bag_offsets
from ncf_stream.ids import IdMap, MappedEvents
from ncf_stream.model import NeuMF, NeuMFConfig
from ncf_stream.optim import RowAdagrad, RowAdam
from ncf_stream.sampler import NegativeSampler, SamplerConfig
from ncf_stream.settings import Settings, check_config, config_values, setting
from ncf_stream.store import AppendResult, InteractionStore, evaluated_users


@dataclass(frozen=True)
class TrainerConfig:
    """Defaults, bounds and the reasons for them: the settings of the same names
    (ncf_stream.settings; ``alpha`` is ``negative_alpha``)."""

    batch_size: int = setting("batch_size")
    negatives: int = setting("negatives")
    alpha: float = setting("negative_alpha")
    optimizer: str = setting("optimizer")
    loss: str = setting("loss")
    lr: float = setting("lr")
    weight_decay: float = setting("weight_decay")
    tower_lr: float = setting("tower_lr")
    fresh_share: float = setting("fresh_share")
    replay: bool = setting("replay")
    replay_ratio: float | None = setting("replay_ratio")
    min_history: int = setting("min_history")
    holdout_fraction: float = setting("holdout_fraction")
    seed: int = setting("seed")
    device_step: str = setting("device_step")
    model: NeuMFConfig = field(default_factory=NeuMFConfig)

    def __post_init__(self) -> None:
        check_config(self)

    @classmethod
    def from_settings(cls, s: Settings) -> TrainerConfig:
        return cls(**config_values(cls, s), model=NeuMFConfig.from_settings(s))

    @property
    def positives_per_step(self) -> int:
        return max(1, self.batch_size // (1 + self.negatives))

    @property
    def step_tensor_bytes(self) -> int:
        """The largest float32 tensor of a step, about: a row per sample as wide as the
        widest of the embedding rows, the MLP's input and the joined GMF and MLP outputs."""
        m = self.model
        return 4 * self.batch_size * max(m.row_dim, m.mlp_layers[0],
                                         m.factors + m.mlp_layers[-1])


@dataclass
class StepStats:
    fresh: int
    replayed: int  # with the device step: drawn, a few may be masked (replay_shortfall)
    samples: int  # with the device step: positives x (1 + negatives), masked ones included
    loss: torch.Tensor  # mean BCE on the step, a device tensor: .item() syncs


class Trainer:
    def __init__(self, cfg: TrainerConfig | None = None, device: str | torch.device = "cpu",
                 store: InteractionStore | None = None) -> None:
        self.cfg = cfg = cfg or TrainerConfig()
        self.device = torch.device(device)
        self.user_ids, self.item_ids = IdMap(), IdMap()
        # "is None", not "or": an empty store given (a merge of users without events) is
        # falsy, and must still be the one trained from.
        self.store = store if store is not None else InteractionStore(
            min_history=cfg.min_history)
        self.sampler = NegativeSampler(
            self.store, SamplerConfig(k=cfg.negatives, alpha=cfg.alpha, seed=cfg.seed))
        self.model = NeuMF(cfg.model, self.device, seed=cfg.seed)
        rows_opt = RowAdagrad if cfg.optimizer == "adagrad" else RowAdam
        self.opt_users = rows_opt(self.model.users, cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_items = rows_opt(self.model.items, cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_tower = torch.optim.Adam(self.model.tower.parameters(), lr=cfg.tower_lr,
                                          fused=True)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.opt_context = (None if self.model.context is None else
                            rows_opt(self.model.context, cfg.lr, weight_decay=cfg.weight_decay))
        # Fresh positives: (users, items, event times) in arrival order.
        self._fresh: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()
        self._pending = 0
        self.samples_trained = 0
        self.fresh_samples = 0  # of samples_trained: the replay budget is a multiple of it
        self.steps = 0
        # The device-resident step (ncf_stream.device_step), or None: the host step.
        self.device_step = (DeviceStep(self.store, self.device, cfg.alpha, cfg.seed + 2)
                            if enabled(cfg.device_step, self.device, cfg.model.history_length)
                            else None)

    @property
    def pending(self) -> int:
        """Fresh positives waiting to be trained."""
        if self.device_step is not None:
            return len(self.device_step.queue)
        return self._pending

    def ingest(self, events: Events | MappedEvents) -> AppendResult:
        users, items = self.rows(events)
        return self.ingest_rows(users, items, events.ts)

    def rows(self, events: Events | MappedEvents) -> tuple[np.ndarray, np.ndarray]:
        """The events' (user rows, item rows); their new ids get rows, and the model
        grows to them at :meth:`ingest_rows`."""
        if isinstance(events, MappedEvents):  # mapped upstream: take the new ids only
            self.user_ids.extend(events.new_users, events.user_base)
            self.item_ids.extend(events.new_items, events.item_base)
            return events.users, events.items
        return self.user_ids.rows(events.users), self.item_ids.rows(events.items)

    def ingest_rows(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> AppendResult:
        """Append (user row, item row, time) events, rows from :meth:`rows`."""
        new = np.arange(self.store.n_users, len(self.user_ids))  # users' first events
        self.store.mark_evaluated(new, evaluated_users(
            self.user_ids.ids(new).tolist(), self.cfg.holdout_fraction))
        ds = self.device_step
        known = None if ds is None else ds.known(self.store, users, items)
        result = self.store.append(users, items, ts)
        self.model.grow(len(self.user_ids), len(self.item_ids))
        if ds is not None:
            assert known is not None
            ds.ingested(self.store, users, result, known)
            return result
        if self.model.recent is not None:
            self.model.recent.add(result.train_users, result.train_items, result.train_ts)
        if len(result.train_users):
            self._fresh.append((result.train_users, result.train_items,
                                np.round(result.train_ts)))  # whole seconds, as stored
            self._pending += len(result.train_users)
        return result

    def forget_user(self, user_id: str) -> int:
        """Delete a user: pairs, row, optimizer state, history, pending positives, id.
        Returns the pairs removed, or -1 when the id is unknown (a no-op)."""
        row = self.user_ids.forget(user_id)
        if row < 0:
            return -1
        self._drop_fresh(lambda u, _: u == row)
        self.model.forget_user(row)
        self.opt_users.reset(row)
        removed = self.store.forget_user(row)
        if self.device_step is not None:
            self.device_step.mirror.rebuild_from(self.store)
        return removed

    def forget_item(self, item_id: str) -> int:
        """Delete an item: pairs, rows (own and context), optimizer state, its place in
        every history, pending positives, id. Returns the pairs removed, or -1 when the
        id is unknown (a no-op)."""
        row = self.item_ids.forget(item_id)
        if row < 0:
            return -1
        self._drop_fresh(lambda _, i: i == row)
        self.model.forget_item(row)
        self.opt_items.reset(row)
        if self.opt_context is not None:
            self.opt_context.reset(row)
        removed = self.store.forget_item(row)
        if self.device_step is not None:  # its pairs, and its mark: never a negative
            self.device_step.mirror.rebuild_from(self.store)
        return removed

    def _drop_fresh(self, match: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Drop the waiting fresh positives ``match(users, items)`` selects: a deleted
        entity is never trained on again."""
        if self.device_step is not None:
            self.device_step.queue.filter(match)
            return
        kept: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()
        for u, i, t in self._fresh:
            keep = ~match(u, i)
            self._pending -= int(len(u) - keep.sum())
            if keep.any():
                kept.append((u[keep], i[keep], t[keep]))
        self._fresh = kept

    def _take_fresh(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        taken = 0
        while self._fresh and taken < n:
            part = self._fresh.popleft()
            if taken + len(part[0]) > n:
                cut = n - taken
                self._fresh.appendleft((part[0][cut:], part[1][cut:], part[2][cut:]))
                part = (part[0][:cut], part[1][:cut], part[2][:cut])
            parts.append(part)
            taken += len(part[0])
        self._pending -= taken
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
        u, i, t = (np.concatenate(column) for column in zip(*parts, strict=True))
        return u, i, t

    def step(self) -> StepStats | None:
        """Train one micro-batch; None when there is nothing to train on."""
        if self.device_step is not None:
            return self._device_step()
        slots = self.cfg.positives_per_step
        replay = self.cfg.replay and len(self.store) > 0 and self.replay_budget > 0
        fresh_u, fresh_i, fresh_t = self._take_fresh(
            int(slots * self.cfg.fresh_share) if replay else slots)
        users, items, ts = fresh_u, fresh_i, fresh_t
        if replay:
            rep_u, rep_i = self.store.sample_positives(self.rng, slots - len(fresh_u))
            users, items = np.concatenate([fresh_u, rep_u]), np.concatenate([fresh_i, rep_i])
            if self.model.recent is not None:  # only the history input needs their times
                ts = np.concatenate([fresh_t, self.store.last_ts(rep_u, rep_i)])
        if len(users) == 0:
            return None
        loss = self.train_pairs(users, items, ts)
        self.fresh_samples += len(fresh_u) * (1 + self.cfg.negatives)
        return StepStats(len(fresh_u), len(users) - len(fresh_u), len(users) *
                         (1 + self.cfg.negatives), loss)

    @property
    def replay_budget(self) -> float:
        """Replay samples left before replay stops until new events earn more (inf: no
        budget). A step may overrun it by one batch."""
        if self.cfg.replay_ratio is None:
            return float("inf")
        replayed = self.samples_trained - self.fresh_samples
        return max(0.0, self.cfg.replay_ratio * self.fresh_samples - replayed)

    def train_pairs(self, pos_users: np.ndarray, pos_items: np.ndarray,
                    pos_ts: np.ndarray | None = None) -> torch.Tensor:
        """One optimization step on positives plus freshly sampled negatives.

        ``pos_ts``: the positives' event times, which the history input needs (each
        positive sees only the history that preceded it)."""
        k = self.cfg.negatives
        history = None
        if self.model.recent is not None:
            if pos_ts is None:
                pos_ts = self.store.last_ts(pos_users, pos_items)
            history = self._history(pos_users, pos_items, pos_ts)
        if self.cfg.loss == "softmax":
            return self._softmax_step(pos_users, pos_items, self.sampler.sample(pos_users, k),
                                      history)
        neg = self.sampler.sample(pos_users, k).ravel()
        ok = neg >= 0  # -1: the user has touched every item
        positive = np.concatenate([np.arange(len(pos_users)),
                                   np.repeat(np.arange(len(pos_users)), k)[ok]])
        items = np.concatenate([pos_items, neg[ok]])
        labels = np.zeros(len(positive), dtype=np.float32)
        labels[: len(pos_users)] = 1.0
        return self.train_batch(pos_users[positive], items, labels, history, positive)

    def _softmax_step(self, pos_users: np.ndarray, pos_items: np.ndarray,
                      neg: np.ndarray, history: _History | None = None) -> torch.Tensor:
        """Sampled softmax: each positive against its own k negatives, every logit
        corrected by -log q (q: the negatives' draw distribution), as TensorFlow's
        sampled_softmax_loss, so the loss estimates a softmax over the catalogue."""
        b, k = neg.shape
        ok = np.concatenate([np.ones((b, 1), dtype=bool), neg >= 0], axis=1)
        items = np.concatenate([pos_items[:, None], neg], axis=1)
        items = np.where(ok, items, pos_items[:, None]).ravel()  # a placeholder, masked
        positive = np.repeat(np.arange(b), 1 + k)
        users = pos_users[positive]
        log_q = np.log(np.maximum(self.sampler.weights(items), 1e-12)).astype(np.float32)
        dev = self.device
        mask = torch.from_numpy(ok).to(dev)
        correction = torch.from_numpy(log_q.reshape(b, 1 + k)).to(dev)
        target = torch.zeros(b, dtype=torch.long, device=dev)

        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            grouped = (logits.view(b, 1 + k) - correction).masked_fill(~mask, float("-inf"))
            return F.cross_entropy(grouped, target, reduction="sum")

        return self._step(users, items, loss_of, int(ok.sum()), history, positive)

    def train_batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                    history: _History | None = None, positive: np.ndarray | None = None,
                    ) -> torch.Tensor:
        """One step on aligned (user row, item row, label) arrays; returns the mean loss.
        With the history input, ``positive[j]`` is the positive whose history sample j
        sees (see :meth:`train_pairs`)."""
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        return self._step(users, items, lambda logits: F.binary_cross_entropy_with_logits(
            logits, y, reduction="sum"), len(users), history, positive)

    def _step(self, users: np.ndarray, items: np.ndarray,
              loss_of: Callable[[torch.Tensor], torch.Tensor], samples: int,
              history: _History | None = None, positive: np.ndarray | None = None,
              ) -> torch.Tensor:
        """One optimization step: ``loss_of`` the (user, item) logits, summed so a row's
        gradient does not shrink as the batch grows; returns the loss per sample."""
        dev = self.device
        uu, u_inv = unique_inverse(users)
        ii, i_inv = unique_inverse(items)
        uu_t, u_inv_t, ii_t, i_inv_t = (
            torch.from_numpy(a).to(dev, non_blocking=True) for a in (uu, u_inv, ii, i_inv))
        loss = self._update(uu_t, u_inv_t, ii_t, i_inv_t, loss_of, history, positive)
        self.samples_trained += samples
        self.steps += 1
        return loss.detach() / samples

    def _update(self, uu_t: torch.Tensor, u_inv_t: torch.Tensor, ii_t: torch.Tensor,
                i_inv_t: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                history: _History | None = None, positive: np.ndarray | None = None,
                ) -> torch.Tensor:
        """The update of :meth:`_step` on device row indices: ``uu_t`` and ``ii_t`` the
        unique rows (distinct, or repeats whose gradient is 0: the device step's
        padding), ``*_inv_t`` each sample's place in them; returns the summed loss."""
        dev = self.device
        # The batch's rows as leaves. Their gradients are summed per unique row with
        # index_add_ below: autograd's own index backward (index_put_ with
        # accumulate) is 13x slower on CPU.
        u_rows = self.model.users.weight.index_select(0, uu_t)
        i_rows = self.model.items.weight.index_select(0, ii_t)
        u_batch = u_rows.index_select(0, u_inv_t).requires_grad_()
        i_batch = i_rows.index_select(0, i_inv_t).requires_grad_()
        if history is not None:
            assert positive is not None
            u_in = u_batch + history.mix(torch.from_numpy(positive).to(dev))
        else:
            u_in = u_batch
        loss = loss_of(self.model.logits_from_rows(u_in, i_batch))
        self.opt_tower.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_tower.step()
        for opt, rows, inv, batch, old in ((self.opt_users, uu_t, u_inv_t, u_batch, u_rows),
                                           (self.opt_items, ii_t, i_inv_t, i_batch, i_rows)):
            assert batch.grad is not None
            grad = torch.zeros_like(old).index_add_(0, inv, batch.grad)
            opt.step(rows, grad, old)
        if history is not None:
            assert self.opt_context is not None and history.leaf.grad is not None
            self.opt_context.step(history.rows, history.leaf.grad, history.old)
        return loss

    # ---- the device-resident step (ncf_stream.device_step) ---------------------------------

    def _device_step(self) -> StepStats | None:
        """:meth:`step` on the device: the same shares of fresh and replay, no sync."""
        ds = self.device_step
        assert ds is not None
        ds.follow(self.store)
        slots = self.cfg.positives_per_step
        replay = self.cfg.replay and ds.mirror.slots > 0 and self.replay_budget > 0
        n_fresh = min(len(ds.queue), int(slots * self.cfg.fresh_share) if replay else slots)
        n_replay = slots - n_fresh if replay else 0
        if n_fresh + n_replay == 0:
            return None
        users, items, ok = ds.positives(n_fresh, n_replay)
        loss = self._device_train(users, items, ok)
        per = 1 + self.cfg.negatives
        self.fresh_samples += n_fresh * per
        return StepStats(n_fresh, n_replay, (n_fresh + n_replay) * per, loss)

    def _device_train(self, users: torch.Tensor, items: torch.Tensor,
                      ok: torch.Tensor) -> torch.Tensor:
        """One update on device positives (``ok`` False: masked) and their negatives;
        masked samples go to the scratch rows with weight 0. Returns the loss per
        sample trained, a device tensor."""
        ds = self.device_step
        assert ds is not None
        dev, k, b = self.device, self.cfg.negatives, len(users)
        su = ds.scratch(self.model.users, [self.opt_users])
        si = ds.scratch(self.model.items, [self.opt_items])
        neg = ds.sampler.sample(users, k)
        # The engine's negatives counter reads the host sampler's: every round draws the batch.
        self.sampler.drawn += b * k * ds.sampler.rounds
        neg_ok = (neg >= 0) & ok[:, None]
        if self.cfg.loss == "softmax":
            group_ok = torch.cat([ok[:, None], neg_ok], dim=1)
            group = torch.cat([items[:, None], neg], dim=1)
            log_q = ds.sampler.log_q(torch.where(group_ok, group, 0))
            all_i = torch.where(group_ok, group, si).ravel()
            all_u = torch.where(ok, users, su)[:, None].expand(b, 1 + k).reshape(-1)
            keep = group_ok.clone()
            keep[:, 0] = True  # a masked positive's logit stays finite: its group weighs 0
            weight = ok.float()
            target = torch.zeros(b, dtype=torch.long, device=dev)

            def loss_of(logits: torch.Tensor) -> torch.Tensor:
                grouped = (logits.view(b, 1 + k) - log_q).masked_fill(~keep, float("-inf"))
                return (F.cross_entropy(grouped, target, reduction="none") * weight).sum()

            valid = group_ok
        else:
            valid_flat = torch.cat([ok, neg_ok.ravel()])
            each = users[:, None].expand(b, k).reshape(-1)  # each negative's user
            all_u = torch.where(valid_flat, torch.cat([users, each]), su)
            all_i = torch.where(valid_flat, torch.cat([items, neg.ravel()]), si)
            labels = torch.zeros(b * (1 + k), device=dev)
            labels[:b] = 1.0
            w = valid_flat.float()

            def loss_of(logits: torch.Tensor) -> torch.Tensor:
                return F.binary_cross_entropy_with_logits(logits, labels, weight=w,
                                                          reduction="sum")

            valid = valid_flat
        uu, u_inv = unique_padded(all_u, su)
        ii, i_inv = unique_padded(all_i, si)
        loss = self._update(uu, u_inv, ii, i_inv, loss_of)
        self.samples_trained += b * (1 + k)
        self.steps += 1
        return loss.detach() / valid.sum().clamp(min=1)

    def negative_shortfall(self) -> tuple[int, int]:
        """(negatives, replay draws) the device step masked so far: a device read, so
        ask now and then, not per step. (0, 0) with the host step, which never masks."""
        ds = self.device_step
        if ds is None:
            return 0, 0
        return int(ds.sampler.shortfall), int(ds.replay_shortfall)

    def _history(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> _History:
        """Each positive's history input: its user's recent items from before it (event
        time <= its own, itself excluded), as one leaf of context rows and one bag per
        positive."""
        model, dev = self.model, self.device
        assert model.context is not None and model.recent is not None
        recent = model.recent.of(users)
        valid = ((recent >= 0) & (model.recent.ts[users] <= ts[:, None])
                 & (recent != items[:, None]))
        weights = model.history_weights(valid)
        rows, bag = unique_inverse(recent[valid])
        rows_t = torch.from_numpy(rows).to(dev)
        old = model.context.weight.index_select(0, rows_t)
        return _History(rows_t, old, old.clone().requires_grad_(),
                        torch.from_numpy(bag).to(dev),
                        torch.from_numpy(bag_offsets(valid)).to(dev),
                        torch.from_numpy(weights[valid]).to(dev))

    def scorer(self, batch_pairs: int = 1 << 20):
        """A scorer for :mod:`ncf_stream.evaluate`: logits of (users, items) rows."""
        model = self.model

        def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
            n, m = items.shape
            flat_u = np.repeat(users, m)
            flat_i = np.ascontiguousarray(items).ravel()
            out = np.empty(n * m, dtype=np.float32)
            with torch.no_grad():
                for lo in range(0, n * m, batch_pairs):
                    u = torch.from_numpy(flat_u[lo: lo + batch_pairs]).to(model.device)
                    i = torch.from_numpy(flat_i[lo: lo + batch_pairs]).to(model.device)
                    out[lo: lo + batch_pairs] = model(u, i).float().cpu().numpy()
            return out.reshape(n, m)

        return score


@dataclass
class _History:
    """One step's history input (Trainer._history)."""

    rows: torch.Tensor  # unique context rows the step touches
    old: torch.Tensor  # their values before the step
    leaf: torch.Tensor  # the same values, requiring grad
    bag: torch.Tensor  # leaf index of each history entry, positives end to end
    offsets: torch.Tensor  # (positives,) where each positive's entries start
    weights: torch.Tensor  # each entry's weight (a positive's sum to 1, or it has none)

    def mix(self, positive: torch.Tensor) -> torch.Tensor:
        """(samples, row_dim): the history of each sample's positive."""
        per_positive = F.embedding_bag(self.bag, self.leaf, self.offsets, mode="sum",
                                       per_sample_weights=self.weights)
        return per_positive.index_select(0, positive)


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, 5x faster: one unstable argsort."""
    if len(values) == 0:
        return values, np.empty(0, dtype=np.int64)
    order = np.argsort(values)
    sorted_values = values[order]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return sorted_values[first], inverse
