"""Thread roles: background work yields the CPU to requests, and what it starts inherits."""

from __future__ import annotations

import os
import threading

import pytest

from ncf_stream.threads import BACKGROUND_NICE, background_thread


def policy_of_thread_and_its_child(policy: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    out: dict[str, object] = {}

    def child() -> None:
        tid = threading.get_native_id()
        out["child"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))

    def parent() -> None:
        out["applied"] = background_thread(policy)
        tid = threading.get_native_id()
        out["parent"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
        t = threading.Thread(target=child)  # as the trainer's OpenMP team is started
        t.start()
        t.join()

    t = threading.Thread(target=parent)
    t.start()
    t.join()
    return out["applied"], out["parent"], out["child"]  # type: ignore[return-value]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread policy: Linux")
@pytest.mark.parametrize("policy", ["idle", "nice"])
def test_background_thread_yields_and_its_threads_inherit(policy: str) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    applied, parent, child = policy_of_thread_and_its_child(policy)
    want = (os.SCHED_IDLE, base) if policy == "idle" else (os.SCHED_OTHER, base + BACKGROUND_NICE)
    assert applied == policy and parent == want and child == want
    me = threading.get_native_id()  # the caller's own thread is left alone
    assert (os.sched_getscheduler(me), os.getpriority(os.PRIO_PROCESS, me)) == (
        os.SCHED_OTHER, base)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread policy: Linux")
def test_the_periodic_evaluator_is_background_work() -> None:
    import time

    from ncf_stream.evaluator import EvalConfig, Evaluator
    from ncf_stream.snapshot import SnapshotHolder

    evaluator = Evaluator(SnapshotHolder(), EvalConfig(interval_s=3600, background="idle"))
    evaluator.start()
    try:
        assert evaluator._thread is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tid = evaluator._thread.native_id
            if tid is not None and os.sched_getscheduler(tid) == os.SCHED_IDLE:
                break
            time.sleep(0.01)
        assert tid is not None and os.sched_getscheduler(tid) == os.SCHED_IDLE
    finally:
        evaluator.stop()


ROLES = """
import threading
from ncf_stream.threads import reader_thread, trainer_thread
import torch
counts, steps = {}, [threading.Event() for _ in range(3)]

def role(name, setup, ready, go_on):
    setup()
    ready.set()
    go_on.wait()  # all three set up: now each reads its own count
    counts[name] = torch.get_num_threads()

done = threading.Event()
a = threading.Thread(target=role, args=("reader_before", reader_thread, steps[0], done))
t = threading.Thread(target=role, args=("trainer", lambda: trainer_thread(3), steps[1], done))
b = threading.Thread(target=role, args=("reader_after", reader_thread, steps[2], done))
for thread, ready in ((a, steps[0]), (t, steps[1]), (b, steps[2])):
    thread.start()
    ready.wait()
done.set()
for thread in (a, t, b):
    thread.join()
print(counts["reader_before"], counts["trainer"], counts["reader_after"])
"""


def test_the_trainer_keeps_its_cores_whatever_readers_set_before_or_after() -> None:
    """torch gives a thread, on its first use, the count any thread set last: a reader
    started before the trainer once made it single-threaded (half speed)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", ROLES], capture_output=True, text=True,
                         check=True, timeout=120)
    assert run.stdout.split() == ["1", "3", "1"]
