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

**Serving.** Every indexed item is compared, exactly: one (n, d) product with
d ~ 30-70, the cost of the flat search every recommendation already pays
(bench/retrieval.py: 0.06 ms p50 at 10k items). Retrieving candidates from the
recommendation index instead, by v_j' (S v_i) = |w_j| |w_i| sim(i, j), ranks by
the similarity times the candidate's norm, and the norms vary too much: rescored
exactly, 800 candidates held 0.29 of the exact top 10 at 10k items and 0.06 at
100k (bench/retrieval.py, ``similar``). The item itself and unavailable items
are never returned. The w_i are computed once per index (at the first request
that needs them, not at publish: a daemon nobody asks for similar items pays
nothing) and kept while the index serves.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ncf_stream.ranking import best
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
    w = snap.index.vectors @ root.astype(np.float32)  # float32: half the time of float64
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    unit = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    return SimilarSpace(unit, cov.astype(np.float32))


def top_similar(snap: Snapshot, row: int, k: int,
                hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k indexed items most similar to ``row`` (never itself, nor ``hidden``, sorted
    rows), as (rows, similarities), most similar first; ties by row."""
    unit = similar_space(snap).unit
    sims = unit @ unit[row]
    sims[hidden[hidden < len(sims)]] = -np.inf
    sims[row] = -np.inf
    rows, scores = best(np.arange(len(sims)), sims, k)
    keep = np.isfinite(scores)  # fewer than k eligible items
    return rows[keep], scores[keep]
