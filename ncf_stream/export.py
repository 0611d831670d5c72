"""Snapshot export: the trainer writes published snapshots to a directory; replicas read them.

``snapshot_dir`` holds:

* ``snap-<seq>/``: one export, written as a checkpoint is (:mod:`ncf_stream.checkpoint`):
  under a temporary name, every file and the directory fsynced, then renamed into
  place. ``meta.json`` has the format, the snapshot's scalars, the model and index
  configs, the trainer's status at publish time and a SHA-256 per file;
  ``model.pt`` the frozen weights (tensors only, loaded with ``weights_only=True``)
  with the cached item halves and mean user, so a replica scores bit for bit as the
  trainer; ``arrays.npz`` the popular lists and unavailable items; ``index.npz``
  the index's vectors and linearisation point; ``store.npz`` the store view;
  ``users.npz`` / ``items.npz`` the id maps up to the snapshot's rows;
  ``quantizer.faiss`` an IVF index's trained centroids (the replica re-adds the
  vectors to them, which gives the trainer's index; retraining would not).
* ``LATEST``: the name of the newest complete export, replaced atomically (a
  temporary file, then ``os.replace``).

``<seq>`` counts exports in this directory, not snapshot versions: a restarted
trainer starts its versions over, and a replica loads whatever LATEST names. The
newest :data:`KEEP` exports stay; older ones are deleted only after LATEST moved
past them, and a replica reading one that vanishes meanwhile reads LATEST again.

The exporter (:class:`Exporter`) writes on a thread of its own: the snapshot is
immutable, so training never waits for an export. It holds one pending snapshot,
the newest: snapshots published while an export runs are skipped, never queued.
A failed export (disk full, permissions) is logged once per kind, counted, and
changes nothing else.

An IVF index is rebuilt every ``index_refresh_s``, not with each snapshot, and at
1M items its files are over 100 MB: rewriting and hashing them every second would
keep a core busy on the trainer and on every replica. So an export of the same
index object as the previous one hard-links that export's index files and copies
their checksums (:data:`INDEX_FILES`), and a replica skips checking a file that is
the very file (same inode) it checked before: exports are never written in place.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ncf_stream import checkpoint
from ncf_stream.api import Status
from ncf_stream.errors import NcfStreamError
from ncf_stream.ids import IdMap
from ncf_stream.metrics import EngineMetrics
from ncf_stream.model import NeuMF, NeuMFConfig
from ncf_stream.retrieval import CandidateIndex, IndexConfig
from ncf_stream.snapshot import Snapshot
from ncf_stream.store import StoreView
from ncf_stream.threads import BackgroundPolicy, background_thread, reader_thread

log = logging.getLogger(__name__)

# Bump on any change a replica of this version could not read; a replica refuses
# other formats with ExportFormatError (and keeps serving what it has).
EXPORT_FORMAT = 1
KEEP = 3  # exports kept: a replica still reading the one before the newest finds it
LATEST = "LATEST"
EXPORT_PREFIX = "snap"
EXPORT_FILES = ("model.pt", "arrays.npz", "index.npz", "store.npz", "users.npz", "items.npz")
QUANTIZER = "quantizer.faiss"  # IVF indexes only
INDEX_FILES = ("index.npz", QUANTIZER)  # what an export of an unchanged index links


class ExportError(NcfStreamError):
    """An export a replica cannot use."""


class CorruptExport(ExportError):
    """A file is missing, truncated or altered (it does not match its checksum)."""


class ExportFormatError(ExportError):
    """Written in a format this version cannot read."""


# ---- writing ---------------------------------------------------------------------------------

def write(directory: str | Path, snapshot: Snapshot, status: Status,
          same_index_as: Path | None = None) -> Path:
    """Export ``snapshot`` (with the trainer's ``status`` as of it), point LATEST at it and
    drop exports beyond :data:`KEEP`; returns its path. ``same_index_as``: an export
    written from this snapshot's very index object (the caller knows), whose index files
    are linked instead of written, when it still exists."""
    root = Path(directory)
    seq, tmp = checkpoint.begin(root, EXPORT_PREFIX)
    known = _link_index(same_index_as, tmp) if same_index_as is not None else {}
    files = _write_files(tmp, snapshot, skip=tuple(known))
    checkpoint.seal(tmp, files, {
        "format": EXPORT_FORMAT, "seq": seq, "version": snapshot.version,
        "published_at": snapshot.published_at, "events": snapshot.events,
        "index_version": snapshot.index_version,
        "popular_window_s": snapshot.popular_window_s,
        "model": dataclasses.asdict(snapshot.model.cfg),
        "index": dataclasses.asdict(snapshot.index.config), "status": status.as_dict(),
    }, known)
    final = root / f"{EXPORT_PREFIX}-{seq:08d}"
    os.rename(tmp, final)
    checkpoint.fsync(root)
    _point_latest(root, final.name)
    for old in sorted(root.glob(f"{EXPORT_PREFIX}-*"))[:-KEEP]:  # LATEST is past them now
        shutil.rmtree(old, ignore_errors=True)
    return final


def _link_index(source: Path, directory: Path) -> dict[str, str]:
    """Hard-link ``source``'s index files into ``directory``; their checksums, or {} when
    ``source`` is gone or cannot be linked from (the caller then writes them)."""
    try:
        digests = json.loads((source / "meta.json").read_text())["sha256"]
        names = [name for name in INDEX_FILES if name in digests]
        for name in names:
            os.link(source / name, directory / name)
    except (OSError, ValueError, KeyError, TypeError):
        for name in INDEX_FILES:  # a partial link is undone: all of it is written then
            (directory / name).unlink(missing_ok=True)
        return {}
    return {name: digests[name] for name in names}


def _write_files(directory: Path, snapshot: Snapshot,
                 skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The snapshot's files (see the module's docstring), but for ``skip`` (already
    linked in); returns the names of all of them."""
    model = snapshot.model
    weights = checkpoint.model_weights(model)
    if model.mean_user is not None:
        weights["mean_user"] = model.mean_user.cpu()
    if model.item_hidden is not None:
        weights["item_hidden"] = model.item_hidden.cpu()
    torch.save(weights, directory / "model.pt")
    np.savez(directory / "arrays.npz", popular=snapshot.popular,
             popularity=snapshot.popularity, unavailable=snapshot.unavailable,
             recent=snapshot.recent, recent_counts=snapshot.recent_counts)
    if "index.npz" not in skip:
        np.savez(directory / "index.npz", vectors=snapshot.index.vectors,
                 a_ref=snapshot.a_ref.cpu().numpy())
    snapshot.store.save(directory / "store.npz")
    snapshot.user_ids.save(directory / "users.npz", snapshot.n_users)
    snapshot.item_ids.save(directory / "items.npz", snapshot.n_items)
    quantizer = getattr(snapshot.index, "quantizer", None)
    if quantizer is None:
        return EXPORT_FILES
    if QUANTIZER not in skip:
        (directory / QUANTIZER).write_bytes(faiss.serialize_index(quantizer).tobytes())
    return (*EXPORT_FILES, QUANTIZER)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    checkpoint.fsync(tmp)
    os.replace(tmp, root / LATEST)
    checkpoint.fsync(root)


# ---- reading ---------------------------------------------------------------------------------

def latest(directory: str | Path) -> str | None:
    """The name LATEST points at; None while there is none."""
    try:
        return (Path(directory) / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`read` returns."""

    snapshot: Snapshot
    status: Status  # the trainer's, as of the snapshot
    index_key: str  # the checksums of the index's files: equal keys, equal indexes
    # The index files checked, by (device, inode, size, mtime): a link to one of them is
    # that file (the size and time guard against an inode number freed and reused).
    checked: frozenset[tuple[int, int, int, int]] = frozenset()


def read(path: str | Path, device: torch.device, previous: Loaded | None = None) -> Loaded:
    """An export as a :class:`Snapshot` on ``device``, and the trainer's status as of it.

    ``previous``: the export loaded before; its index is reused when this one's index
    files are the same (an IVF index is refreshed every ``index_refresh_s``, not with
    every snapshot, and re-adding a million vectors to it costs seconds).

    Raises :class:`ExportFormatError` for a format this version cannot read,
    :class:`CorruptExport` when a file does not match its checksum (or meta.json is
    unreadable), and FileNotFoundError when the export was deleted meanwhile."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        fmt = meta["format"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptExport(f"{path.name}: meta.json is unreadable ({e})") from None
    if fmt != EXPORT_FORMAT:
        raise ExportFormatError(f"{path.name} is export format {fmt}; this version reads "
                                f"format {EXPORT_FORMAT}: run the same ncf-stream version as the "
                                "trainer")
    if not isinstance(meta.get("sha256"), dict):
        raise CorruptExport(f"{path.name}: meta.json has no checksums")
    files = (*EXPORT_FILES, *([QUANTIZER] if QUANTIZER in meta["sha256"] else []))
    inodes = {name: _inode(path / name) for name in INDEX_FILES if name in files}
    seen = previous.checked if previous is not None else frozenset()
    try:
        checkpoint.check_files(path, meta, [f for f in files if inodes.get(f) not in seen])
    except checkpoint.CheckpointError as e:
        raise CorruptExport(f"{path.name}: {e}") from None
    key = json.dumps([meta["sha256"]["index.npz"], meta["sha256"].get(QUANTIZER),
                      meta["index"]])
    index = previous.snapshot.index if previous and previous.index_key == key else None
    return Loaded(_snapshot(path, meta, device, index), _status(meta["status"]), key,
                  frozenset(inodes.values()))


def _inode(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot(path: Path, meta: dict[str, Any], device: torch.device,
              index: CandidateIndex | None) -> Snapshot:
    model = _model(path, meta["model"], device)
    with np.load(path / "arrays.npz", allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    with np.load(path / "index.npz", allow_pickle=False) as z:  # members load lazily
        a_ref = z["a_ref"]
        if index is None:
            index = _index(path, meta, z["vectors"])
    return Snapshot(
        version=meta["version"], published_at=meta["published_at"], events=meta["events"],
        model=model, index=index, index_version=meta["index_version"],
        a_ref=torch.from_numpy(a_ref).to(device),
        store=StoreView.load(path / "store.npz"), user_ids=IdMap.load(path / "users.npz"),
        item_ids=IdMap.load(path / "items.npz"), popular=arrays["popular"],
        popularity=arrays["popularity"], unavailable=arrays["unavailable"],
        recent=arrays["recent"], recent_counts=arrays["recent_counts"],
        popular_window_s=meta["popular_window_s"])


def _index(path: Path, meta: dict[str, Any], vectors: np.ndarray) -> CandidateIndex:
    quantizer = (faiss.deserialize_index(np.frombuffer((path / QUANTIZER).read_bytes(),
                                                       dtype=np.uint8))
                 if QUANTIZER in meta["sha256"] else None)
    return CandidateIndex(vectors, index_config(meta["index"]), quantizer)


_WARNED: set[tuple[str, ...]] = set()  # unknown index keys already logged


def index_config(exported: dict[str, Any]) -> IndexConfig:
    """The export's index config, keys this version does not know left out: they are
    serving hints a replica resolves on its own machine (a backend, a probe count), so
    a replica one version behind its trainer serves on instead of refusing every export
    (a rolling upgrade that starts with the trainer). What changes answers, the model's
    config and the export format, is checked strictly."""
    known = {f.name for f in dataclasses.fields(IndexConfig)}
    unknown = sorted(set(exported) - known)
    if unknown and tuple(unknown) not in _WARNED:  # once, not at every export
        _WARNED.add(tuple(unknown))
        log.warning("the export's index config has settings this version does not know "
                    "(%s): left out; upgrade the replica to use them", ", ".join(unknown))
    return IndexConfig(**{k: v for k, v in exported.items() if k in known})


def _model(path: Path, config: dict[str, Any], device: torch.device) -> NeuMF:
    """The frozen model: the live rows into a fresh model, frozen as the trainer froze it,
    with the trainer's cached parts (recomputing them could differ in the last bits)."""
    cfg = NeuMFConfig(**(config | {"mlp_layers": tuple(config["mlp_layers"])}))
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):  # NeuMF seeds torch's global generator
        live = NeuMF(cfg, device)
    checkpoint.load_weights(live, weights)
    hidden = weights.get("item_hidden")
    model = live.frozen_copy(item_hidden=False)
    model.item_hidden = None if hidden is None else hidden.to(device)
    if "mean_user" in weights:
        model.mean_user = weights["mean_user"].to(device)
    return model


def _status(fields: dict[str, Any]) -> Status:
    known = {f.name for f in dataclasses.fields(Status)} - {"ranks"}  # a replica's own
    return Status(**{k: v for k, v in fields.items() if k in known})


# ---- the exporter ------------------------------------------------------------------------------

Writer = Callable[[str | Path, Snapshot, Status, Path | None], Path]


class Exporter:
    """Exports the newest offered snapshot at most every ``every_s``, on its own thread."""

    def __init__(self, directory: str | Path, every_s: float, metrics: EngineMetrics,
                 background: BackgroundPolicy = "idle", writer: Writer = write) -> None:
        self.directory, self.every_s, self.metrics = Path(directory), every_s, metrics
        self.writer = writer
        self.background = background
        self.last: Path | None = None  # the newest export written
        self._index_in: tuple[CandidateIndex, Path] | None = None  # an index and its export
        self._pending: tuple[Snapshot, Status] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._logged: set[str] = set()  # failure kinds logged already
        self._thread = threading.Thread(target=self._run, name="ncf-export", daemon=True)
        self._thread.start()

    def offer(self, snapshot: Snapshot, status: Status) -> None:
        """Export this snapshot when due, unless a newer one is offered first. Never waits."""
        with self._cond:
            self._pending = (snapshot, status)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop; an export in progress is finished (within ``timeout``), a pending one dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Serving comes first: the export yields the CPU as training does, and its torch
        # work (copies to the CPU) stays single-threaded.
        background_thread(self.background)
        reader_thread()
        last = -float("inf")
        while (job := self._next(last)) is not None:
            last = time.monotonic()
            self._export(*job)

    def _next(self, last: float) -> tuple[Snapshot, Status] | None:
        """The pending snapshot once an export is due; None once closed."""
        with self._cond:
            while not self._closed:
                wait = last + self.every_s - time.monotonic()
                if self._pending is not None and wait <= 0:
                    job, self._pending = self._pending, None
                    return job
                self._cond.wait(wait if self._pending is not None else None)
        return None

    def _export(self, snapshot: Snapshot, status: Status) -> None:
        start = time.perf_counter()
        same = self._index_in[1] if self._index_in and self._index_in[0] is snapshot.index \
            else None
        try:
            self.last = self.writer(self.directory, snapshot, status, same)
            self._index_in = (snapshot.index, self.last)
        except Exception as e:  # an export must never stop training or serving
            self._failed(e)
            return
        self.metrics.exports.inc()
        self.metrics.export_seconds.observe(time.perf_counter() - start)

    def _failed(self, e: Exception) -> None:
        code = getattr(e, "errno", None)
        reason = errno.errorcode.get(code, type(e).__name__) if isinstance(code, int) else (
            type(e).__name__)
        self.metrics.export_failures.labels(reason=reason).inc()
        if reason not in self._logged:  # a full disk fails every second: once is enough
            self._logged.add(reason)
            log.error("snapshot export to %s failed (%s: %s); training and serving go on, "
                      "replicas keep the last export (logged once per kind; "
                      "ncf_stream_snapshot_export_failures_total counts them)",
                      self.directory, reason, e)
