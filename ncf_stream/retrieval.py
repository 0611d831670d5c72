"""Candidate retrieval: a FAISS inner-product index over NeuMF's retrieval vectors.

The index holds :meth:`ncf_stream.model.NeuMF.retrieval_items`: per item, its
GMF vector, the gradient of the MLP tower at the mean user and the tower's
value there, so that the inner product with a user's query
(:meth:`~ncf_stream.model.NeuMF.retrieval_queries`) approximates the whole
logit: the GMF half exactly, the MLP half to first order. The recommender
rescores the top C candidates with the full network; how close that gets to
the exact ranking is measured (bench/retrieval.py, ``candidate_recall``).

One class, choices inside it (CONVENTIONS.md, item 1). With FAISS: a flat index
below ``ivf_threshold`` items (exact, and cheap to rebuild: a copy), an IVF index
above it (sub-linear search; its coarse quantizer is trained once and kept,
so a refresh only re-assigns vectors), on the GPU when CUDA and faiss-gpu are
both present, else on the CPU. faiss-gpu refuses a k or an nprobe above
:data:`GPU_MAX_K`: a GPU index keeps the CPU index it was copied from and
searches a larger k there, and its nprobe is clamped. With torch (the setting
``retrieval_backend``; "auto" picks it on CUDA without faiss-gpu): the exact
top-k of one matrix product, on the model's kind of device, needing no extra
wheel (:func:`torch_top_k`).

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
import torch

from ncf_stream.errors import ConfigError
from ncf_stream.settings import Settings, check_config, config_values, setting

log = logging.getLogger(__name__)

# faiss-gpu's k-selection kernels go up to GPU_MAX_SELECTION_K = 2048 (CUDA builds;
# faiss/gpu/impl/IndexUtils.cu, validateKSelect and validateNProbe): a search with a
# larger k, or an IVF with a larger nprobe, raises. The recommender asks for
# max(candidates, k) + the user's seen items, so a user with ~1,250 seen items
# already goes past it at the default 800 candidates.
GPU_MAX_K = 2048
# The torch search scores at most this many (query, item) pairs at once (64 MB of
# float32), so a batch of queries over 1M items does not hold a (q, 1M) matrix.
TORCH_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class IndexConfig:
    """``ivf_threshold``, ``retrieval_backend``, ``nprobe`` and ``exact_items`` are the
    settings of the same names (ncf_stream.settings: defaults, bounds and why)."""

    ivf_threshold: int = setting("ivf_threshold")
    # As asked ("auto" included), not as resolved: a replica rebuilding the index from an
    # export's config resolves it on its own machine (choose_backend).
    retrieval_backend: str = setting("retrieval_backend")
    # Catalogues this small are ranked whole per query: their snapshots cache each
    # item's first-layer half (NeuMF.frozen_copy). Larger ones skip that cost (0.1 s
    # per publish at 1M items) for a few hundred rescored candidates per query.
    exact_items: int = setting("exact_items")
    nlist: int | None = None  # IVF lists; None: ~ 4 sqrt(n) (FAISS's guideline)
    nprobe: int = setting("nprobe")
    use_gpu: bool = True  # when CUDA (and, for FAISS, faiss-gpu) is present

    def __post_init__(self) -> None:
        check_config(self)
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"IndexConfig.nlist = {self.nlist}: must be >= 1 or None")

    @classmethod
    def from_settings(cls, s: Settings) -> IndexConfig:
        return cls(**config_values(cls, s))


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def cuda_available() -> bool:
    """torch sees a GPU (a seam for tests, like :func:`gpu_available`)."""
    return torch.cuda.is_available()


def choose_backend(cfg: IndexConfig) -> str:
    """"faiss" or "torch": the setting ``retrieval_backend`` resolved on this machine."""
    if cfg.retrieval_backend != "auto":
        return cfg.retrieval_backend
    if cfg.use_gpu and not gpu_available() and cuda_available():
        return "torch"  # a GPU, but only faiss-cpu: retrieval would stay on the host
    return "faiss"


class CandidateIndex:
    """An immutable MIPS index over item rows [0, n).

    ``backend`` is "faiss" or "torch"; ``kind`` is "flat" or "ivf" (FAISS) or "torch"
    (exact at any size); ``device`` is where it searches, "cpu" or "cuda"."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig | None = None,
                 quantizer: faiss.Index | None = None) -> None:
        self.config = cfg = config or IndexConfig()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        # Kept for what needs the vectors themselves (similar items: ncf_stream.similar):
        # FAISS holds its own copy, and reading one back is not offered by every index
        # kind. n x d x 4 bytes (1M items x 33: 132 MB).
        self.vectors = vectors
        self.size, self.dim = vectors.shape
        self.backend = choose_backend(cfg)
        self.max_norm = 0.0  # M of the L2 reduction (IVF only)
        self._cpu_index: faiss.Index | None = None  # a GPU index's CPU original (GPU_MAX_K)
        if self.backend == "torch":
            self.kind = "torch"
            self.device = "cuda" if cfg.use_gpu and cuda_available() else "cpu"
            self.matrix = torch.from_numpy(vectors).to(self.device)  # (n, d)
            return
        self.kind = "ivf" if self.size >= cfg.ivf_threshold else "flat"
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
        ivf = index if isinstance(index, faiss.IndexIVF) else None
        nprobe = ivf.nprobe if ivf is not None else 0
        # The GPU copy takes the CPU index's nprobe, and faiss-gpu refuses one this large.
        if ivf is not None and nprobe > GPU_MAX_K:
            log.warning("nprobe %d is above faiss-gpu's limit; the GPU index probes %d lists",
                        nprobe, GPU_MAX_K)
            ivf.nprobe = GPU_MAX_K
        try:
            res = faiss.StandardGpuResources()
            moved = faiss.index_cpu_to_gpu(res, 0, index)
        except (RuntimeError, AttributeError) as e:  # a broken driver or build: keep the CPU one
            log.warning("FAISS GPU index unavailable (%s); using the CPU index", e)
            return index
        finally:
            if ivf is not None:
                ivf.nprobe = nprobe  # the CPU index, kept below, probes as configured
        self._gpu_resources = res  # must outlive the index
        # Kept for a k above GPU_MAX_K: another n x (d + 1) x 4 bytes of host memory, for
        # the rare request (a user with ~1,250+ seen items) the GPU copy refuses.
        self._cpu_index = index
        self.device = "cuda"
        return moved

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items by inner product, best first: (scores, rows), float32 and int64,
        each (len(queries), min(k, n)); rows -1 (scores -inf) where an IVF index found fewer."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, self.size)
        if k <= 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        if self.backend == "torch":
            return torch_top_k(self.matrix, queries, k)
        # faiss-gpu refuses a k above GPU_MAX_K: such queries go to the CPU original.
        index = self._cpu_index if self._cpu_index is not None and k > GPU_MAX_K else self.index
        if self.kind == "flat":
            return index.search(queries, k)
        # Queries scaled onto the items' sphere (the ranking is scale-free): a short query
        # would otherwise probe the cells with the shortest centroids, not the best ones.
        norm = np.linalg.norm(queries, axis=1, keepdims=True)
        scale = np.where(norm > 0, self.max_norm / np.maximum(norm, 1e-30), 1.0)
        reduced = np.hstack([queries * scale, np.zeros((len(queries), 1), np.float32)])
        dist, rows = index.search(reduced.astype(np.float32), k)
        # |[s q, 0] - [x, e]|^2 = s^2 |q|^2 + M^2 - 2 s q.x: back to inner products
        sq = np.einsum("ij,ij->i", reduced, reduced)[:, None]
        with np.errstate(over="ignore"):  # FAISS pads a short result with FLT_MAX distances
            scores = (sq + self.max_norm ** 2 - dist) / (2 * scale)
        scores[rows < 0] = -np.inf  # and rows -1: nothing there
        return scores.astype(np.float32, copy=False), rows


@torch.no_grad()
def torch_top_k(matrix: torch.Tensor, queries: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` (1 <= k <= n) of ``queries`` (q, d) against ``matrix``'s rows
    (n, d) by inner product, on ``matrix``'s device: :meth:`CandidateIndex.search`'s
    (scores, rows). Items are scored in chunks of at most TORCH_CHUNK_ELEMENTS pairs; each
    chunk's top k, then the top k of those, is the top k of all."""
    q = torch.from_numpy(queries).to(matrix.device)  # (q, d)
    n = matrix.shape[0]
    step = max(k, TORCH_CHUNK_ELEMENTS // max(len(queries), 1))
    best_scores, best_rows = [], []
    for lo in range(0, n, step):
        scores = q @ matrix[lo:lo + step].T  # (q, chunk)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores.append(top.values)
        best_rows.append(top.indices + lo)
    scores, rows = torch.cat(best_scores, dim=1), torch.cat(best_rows, dim=1)
    if len(best_scores) > 1:
        top = torch.topk(scores, k, dim=1)
        scores, rows = top.values, torch.gather(rows, 1, top.indices)
    return scores.float().cpu().numpy(), rows.cpu().numpy().astype(np.int64, copy=False)
