"""Candidate retrieval: a FAISS inner-product index over NeuMF's retrieval vectors.

The index holds :meth:`ncf_stream.model.NeuMF.retrieval_items`: per item, its
GMF vector, the gradient of the MLP tower at the mean user and the tower's
value there, so that the inner product with a user's query
(:meth:`~ncf_stream.model.NeuMF.retrieval_queries`) approximates the whole
logit: the GMF half exactly, the MLP half to first order. The recommender
rescores the top C candidates with the full network; how close that gets to
the exact ranking is measured (bench/retrieval.py, ``candidate_recall``).

One class, choices inside it (CONVENTIONS.md, item 1): a flat index below
``ivf_threshold`` items (exact, and cheap to rebuild: a copy), an IVF index
above it (sub-linear search; its coarse quantizer is trained once and kept,
so a refresh only re-assigns vectors), on the GPU when CUDA and faiss-gpu are
both present, else on the CPU.

The IVF index searches by L2 distance over vectors made to have equal norms
(Bachrach et al. 2014, the MIPS-to-NN reduction: [x, sqrt(M^2 - |x|^2)] for the
items, [q, 0] for the query), which orders items exactly as the inner product
does. An inner-product IVF assigns items to cells by their inner product with
the centroids, which favours long vectors, so the probed cells missed most of
the true top items: at 200k items and 32 probes it found 0.40 of the model's
exact top 10 against 0.72 with the reduction, and 0.58 against 0.91 at 128
probes (a converged model of the quality profile, 2026-12-03).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from ncf_stream.errors import ConfigError
from ncf_stream.settings import Settings, check_config, config_values, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """``ivf_threshold``, ``nprobe`` and ``exact_items`` are the settings of the same
    names (ncf_stream.settings: defaults, bounds and why)."""

    ivf_threshold: int = setting("ivf_threshold")
    # Catalogues this small are ranked whole per query: their snapshots cache each
    # item's first-layer half (NeuMF.frozen_copy). Larger ones skip that cost (0.1 s
    # per publish at 1M items) for a few hundred rescored candidates per query.
    exact_items: int = setting("exact_items")
    nlist: int | None = None  # IVF lists; None: ~ 4 sqrt(n) (FAISS's guideline)
    nprobe: int = setting("nprobe")
    use_gpu: bool = True  # when CUDA and faiss-gpu are present

    def __post_init__(self) -> None:
        check_config(self)
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"IndexConfig.nlist = {self.nlist}: must be >= 1 or None")

    @classmethod
    def from_settings(cls, s: Settings) -> IndexConfig:
        return cls(**config_values(cls, s))


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class CandidateIndex:
    """An immutable MIPS index over item rows [0, n)."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig | None = None,
                 quantizer: faiss.Index | None = None) -> None:
        self.config = cfg = config or IndexConfig()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        # Kept for what needs the vectors themselves (similar items: ncf_stream.similar):
        # FAISS holds its own copy, and reading one back is not offered by every index
        # kind. n x d x 4 bytes (1M items x 33: 132 MB).
        self.vectors = vectors
        self.size, self.dim = vectors.shape
        self.kind = "ivf" if self.size >= cfg.ivf_threshold else "flat"
        self.max_norm = 0.0  # M of the L2 reduction (IVF only)
        if self.kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(self.dim)
        else:
            norms = np.linalg.norm(vectors, axis=1)
            self.max_norm = float(norms.max(initial=0.0))
            extra = np.sqrt(np.maximum(self.max_norm ** 2 - norms ** 2, 0.0))
            vectors = np.hstack([vectors, extra[:, None].astype(np.float32)])
            index = self._ivf(vectors, quantizer)
        index.add(vectors)
        self.device = "cpu"
        if cfg.use_gpu and gpu_available():
            index = self._to_gpu(index)
        self.index = index

    def _ivf(self, vectors: np.ndarray, quantizer: faiss.Index | None) -> faiss.Index:
        """An L2 IVF over the reduced ``vectors`` (dim + 1 columns)."""
        nlist = self.config.nlist or int(4 * np.sqrt(self.size))
        dim = vectors.shape[1]
        if quantizer is None or quantizer.d != dim:
            quantizer = faiss.IndexFlatL2(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            sample = vectors[np.random.default_rng(0).permutation(self.size)[: 64 * nlist]]
            ivf.train(sample)
        else:  # reuse trained centroids: a refresh only re-assigns vectors
            ivf = faiss.IndexIVFFlat(quantizer, dim, quantizer.ntotal, faiss.METRIC_L2)
            ivf.is_trained = True
        ivf.nprobe = self.config.nprobe
        self.quantizer = quantizer
        return ivf

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        try:
            res = faiss.StandardGpuResources()
            moved = faiss.index_cpu_to_gpu(res, 0, index)
        except (RuntimeError, AttributeError) as e:  # a broken driver or build: keep the CPU one
            log.warning("FAISS GPU index unavailable (%s); using the CPU index", e)
            return index
        self._gpu_resources = res  # must outlive the index
        self.device = "cuda"
        return moved

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items by inner product: (scores, rows), each (len(queries), k); -1 pads."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, self.size)
        if k <= 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        if self.kind == "flat":
            return self.index.search(queries, k)
        # Queries scaled onto the items' sphere (the ranking is scale-free): a short query
        # would otherwise probe the cells with the shortest centroids, not the best ones.
        norm = np.linalg.norm(queries, axis=1, keepdims=True)
        scale = np.where(norm > 0, self.max_norm / np.maximum(norm, 1e-30), 1.0)
        reduced = np.hstack([queries * scale, np.zeros((len(queries), 1), np.float32)])
        dist, rows = self.index.search(reduced.astype(np.float32), k)
        # |[s q, 0] - [x, e]|^2 = s^2 |q|^2 + M^2 - 2 s q.x: back to inner products
        sq = np.einsum("ij,ij->i", reduced, reduced)[:, None]
        return (sq + self.max_norm ** 2 - dist) / (2 * scale), rows
