"""Thread roles: the trainer owns the cores; readers compute single-threaded.

torch and FAISS run their kernels on OpenMP. Each thread that calls them leads
its own OpenMP team, and GNU OpenMP, once it counts more OpenMP threads than
cores, stops spinning between parallel regions for everyone: the trainer's
steps then run ~45% slower for the rest of the process (bench/eval.py found
it; measured 206 vs 113 steps/s). A request or an evaluation is too small to
gain from a team anyway, so reader threads call :func:`reader_thread` first;
the thread count is per calling thread, so the trainer keeps its own.
"""

from __future__ import annotations

import ctypes

import faiss
import torch


def reader_thread() -> None:
    """Make this thread's torch and FAISS kernels single-threaded."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    An evaluation scores the catalogue in blocks of tens of MB; glibc keeps the
    freed blocks in its arenas, so RSS ratcheted up by hundreds of MB per
    evaluation (bench/soak.py) without anything being live.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
