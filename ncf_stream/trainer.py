"""The online trainer: events in, micro-batches of positives and sampled negatives out.

``ingest`` maps external ids to rows (growing the model), or takes rows
mapped upstream (:class:`~ncf_stream.ids.MappedEvents`), appends to the
store, and queues the positives the store releases to training (the newest
interaction of each user is held out). ``step`` trains one micro-batch:
fresh positives first, up to ``fresh_share`` of the positive slots, the rest
**replayed** from the store, so the model keeps learning between bursts and
does not forget; with no fresh events a step is all replay. Each positive gets
``negatives`` sampled items the user never touched. Loss: binary
cross-entropy, as in the paper.

On CUDA the tables, optimizer state and tower live on the device; a step moves
only the batch's row indices and labels there, and reads nothing back (the
loss stays a device tensor until someone asks for it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ncf_stream.events import Events
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
    min_history: int = setting("min_history")
    holdout_fraction: float = setting("holdout_fraction")
    seed: int = setting("seed")
    model: NeuMFConfig = field(default_factory=NeuMFConfig)

    def __post_init__(self) -> None:
        check_config(self)

    @classmethod
    def from_settings(cls, s: Settings) -> TrainerConfig:
        return cls(**config_values(cls, s), model=NeuMFConfig.from_settings(s))

    @property
    def positives_per_step(self) -> int:
        return max(1, self.batch_size // (1 + self.negatives))


@dataclass
class StepStats:
    fresh: int
    replayed: int
    samples: int
    loss: torch.Tensor  # mean BCE on the step, a device tensor: .item() syncs


class Trainer:
    def __init__(self, cfg: TrainerConfig | None = None, device: str | torch.device = "cpu",
                 store: InteractionStore | None = None) -> None:
        self.cfg = cfg = cfg or TrainerConfig()
        self.device = torch.device(device)
        self.user_ids, self.item_ids = IdMap(), IdMap()
        self.store = store or InteractionStore(min_history=cfg.min_history)
        self.sampler = NegativeSampler(
            self.store, SamplerConfig(k=cfg.negatives, alpha=cfg.alpha, seed=cfg.seed))
        self.model = NeuMF(cfg.model, self.device, seed=cfg.seed)
        rows_opt = RowAdagrad if cfg.optimizer == "adagrad" else RowAdam
        self.opt_users = rows_opt(self.model.users, cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_items = rows_opt(self.model.items, cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_tower = torch.optim.Adam(self.model.tower.parameters(), lr=cfg.tower_lr,
                                          fused=True)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self._fresh: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._pending = 0
        self.samples_trained = 0
        self.steps = 0

    @property
    def pending(self) -> int:
        """Fresh positives waiting to be trained."""
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
        result = self.store.append(users, items, ts)
        self.model.grow(len(self.user_ids), len(self.item_ids))
        if len(result.train_users):
            self._fresh.append((result.train_users, result.train_items))
            self._pending += len(result.train_users)
        return result

    def _take_fresh(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        users, items, taken = [], [], 0
        while self._fresh and taken < n:
            u, i = self._fresh.popleft()
            if taken + len(u) > n:
                cut = n - taken
                self._fresh.appendleft((u[cut:], i[cut:]))
                u, i = u[:cut], i[:cut]
            users.append(u)
            items.append(i)
            taken += len(u)
        self._pending -= taken
        if not users:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(users), np.concatenate(items)

    def step(self) -> StepStats | None:
        """Train one micro-batch; None when there is nothing to train on."""
        slots = self.cfg.positives_per_step
        replay = self.cfg.replay and len(self.store) > 0
        fresh_u, fresh_i = self._take_fresh(int(slots * self.cfg.fresh_share) if replay else slots)
        if replay:
            rep_u, rep_i = self.store.sample_positives(self.rng, slots - len(fresh_u))
            users, items = np.concatenate([fresh_u, rep_u]), np.concatenate([fresh_i, rep_i])
        else:
            users, items = fresh_u, fresh_i
        if len(users) == 0:
            return None
        loss = self.train_pairs(users, items)
        return StepStats(len(fresh_u), len(users) - len(fresh_u), len(users) *
                         (1 + self.cfg.negatives), loss)

    def train_pairs(self, pos_users: np.ndarray, pos_items: np.ndarray) -> torch.Tensor:
        """One optimization step on positives plus freshly sampled negatives."""
        k = self.cfg.negatives
        if self.cfg.loss == "softmax":
            return self._softmax_step(pos_users, pos_items, self.sampler.sample(pos_users, k))
        neg = self.sampler.sample(pos_users, k).ravel()
        neg_users = np.repeat(pos_users, k)
        ok = neg >= 0  # -1: the user has touched every item
        users = np.concatenate([pos_users, neg_users[ok]])
        items = np.concatenate([pos_items, neg[ok]])
        labels = np.zeros(len(users), dtype=np.float32)
        labels[: len(pos_users)] = 1.0
        return self.train_batch(users, items, labels)

    def _softmax_step(self, pos_users: np.ndarray, pos_items: np.ndarray,
                      neg: np.ndarray) -> torch.Tensor:
        """Sampled softmax: each positive against its own k negatives, every logit
        corrected by -log q (q: the negatives' draw distribution), as TensorFlow's
        sampled_softmax_loss, so the loss estimates a softmax over the catalogue."""
        b, k = neg.shape
        ok = np.concatenate([np.ones((b, 1), dtype=bool), neg >= 0], axis=1)
        items = np.concatenate([pos_items[:, None], neg], axis=1)
        items = np.where(ok, items, pos_items[:, None]).ravel()  # a placeholder, masked
        users = np.repeat(pos_users, 1 + k)
        log_q = np.log(np.maximum(self.sampler.weights(items), 1e-12)).astype(np.float32)
        dev = self.device
        mask = torch.from_numpy(ok).to(dev)
        correction = torch.from_numpy(log_q.reshape(b, 1 + k)).to(dev)
        target = torch.zeros(b, dtype=torch.long, device=dev)

        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            grouped = (logits.view(b, 1 + k) - correction).masked_fill(~mask, float("-inf"))
            return F.cross_entropy(grouped, target, reduction="sum")

        return self._step(users, items, loss_of, int(ok.sum()))

    def train_batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """One step on aligned (user row, item row, label) arrays; returns the mean loss."""
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        return self._step(users, items, lambda logits: F.binary_cross_entropy_with_logits(
            logits, y, reduction="sum"), len(users))

    def _step(self, users: np.ndarray, items: np.ndarray,
              loss_of: Callable[[torch.Tensor], torch.Tensor], samples: int) -> torch.Tensor:
        """One optimization step: ``loss_of`` the (user, item) logits, summed so a row's
        gradient does not shrink as the batch grows; returns the loss per sample."""
        dev = self.device
        uu, u_inv = unique_inverse(users)
        ii, i_inv = unique_inverse(items)
        uu_t, u_inv_t, ii_t, i_inv_t = (
            torch.from_numpy(a).to(dev, non_blocking=True) for a in (uu, u_inv, ii, i_inv))
        # The batch's rows as leaves. Their gradients are summed per unique row with
        # index_add_ below: autograd's own index backward (index_put_ with
        # accumulate) is 13x slower on CPU.
        u_rows = self.model.users.weight.index_select(0, uu_t)
        i_rows = self.model.items.weight.index_select(0, ii_t)
        u_batch = u_rows.index_select(0, u_inv_t).requires_grad_()
        i_batch = i_rows.index_select(0, i_inv_t).requires_grad_()
        loss = loss_of(self.model.logits_from_rows(u_batch, i_batch))
        self.opt_tower.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_tower.step()
        for opt, rows, inv, batch, old in ((self.opt_users, uu_t, u_inv_t, u_batch, u_rows),
                                           (self.opt_items, ii_t, i_inv_t, i_batch, i_rows)):
            assert batch.grad is not None
            grad = torch.zeros_like(old).index_add_(0, inv, batch.grad)
            opt.step(rows, grad, old)
        self.samples_trained += samples
        self.steps += 1
        return loss.detach() / samples

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


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, 5x faster: one unstable argsort."""
    order = np.argsort(values)
    sorted_values = values[order]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return sorted_values[first], inverse
