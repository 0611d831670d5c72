"""CandidateIndex's backends on the CPU: faiss-gpu's k cap (a simulated GPU index that
refuses what the real one refuses), the torch search against a numpy brute force, and
how the setting retrieval_backend resolves."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import faiss
import numpy as np
import pytest
import torch

import ncf_stream.retrieval as retrieval
from ncf_stream.errors import ConfigError
from ncf_stream.retrieval import GPU_MAX_K, CandidateIndex, IndexConfig, choose_backend
from ncf_stream.settings import Settings


def distinct(n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(items, queries) whose inner products are distinct by a margin of ~1 (no ties to
    break either way): column 0 holds a permutation of 0..n-1 scaled by |q_0| in [1, 2],
    the other columns add at most ~0.1."""
    rng = np.random.default_rng(seed)
    items = rng.normal(scale=1e-3, size=(n, d))
    items[:, 0] = rng.permutation(n)
    q = rng.normal(size=(queries, d))
    q[:, 0] = rng.uniform(1, 2, queries) * rng.choice([-1, 1], queries)
    return items.astype(np.float32), q.astype(np.float32)


def brute(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


# ---- faiss-gpu's k cap --------------------------------------------------------------------------

class FakeGpuIndex:
    """What faiss-gpu's copy does that matters here: it refuses k and nprobe above the cap."""

    def __init__(self, index: faiss.Index) -> None:
        self.nprobe = getattr(index, "nprobe", None)
        if self.nprobe is not None and self.nprobe > GPU_MAX_K:
            raise AssertionError("faiss-gpu would refuse this nprobe")
        self.inner = faiss.clone_index(index)
        self.ks: list[int] = []

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > GPU_MAX_K:
            raise RuntimeError(f"k {k} > GPU_MAX_SELECTION_K")
        self.ks.append(k)
        return self.inner.search(x, k)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpuIndex]:
    """faiss-gpu "present": index_cpu_to_gpu returns a FakeGpuIndex (listed here)."""
    made: list[FakeGpuIndex] = []

    def to_gpu(res: Any, device: int, index: faiss.Index) -> FakeGpuIndex:
        made.append(FakeGpuIndex(index))
        return made[-1]

    monkeypatch.setattr(retrieval, "gpu_available", lambda: True)
    monkeypatch.setattr(retrieval.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(retrieval.faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return made


@pytest.mark.parametrize("config", [
    IndexConfig(retrieval_backend="faiss"),  # flat
    IndexConfig(retrieval_backend="faiss", ivf_threshold=1, nlist=16, nprobe=16),
], ids=["flat", "ivf"])
def test_a_k_above_the_gpu_cap_is_searched_on_the_cpu_original(
        fake_gpu: list[FakeGpuIndex], config: IndexConfig) -> None:
    items, q = distinct(GPU_MAX_K + 900, 6, 4)
    cpu = CandidateIndex(items, dataclasses.replace(config, use_gpu=False))
    gpu = CandidateIndex(items, config)
    assert (cpu.device, gpu.device) == ("cpu", "cuda") and len(fake_gpu) == 1
    for k in (10, GPU_MAX_K, GPU_MAX_K + 1, GPU_MAX_K + 700):
        got, want = gpu.search(q, k), cpu.search(q, k)
        assert np.array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
        assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    assert fake_gpu[0].ks == [10, GPU_MAX_K]  # the two below the cap went to the GPU copy
    np.testing.assert_array_equal(gpu.search(q, GPU_MAX_K + 1)[1][:, :10], brute(items, q, 10)[1])


def test_an_nprobe_above_the_gpu_cap_is_clamped_on_the_gpu_copy_only(
        fake_gpu: list[FakeGpuIndex], caplog: pytest.LogCaptureFixture) -> None:
    items, q = distinct(500, 6, 3)
    with caplog.at_level(logging.WARNING, logger="ncf_stream.retrieval"):
        index = CandidateIndex(items, IndexConfig(ivf_threshold=1, nlist=8,
                                                  nprobe=GPU_MAX_K + 5))
    assert index.device == "cuda" and fake_gpu[0].nprobe == GPU_MAX_K
    assert index._cpu_index is not None and index._cpu_index.nprobe == GPU_MAX_K + 5
    assert "nprobe" in caplog.text and str(GPU_MAX_K) in caplog.text
    np.testing.assert_array_equal(index.search(q, 10)[1], brute(items, q, 10)[1])


def test_a_failed_gpu_copy_keeps_the_cpu_index_with_its_nprobe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(res: Any, device: int, index: faiss.Index) -> None:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(retrieval, "gpu_available", lambda: True)
    monkeypatch.setattr(retrieval.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(retrieval.faiss, "index_cpu_to_gpu", broken, raising=False)
    items, q = distinct(500, 6, 3)
    index = CandidateIndex(items, IndexConfig(ivf_threshold=1, nlist=8, nprobe=GPU_MAX_K + 5))
    assert index.device == "cpu" and index._cpu_index is None
    assert index.index.nprobe == GPU_MAX_K + 5
    np.testing.assert_array_equal(index.search(q, GPU_MAX_K + 1)[1][:, :10],
                                  brute(items, q, 10)[1])


def test_an_ivf_search_that_finds_fewer_pads_with_rows_minus_one_scored_minus_inf() -> None:
    """One probe of many lists finds fewer than k: the padding is -1 with score -inf
    (FAISS's FLT_MAX distances turned back into scores would overflow), and what was
    found is exact by inner product within the probed list."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    index = CandidateIndex(vectors, IndexConfig(ivf_threshold=1000, nlist=64, nprobe=1,
                                                use_gpu=False))
    query = rng.standard_normal((1, 8)).astype(np.float32)
    with np.errstate(all="raise"):
        scores, rows = index.search(query, 500)
    found = rows[0] >= 0
    assert 0 < found.sum() < 500 and (rows[0][~found] == -1).all()
    assert np.isneginf(scores[0][~found]).all()
    np.testing.assert_allclose(scores[0][found], vectors[rows[0][found]] @ query[0], rtol=1e-4,
                               atol=1e-4)


# ---- the torch search ---------------------------------------------------------------------------

ON_CPU = IndexConfig(retrieval_backend="torch", use_gpu=False)  # the ops CUDA runs, on the CPU

@pytest.mark.parametrize("k", [1, 10, 400, 500, 700])
def test_torch_search_is_the_exact_top_k(k: int) -> None:
    items, q = distinct(500, 12, 7)
    index = CandidateIndex(items, ON_CPU)
    assert (index.backend, index.kind, index.device) == ("torch", "torch", "cpu")
    scores, rows = index.search(q, k)
    want_scores, want_rows = brute(items, q, k)
    assert scores.shape == rows.shape == (7, min(k, 500))
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("k", [1, 10, 64])
def test_torch_search_in_chunks_of_items_is_the_same(monkeypatch: pytest.MonkeyPatch,
                                                     k: int) -> None:
    items, q = distinct(1000, 8, 5)
    monkeypatch.setattr(retrieval, "TORCH_CHUNK_ELEMENTS", 5 * 64)  # 64 items per chunk
    index = CandidateIndex(items, ON_CPU)
    scores, rows = index.search(q, k)
    want_scores, want_rows = brute(items, q, k)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-3)


def test_torch_search_of_nothing_and_of_one_query() -> None:
    items, q = distinct(50, 4, 1)
    index = CandidateIndex(items, ON_CPU)
    scores, rows = index.search(q[0], 0)
    assert scores.shape == rows.shape == (1, 0)
    assert np.array_equal(index.search(q[0], 3)[1], brute(items, q, 3)[1])


def test_torch_search_agrees_with_faiss_flat_on_random_vectors() -> None:
    rng = np.random.default_rng(3)
    items = rng.normal(size=(3000, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    flat = CandidateIndex(items, IndexConfig(retrieval_backend="faiss"))
    torch_ = CandidateIndex(items, ON_CPU)
    assert np.array_equal(flat.search(q, 50)[1], torch_.search(q, 50)[1])


# ---- the setting --------------------------------------------------------------------------------

@pytest.mark.parametrize(("asked", "use_gpu", "faiss_gpu", "cuda", "chosen"), [
    ("auto", True, True, True, "faiss"),  # faiss-gpu sees the GPU: FAISS on it
    ("auto", True, False, True, "torch"),  # CUDA without faiss-gpu: torch on it
    ("auto", True, False, False, "faiss"),  # no GPU: FAISS on the CPU (IVF is sub-linear)
    ("auto", False, False, True, "faiss"),  # told to stay off the GPU
    ("torch", True, True, True, "torch"),
    ("faiss", True, False, True, "faiss"),
])
def test_auto_picks_faiss_unless_cuda_lacks_faiss_gpu(
        monkeypatch: pytest.MonkeyPatch, asked: str, use_gpu: bool, faiss_gpu: bool,
        cuda: bool, chosen: str) -> None:
    monkeypatch.setattr(retrieval, "gpu_available", lambda: faiss_gpu)
    monkeypatch.setattr(retrieval, "cuda_available", lambda: cuda)
    assert choose_backend(IndexConfig(retrieval_backend=asked, use_gpu=use_gpu)) == chosen


def test_the_setting_flows_into_the_config_and_through_an_export_meta() -> None:
    cfg = IndexConfig.from_settings(Settings(retrieval_backend="torch"))
    assert cfg.retrieval_backend == "torch"
    assert IndexConfig(**dataclasses.asdict(cfg)) == cfg  # export.py's meta["index"]
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "retrieval_backend"}
    assert IndexConfig(**old).retrieval_backend == "auto"  # an export from before the field
    with pytest.raises(ConfigError, match="retrieval_backend"):
        IndexConfig(retrieval_backend="cuvs")


# ---- on a GPU (bench/gpu.sh runs these) ---------------------------------------------------

@pytest.mark.parametrize("k", [10, GPU_MAX_K + 500])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_torch_search_is_the_exact_top_k(k: int) -> None:
    items, q = distinct(GPU_MAX_K + 900, 12, 6)
    index = CandidateIndex(items, IndexConfig(retrieval_backend="torch"))
    assert index.device == "cuda"
    scores, rows = index.search(q, k)
    want_scores, want_rows = brute(items, q, k)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not retrieval.gpu_available(), reason="needs faiss-gpu and a GPU")
@pytest.mark.gpu
def test_a_real_faiss_gpu_index_answers_a_k_above_its_cap() -> None:
    items, q = distinct(GPU_MAX_K + 900, 6, 4)
    for config in (IndexConfig(retrieval_backend="faiss"),
                   IndexConfig(retrieval_backend="faiss", ivf_threshold=1, nlist=16,
                               nprobe=16)):
        index = CandidateIndex(items, config)
        assert index.device == "cuda"
        for k in (10, GPU_MAX_K + 700):
            assert np.array_equal(index.search(q, k)[1][:, :10], brute(items, q, 10)[1])
