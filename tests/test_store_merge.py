"""merge_stores: users of several stores merged, or some of one kept, against one store
that saw only those users' events."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ncf_stream.ids import IdMap
from ncf_stream.store import InteractionStore, merge_stores, split_keys

Batch = list[tuple[str, int, float]]  # (user id, item row, time)


def random_stream(seed: int, users: int = 30, items: int = 25, batches: int = 12,
                  ) -> list[Batch]:
    """Batches with repeats, ties in time and late events; times far from 0 and batches
    starting at different times, so stores of different users have different origins."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        n = int(rng.integers(1, 40))
        u = rng.integers(0, users, n)
        i = rng.integers(0, items, n)
        t = 1_700_000_000 + 10 * b + rng.integers(-40, 12, n)  # ties and late events
        out.append([(f"u{x}", int(y), float(z)) for x, y, z in
                    zip(u.tolist(), i.tolist(), t.tolist(), strict=True)])
    return out


class Fed:
    """A store fed through an id map, as a trainer feeds it (items by row: shared)."""

    def __init__(self, min_history: int) -> None:
        self.store = InteractionStore(min_history=min_history)
        self.ids = IdMap()

    def append(self, batch: Batch) -> None:
        if not batch:
            return
        users = self.ids.rows([u for u, _, _ in batch])
        new = np.arange(self.store.n_users, len(self.ids))
        # Some users have no hold-out, by their id, as the trainer marks them.
        self.store.mark_evaluated(new, np.array([int(x[1:]) % 4 != 3
                                                 for x in self.ids.ids(new).tolist()]))
        self.store.append(users, np.array([i for _, i, _ in batch]),
                          np.array([t for _, _, t in batch]))

    def forget_user(self, user: str) -> None:
        row = self.ids.forget(user)
        if row >= 0:
            self.store.forget_user(row)


def state(store: InteractionStore, ids: IdMap) -> dict[str, object]:
    """Everything per user by external id, and everything per item."""
    def by_id(rows: np.ndarray) -> list[object]:
        return ids.ids(rows).tolist()

    keys, _ = store._pairs.arrays()
    users, items = split_keys(keys)
    pairs = dict(zip(zip(by_id(users), items.tolist(), strict=True),
                     store.last_ts(users, items).tolist(), strict=True))
    ho = store.holdout()
    holdout = {u: (i, t) for u, i, t in zip(by_id(ho.users), ho.items.tolist(), ho.ts.tolist(),
                                            strict=True)}
    live = np.flatnonzero([x is not None for x in ids.all_ids().tolist()])
    live = live[live < store.n_users]
    indptr, flat = store.seen_csr(live)
    seen = {u: flat[a:b].tolist() for u, (a, b) in
            zip(by_id(live), itertools.pairwise(indptr.tolist()), strict=True)}
    assert seen == {u: store.seen(int(r)).tolist()
                    for u, r in zip(by_id(live), live, strict=True)}
    tu, ti = store.training_pairs()
    assert None not in pairs and None not in holdout
    return {
        "pairs": pairs, "holdout": holdout, "seen": {u: s for u, s in seen.items() if s},
        "count": {u: c for u, c in zip(by_id(live), store.count_of(live).tolist(), strict=True)
                  if c},
        "training": set(zip(by_id(tu), ti.tolist(), strict=True)),
        "item_counts": store.item_counts().tolist(), "dead": store.dead_items().tolist(),
        "n_items": store.n_items, "len": len(store),
    }


def feed(batches: list[Batch], owned: set[str] | None, min_history: int,
         forget: tuple[int, str] | None = None, dead: tuple[int, int] | None = None) -> Fed:
    """A store of ``owned`` users' events (all when None); ``forget``/``dead``: after
    batch b, delete that user (where it lives) / that item (everywhere)."""
    fed = Fed(min_history)
    for b, batch in enumerate(batches):
        fed.append([e for e in batch if owned is None or e[0] in owned])
        if forget is not None and forget[0] == b and (owned is None or forget[1] in owned):
            fed.forget_user(forget[1])
        if dead is not None and dead[0] == b:
            fed.store.forget_item(dead[1])
    return fed


def live_rows(ids: IdMap, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(len(ids))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("min_history", [1, 3])
def test_merged_stores_equal_one_store_of_all_the_events(seed: int, min_history: int) -> None:
    rng = np.random.default_rng(100 + seed)
    batches = random_stream(seed)
    everyone = {u for batch in batches for u, _, _ in batch}
    a_users = {u for u in everyone if rng.random() < 0.5}
    forget = (int(rng.integers(0, len(batches))), f"u{int(rng.integers(0, 30))}")
    dead = (int(rng.integers(0, len(batches))), int(rng.integers(0, 25)))
    ref = feed(batches, None, min_history, forget, dead)
    a = feed(batches, a_users, min_history, forget, dead)
    b = feed(batches, everyone - a_users, min_history, forget, dead)
    a_rows, b_rows = live_rows(a.ids, rng), live_rows(b.ids, rng)  # any order, tombstones too
    merged = merge_stores([(a.store, a_rows), (b.store, b_rows)])
    ids = IdMap()
    ids.extend([*a.ids.ids(a_rows).tolist(), *b.ids.ids(b_rows).tolist()], 0)
    assert state(merged, ids) == state(ref.store, ref.ids)
    assert (merged.events, merged.repeats) == (ref.store.events, ref.store.repeats)
    assert merged.n_users == len(ids)
    # Each user's hold-out keeps its arrival number, and the counter is past all of them.
    for part, rows, base in ((a, a_rows, 0), (b, b_rows, len(a_rows))):
        ho, mho = part.store.holdout(), merged.holdout()
        new_of = dict(zip(rows.tolist(), range(base, base + len(rows)), strict=True))
        assert set(zip(mho.users.tolist(), mho.seq.tolist(), strict=True)) >= {
            (new_of[u], s) for u, s in zip(ho.users.tolist(), ho.seq.tolist(), strict=True)}
        evaluated = merged._user_columns(np.arange(base, base + len(rows)))["evaluated"]
        assert evaluated.tolist() == part.store._user_columns(rows)["evaluated"].tolist()
    assert merged.events > max(merged.holdout().seq.tolist(), default=-1)
    # The merged store goes on as the one store does.
    for batch in random_stream(seed + 50, batches=4):
        users = ids.rows([u for u, _, _ in batch])
        new = np.arange(merged.n_users, len(ids))
        merged.mark_evaluated(new, np.array([int(x[1:]) % 4 != 3
                                             for x in ids.ids(new).tolist()]))
        merged.append(users, np.array([i for _, i, _ in batch]),
                      np.array([t for _, _, t in batch]))
        ref.append(batch)
        assert state(merged, ids) == state(ref.store, ref.ids)


@pytest.mark.parametrize("seed", range(6))
def test_a_split_keeps_exactly_the_chosen_users(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    batches = random_stream(seed)
    whole = feed(batches, None, 2, dead=(3, 7))
    rows = rng.permutation(len(whole.ids))[: len(whole.ids) // 3]
    kept = set(whole.ids.ids(rows).tolist())
    alone = feed(batches, kept, 2, dead=(3, 7))
    split = merge_stores([(whole.store, rows)])
    ids = IdMap()
    ids.extend(whole.ids.ids(rows).tolist(), 0)
    got, want = state(split, ids), state(alone.store, alone.ids)
    # The item rows are the whole store's: items only other users touched count 0 here.
    got_counts, want_counts = got.pop("item_counts"), want.pop("item_counts")
    assert isinstance(got_counts, list) and isinstance(want_counts, list)
    assert (len(got_counts), len(want_counts)) == (got.pop("n_items"), want.pop("n_items"))
    assert len(got_counts) >= len(want_counts)
    assert got_counts[: len(want_counts)] == want_counts
    assert not any(got_counts[len(want_counts):])
    assert got.pop("dead") == [7] and want.pop("dead") in ([], [7])
    assert got == want
    assert split.events == whole.store.events  # the whole store's counter: past every seq


def test_merging_refuses_what_it_cannot_merge() -> None:
    a, b = InteractionStore(min_history=1), InteractionStore(min_history=2)
    with pytest.raises(ValueError, match="min_history"):
        merge_stores([(a, np.arange(0)), (b, np.arange(0))])
    with pytest.raises(ValueError, match="twice"):
        merge_stores([(a, np.array([0, 0]))])
    with pytest.raises(ValueError, match="at least one"):
        merge_stores([])
    empty = merge_stores([(a, np.arange(3))])  # rows the store never saw: empty users
    assert (empty.n_users, len(empty), empty.events) == (3, 0, 0)
    assert len(empty.holdout().users) == 0
