"""One trainer of a group (or the single reference), run as a process by tests/test_group.py.

``python tests/group_worker.py SPEC.json``: SPEC names the events (a .npz of the
columns), the settings, and where to write what the test compares (a JSON dump
of the store by external ids, the item ids, digests of the shared tensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

from ncf_stream.engine import Engine, Resume
from ncf_stream.events import Availability, Deletions, Events
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource
from ncf_stream.store import split_keys

TOPIC = "memory"


def load_events(path: str) -> Events:
    with np.load(path, allow_pickle=False) as z:
        n = len(z["ts"])
        users, items, types = (np.empty(n, dtype=object) for _ in range(3))
        users[:], items[:] = z["users"].tolist(), z["items"].tolist()
        types[:] = ["click"] * n
        return Events(users, items, z["ts"].astype(np.float64), np.ones(n), types)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def dump(engine: Engine) -> dict:
    t = engine.trainer
    store = t.store
    keys, vals = store._pairs.arrays()
    users, items = split_keys(keys)
    t0 = store._t0 or 0.0
    uid, iid = t.user_ids.ids(users).tolist(), t.item_ids.ids(items).tolist()
    pairs = sorted([u, i, float(v) + t0] for u, i, v in zip(uid, iid, vals.tolist(), strict=True))
    ho = store.holdout()
    holdouts = sorted([u, i] for u, i in zip(t.user_ids.ids(ho.users).tolist(),
                                              t.item_ids.ids(ho.items).tolist(), strict=True))
    m = t.model
    n = m.n_items
    return {
        "pairs": pairs, "holdouts": holdouts, "item_ids": t.item_ids.all_ids().tolist(),
        "items": digest(m.items.weight[:n]),
        "context": None if m.context is None else digest(m.context.weight[:n]),
        "tower": digest(parameters_to_vector(m.tower.parameters())),
        "epoch": None if engine.group is None else engine.group.epoch,
        "samples": t.samples_trained, "consumed": engine.counters.consumed,
        "unavailable": engine.catalogue.availability.ids(),
        "exchange_bytes": engine.metrics.engine.group_exchange_bytes._value.get(),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    events = load_events(spec["events"])
    settings = Settings(**spec["settings"])

    # Items made unavailable at the end of this trainer's stream (every trainer must
    # serve them so): records after the events, so a resumed run never replays them.
    unavailable = spec.get("unavailable", [])
    deleted = spec.get("delete_items", [])  # deleted at the end too, after the above
    total = len(events) + len(unavailable) + len(deleted)

    def source(resume: Resume) -> MemorySource:
        start = resume.positions.get((TOPIC, 0), 0)
        memory = MemorySource(events.take(np.arange(start, len(events))),
                              batch_size=spec.get("poll", 200), topic=TOPIC, offset=start)
        if unavailable and start <= len(events):
            memory.push(Availability.from_rows([(i, False) for i in unavailable]))
        if deleted and start <= len(events):
            memory.push(Deletions.from_rows([("item", i, 0) for i in deleted]))
        return memory

    engine = Engine(settings, source)

    def done() -> bool:
        return engine.positions.get((TOPIC, 0), 0) >= total and not engine.trainer.pending

    engine.run(until=done)
    engine.close()
    Path(spec["out"]).write_text(json.dumps(dump(engine)))


if __name__ == "__main__":
    main()
