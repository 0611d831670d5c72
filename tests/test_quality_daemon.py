"""bench/quality_daemon.py's ranks from served answers: ties count against the hold-out,
and a missing, null or non-finite score is never a hit."""

import sys
from pathlib import Path

from conftest import bench_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # it imports load
qd = bench_module("quality_daemon")
MISS = 1000


def test_listed_rank_counts_ties_against_the_holdout():
    items = ["a", "h", "b", "c"]
    assert qd.listed_rank(items, [0.9, 0.8, 0.7, 0.6], "h", MISS) == 1
    assert qd.listed_rank(items, [0.9, 0.8, 0.8, 0.6], "h", MISS) == 2  # a tie listed after
    assert qd.listed_rank(items, [0.9, 0.8, None, float("nan")], "h", MISS) == 1


def test_listed_rank_misses():
    assert qd.listed_rank(["a", "b"], [0.9, 0.8], "h", MISS) == MISS  # not listed
    assert qd.listed_rank(["h", "b"], [None, 0.8], "h", MISS) == MISS
    assert qd.listed_rank(["h", "b"], [float("nan"), 0.8], "h", MISS) == MISS


def test_scored_rank():
    assert qd.scored_rank([0.5, 0.1, 0.2], MISS) == 0
    assert qd.scored_rank([0.5, 0.5, 0.9, None], MISS) == 2  # the tie and the higher one
    assert qd.scored_rank([None, 0.1], MISS) == MISS
    assert qd.scored_rank([float("inf"), 0.1], MISS) == MISS
