"""NeuMF, its growable tables, the sparse optimizer and the online trainer.

One contract suite for every device: CUDA cases skip without a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import swapped_stream, train_stream  # tests/conftest.py

from ncf_stream import checkpoint
from ncf_stream.evaluate import evaluate
from ncf_stream.events import Events
from ncf_stream.model import NeuMF, NeuMFConfig
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer, TrainerConfig, unique_inverse

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]
TINY = NeuMFConfig(factors=4, mlp_layers=(6, 4, 2), initial_capacity=2)


@pytest.mark.parametrize("device", DEVICES)
def test_growth_keeps_existing_rows_bit_identical(device: str) -> None:
    model = NeuMF(TINY, device)
    model.grow(3, 2)
    before_u = model.users.weight[:3].clone()
    before_i = model.items.weight[:2].clone()
    model.grow(1000, 513)
    assert model.users.weight.shape[0] >= 1000 and model.items.weight.shape[0] >= 513
    assert torch.equal(model.users.weight[:3], before_u)
    assert torch.equal(model.items.weight[:2], before_i)
    assert model.users.weight[3:1000].std().item() == pytest.approx(TINY.init_std, rel=0.2)
    model.grow(10, 10)  # never shrinks
    assert (model.n_users, model.n_items) == (1000, 513)


def test_capacity_doubles_instead_of_growing_per_row() -> None:
    model = NeuMF(TINY)
    capacities = set()
    for n in range(1, 300):
        model.grow(n, 1)
        capacities.add(model.users.weight.shape[0])
    assert capacities == {2, 4, 8, 16, 32, 64, 128, 256, 512}


def test_retrieval_vectors_give_the_logit_exactly_at_the_reference_user() -> None:
    """[GMF exact ; MLP to first order]: a user at the expansion point gets the exact
    logit from one inner product, and others get close to it."""
    model = NeuMF(NeuMFConfig(factors=6, mlp_layers=(8, 6, 4)))
    model.grow(1, 50)
    items, a_ref = model.retrieval_items(chunk=16)  # chunked on purpose
    inner = (model.retrieval_queries(torch.tensor([0]), a_ref) @ items.T)[0]
    logits = model(torch.zeros(50, dtype=torch.long), torch.arange(50))
    torch.testing.assert_close(inner, logits.detach(), rtol=1e-5, atol=1e-6)
    # A second user a hair away: the first-order term carries the difference (ReLU is
    # piecewise linear, so inside one linear piece the expansion is exact).
    model.grow(2, 50)
    with torch.no_grad():
        model.users.weight[1] = model.users.weight[0]
        model.users.weight[1, 6:] += 1e-4 * torch.randn(4)
    items, a_ref = model.retrieval_items()
    users = torch.arange(2)
    approx = model.retrieval_queries(users, a_ref) @ items.T
    exact = model.score_matrix(users)
    torch.testing.assert_close(approx, exact, rtol=0, atol=1e-6)


def test_one_user_against_many_items_equals_the_pairwise_forward() -> None:
    """user_logits (the user's halves once, the items' first-layer halves cached on a
    frozen copy) against forward over the same pairs, for a subset and the catalogue."""
    model = NeuMF(NeuMFConfig(factors=6, mlp_layers=(8, 6, 4)), seed=3)
    model.grow(5, 40)
    with torch.no_grad():  # away from the near-zero init, so every term matters
        for table in (model.users, model.items):
            table.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    frozen = model.frozen_copy()
    assert model.item_hidden is None and frozen.item_hidden is not None
    some = torch.tensor([7, 0, 39, 7, 12])
    for m in (model, frozen):
        for user in range(5):
            with torch.no_grad():
                want_all = m(torch.full((40,), user), torch.arange(40))
            torch.testing.assert_close(m.user_logits(user), want_all, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m.user_logits(user, some), want_all[some],
                                       rtol=1e-5, atol=1e-5)
    # The cache belongs to the snapshot: training the live model leaves it as it was.
    with torch.no_grad():
        model.items.weight[:40] += 1.0
    assert not torch.allclose(model.user_logits(0), frozen.user_logits(0))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_step_equals_dense_adagrad_reference(device: str) -> None:
    """Trainer.train_batch (unique rows, summed duplicates, RowAdagrad) against the
    same model with dense parameters and torch.optim.Adagrad/Adam."""
    cfg = TrainerConfig(model=TINY, lr=0.1, tower_lr=0.01)
    trainer = Trainer(cfg, device=device)
    trainer.model.grow(6, 5)
    ref = copy.deepcopy(trainer.model.tower)
    u_tab = torch.nn.Parameter(trainer.model.users.weight[:6].clone())
    i_tab = torch.nn.Parameter(trainer.model.items.weight[:5].clone())
    opt_tables = torch.optim.Adagrad([u_tab, i_tab], lr=0.1, eps=1e-8)
    opt_tower = torch.optim.Adam(ref.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(5):
        users = rng.integers(0, 6, 12)  # duplicates on purpose
        items = rng.integers(0, 5, 12)
        labels = rng.integers(0, 2, 12).astype(np.float32)
        trainer.train_batch(users, items, labels)

        u = torch.from_numpy(users).to(device)
        i = torch.from_numpy(items).to(device)
        pu, qi = u_tab[u], i_tab[i]
        logits = ref(pu[:, :4] * qi[:, :4], pu[:, 4:], qi[:, 4:])
        loss = F.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(labels).to(device), reduction="sum")
        opt_tables.zero_grad()
        opt_tower.zero_grad()
        loss.backward()
        opt_tables.step()
        opt_tower.step()
    torch.testing.assert_close(trainer.model.users.weight[:6], u_tab.detach())
    torch.testing.assert_close(trainer.model.items.weight[:5], i_tab.detach())
    for a, b in zip(trainer.model.tower.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_softmax_step_equals_a_dense_sampled_softmax_reference() -> None:
    """loss="softmax": each positive against its own negatives, logits minus log q of
    the draw weights, a negative the sampler could not find masked out; the same step
    computed densely by hand from the same draws."""
    cfg = TrainerConfig(model=TINY, lr=0.1, tower_lr=0.01, loss="softmax", negatives=3,
                        alpha=0.75)
    trainer = Trainer(cfg)
    trainer.store.append(np.array([0, 0, 1, 2, 2, 3]), np.array([0, 1, 1, 2, 3, 4]),
                         np.arange(6.0))
    trainer.model.grow(6, 5)
    ref = copy.deepcopy(trainer.model.tower)
    u_tab = torch.nn.Parameter(trainer.model.users.weight[:6].clone())
    i_tab = torch.nn.Parameter(trainer.model.items.weight[:5].clone())
    opt_tables = torch.optim.Adagrad([u_tab, i_tab], lr=0.1, eps=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(4):
        ref.load_state_dict(trainer.model.tower.state_dict())
        pos_u, pos_i = rng.integers(0, 6, 8), rng.integers(0, 5, 8)
        neg = rng.integers(0, 5, (8, 3))
        neg[rng.random((8, 3)) < 0.2] = -1  # none found
        trainer._softmax_step(pos_u, pos_i, neg)

        cands = np.where(neg >= 0, neg, 0)
        items = torch.from_numpy(np.concatenate([pos_i[:, None], cands], 1))
        weights = trainer.sampler.weights(items.numpy().ravel()).reshape(8, 4)
        users = torch.from_numpy(pos_u)[:, None].expand(8, 4)
        pu, qi = u_tab[users], i_tab[items]
        logits = ref(pu[..., :4].reshape(-1, 4) * qi[..., :4].reshape(-1, 4),
                     pu[..., 4:].reshape(-1, 3), qi[..., 4:].reshape(-1, 3)).view(8, 4)
        logits = logits - torch.from_numpy(np.log(np.maximum(weights, 1e-12))).float()
        logits[:, 1:] = logits[:, 1:].masked_fill(torch.from_numpy(neg < 0), float("-inf"))
        loss = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long), reduction="sum")
        opt_tables.zero_grad()
        ref.zero_grad()
        loss.backward()
        opt_tables.step()
        # The tower's gradients, not its Adam step: Adam turns a rounding-size gradient
        # of a nearly dead ReLU unit into a full-size step.
        for a, b in zip(trainer.model.tower.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trainer.model.users.weight[:6], u_tab.detach())
        torch.testing.assert_close(trainer.model.items.weight[:5], i_tab.detach())


def test_optimizer_state_grows_with_the_table() -> None:
    trainer = Trainer(TrainerConfig(model=TINY))
    trainer.model.grow(2, 2)
    trainer.train_batch(np.array([0, 1]), np.array([1, 0]), np.array([1.0, 0.0], np.float32))
    state = trainer.opt_users.state[:2].clone()
    trainer.model.grow(100, 100)
    assert trainer.opt_users.state.shape == trainer.model.users.weight.shape
    assert torch.equal(trainer.opt_users.state[:2], state)
    assert trainer.opt_users.state[2:].abs().sum() == 0


def test_unique_inverse_matches_numpy() -> None:
    values = np.random.default_rng(1).integers(0, 50, 1000)
    uniq, inv = unique_inverse(values)
    ref_u, ref_inv = np.unique(values, return_inverse=True)
    assert np.array_equal(uniq, ref_u) and np.array_equal(inv, ref_inv)


def events_of(users: list[str], items: list[str], ts: list[float]) -> Events:
    return Events.from_rows([(u, i, t, "interaction", 1.0)
                             for u, i, t in zip(users, items, ts, strict=True)])


def test_trainer_trains_fresh_first_and_replays_when_idle() -> None:
    cfg = TrainerConfig(model=TINY, batch_size=50, negatives=4,  # 10 positives a step
                        holdout_fraction=1.0)
    trainer = Trainer(cfg)
    n = 30
    trainer.ingest(events_of([f"u{k % 3}" for k in range(n)], [f"i{k}" for k in range(n)],
                             [float(k) for k in range(n)]))
    assert trainer.pending == n - 3  # each user's newest is held out
    stats = trainer.step()
    assert stats is not None and stats.fresh == 5 and stats.replayed == 5  # fresh_share 0.5
    while trainer.pending:
        trainer.step()
    idle = trainer.step()
    assert idle is not None and idle.fresh == 0 and idle.replayed == 10
    assert 0 < idle.loss.item() < 10


def test_trainer_without_replay_stops_when_the_stream_does() -> None:
    trainer = Trainer(TrainerConfig(model=TINY, batch_size=50, replay=False,
                                    holdout_fraction=1.0))
    trainer.ingest(events_of(["a", "a", "a"], ["x", "y", "z"], [1.0, 2.0, 3.0]))
    stats = trainer.step()
    assert stats is not None and stats.fresh == 2 and stats.replayed == 0
    assert trainer.step() is None


def test_replay_stops_at_its_budget_and_new_events_earn_more(tmp_path: Path) -> None:
    cfg = TrainerConfig(model=TINY, batch_size=50, negatives=4,  # 10 positives a step
                        holdout_fraction=1.0, replay_ratio=2.0)
    trainer = Trainer(cfg)
    trainer.ingest(events_of(["a"] * 11, [f"i{k}" for k in range(11)],
                             [float(k) for k in range(11)]))
    first = trainer.step()  # nothing earned yet: all fresh
    assert first is not None and (first.fresh, first.replayed) == (10, 0)
    replayed = 0
    while (stats := trainer.step()) is not None:
        assert stats.fresh == 0
        replayed += stats.samples
        assert replayed < 100 + 50  # 2 x 50 fresh samples, overrun by one step at most
    assert replayed >= 100 and trainer.replay_budget == 0
    assert trainer.samples_trained - trainer.fresh_samples == replayed
    checkpoint.save(tmp_path, trainer, {}, {})
    after = Trainer(cfg)
    assert checkpoint.load_latest(tmp_path, after) is not None
    assert after.step() is None  # spent across a restart too
    after.ingest(events_of(["a"] * 5, [f"j{k}" for k in range(5)],
                           [20.0 + k for k in range(5)]))
    earned = after.step()  # i10 (released) and j0..j3; j4 is the new hold-out
    assert earned is not None and (earned.fresh, earned.replayed) == (5, 0)
    assert after.replay_budget == 2.0 * (50 + 25) - replayed
    while (stats := after.step()) is not None:
        assert stats.fresh == 0
        replayed += stats.samples
    assert 150 <= replayed < 150 + 50


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_planted_stream_is_learned(device: str) -> None:
    """Far above popularity on both protocols: fails if learning breaks."""
    stream = generate(SynthConfig(users=600, items=400, events=30_000, seed=4, topics=12))
    trainer = Trainer(TrainerConfig(batch_size=4096, lr=0.05, holdout_fraction=1.0),
                      device=device)
    train_stream(trainer, stream.to_events(), poll=2048, replay_steps=300)
    view = trainer.store.view()
    model = evaluate(trainer.scorer(), view)
    counts = trainer.store.item_counts().astype(np.float32)
    popular = evaluate(lambda u, i: counts[i], view)
    assert model["sampled"].hr[10] > popular["sampled"].hr[10] + 0.15
    assert model["full"].hr[10] > 1.5 * popular["full"].hr[10]


@pytest.mark.parametrize("history", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_trained_parameters_do_not_depend_on_the_hold_out(device: str, history: int) -> None:
    """Swap every user's hold-out for another item the user never touched: the fresh
    positives, the replayed ones and the negatives are the same, so training is
    bit-identical."""
    u, i, i_alt, ts = swapped_stream(seed=7)
    models = []
    for items in (i, i_alt):
        model = dataclasses.replace(TINY, history_length=history)  # the hold-out never enters
        trainer = Trainer(TrainerConfig(model=model, batch_size=64, negatives=4, alpha=0.75,
                                        holdout_fraction=1.0),
                          device=device)
        events = Events.from_rows([(f"u{a}", f"i{b}", float(t), "", 1.0)
                                   for a, b, t in zip(u.tolist(), items.tolist(), ts.tolist(),
                                                      strict=True)])
        train_stream(trainer, events, poll=100, replay_steps=50)
        models.append(trainer)
    a, b = models
    assert not np.array_equal(a.store.holdout().items, b.store.holdout().items)
    assert a.sampler.drawn == b.sampler.drawn > 0
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    for name in ("users", "items", "context"):
        ta, tb = getattr(a.model, name), getattr(b.model, name)
        assert (ta is None) == (tb is None) == (name == "context" and not history)
        if ta is not None:
            assert torch.equal(ta.weight[: ta.rows], tb.weight[: tb.rows]), name
