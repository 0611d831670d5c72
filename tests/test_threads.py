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
