"""The k best of scored items, shared by every ranking the recommender serves."""

from __future__ import annotations

import numpy as np


def best(items: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable of ``items`` (sorted rows), ties broken by row: a partition
    finds the k-th probability, and only what reaches it is sorted."""
    if len(items) > k:
        kth = np.partition(probs, len(probs) - k)[len(probs) - k]
        keep = probs >= kth  # NaN compares False: never kept ahead of a number
        if keep.sum() >= k:
            items, probs = items[keep], probs[keep]
    order = np.argsort(-probs, kind="stable")[:k]
    return items[order], probs[order]
