"""Test-only crash points: where a kill -9 must lose nothing, named so tests can aim at them.

``NCF_TEST_KILL_AT=name:n`` makes the process SIGKILL itself the n-th time it
reaches :func:`crash_point` with that name (``name`` alone: the first time).
Read once at import; unset (always, outside tests) a crash point is one
comparison. The names are :data:`POINTS`.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "NCF_TEST_KILL_AT"
POINTS = (
    "ingest",  # a batch applied to the store, its offsets not yet in the state's positions
    "checkpoint-written",  # a checkpoint written and fsynced, not yet renamed into place
    "checkpoint-renamed",  # a checkpoint in place, its offsets not yet committed
    "publish",  # a snapshot copied, not yet swapped in
)


def _target() -> tuple[str, int] | None:
    value = os.environ.get(KILL_AT_ENV)
    if not value:
        return None
    name, _, n = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"{KILL_AT_ENV}={value!r}: the points are {', '.join(POINTS)}")
    return name, int(n or 1)


_TARGET = _target()
_hits = 0


def crash_point(name: str) -> None:
    global _hits
    if _TARGET is None or _TARGET[0] != name:
        return
    _hits += 1
    if _hits == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
