"""Anonymous and session requests: a temporary user row fitted to a list of items.

``POST /v1/recommend`` (and gRPC ``Recommend``) may carry ``items`` instead of a
user: someone not signed in, or a session's clicks. The answer is ranked for a
row fitted to those items on the spot, as the trainer would fit a new user's
row, and then thrown away:

* a fresh row (zeros, or the snapshot's mean user row: ``anonymous_init``);
* ``anonymous_steps`` Adagrad steps (the trainer's optimizer for rows) of binary
  cross-entropy, the given items as positives and ``anonymous_negatives`` per
  item drawn from the rest of the catalogue as the trainer draws them (by
  interaction count ^ ``negative_alpha``; uniform at 0), all in one batch (the
  gradient written out: :meth:`ncf_stream.model.NeuMF.row_bce_grad`);
* against the frozen snapshot: its item rows, context rows and tower take no
  gradient (they are frozen copies: ``NeuMF.frozen_copy``), and nothing is
  written anywhere but the request's own tensors. So requests need no lock,
  never see each other, and never change what a known user gets.

The negatives are drawn from a generator seeded by the items, so the same items
get the same answer from the same snapshot. They follow the trainer's draw
because the snapshot's rows and tower were fitted against it: on ml-latest-small's
validation split at the quality profile (``negative_alpha`` 0.5), uniform
negatives made every fit worse than no fit at all (full HR@10 0.093 without
steps, 0.067 after 5 at lr 0.1, 0.049 at 0.3): a row pushed away from mostly
unpopular items learns popularity.

With the history input (``history_length`` > 0) the row is joined, as a known
user's is, by the decayed mean of the context rows of the most recent given
items (:meth:`ncf_stream.model.NeuMF.history_rows`). The given order is **oldest
first**: a session's clicks as they happened, the last one the newest; an item
given twice counts at its latest place. The fit sees that history term as a
constant, so the row learns what the history does not already say.

Ranking then goes exactly as for a user (:mod:`ncf_stream.recommend`): retrieval
queries from the fitted row, candidates rescored by the full network, or the
exact ranking for small catalogues.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ncf_stream.model import NeuMF
from ncf_stream.settings import Settings, check_config, config_values, setting

# Adagrad's epsilon, as RowAdagrad's.
_EPS = 1e-8


@dataclass(frozen=True)
class AnonymousConfig:
    """Defaults, bounds and the reasons for them: the settings ``anonymous_*``."""

    steps: int = setting("anonymous_steps")
    lr: float = setting("anonymous_lr")
    negatives: int = setting("anonymous_negatives")
    init: str = setting("anonymous_init")
    alpha: float = setting("negative_alpha")  # the trainer's draw: see the module docstring

    def __post_init__(self) -> None:
        check_config(self)

    @classmethod
    def from_settings(cls, s: Settings) -> AnonymousConfig:
        return cls(**config_values(cls, s))


@dataclass(frozen=True)
class AnonymousUser:
    """A fitted row standing in for a user, and the items it was fitted to."""

    row: torch.Tensor  # (row_dim,) the effective row: fitted row plus the history input
    items: np.ndarray  # sorted distinct item rows given: what ``exclude="seen"`` leaves out


def request_seed(rows: np.ndarray) -> int:
    """The negatives' seed: a function of the given item rows (in order) alone."""
    return zlib.crc32(np.ascontiguousarray(rows, dtype=np.int64).tobytes())


def negative_cdf(item_counts: np.ndarray, n_items: int, alpha: float) -> np.ndarray | None:
    """The cumulative draw weights count^alpha of items [0, n_items) (an item newer than
    the counts weighs 0); None for a uniform draw (alpha 0, or no counts)."""
    if alpha == 0:
        return None
    w = np.zeros(n_items)
    m = min(n_items, len(item_counts))
    w[:m] = item_counts[:m].astype(np.float64) ** alpha
    cdf = np.cumsum(w)
    return cdf if n_items and cdf[-1] > 0 else None


def draw_negatives(n_items: int, given: np.ndarray, n: int, rng: np.random.Generator,
                   cdf: np.ndarray | None = None) -> np.ndarray:
    """``n`` item rows drawn (with replacement) from [0, n_items) less the sorted rows
    ``given``: uniformly, or by the weights whose cumulative sum is ``cdf``
    (:func:`negative_cdf`). Fewer (none) only when nothing else can be drawn."""
    if cdf is not None:
        weights = cdf[given] - np.where(given > 0, cdf[np.maximum(given - 1, 0)], 0.0)
        free_mass = cdf[-1] - weights.sum()
        if free_mass <= 1e-9 * cdf[-1]:
            cdf = None  # the given items hold all the weight: uniform over the rest
        elif free_mass < cdf[-1] / 2:  # rejection would need many rounds
            rest = np.setdiff1d(np.arange(n_items), given, assume_unique=True)
            p = np.diff(cdf, prepend=0.0)[rest]
            return rng.choice(rest, n, p=p / p.sum())
    free = n_items - len(given)
    if free <= 0 or n <= 0:
        return np.empty(0, dtype=np.int64)
    if cdf is None and free < n_items // 2:  # rejection would need many rounds
        return rng.choice(np.setdiff1d(np.arange(n_items), given, assume_unique=True), n)
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:  # at least half of every draw is kept: two rounds, usually
        want = 2 * (n - len(out))
        draw = (rng.integers(0, n_items, want) if cdf is None else
                np.searchsorted(cdf, rng.random(want) * cdf[-1], side="right"))
        out = np.concatenate([out, draw[~np.isin(draw, given)]])
    return out[:n]


def history_recent(rows: np.ndarray, length: int) -> np.ndarray:
    """Given item rows, oldest first, as the model's history holds them: newest first,
    a repeated item at its latest place only, at most ``length``, -1 padding. (1, length)."""
    newest_first = rows[::-1]
    _, first = np.unique(newest_first, return_index=True)
    recent = newest_first[np.sort(first)][:length]
    out = np.full((1, length), -1, dtype=np.int64)
    out[0, : len(recent)] = recent
    return out


def start_row(model: NeuMF, init: str) -> torch.Tensor:
    """The row the fit starts from: zeros, or the snapshot's mean user row."""
    if init == "mean" and model.mean_user is not None:
        return model.mean_user.detach().clone()
    return torch.zeros(model.cfg.row_dim, device=model.device)


def fit_row(model: NeuMF, rows: np.ndarray, cfg: AnonymousConfig,
            cdf: np.ndarray | None = None) -> AnonymousUser:
    """A row fitted to the known item ``rows`` (oldest first; not empty) on a frozen
    model, negatives drawn by ``cdf`` (:func:`negative_cdf`; None: uniform): see the
    module docstring. Touches nothing but its own tensors."""
    given = np.unique(rows)
    rng = np.random.default_rng(request_seed(rows))
    neg = draw_negatives(model.n_items, given, cfg.negatives * len(given), rng, cdf)
    items = torch.from_numpy(np.concatenate([given, neg])).to(model.device)
    labels = torch.zeros(len(items), device=model.device)
    labels[: len(given)] = 1.0
    history = (model.history_rows(history_recent(rows, model.cfg.history_length))[0]
               if model.context is not None
               else torch.zeros(model.cfg.row_dim, device=model.device))
    row = start_row(model, cfg.init)
    acc = torch.zeros_like(row)
    with torch.no_grad():
        gmf, c = model.item_parts(items)  # the items' side is fixed: gathered once
        for _ in range(cfg.steps):
            grad = model.row_bce_grad(row + history, gmf, c, labels)
            acc.addcmul_(grad, grad)
            row = row - cfg.lr * grad / (acc.sqrt() + _EPS)
    return AnonymousUser(row + history, given)


def bce(model: NeuMF, user: AnonymousUser, items: np.ndarray, labels: np.ndarray) -> float:
    """Mean BCE of ``user``'s row on item rows with 0/1 labels (tests, benchmarks)."""
    with torch.no_grad():
        logits = model.row_logits(user.row, torch.from_numpy(items).to(model.device))
        y = torch.from_numpy(labels.astype(np.float32)).to(model.device)
        return float(F.binary_cross_entropy_with_logits(logits, y))
