"""A group of trainers over torch.distributed (gloo on loopback), engine level: each
trainer a process over its partitions' events, against one trainer over all of them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ncf_stream.errors import ConfigError
from ncf_stream.events import Events
from ncf_stream.group import Group, read_manifest
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer

WORKER = Path(__file__).with_name("group_worker.py")
ROOT = WORKER.parent.parent  # the checkout under test, whatever the environment installed
PARTITIONS = 4
MODEL = dict(device="cpu", factors=8, mlp_layers=[16, 8], batch_size=256, history_length=5,
             eval_interval_s=3600.0, publish_every_s=0.2)
TIMEOUT_S = 120


def stream(n: int = 4000) -> Events:
    return generate(SynthConfig(users=150, items=120, events=n, seed=4, topics=4)).to_events()


def partition(user: str) -> int:
    # Any fixed keying will do: the group routes by what its trainers observe.
    return zlib.crc32(user.encode()) % PARTITIONS


def save_events(path: Path, events: Events) -> str:
    np.savez(path, users=np.array(events.users.tolist(), dtype=str),
             items=np.array(events.items.tolist(), dtype=str), ts=events.ts)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(tmp: Path, name: str, events: Events, settings: dict[str, Any],
          env: dict[str, str] | None = None, unavailable: list[str] | None = None,
          delete_items: list[str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{name}.json"
    spec = {"events": save_events(tmp / f"{name}.npz", events), "settings": settings,
            "out": str(out), "poll": 100, "unavailable": unavailable or [],
            "delete_items": delete_items or []}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path)],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stderr=subprocess.PIPE)
    return proc, out


def finish(proc: subprocess.Popen[bytes]) -> str:
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return err.decode(errors="replace")


def run_group(tmp: Path, shards: list[Events], extra: dict[str, Any],
              envs: list[dict[str, str]] | None = None,
              unavailable: list[list[str]] | None = None,
              delete_items: list[list[str]] | None = None) -> list[tuple[int, str, Path]]:
    address = f"127.0.0.1:{free_port()}"
    procs = [start(tmp, f"rank{r}", shard, {**MODEL, **extra, "group_size": len(shards),
                                            "group_rank": r, "group_address": address},
                   (envs or [{}] * len(shards))[r], (unavailable or [[]] * len(shards))[r],
                   (delete_items or [[]] * len(shards))[r])
             for r, shard in enumerate(shards)]
    errs = [finish(p) for p, _ in procs]
    return [(p.returncode, err, out) for (p, out), err in zip(procs, errs, strict=True)]


def shards(events: Events, size: int) -> list[Events]:
    owner = np.array([partition(u) % size for u in events.users.tolist()])
    return [events.take(np.flatnonzero(owner == r)) for r in range(size)]


def reference(tmp: Path, events: Events) -> dict[str, Any]:
    proc, out = start(tmp, "single", events, {**MODEL, "checkpoint_dir": None})
    err = finish(proc)
    assert proc.returncode == 0, err
    return json.loads(out.read_text())


def union(dumps: list[dict[str, Any]], key: str) -> list[Any]:
    return sorted(x for d in dumps for x in d[key])


def check_against_reference(ref: dict[str, Any], dumps: list[dict[str, Any]]) -> None:
    assert union(dumps, "pairs") == ref["pairs"]
    assert union(dumps, "holdouts") == ref["holdouts"]
    # Item rows: one assignment for the whole group, the same on every trainer ...
    assert all(d["item_ids"] == dumps[0]["item_ids"] for d in dumps)
    assert sorted(i for i in dumps[0]["item_ids"] if i) == sorted(i for i in ref["item_ids"] if i)
    # ... and the shared tensors identical after the group's last exchange.
    for key in ("items", "context", "tower"):
        assert len({d[key] for d in dumps}) == 1, key
    assert len({d["epoch"] for d in dumps}) == 1


def test_two_trainers_hold_what_one_holds_and_share_identical_items(tmp_path: Path) -> None:
    events = stream()
    ref = reference(tmp_path, events)
    parts = shards(events, 2)
    assert min(map(len, parts)) > 1000  # both trainers have real work
    # An item made unavailable through one trainer's partitions is unavailable on both;
    # one deleted through the other's, at the very end, is deleted on both (the stop's
    # checkpoint covers the delete event's offset, so the deletion must be in it).
    doomed = events.items[2]
    results = run_group(tmp_path, parts, {"checkpoint_dir": str(tmp_path / "ckpt"),
                                          "group_sync_every_s": 0.05},
                        unavailable=[[], [events.items[0], events.items[1]]],
                        delete_items=[[doomed], []])
    for code, err, _ in results:
        assert code == 0, err
    dumps = [json.loads(out.read_text()) for _, _, out in results]
    assert all(doomed not in d["item_ids"] for d in dumps)
    assert all(i != doomed for d in dumps for _, i, _ in d["pairs"])
    ref["pairs"] = [p for p in ref["pairs"] if p[1] != doomed]
    ref["holdouts"] = [h for h in ref["holdouts"] if h[1] != doomed]
    ref["item_ids"] = [i for i in ref["item_ids"] if i != doomed]
    check_against_reference(ref, dumps)
    assert all(d["exchange_bytes"] > 0 and d["samples"] > 0 for d in dumps)
    assert all(d["unavailable"] == sorted({events.items[0], events.items[1]}) for d in dumps)
    # The stop was an aligned checkpoint: the manifest names the final epoch.
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest is not None and manifest == {**manifest, "epoch": dumps[0]["epoch"],
                                                 "size": 2}


def test_after_a_kill_9_the_group_resumes_from_its_aligned_checkpoint_exactly_once(
        tmp_path: Path) -> None:
    events = stream()
    ref = reference(tmp_path, events)
    parts = shards(events, 2)
    ckpt = tmp_path / "ckpt"
    # An exchange every turn of the loop and a checkpoint at each (a poll of 100 events
    # per turn: 20 turns or more per trainer), so the kill below comes whatever the speed.
    settings = {"checkpoint_dir": str(ckpt), "group_sync_every_s": 0.001,
                "checkpoint_every_s": 0.001, "group_timeout_s": 30.0}
    # Rank 1 dies right after its second checkpoint is in place, before the group records
    # that epoch: the group must resume from the first, past rank 1's newer one.
    crashed = run_group(tmp_path, parts, settings,
                        envs=[{}, {"NCF_TEST_KILL_AT": "checkpoint-renamed:2"}])
    assert crashed[1][0] == -signal.SIGKILL, crashed[1][1]
    assert crashed[0][0] != 0 and "GroupError" in crashed[0][1], crashed[0][1]
    manifest = read_manifest(ckpt)
    assert manifest is not None and manifest["size"] == 2
    epochs = [json.loads(p.read_text()).get("group", {}).get("epoch")
              for p in sorted((ckpt / "rank-1").glob("ckpt-*/meta.json"))]
    assert max(epochs) > manifest["epoch"]  # a newer checkpoint than the aligned one exists

    results = run_group(tmp_path, parts, settings)
    for code, err, _ in results:
        assert code == 0, err
    for _, err, _ in results:  # each from its checkpoint of the aligned epoch
        assert f"at epoch {manifest['epoch']}" in err and "restored ckpt-" in err, err
    dumps = [json.loads(out.read_text()) for _, _, out in results]
    check_against_reference(ref, dumps)


def test_a_group_refuses_a_rank_outside_it() -> None:
    settings = Settings(device="cpu", group_size=2, group_rank=2)
    with pytest.raises(ConfigError, match="group_rank 2"):
        Group(settings, Trainer())


def test_the_scale_bench_compares_one_trainer_with_two_on_the_same_state() -> None:
    """bench/scale.py --quick end to end: its JSON line, and the group's stores and shared
    tensors found equal to the single trainer's."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=TIMEOUT_S, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["state_equal"] is True
    one, two = report["workers"]
    assert (one["n"], two["n"]) == (1, 2) and one["users"] == two["users"] > 1000
    assert abs(one["samples"] - two["samples"]) < 0.01 * one["samples"]  # equal budgets
    assert one["sync_share"] == 0 < two["sync_share"] < 1 and two["bytes_per_step"] > 0
    lo, hi = two["hr10_diff"][1:]
    assert lo <= two["hr10_diff"][0] <= hi


def test_a_group_refuses_a_single_trainers_checkpoints_rather_than_dropping_them(
        tmp_path: Path) -> None:
    from ncf_stream.engine import Engine
    from ncf_stream.source import MemorySource

    (tmp_path / "ckpt-00000001").mkdir()  # what one `ncf-stream serve` leaves
    settings = Settings(**MODEL, checkpoint_dir=str(tmp_path), group_size=2, group_rank=0)
    with pytest.raises(ConfigError, match="single trainer's checkpoints"):
        Engine(settings, MemorySource())
