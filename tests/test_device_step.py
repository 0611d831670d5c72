"""The device-resident step (ncf_stream.device_step) against brute force.

One suite for every device: the CPU runs it with the normal suite, CUDA cases
skip without a GPU and run the same assertions on one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (  # tests/conftest.py
    drain_engine,
    small_engine_settings,
    swapped_stream,
    train_stream,
)

from ncf_stream import checkpoint
from ncf_stream.device_step import (
    DeviceMirror,
    DeviceNegativeSampler,
    DeviceStep,
    enabled,
    unique_padded,
)
from ncf_stream.engine import Engine
from ncf_stream.errors import ConfigError
from ncf_stream.events import Deletions, Events
from ncf_stream.model import NeuMFConfig
from ncf_stream.source import MemorySource
from ncf_stream.store import ITEM_BITS, InteractionStore, pair_keys
from ncf_stream.synth import SynthConfig, SynthStream, generate
from ncf_stream.trainer import Trainer, TrainerConfig, unique_inverse

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]
TINY = NeuMFConfig(factors=4, mlp_layers=(6, 4, 2), initial_capacity=2)


def keys_of(users: np.ndarray, items: np.ndarray) -> set[int]:
    return set(pair_keys(users, items).tolist())


def training_keys(store: InteractionStore) -> set[int]:
    return keys_of(*store.training_pairs())


def events_of(rows: list[tuple[int, int, float]]) -> Events:
    return Events.from_rows([(f"u{u}", f"i{i}", t, "interaction", 1.0) for u, i, t in rows])


def repeating_stream(seed: int, n: int = 3000, users: int = 60, items: int = 80) -> Events:
    """Random events with many repeats (a trained pair repeated as a user's newest
    becomes the hold-out while mirrored) and late events."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n) % np.maximum(1, (u % 7) * 12)  # some users on few items
    ts = np.arange(n, dtype=np.float64) - rng.integers(0, 3, n) * (rng.random(n) < 0.1) * 50
    return events_of(list(zip(u.tolist(), i.tolist(), ts.tolist(), strict=True)))


def assert_mirrors(trainer: Trainer) -> None:
    """The mirror against the store: every training positive, nothing else but current
    hold-outs that were trained before; counts of training positives; hold-outs."""
    ds, store = trainer.device_step, trainer.store
    assert ds is not None
    mirrored = set(ds.mirror.keys().tolist())
    train = training_keys(store)
    assert train <= mirrored
    extra = np.array(sorted(mirrored - train), dtype=np.int64)
    assert store.is_holdout(extra >> ITEM_BITS, extra & 0xFFFFFFFF).all()
    _, items = store.training_pairs()
    want = np.bincount(items, minlength=store.n_items)
    assert np.array_equal(ds.mirror.counts().cpu().numpy(), want)
    every = np.arange(store.n_users)
    assert np.array_equal(ds.mirror.holdouts().cpu().numpy(), store.holdout_items(every))


def device_trainer(device: str, **kw: object) -> Trainer:
    cfg = TrainerConfig(**({"model": TINY, "batch_size": 64, "holdout_fraction": 1.0,
                            "device_step": "on"} | kw))  # type: ignore[arg-type]
    return Trainer(cfg, device=device)


# ---- the setting -----------------------------------------------------------------------------


def test_the_setting_turns_it_on_for_cuda_without_the_history_input() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not enabled("auto", cpu, 0) and enabled("auto", cuda, 0)
    assert not enabled("auto", cuda, 3)  # the history input keeps the host step
    assert enabled("on", cpu, 0) and not enabled("off", cuda, 0)
    with pytest.raises(ConfigError, match="history_length"):
        enabled("on", cuda, 3)
    assert Trainer(TrainerConfig(model=TINY)).device_step is None  # the CPU default
    assert Trainer(TrainerConfig(model=TINY, device_step="on")).device_step is not None


# ---- the mirror ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_mirror_matches_a_set_through_repeats_merges_and_growth(device: str) -> None:
    rng = np.random.default_rng(3)
    mirror = DeviceMirror(device, merge_share=0.2, min_delta=16)
    reference: set[int] = set()
    n_users = n_items = 0
    for step in range(40):
        n_users, n_items = n_users + int(rng.integers(0, 30)), n_items + int(rng.integers(0, 40))
        n_users, n_items = max(n_users, 1), max(n_items, 1)
        mirror.grow(n_users, n_items)
        m = int(rng.integers(0, 60))
        keys = np.unique(pair_keys(rng.integers(0, n_users, m), rng.integers(0, n_items, m)))
        if reference and step % 3 == 0:  # repeats of keys already held
            old = np.array(sorted(reference))[rng.integers(0, len(reference), 20)]
            keys = np.union1d(keys, old)
        if step % 4 == 1:  # repeats within the batch, unsorted
            keys = rng.permutation(np.concatenate([keys, keys[: len(keys) // 2]]))
        mirror.append(keys)
        reference |= set(keys.tolist())
        assert mirror.keys().tolist() == sorted(reference)
        assert int(mirror.count()) == len(reference)
        items = np.array(sorted(reference), dtype=np.int64) & 0xFFFFFFFF
        assert np.array_equal(mirror.counts().cpu().numpy(),
                              np.bincount(items, minlength=n_items))
        probe = pair_keys(rng.integers(0, n_users + 2, 200), rng.integers(0, n_items + 2, 200))
        got = mirror.contains(torch.from_numpy(probe).to(device)).cpu().numpy()
        assert got.tolist() == [int(k) in reference for k in probe]
    assert mirror.merges >= 3 and mirror.delta_slots < mirror.base_slots
    assert mirror.nbytes() >= 8 * len(reference)
    mirror.merge()  # the repeats' sentinels are dropped: one slot per key
    assert mirror.base_slots == len(reference) and mirror.delta_slots == 0
    assert mirror.keys().tolist() == sorted(reference)


@pytest.mark.parametrize("device", DEVICES)
def test_the_trainers_mirror_follows_the_store_through_holdouts_and_removals(
        device: str) -> None:
    trainer = device_trainer(device)
    events = repeating_stream(seed=5)
    for lo in range(0, len(events), 400):
        trainer.ingest(events.take(np.arange(lo, min(lo + 400, len(events)))))
        assert_mirrors(trainer)
    ds = trainer.device_step
    assert ds is not None
    # The edge the hold-out tensor is there for: trained pairs that are hold-outs now.
    assert len(ds.mirror.keys()) > len(training_keys(trainer.store))
    user = int(trainer.user_ids.rows(["u3"], add=False)[0])
    item = int(trainer.item_ids.rows(["i5"], add=False)[0])
    assert trainer.forget_user("u3") > 0 and trainer.forget_item("i5") > 0
    assert_mirrors(trainer)
    keys = ds.mirror.keys()
    assert not ((keys >> ITEM_BITS) == user).any() and not ((keys & 0xFFFFFFFF) == item).any()
    before = len(keys)
    trainer.store.expire(1500.0)  # retention calls the store directly: the step follows it
    assert trainer.step() is not None
    assert_mirrors(trainer)
    assert 0 < len(ds.mirror.keys()) < before


# ---- negatives -------------------------------------------------------------------------------


def touched_store(touched: dict[int, list[int]]) -> InteractionStore:
    """Each user's items, in this order; every user evaluated (a store alone)."""
    pairs = [(u, i) for u, items in touched.items() for i in items]
    store = InteractionStore(min_history=2)
    store.append(np.array([u for u, _ in pairs]), np.array([i for _, i in pairs]),
                 np.arange(len(pairs), dtype=np.float64))
    return store


@pytest.mark.parametrize("alpha", [0.0, 0.75])
@pytest.mark.parametrize("device", DEVICES)
def test_negatives_are_never_trained_on_the_holdout_is_allowed(device: str, alpha: float) -> None:
    trainer = device_trainer(device, alpha=alpha)
    trainer.ingest(repeating_stream(seed=8))
    ds, store = trainer.device_step, trainer.store
    assert ds is not None
    users = np.repeat(np.arange(store.n_users), 20)
    neg = ds.sampler.sample(torch.from_numpy(users).to(device), 10).cpu().numpy()
    train = training_keys(store)
    flat_u = np.repeat(users, 10)
    flat = neg.ravel()
    found = flat >= 0
    assert not (keys_of(flat_u[found], flat[found]) & train)  # brute force: never trained
    assert (flat < store.n_items).all()
    shortfall = int(ds.sampler.shortfall)
    assert shortfall == int((~found).sum())
    # Users on few items get no shortfall; hold-outs come up as negatives.
    counts = store.count_of(flat_u)
    assert (found | (counts > store.n_items // 5)).all()  # 0.2^8 a miss: never at this seed
    ho = store.holdout()
    drawn_holdouts = keys_of(flat_u[found], flat[found]) & keys_of(ho.users, ho.items)
    assert len(drawn_holdouts) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_user_on_almost_the_whole_catalogue_is_masked_and_counted(device: str) -> None:
    n = 50
    store = touched_store({0: list(range(n - 1)), 1: list(range(n)), 2: [3, 4]})
    # min_history 2: each user's newest is a hold-out; release them with one more event
    # each on an item they already have, so every touched item is trained on.
    store.append(np.array([0, 1, 2]), np.array([0, 0, 3]), np.array([1e6, 1e6, 1e6]))
    step = DeviceStep(store, torch.device(device), alpha=0.0, seed=1, rounds=8)
    users = torch.tensor([0] * 200 + [1] * 50 + [2] * 50, device=device)
    neg = step.sampler.sample(users, 4).cpu().numpy()
    trained0 = {int(k) & 0xFFFFFFFF for k in training_keys(store) if int(k) >> ITEM_BITS == 0}
    free0 = sorted(set(range(n)) - trained0)
    assert len(free0) <= 2  # the user's hold-out (item 0 now) and the untouched item 49
    u0 = neg[:200].ravel()
    assert set(u0[u0 >= 0].tolist()) <= set(free0) and (u0 == -1).sum() > 0
    u1 = neg[200:250].ravel()
    assert set(u1[u1 >= 0].tolist()) <= {0}  # user 1 trained on all but the hold-out
    assert (neg[250:] >= 0).all()  # user 2, on 2 of 50 items: never short
    assert int(step.sampler.shortfall) == int((neg == -1).sum()) > 0


@pytest.mark.parametrize("alpha", [0.0, 0.75])
@pytest.mark.parametrize("device", DEVICES)
def test_draw_frequencies_follow_count_to_the_alpha(device: str, alpha: float) -> None:
    """Chi-square against count^alpha at a fixed seed (deterministic); a uniform draw
    under alpha 0.75, or the reverse, is thousands off."""
    n_items = 12
    counts = np.arange(1, n_items + 1) * 3
    mirror = DeviceMirror(device)
    mirror.grow(200, n_items)
    keys = [pair_keys(np.arange(c) + 1, np.full(c, i)) for i, c in enumerate(counts)]
    mirror.append(np.unique(np.concatenate(keys)))
    sampler = DeviceNegativeSampler(mirror, alpha, torch.Generator(device).manual_seed(4))
    draws = 60_000  # for user 0, who has trained on nothing
    neg = sampler.sample(torch.zeros(draws // 6, dtype=torch.int64, device=device), 6)
    got = np.bincount(neg.cpu().numpy().ravel(), minlength=n_items)
    w = counts.astype(np.float64) ** alpha
    want = draws * w / w.sum()
    chi2 = float(((got - want) ** 2 / want).sum())
    assert chi2 < 40  # 11 degrees of freedom: 99.99% below 38
    other = counts.astype(np.float64) ** (0.75 - alpha)
    off = draws * other / other.sum()
    assert float(((got - off) ** 2 / off).sum()) > 1000
    if alpha:
        log_q = sampler.log_q(torch.arange(n_items, device=device)).cpu().numpy()
        assert np.allclose(log_q, np.log(w), rtol=1e-5)


# ---- replay and the fresh queue --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_replay_is_uniform_over_training_positives_and_never_a_holdout(device: str) -> None:
    # User 0 trains on x, then y is its hold-out, then x again is the newest: a trained
    # pair that is the hold-out while it stays in the mirror.
    trainer = device_trainer(device)
    for event in ((0, 0, 1.0), (0, 1, 2.0), (0, 0, 3.0)):  # one ingest each
        trainer.ingest(events_of([event]))
    trainer.ingest(events_of([(u, i, 10.0 + 3 * u + i) for u in range(1, 12) for i in range(3)]))
    ds, store = trainer.device_step, trainer.store
    assert ds is not None
    x = trainer.item_ids.rows(["i0"], add=False)[0]
    u0 = trainer.user_ids.rows(["u0"], add=False)[0]
    assert store.is_holdout(np.array([u0]), np.array([x]))[0]
    assert pair_keys(u0, x) in set(ds.mirror.keys().tolist())
    users, items, ok = ds.positives(0, 60_000)
    assert bool(ok.all())
    got = pair_keys(users.cpu().numpy(), items.cpu().numpy())
    train = training_keys(store)
    assert set(got.tolist()) == train  # every one, and nothing else: never a hold-out
    _, freq = np.unique(got, return_counts=True)
    want = len(got) / len(train)
    assert float(((freq - want) ** 2 / want).sum()) < 2 * len(train) + 40  # chi-square
    assert int(ds.replay_shortfall) == 0
    # ... and that mirrored hold-out is a negative like any untrained item.
    neg = ds.sampler.sample(torch.full((100,), u0, device=device), 4).cpu().numpy()
    assert set(neg.ravel().tolist()) == {x, trainer.item_ids.rows(["i2"], add=False)[0]}


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_positives_come_in_arrival_order_and_deletions_drop_them(device: str) -> None:
    trainer = device_trainer(device, batch_size=50, replay=False)  # 10 positives a step
    rows = [(k % 3, k, float(k)) for k in range(30)]
    result = trainer.ingest(events_of(rows))
    assert trainer.pending == len(result.train_users) == 27  # each user's newest held out
    ds = trainer.device_step
    assert ds is not None
    head_u, head_i = ds.queue.take(4)
    assert head_i.cpu().tolist() == result.train_items[:4].tolist()
    assert head_u.cpu().tolist() == result.train_users[:4].tolist()
    assert trainer.forget_user("u1") > 0
    assert trainer.pending == 23 - sum(1 for u in result.train_users[4:] if u == 1)
    stats = trainer.step()
    assert stats is not None and (stats.fresh, stats.replayed) == (10, 0)
    while trainer.step() is not None:
        pass
    assert trainer.pending == 0


# ---- the update ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_unique_padded_matches_numpy(device: str) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 500):
        values = rng.integers(0, 40, n)
        unique, inverse = unique_padded(torch.from_numpy(values).to(device), 99)
        want_u, want_inv = unique_inverse(values)
        u = unique.cpu().numpy()
        assert np.array_equal(u[: len(want_u)], want_u) and (u[len(want_u):] == 99).all()
        assert np.array_equal(inverse.cpu().numpy(), want_inv)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_padded_update_equals_the_host_update(device: str, optimizer: str) -> None:
    """The same batch through the host's unique rows and the device's padded ones, with
    lazy weight decay: the live rows and their optimizer state come out the same, and
    the padding (the scratch row, repeated) leaves no trace."""
    kw = dict(model=TINY, batch_size=64, optimizer=optimizer, weight_decay=0.1,
              holdout_fraction=1.0)
    host = Trainer(TrainerConfig(**kw), device=device)  # type: ignore[arg-type]
    dev = Trainer(TrainerConfig(**kw, device_step="on"), device=device)  # type: ignore[arg-type]
    events = repeating_stream(seed=2, n=300)
    host.ingest(events)
    dev.ingest(events)
    rng = np.random.default_rng(1)
    users = rng.integers(0, host.store.n_users, 40)
    items = rng.integers(0, host.store.n_items, 40)
    labels = (rng.random(40) < 0.3).astype(np.float32)
    host.train_batch(users, items, labels)
    ds = dev.device_step
    assert ds is not None
    su = ds.scratch(dev.model.users, [dev.opt_users])
    si = ds.scratch(dev.model.items, [dev.opt_items])
    scratch_before = (dev.model.users.weight[su].clone(), dev.model.items.weight[si].clone())
    u_t, i_t = torch.from_numpy(users).to(device), torch.from_numpy(items).to(device)
    y = torch.from_numpy(labels).to(device)
    uu, u_inv = unique_padded(u_t, su)
    ii, i_inv = unique_padded(i_t, si)
    dev._update(uu, u_inv, ii, i_inv, lambda logits: F.binary_cross_entropy_with_logits(
        logits, y, reduction="sum"))
    for a, b in ((host.model.users, dev.model.users), (host.model.items, dev.model.items)):
        assert torch.allclose(a.weight[: a.rows], b.weight[: b.rows], atol=1e-6)
    sa, sb = host.opt_users.state_dict(), dev.opt_users.state_dict()
    for name, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, sb[name], atol=1e-6), name  # type: ignore[arg-type]
    assert torch.equal(dev.model.users.weight[su], scratch_before[0])  # no gradient there
    assert torch.equal(dev.model.items.weight[si], scratch_before[1])


# ---- training --------------------------------------------------------------------------------


def topical_share(trainer: Trainer, stream: SynthStream) -> tuple[float, float]:
    """(model, popularity): the share of each user's top 10 items (seen ones included)
    that lie in the user's planted topics, averaged over users."""
    users, items = np.arange(trainer.store.n_users), np.arange(trainer.store.n_items)
    own = stream.user_topics[trainer.user_ids.ids(users).astype(np.int64)]
    topic = stream.item_topic[trainer.item_ids.ids(items).astype(np.int64)]
    scores = trainer.scorer()(users, np.tile(items, (len(users), 1)))
    top = topic[np.argsort(-scores, axis=1)[:, :10]]
    popular = np.broadcast_to(topic[np.argsort(-trainer.store.item_counts())[:10]], top.shape)
    return tuple(float(((t == own[:, :1]) | (t == own[:, 1:])).mean())  # type: ignore[return-value]
                 for t in (top, popular))


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "alpha"), [("bce", 0.0), ("softmax", 0.75)])
@pytest.mark.parametrize("device", DEVICES)
def test_the_device_step_learns_the_planted_topics(device: str, loss: str, alpha: float) -> None:
    """A user's top 10 lie in their planted topics far more often than popularity's
    (which hits them by chance: 2 of 4 topics); the host step reaches 0.84 and 0.87
    here. Fails if learning breaks."""
    stream = generate(SynthConfig(users=200, items=120, events=10_000, seed=2, topics=4))
    trainer = Trainer(TrainerConfig(batch_size=1024, lr=0.2, holdout_fraction=1.0, loss=loss,
                                    alpha=alpha, device_step="on",
                                    model=NeuMFConfig(factors=8, mlp_layers=(16, 8, 4))),
                      device=device)
    train_stream(trainer, stream.to_events(), poll=3000, replay_steps=100)
    model, popular = topical_share(trainer, stream)
    assert model > popular + 0.2 and model > 0.75
    negatives, replay = trainer.negative_shortfall()
    assert replay == 0 and 0 < negatives < 0.02 * trainer.samples_trained  # heavy users: few


def test_the_device_step_is_reproducible_at_a_seed_on_the_cpu() -> None:
    def run(seed: int) -> Trainer:
        trainer = device_trainer("cpu", alpha=0.75, seed=seed)
        return train_stream(trainer, repeating_stream(seed=1, n=1500), poll=300,
                            replay_steps=20)

    a, b, c = run(0), run(0), run(1)
    for name in ("users", "items"):
        ta, tb, tc = (getattr(t.model, name) for t in (a, b, c))
        assert torch.equal(ta.weight[: ta.rows], tb.weight[: tb.rows]), name
        assert not torch.equal(ta.weight[: ta.rows], tc.weight[: tc.rows]), name
    assert a.steps == b.steps > 20


@pytest.mark.parametrize("loss", ["bce", "softmax"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_training_does_not_depend_on_the_holdout(device: str, loss: str) -> None:
    """As tests/test_model.py's host test: every user's hold-out swapped for another
    untouched item, and the replay, the negatives and so the weights are the same."""
    u, i, i_alt, ts = swapped_stream(seed=7)
    runs = []
    for items in (i, i_alt):
        trainer = device_trainer(device, alpha=0.75, loss=loss)
        train_stream(trainer, events_of(list(zip(u.tolist(), items.tolist(), ts.tolist(),
                                                 strict=True))), poll=100, replay_steps=50)
        runs.append(trainer)
    a, b = runs
    assert not np.array_equal(a.store.holdout().items, b.store.holdout().items)
    assert a.negative_shortfall() == b.negative_shortfall()
    assert a.negative_shortfall()[0] > 0  # every tenth user has touched most of the items
    for name in ("users", "items"):
        ta, tb = getattr(a.model, name), getattr(b.model, name)
        assert torch.equal(ta.weight[: ta.rows], tb.weight[: tb.rows]), name
    for x, y in zip(a.model.tower.state_dict().values(), b.model.tower.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_a_cuda_step_never_syncs(loss: str) -> None:
    """The issue's promise, checked by CUDA itself: with sync debugging set to error,
    steps (fresh, replay, negatives, the update) and an ingest of known rows without a
    merge raise if anything waits for the device."""
    trainer = device_trainer("cuda", alpha=0.75, loss=loss, batch_size=256)
    events = repeating_stream(seed=3, n=2000)
    trainer.ingest(events.take(np.arange(1500)))
    trainer.step()  # the first step sets up the scratch rows and the popularity table
    later = events.take(np.arange(1500, 2000))
    known = np.isin(later.users, events.users[:1500]) & np.isin(later.items, events.items[:1500])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.ingest(later.take(np.flatnonzero(known)))
        for _ in range(5):
            assert trainer.step() is not None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(trainer.step().loss)  # type: ignore[union-attr]


# ---- the engine ------------------------------------------------------------------------------


def test_an_engine_with_the_device_step_forgets_and_checkpoints(tmp_path: Path) -> None:
    events = generate(SynthConfig(users=120, items=90, events=3000, seed=0,
                                  topics=4)).to_events()
    s = small_engine_settings(tmp_path, device_step="on", replay=True, holdout_fraction=1.0,
                              batch_size=256)
    source = MemorySource(events, batch_size=500)
    engine = Engine(s, source)
    drain_engine(engine, after=3)
    t = engine.trainer
    assert t.device_step is not None and t.steps > 0 and engine.counters.consumed == 3000
    assert_mirrors(t)
    user, item = t.user_ids.ids(np.array([0]))[0], t.item_ids.ids(np.array([0]))[0]
    user_row, item_row = 0, 0
    assert len(t.store.seen(user_row)) > 0 and t.store.item_counts()[item_row] > 0
    source.push(Deletions.from_rows([("user", user, 0), ("item", item, 0)]))
    drain_engine(engine, after=3)
    assert_mirrors(t)
    keys = t.device_step.mirror.keys()
    assert not ((keys >> ITEM_BITS) == user_row).any()
    assert not ((keys & 0xFFFFFFFF) == item_row).any()
    users = torch.arange(1, t.store.n_users)
    neg = t.device_step.sampler.sample(users, 20)
    assert not bool((neg == item_row).any())  # a deleted item is never a negative
    for _ in range(20):
        assert t.step() is not None
    assert torch.count_nonzero(t.model.items.weight[item_row]) == 0
    assert torch.count_nonzero(t.model.users.weight[user_row]) == 0
    engine._gauges()  # the shortfall and the mirror's memory, read here and not per step
    registry = engine.metrics.registry
    assert registry.get_sample_value("ncf_stream_negatives_short_total") == float(
        t.negative_shortfall()[0])
    assert registry.get_sample_value("ncf_stream_device_mirror_bytes") == float(
        t.device_step.nbytes()) >= 8 * len(t.store)
    engine.close()
    # Restored: the mirror is rebuilt from the checkpoint's store and training goes on;
    # the queue starts empty (pending positives are never checkpointed), as on the host.
    again = Engine(s, MemorySource(generate(SynthConfig(
        users=120, items=90, events=200, seed=9, topics=4)).to_events(),
        offset=engine.counters.consumed))  # the deletions are records too
    a = again.trainer
    assert a.device_step is not None and a.pending == 0
    assert np.array_equal(a.store.holdout().items, t.store.holdout().items)
    assert torch.equal(a.model.items.weight[: a.model.n_items],
                       t.model.items.weight[: t.model.n_items])
    assert a.step() is not None  # replay from the rebuilt mirror
    assert_mirrors(a)
    drain_engine(again, after=2)
    assert again.counters.consumed == engine.counters.consumed + 200
    assert_mirrors(a)
    again.close()
    back = Trainer(dataclasses.replace(t.cfg))
    assert checkpoint.load_latest(tmp_path, back) is not None
    assert back.device_step is not None and back.step() is not None
