"""NeuMF (He et al. 2017): GMF and an MLP tower over their own embeddings, joined in one output.

    score(u, i) = h . [ p_u^G * q_i^G ,  MLP([p_u^M ; q_i^M]) ] + b

The embedding tables are plain tensors that grow by doubling as new users and
items appear (no hashing, no collisions; existing rows stay bit-identical),
and are updated by :class:`ncf_stream.optim.RowAdagrad` on the touched rows
only. Each side keeps its GMF and MLP embeddings side by side in one table
(``[gmf | mlp]`` columns), so a step gathers and updates one table per side.
The dense part (MLP tower and output layer) is an ordinary ``nn.Module``.

With ``history_length`` > 0 a user's row is joined by the decayed mean of the
context rows (a third table) of their recent items: :mod:`ncf_stream.history`,
:meth:`NeuMF.user_rows`. Everything that scores a user goes through that method.

Retrieval: :meth:`NeuMF.retrieval_items` and :meth:`NeuMF.retrieval_queries`
give vectors whose inner product approximates the whole logit (the GMF half
exactly, since h_G . (p * q) = (h_G * p) . q; the MLP half to first order), so
a maximum-inner-product index finds candidates, which the full network then
rescores (:mod:`ncf_stream.recommend`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncf_stream.errors import ConfigError
from ncf_stream.history import RecentItems, bag_offsets
from ncf_stream.settings import Settings, check_config, config_values, setting


@dataclass(frozen=True)
class NeuMFConfig:
    """``factors``, ``mlp_layers`` and ``dropout``: defaults, bounds and the measurements
    behind them are the settings of the same names (ncf_stream.settings)."""

    factors: int = setting("factors")
    mlp_layers: tuple[int, ...] = setting("mlp_layers")
    dropout: float = setting("dropout")
    history_length: int = setting("history_length")
    history_decay: float = setting("history_decay")
    # Gaussian init as the paper (sigma 0.01): small enough that early scores sit
    # near 0.5 and new rows start neutral.
    init_std: float = 0.01
    # Rows allocated up front; tables double when a new row does not fit.
    initial_capacity: int = 1024

    def __post_init__(self) -> None:
        check_config(self)
        if not self.init_std > 0 or self.initial_capacity < 1:
            raise ConfigError("NeuMFConfig: init_std must be > 0 and initial_capacity >= 1")

    @classmethod
    def from_settings(cls, s: Settings) -> NeuMFConfig:
        return cls(**config_values(cls, s))

    @property
    def mlp_dim(self) -> int:
        return self.mlp_layers[0] // 2

    @property
    def row_dim(self) -> int:
        return self.factors + self.mlp_dim


class Tower(nn.Module):
    """The dense part: MLP layers and the joint output layer.

    The paper's first MLP layer acts on [p ; q] and the output on [gmf ; mlp];
    both are written as sums of two halves, W [p ; q] = W_u p + W_i q and
    h . [g ; m] = h_G . g + h_M . m: the same function without the two
    concatenations (and their backward copies), and it exposes h_G for retrieval.
    """

    def __init__(self, cfg: NeuMFConfig) -> None:
        super().__init__()
        widths = cfg.mlp_layers
        hidden = widths[1] if len(widths) > 1 else widths[0]
        self.first_user = nn.Linear(cfg.mlp_dim, hidden)
        self.first_item = nn.Linear(cfg.mlp_dim, hidden, bias=False)
        layers: list[nn.Module] = [nn.ReLU()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        for d_in, d_out in itertools.pairwise(widths[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
        self.mlp = nn.Sequential(*layers)
        self.out_gmf = nn.Linear(cfg.factors, 1, bias=False)
        self.out_mlp = nn.Linear(widths[-1] if len(widths) > 1 else hidden, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, gmf: torch.Tensor, user_mlp: torch.Tensor,
                item_mlp: torch.Tensor) -> torch.Tensor:
        # gmf: (B, factors); user_mlp, item_mlp: (B, mlp_dim) -> logits (B,)
        hidden = self.mlp(self.first_user(user_mlp) + self.first_item(item_mlp))
        return (self.out_gmf(gmf) + self.out_mlp(hidden)).squeeze(1)


@dataclass
class Table:
    """A growable embedding table: rows [0, rows) are live, the rest is headroom."""

    weight: torch.Tensor  # (capacity, row_dim)
    rows: int = 0
    on_grow: list = field(default_factory=list)  # callbacks(new_capacity): optimizer state

    def ensure_capacity(self, rows: int) -> None:
        """Room for ``rows`` rows (capacity doubles); live rows and their values unchanged."""
        if rows > len(self.weight):
            capacity = len(self.weight)
            while capacity < rows:
                capacity *= 2
            grown = torch.empty((capacity, self.weight.shape[1]), dtype=self.weight.dtype,
                                device=self.weight.device)
            grown[: len(self.weight)] = self.weight
            self.weight = grown
            for callback in self.on_grow:
                callback(capacity)

    def ensure(self, rows: int, init_std: float, generator: torch.Generator) -> None:
        """Make rows [0, rows) live; new ones get Gaussian init."""
        self.ensure_capacity(rows)
        if rows > self.rows:
            new = self.weight[self.rows: rows]
            # non_blocking: a blocking copy to CUDA waits for every queued step (an
            # ingest of new rows would sync); from pageable memory it is staged at once.
            new.copy_(torch.randn(new.shape, generator=generator, dtype=new.dtype) * init_std,
                      non_blocking=True)
            self.rows = rows


class NeuMF(nn.Module):
    def __init__(self, cfg: NeuMFConfig | None = None, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or NeuMFConfig()
        self.device = torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.tower = Tower(cfg).to(self.device)
        cap = cfg.initial_capacity
        self.users = Table(torch.zeros((cap, cfg.row_dim), device=self.device))
        self.items = Table(torch.zeros((cap, cfg.row_dim), device=self.device))
        self.item_hidden: torch.Tensor | None = None  # frozen copies only (frozen_copy)
        # The mean user row, frozen copies only: where an anonymous row may start.
        self.mean_user: torch.Tensor | None = None
        # The history input (ncf_stream.history): a user's row plus the decayed mean of
        # the context rows of their recent items. None: the paper's model.
        self.context: Table | None = None
        self.recent: RecentItems | None = None
        if cfg.history_length:
            self.context = Table(torch.zeros((cap, cfg.row_dim), device=self.device))
            self.recent = RecentItems(cfg.history_length, cap)
        self._decay = cfg.history_decay ** np.arange(cfg.history_length, dtype=np.float32)

    def grow(self, n_users: int, n_items: int) -> None:
        """Make rows [0, n_users) and [0, n_items) exist; new rows get fresh init."""
        self.users.ensure(n_users, self.cfg.init_std, self._gen)
        self.items.ensure(n_items, self.cfg.init_std, self._gen)
        if self.context is not None and self.recent is not None:
            self.context.ensure(n_items, self.cfg.init_std, self._gen)
            self.recent.ensure(n_users)

    @torch.no_grad()
    def forget_user(self, user: int) -> None:
        """Zero a deleted user's row and history: a tombstone (ncf_stream.ids), which
        nothing trains or serves again, so zeros are what is left of it."""
        if 0 <= user < self.users.rows:
            self.users.weight[user] = 0
        if self.recent is not None:
            self.recent.forget_user(user)

    @torch.no_grad()
    def forget_item(self, item: int) -> None:
        """Zero a deleted item's rows (its own and its context row) and take it out of
        every user's history."""
        if 0 <= item < self.items.rows:
            self.items.weight[item] = 0
        if self.context is not None and 0 <= item < self.context.rows:
            self.context.weight[item] = 0
        if self.recent is not None:
            self.recent.forget_item(item)

    def history_weights(self, valid: np.ndarray) -> np.ndarray:
        """Weights (n, L) of each row's valid history entries (newest first): decay^rank,
        counting valid entries only, summing to 1 per row; 0 for a row without any."""
        rank = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
        w = np.where(valid, self._decay[rank], np.float32(0))
        total = w.sum(1, keepdims=True)
        return np.divide(w, total, out=np.zeros_like(w), where=total > 0)

    def user_rows(self, users: torch.Tensor) -> torch.Tensor:
        """Users' effective rows: the user row plus, with the history input, the
        weighted mean of their recent items' context rows. (B,) -> (B, row_dim)."""
        rows = self.users.weight[users]
        if self.context is None or self.recent is None or len(users) == 0:
            return rows
        return rows + self.history_rows(self.recent.of(users.cpu().numpy()))

    def history_rows(self, recent: np.ndarray) -> torch.Tensor:
        """The history input of each row of ``recent`` (n, L) item rows, newest first,
        -1 padding: the decayed mean of their context rows. (n, row_dim); zeros for a
        row without items. Needs the history input (``context``)."""
        if self.context is None:
            raise ConfigError("the model has no history input (history_length is 0)")
        valid = recent >= 0
        w = self.history_weights(valid)
        return F.embedding_bag(
            torch.from_numpy(recent[valid]).to(self.device), self.context.weight,
            torch.from_numpy(bag_offsets(valid)).to(self.device), mode="sum",
            per_sample_weights=torch.from_numpy(w[valid]).to(self.device))

    @torch.no_grad()
    def frozen_copy(self, item_hidden: bool = True) -> NeuMF:
        """An independent copy for readers: live rows only, eval mode, no grad.

        ``item_hidden``: cache each item's first-layer half (see below); worth its
        cost per snapshot only where whole catalogues are scored per query."""
        copy = NeuMF.__new__(NeuMF)
        nn.Module.__init__(copy)
        copy.cfg, copy.device, copy._gen = self.cfg, self.device, self._gen
        copy.tower = Tower(self.cfg).to(self.device)
        copy.tower.load_state_dict(self.tower.state_dict())
        copy.tower.eval().requires_grad_(False)
        copy.users = Table(self.users.weight[: self.users.rows].clone(), self.users.rows)
        copy.items = Table(self.items.weight[: self.items.rows].clone(), self.items.rows)
        # Each item's half of the first MLP layer, computed once per snapshot: a query
        # then costs the layers after the first per item (user_logits), which makes
        # scoring the whole catalogue as cheap as a flat index search.
        copy.item_hidden = copy.tower.first_item(
            copy.items.weight[: copy.n_items, self.cfg.factors:]) if item_hidden else None
        copy.mean_user = (copy.users.weight.mean(0) if copy.n_users
                          else torch.zeros(self.cfg.row_dim, device=self.device))
        copy.context, copy.recent, copy._decay = None, None, self._decay
        if self.context is not None and self.recent is not None:
            copy.context = Table(self.context.weight[: self.context.rows].clone(),
                                 self.context.rows)
            copy.recent = self.recent.copy()
        return copy

    @property
    def n_users(self) -> int:
        return self.users.rows

    @property
    def n_items(self) -> int:
        return self.items.rows

    def logits_from_rows(self, u_rows: torch.Tensor, i_rows: torch.Tensor) -> torch.Tensor:
        """Logits from gathered table rows: u_rows, i_rows (B, row_dim) -> (B,)."""
        # split, not slicing: a slice's backward zero-fills the whole input per slice.
        u_gmf, u_mlp = torch.split(u_rows, [self.cfg.factors, self.cfg.mlp_dim], dim=1)
        i_gmf, i_mlp = torch.split(i_rows, [self.cfg.factors, self.cfg.mlp_dim], dim=1)
        return self.tower(u_gmf * i_gmf, u_mlp, i_mlp)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            return self.logits_from_rows(self.users.weight[users], self.items.weight[items])
        unique, inverse = torch.unique(users, return_inverse=True)  # one history per user
        return self.logits_from_rows(self.user_rows(unique)[inverse], self.items.weight[items])

    @torch.no_grad()
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Probabilities for aligned (user, item) pairs; (B,) -> (B,)."""
        return torch.sigmoid(self(users.to(self.device), items.to(self.device)))

    @torch.no_grad()
    def user_logits(self, user: int, items: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of one user against item rows (default: the catalogue), (n,).

        The user's halves are computed once; the items' first-layer halves come from
        the snapshot's cache when there is one. Equal to ``forward`` up to float rounding.
        """
        return self.row_logits(self.user_rows(torch.tensor([user], device=self.device))[0],
                               items)

    def row_logits(self, u: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`user_logits` for an effective row ``u`` (row_dim,) rather than a user:
        one that is not in the table (an anonymous request's, ncf_stream.anonymous).
        Differentiable in ``u``; the caller decides on ``no_grad``."""
        return self.logits_from_parts(u, *self.item_parts(items))

    def item_parts(self, items: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a row's logits need of item rows (default: the catalogue): their GMF
        factors (n, factors; a view for the catalogue), and their first-layer halves
        (n, hidden), from the snapshot's cache when there is one. Fixed for a frozen
        model, so a caller scoring many rows against the same items computes them once."""
        f, tower = self.cfg.factors, self.tower
        hidden = self.item_hidden
        if items is None:
            rows = self.items.weight[: self.n_items]
            c = hidden if hidden is not None else tower.first_item(rows[:, f:])
        else:
            items = items.to(self.device)
            rows = self.items.weight[items]
            c = hidden[items] if hidden is not None else tower.first_item(rows[:, f:])
        return rows[:, :f], c

    def logits_from_parts(self, u: torch.Tensor, gmf: torch.Tensor,
                          c: torch.Tensor) -> torch.Tensor:
        """Logits (n,) of an effective row ``u`` (row_dim,) against :meth:`item_parts`."""
        f, tower = self.cfg.factors, self.tower
        a = tower.first_user(u[f:])
        return tower.out_mlp(tower.mlp(c + a)).squeeze(-1) + gmf @ (u[:f] *
                                                                   tower.out_gmf.weight[0])

    @torch.no_grad()
    def row_bce_grad(self, u: torch.Tensor, gmf: torch.Tensor, c: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """Gradient in ``u`` (row_dim,) of the summed binary cross-entropy of
        :meth:`logits_from_parts` against 0/1 ``labels``: backpropagation written out
        for the tower's Linear and ReLU layers, so a step is a handful of kernels. For
        the few dozen rows of a session autograd's bookkeeping costs 2-3x the
        arithmetic, and a fit takes several steps per request (ncf_stream.anonymous).
        Equal to autograd's gradient (tests/test_anonymous.py). Eval mode only:
        dropout is then the identity."""
        f, tower = self.cfg.factors, self.tower
        if tower.training:
            raise RuntimeError("row_bce_grad needs the tower in eval mode")
        x = c + tower.first_user(u[f:])  # (n, H)
        backward: list[torch.Tensor | nn.Linear] = []  # per layer: its weight, or a mask
        for layer in tower.mlp:
            if isinstance(layer, nn.Linear):
                x = layer(x)
                backward.append(layer)
            elif isinstance(layer, nn.ReLU):
                mask = x > 0
                x = x * mask
                backward.append(mask)
            elif not isinstance(layer, nn.Dropout):
                raise TypeError(f"row_bce_grad cannot differentiate {layer}")
        h_gmf = tower.out_gmf.weight[0]
        logits = tower.out_mlp(x).squeeze(-1) + gmf @ (u[:f] * h_gmf)
        r = torch.sigmoid(logits) - labels  # dL/dlogit, (n,)
        g = torch.outer(r, tower.out_mlp.weight[0])  # (n, last)
        for step in reversed(backward):
            g = g @ step.weight if isinstance(step, nn.Linear) else g * step
        return torch.cat([(r @ gmf) * h_gmf, g.sum(0) @ tower.first_user.weight])

    @torch.no_grad()
    def score_matrix(self, users: torch.Tensor, items: torch.Tensor | None = None,
                     max_elements: int = 1 << 20) -> torch.Tensor:
        """Logits of every user against every item (default: the catalogue): (U, I).

        Uses the decomposition of the first MLP layer, W_u p + W_i q: the user and
        item halves are computed once each, and the GMF half is one matrix product,
        so a pair costs the layers after the first only. Equal to ``forward`` up to
        float rounding.
        """
        f = self.cfg.factors
        users = users.to(self.device)
        item_rows = self.items.weight[: self.n_items] if items is None else (
            self.items.weight[items.to(self.device)])
        u_rows = self.user_rows(users)
        tower = self.tower
        gmf = (u_rows[:, :f] * tower.out_gmf.weight[0]) @ item_rows[:, :f].T  # (U, I)
        a = tower.first_user(u_rows[:, f:])  # (U, H)
        c = (self.item_hidden if items is None and self.item_hidden is not None
             else tower.first_item(item_rows[:, f:]))  # (I, H)
        out = torch.empty(len(users), len(item_rows), device=self.device)
        step = max(1, max_elements // max(1, len(item_rows) * a.shape[1]))
        for lo in range(0, len(users), step):
            hidden = tower.mlp(a[lo: lo + step, None, :] + c[None, :, :])  # (u, I, last)
            out[lo: lo + step] = tower.out_mlp(hidden).squeeze(-1)
        return out + gmf

    def retrieval_items(self, chunk: int = 262_144) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vectors for maximum-inner-product retrieval, and the user reference a_ref.

        The logit is GMF(u, i) + f(a_u + c_i) + b, with a_u and c_i the user and item
        halves of the first MLP layer and f the rest of the tower. GMF is an exact
        inner product; f is expanded to first order around the mean user a_ref:
            f(a_u + c_i) ~ f(a_ref + c_i) + grad f(a_ref + c_i) . (a_u - a_ref).
        So with item vector [q_i^G, grad_i, f(a_ref + c_i)] and user query
        [h_G * p_u^G, a_u - a_ref, 1] (:meth:`retrieval_queries`) the inner product
        approximates the whole logit: GMF exactly, the MLP to first order.
        """
        f, tower = self.cfg.factors, self.tower
        with torch.no_grad():
            # The mean user, from at most 65,536 of them (evenly spaced rows): with the
            # history input an effective row costs a gather over the user's history.
            sample = torch.arange(0, self.n_users, max(1, self.n_users // 65_536),
                                  device=self.device)
            a_ref = tower.first_user(self.user_rows(sample)[:, f:]).mean(0)
            c = tower.first_item(self.items.weight[: self.n_items, f:])
        parts = []
        for lo in range(0, self.n_items, chunk):
            x = (a_ref + c[lo: lo + chunk]).requires_grad_()
            out = tower.out_mlp(tower.mlp(x)).squeeze(-1)
            (grad,) = torch.autograd.grad(out.sum(), x)  # rows are independent
            parts.append(torch.cat([self.items.weight[lo: lo + len(x), :f], grad,
                                    out.detach()[:, None]], dim=1))
        return torch.cat(parts), a_ref

    def retrieval_queries(self, users: torch.Tensor, a_ref: torch.Tensor) -> torch.Tensor:
        """(B, factors + hidden + 1) queries matching :meth:`retrieval_items`."""
        with torch.no_grad():
            return self.row_queries(self.user_rows(users), a_ref)

    @torch.no_grad()
    def row_queries(self, rows: torch.Tensor, a_ref: torch.Tensor) -> torch.Tensor:
        """:meth:`retrieval_queries` for effective rows (B, row_dim) rather than users."""
        f = self.cfg.factors
        a = self.tower.first_user(rows[:, f:]) - a_ref
        ones = torch.ones(len(rows), 1, device=rows.device)
        return torch.cat([rows[:, :f] * self.tower.out_gmf.weight[0], a, ones], dim=1)
