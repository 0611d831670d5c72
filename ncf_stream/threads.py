"""Thread roles: the trainer owns the cores; readers compute single-threaded.

torch and FAISS run their kernels on OpenMP. Each thread that calls them leads
its own OpenMP team, and GNU OpenMP, once it counts more OpenMP threads than
cores, stops spinning between parallel regions for everyone: the trainer's
steps then run ~45% slower for the rest of the process (bench/eval.py found
it; measured 206 vs 113 steps/s). A request or an evaluation is too small to
gain from a team anyway, so reader threads call :func:`reader_thread` first,
and the training thread :func:`trainer_thread`.

A thread's torch thread count is its own once set, but torch fixes it on the
thread's first use from the last value *any* thread set: a reader's
``set_num_threads(1)`` made every later thread, the trainer's included,
single-threaded (the daemon trained at half speed), and a reader initialised
later took the trainer's count back. So both roles initialise their own count
before they set it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Literal

log = logging.getLogger(__name__)


def _own_torch_threads(n: int) -> None:
    import torch

    torch.get_num_threads()  # this thread's first use: torch initialises its count now
    torch.set_num_threads(n)


def reader_thread() -> None:
    """Make this thread's torch and FAISS kernels single-threaded."""
    import faiss  # here: the source process uses this module and needs neither

    _own_torch_threads(1)
    faiss.omp_set_num_threads(1)


def trainer_thread(threads: int | None = None) -> int:
    """Give this thread's torch kernels ``threads`` OpenMP threads (None: one per usable
    core but one, left to requests); returns the count.

    Why not every core: at SCHED_IDLE, a request that preempts one thread of the team
    stalls the whole team at its next barrier. On 2 cores under 100 qps the daemon
    replayed no faster with 2 threads than with 1 (bench/idle.py: 297k vs 306k
    samples/s), while 2 threads alone are 1.5x faster."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        threads = max(1, cores - 1)
    _own_torch_threads(threads)
    return threads


BACKGROUND_NICE = 19
BackgroundPolicy = Literal["idle", "nice"]


def background_thread(policy: BackgroundPolicy = "idle") -> str:
    """Make this thread, and the threads it starts later, yield the CPU to requests.

    ``idle``: SCHED_IDLE (Linux), so it runs only when no other thread wants a core
    and a waking request preempts it at once; ``nice``: nice 19, which still takes
    turns with requests (bench/load.py --quick, alternating, 3 runs each: p99 HTTP
    8.0-9.8 vs 9.8-10.7 ms, gRPC 8.7-13.8 vs 10.0-13.0 ms, p50 1.5-2.0 vs 1.9-2.6
    ms). Where SCHED_IDLE is missing or refused, nice. Returns what it applied
    ("idle", "nice" or "none").
    """
    native_id = threading.get_native_id()
    if policy == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(native_id, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as e:
            log.info("SCHED_IDLE refused (%s); lowering the thread's nice instead", e)
    try:
        os.setpriority(os.PRIO_PROCESS, native_id,
                       os.getpriority(os.PRIO_PROCESS, native_id) + BACKGROUND_NICE)
        return "nice"
    except (AttributeError, OSError) as e:
        log.info("could not lower a thread's priority: %s", e)
        return "none"


def _glibc(name: str) -> Any:
    """A glibc function, or None where there is no glibc (or no such function)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name, None)
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    An evaluation scores the catalogue in blocks of tens of MB; glibc keeps the
    freed blocks in its arenas, so RSS ratcheted up by hundreds of MB per
    evaluation (bench/soak.py) without anything being live.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # at least: blocks this large get their own mapping, returned on free
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 64 << 20  # at least: free memory kept at the heap top before giving it back


def malloc_thresholds(step_tensor_bytes: int = 0) -> tuple[int, int]:
    """(mmap threshold, trim threshold) for a trainer whose largest per-step tensor is
    ``step_tensor_bytes``: twice that, so every step tensor stays on the heap, and at
    least MMAP_THRESHOLD; the trim threshold four times the mmap one, at least
    TRIM_THRESHOLD, so a step's freed tensors are reused by the next one."""
    mmap = min(MMAP_THRESHOLD_MAX, max(MMAP_THRESHOLD, 2 * step_tensor_bytes))
    return mmap, max(TRIM_THRESHOLD, 4 * mmap)


def tune_malloc(step_tensor_bytes: int = 0) -> bool:
    """Fixed glibc thresholds, so large short-lived arrays go back to the OS when freed,
    and training's per-step tensors do not (:func:`malloc_thresholds`).

    glibc raises its mmap threshold to the size of each mapped block freed (up
    to 32 MB), after which snapshot copies, merges and evaluation blocks come
    from the heap and stay resident as fragments. Fixed at 4 MB for the default
    model (its per-step tensors, ~2 MB, stay on the heap) with a 64 MB trim
    threshold (a 128 KB one made steps fault pages in and cost 10-25% of the
    training rate): bench/soak.py, 5 min at 5k events/s, RSS after warm-up 1277 ->
    1331 MB by default, 1013 -> 968 MB so. A wider model's step tensors must stay
    under it too: at the quality profile (8.9 MB each) a fixed 4 MB had every step
    map and unmap them, 200k page faults/s, half the trainer's CPU in the kernel and
    a third of its training rate (2026-12-03). Returns whether glibc took them."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mmap, trim = malloc_thresholds(step_tensor_bytes)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap) and mallopt(_M_TRIM_THRESHOLD, trim))
