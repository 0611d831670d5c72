"""Freed memory goes back to the OS: the allocator settings the daemon makes at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# In a fresh interpreter: inside the test run, other tests' threads and heap made the
# RSS readings lag (the kernel folds per-thread RSS counters in lazily), and the 8 MB
# block once read as 0 bytes resident.
CHECK = """
import resource, sys
import numpy as np
from ncf_stream.threads import MMAP_THRESHOLD, tune_malloc

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

if not tune_malloc():
    print("not glibc")
    sys.exit(3)
# By default glibc would now raise its mmap threshold to 24 MB, and the 16 MB block
# after it would come from the heap and stay resident once freed.
for size in (24 << 20, 16 << 20, 2 * MMAP_THRESHOLD):
    before = rss_bytes()
    block = np.ones(size // 8)  # touched: resident
    grew = rss_bytes() - before
    assert grew > size // 2, f"{size >> 20} MB: only {grew} bytes became resident"
    del block
    kept = rss_bytes() - before
    assert kept < size // 4, f"{size >> 20} MB: {kept} bytes stayed resident"
"""


def test_large_arrays_are_returned_to_the_os_once_freed() -> None:
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=60)
    if run.returncode == 3:
        pytest.skip("not glibc")
    assert run.returncode == 0, run.stderr[-2000:]
