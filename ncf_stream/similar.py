"""Similar items: which items the model scores alike across its users.

**The similarity.** The index holds, per item, a vector v_i whose inner product
with a user's query q_u approximates the whole NeuMF logit (GMF exactly, the MLP
to first order: :mod:`ncf_stream.retrieval`). So the model's logits of an item
over all users are, to that order, the column ``Q v_i``. Two items are similar
when those columns move together: when the users who like one more than the
average user does like the other more too. That is the correlation over users of
the two items' logits (the adjusted item-item similarity of classic
collaborative filtering, computed on the model's scores for everyone rather than
on the sparse observed ones):

    sim(i, j) = v_i' S v_j / sqrt(v_i' S v_i * v_j' S v_j),   S = Cov(q_u)

With S = R R' this is the cosine of w_i = R' v_i. Centring the queries takes
out what is the same for every user: the query's constant 1 that carries each
item's tower value at the mean user, i.e. its general popularity. A plain cosine
over v_i would let that term, and the mixed units of the vector's parts (GMF
factors, tower gradients, a logit), decide; S weighs each direction by how much
users actually differ along it. S is estimated on up to ``SAMPLE_USERS`` users.

**Serving.** Up to ``exact_items`` indexed items every item is compared (exact,
one (n, d) product). Above, the candidate index is asked for the top C by
v_j' (S v_i) = |w_j| |w_i| sim(i, j), which is the similarity scaled by the
candidate's norm, and the candidates are rescored exactly; recall@10 against the
exact ranking is measured in ``bench/retrieval.py``. The item itself and
unavailable items are never returned. The w_i are computed once per index (at
the first request that needs them, not at publish: a daemon nobody asks for
similar items pays nothing) and kept while the index serves.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ncf_stream.retrieval import CandidateIndex
from ncf_stream.snapshot import Snapshot

SAMPLE_USERS = 4096  # enough for a (d, d) covariance with d ~ 30-70; bounded cost


@dataclass(frozen=True)
class SimilarSpace:
    """One index's items in the similarity's metric."""

    unit: np.ndarray  # (n, d) float32: w_i / |w_i| (a zero vector stays zero)
    metric: np.ndarray  # (d, d) float32: S; a query S v_i scores v_j' S v_i over the index


_spaces: weakref.WeakKeyDictionary[CandidateIndex, SimilarSpace] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def similar_space(snap: Snapshot) -> SimilarSpace:
    """The snapshot's index in the similarity's metric, computed once per index."""
    with _lock:  # one computation per index, even when requests arrive together
        space = _spaces.get(snap.index)
        if space is None:
            space = _spaces[snap.index] = _space(snap)
    return space


def _space(snap: Snapshot) -> SimilarSpace:
    model = snap.model
    step = max(1, model.n_users // SAMPLE_USERS)  # evenly spaced rows, as for a_ref
    users = torch.arange(0, model.n_users, step, device=model.device)
    queries = model.retrieval_queries(users, snap.a_ref).double().cpu().numpy()
    cov = np.atleast_2d(np.cov(queries, rowvar=False))
    eig, basis = np.linalg.eigh(cov)
    root = basis * np.sqrt(np.clip(eig, 0.0, None))  # S = root root'
    w = snap.index.vectors.astype(np.float64) @ root
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    unit = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    return SimilarSpace(unit.astype(np.float32), cov.astype(np.float32))


def exact_similar(snap: Snapshot, row: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed item but ``row`` and ``hidden``, and its similarity to ``row``."""
    unit = similar_space(snap).unit
    sims = unit @ unit[row]
    eligible = np.ones(len(sims), dtype=bool)
    eligible[hidden[hidden < len(sims)]] = False
    eligible[row] = False
    items = np.flatnonzero(eligible)
    return items, sims[items]


def candidate_similar(snap: Snapshot, row: int, k: int, candidates: int,
                      hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the index finds for ``row`` (its top ``candidates`` eligible ones by
    v_j' S v_i), each rescored by the exact similarity; the exact comparison when the
    request covers the catalogue or the index finds fewer than k eligible items."""
    n = snap.index.size
    drop = np.union1d(hidden[hidden < n], [row])
    ask = min(n, max(candidates, k) + len(drop))
    if ask == n:
        return exact_similar(snap, row, hidden)
    space = similar_space(snap)
    query = space.metric @ snap.index.vectors[row]
    _, found = snap.index.search(query[None, :], ask)
    cand = found[0][found[0] >= 0]
    cand = cand[~np.isin(cand, drop, assume_unique=True)][: max(candidates, k)]
    if len(cand) < k and len(cand) < n - len(drop):
        return exact_similar(snap, row, hidden)  # an IVF index probing too few lists
    cand = np.sort(cand)  # ties break by row, as in the exact ranking
    return cand, space.unit[cand] @ space.unit[row]
