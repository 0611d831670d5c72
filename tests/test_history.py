"""The history input: each user's recent trained items, and what each positive sees of them."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ncf_stream.events import Events
from ncf_stream.history import RecentItems
from ncf_stream.model import NeuMFConfig
from ncf_stream.trainer import Trainer, TrainerConfig

HIST = NeuMFConfig(factors=4, mlp_layers=(6, 4, 2), initial_capacity=2, history_length=3,
                   history_decay=0.5)


def test_recent_items_match_a_brute_force_reference() -> None:
    """Batches with repeats, equal times and late events: each user keeps the L newest
    distinct items by time, the later arrival first among equal times."""
    rng = np.random.default_rng(0)
    recent = RecentItems(4, capacity=1)
    newest: dict[int, dict[int, tuple[float, int]]] = {}
    seq = 0
    for _ in range(30):
        n = int(rng.integers(1, 40))
        users, items = rng.integers(0, 7, n), rng.integers(0, 12, n)
        ts = rng.integers(0, 15, n).astype(np.float64)  # many ties, many late ones
        recent.add(users, items, ts)
        for u, i, t in zip(users.tolist(), items.tolist(), ts.tolist(), strict=True):
            seq += 1
            mine = newest.setdefault(u, {})
            if i not in mine or (t, seq) >= mine[i]:
                mine[i] = (t, seq)
        for u, mine in newest.items():
            want = sorted(mine, key=lambda i, m=mine: (-m[i][0], -m[i][1]))[:4]  # type: ignore[misc]
            got = recent.of(np.array([u]))[0]
            assert got[: len(want)].tolist() == want and (got[len(want):] == -1).all()
            assert recent.ts[u, : len(want)].tolist() == [mine[i][0] for i in want]


def ingest(trainer: Trainer, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> None:
    """Events whose ids are their rows: user "3" gets row 3 when rows are met in order."""
    trainer.user_ids.rows([str(u) for u in range(int(users.max()) + 1)])
    trainer.item_ids.rows([str(i) for i in range(int(items.max()) + 1)])
    trainer.ingest(Events.from_rows([(str(u), str(i), float(t), "", 1.0) for u, i, t in zip(
        users.tolist(), items.tolist(), ts.tolist(), strict=True)]))


def trainer_with_history(**kw: object) -> Trainer:
    return Trainer(TrainerConfig(model=HIST, batch_size=64, negatives=2, holdout_fraction=1.0,
                                 **kw))  # type: ignore[arg-type]


def test_a_positive_sees_only_the_history_before_it() -> None:
    """Items 0..5 at times 0..5 for one user (5 is held out): item 3 at time 3 sees 2,
    1, 0 with weights 1, 1/2, 1/4 normalised; item 1 sees 0 alone; the item itself and
    anything newer never."""
    trainer = trainer_with_history()
    ingest(trainer, np.zeros(6, dtype=np.int64), np.arange(6), np.arange(6.0))
    assert trainer.model.recent is not None
    assert trainer.model.recent.of(np.array([0]))[0].tolist() == [4, 3, 2]  # 5: the hold-out
    history = trainer._history(np.array([0, 0, 0]), np.array([3, 1, 4]), np.array([3., 1., 4.]))
    bags = np.split(history.rows[history.bag].numpy(), history.offsets[1:].numpy())
    weights = np.split(history.weights.numpy(), history.offsets[1:].numpy())
    # The buffer holds the 3 newest (4, 3, 2): item 3 sees 2; item 1 sees none of them
    # (all newer); item 4 sees 3 then 2.
    assert [b.tolist() for b in bags] == [[2], [], [3, 2]]
    np.testing.assert_allclose(np.concatenate(weights), [1.0, 2 / 3, 1 / 3], rtol=1e-6)


def test_a_history_step_equals_a_dense_reference() -> None:
    """train_pairs with the history input against the same model written densely: a
    sample's user vector is its user row plus the weighted context rows of its
    positive's history; Adagrad on users, items and context, the tower's gradients."""
    trainer = trainer_with_history(lr=0.1, tower_lr=0.01)
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 6, 60), rng.integers(0, 9, 60)
    ingest(trainer, users, items, np.arange(60.0))
    model = trainer.model
    assert model.context is not None and model.recent is not None
    tables = [torch.nn.Parameter(t.weight[: t.rows].clone())
              for t in (model.users, model.items, model.context)]
    u_tab, i_tab, c_tab = tables
    opt = torch.optim.Adagrad(tables, lr=0.1, eps=1e-8)
    ref = copy.deepcopy(model.tower)
    for _ in range(3):
        ref.load_state_dict(model.tower.state_dict())
        pos_u, pos_i = trainer.store.sample_positives(trainer.rng, 16)
        pos_t = trainer.store.last_ts(pos_u, pos_i)
        state = trainer.sampler.rng.bit_generator.state
        trainer.train_pairs(pos_u, pos_i, pos_t)
        trainer.sampler.rng.bit_generator.state = state  # the same negatives again
        neg = trainer.sampler.sample(pos_u, 2)

        # Dense: each positive's history by hand from the buffer.
        recent, rts = model.recent.of(pos_u), model.recent.ts[pos_u]
        ctx = []
        for b in range(len(pos_u)):
            keep = [j for j in range(3) if recent[b, j] >= 0 and rts[b, j] <= pos_t[b]
                    and recent[b, j] != pos_i[b]]
            w = torch.tensor([0.5 ** r for r in range(len(keep))])
            rows = c_tab[torch.from_numpy(recent[b, keep])]
            ctx.append((w[:, None] * rows).sum(0) / w.sum() if keep else torch.zeros(7))
        vec = u_tab[torch.from_numpy(pos_u)] + torch.stack(ctx)
        ok = neg >= 0
        n = len(pos_u)
        which = np.concatenate([np.arange(n), np.repeat(np.arange(n), 2)[ok.ravel()]])
        it = torch.from_numpy(np.concatenate([pos_i, neg.ravel()[ok.ravel()]]))
        uv, iv = vec[torch.from_numpy(which)], i_tab[it]
        logits = ref(uv[:, :4] * iv[:, :4], uv[:, 4:], iv[:, 4:])
        labels = torch.zeros(len(which))
        labels[:n] = 1
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        opt.zero_grad()
        ref.zero_grad()
        loss.backward()
        opt.step()
        for a, b in zip(model.tower.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for table, want in zip((model.users, model.items, model.context), tables, strict=True):
            torch.testing.assert_close(table.weight[: table.rows], want.detach())


def test_served_scores_use_the_whole_recent_history() -> None:
    """A snapshot scores user u with u's row plus the decayed mean of the context rows
    of all of u's recent items (nothing comes after the newest)."""
    trainer = trainer_with_history()
    ingest(trainer, np.array([0, 0, 0, 0, 1]), np.array([3, 1, 2, 0, 2]),
           np.array([1.0, 2.0, 3.0, 4.0, 1.0]))  # item 0: user 0's hold-out
    for _ in range(5):
        trainer.step()
    frozen = trainer.model.frozen_copy()
    assert frozen.context is not None
    c = frozen.context.weight
    want = frozen.users.weight[0] + (c[2] + 0.5 * c[1] + 0.25 * c[3]) / 1.75
    torch.testing.assert_close(frozen.user_rows(torch.tensor([0]))[0], want)
    # User 1 has one item, too few to hold out (min_history 2): it is all their history.
    torch.testing.assert_close(frozen.user_rows(torch.tensor([1]))[0],
                               frozen.users.weight[1] + c[2])
    with torch.no_grad():
        pairwise = frozen.logits_from_rows(want.expand(4, -1), frozen.items.weight[:4])
    torch.testing.assert_close(frozen.user_logits(0), pairwise, rtol=1e-5, atol=1e-6)
    # Training on leaves the snapshot's history as it was.
    ingest(trainer, np.array([0]), np.array([4]), np.array([9.0]))
    assert frozen.recent is not None and frozen.recent.of(np.array([0]))[0].tolist() == [2, 1, 3]


def test_a_plain_mean_at_decay_one() -> None:
    cfg = NeuMFConfig(factors=2, mlp_layers=(4, 2), history_length=4, history_decay=1.0)
    trainer = Trainer(TrainerConfig(model=cfg, holdout_fraction=1.0))
    ingest(trainer, np.zeros(4, dtype=np.int64), np.arange(4), np.arange(4.0))
    frozen = trainer.model.frozen_copy()
    assert frozen.context is not None
    want = frozen.users.weight[0] + frozen.context.weight[:3].mean(0)
    torch.testing.assert_close(frozen.user_rows(torch.tensor([0]))[0], want)
