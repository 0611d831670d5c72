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


STEPS = """
import resource, sys
from ncf_stream.model import NeuMFConfig
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import tune_malloc
from ncf_stream.trainer import Trainer, TrainerConfig

cfg = TrainerConfig(model=NeuMFConfig(factors=256, history_length=50), loss="softmax",
                    negatives=8, holdout_fraction=1.0)
if not tune_malloc(cfg.step_tensor_bytes if sys.argv[1] == "sized" else 0):
    sys.exit(3)
trainer = Trainer(cfg)
trainer.ingest(generate(SynthConfig(users=2000, items=3000, events=40_000, seed=0)).to_events())
for _ in range(15):  # warm up: the heap grows to a step's working set
    trainer.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    trainer.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10,
      cfg.step_tensor_bytes // resource.getpagesize())
"""


def test_a_wide_models_steps_reuse_their_memory_instead_of_faulting_it_in() -> None:
    """At the quality profile's width each step tensor is ~9 MB. Under the default
    model's 4 MB mmap threshold every one was mapped and unmapped per step (a page
    fault per 4 KB touched, half the trainer's CPU in the kernel); sized to the step,
    a step faults in less than one tensor's worth of pages."""
    got = {}
    for mode in ("fixed", "sized"):
        run = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True,
                             text=True, timeout=300)
        if run.returncode == 3:
            pytest.skip("not glibc")
        assert run.returncode == 0, run.stderr[-2000:]
        faults, pages = map(float, run.stdout.split())
        got[mode] = faults
    assert got["sized"] < pages < got["fixed"], (got, pages)
