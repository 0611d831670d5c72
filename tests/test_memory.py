"""Freed memory goes back to the OS: the allocator settings the daemon makes at start."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from ncf_stream.threads import MMAP_THRESHOLD, tune_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_large_arrays_are_returned_to_the_os_once_freed() -> None:
    if not tune_malloc():
        pytest.skip("not glibc")
    # By default glibc would now raise its mmap threshold to 24 MB, and the 16 MB
    # block after it would come from the heap and stay resident once freed.
    for size in (24 << 20, 16 << 20, 2 * MMAP_THRESHOLD):
        before = rss_bytes()
        block = np.ones(size // 8)  # touched: resident
        assert rss_bytes() - before > size // 2
        del block
        assert rss_bytes() - before < size // 4, f"{size >> 20} MB stayed resident"

