"""Trainer throughput: samples/s of the online trainer vs SparseAdam and a dense offline loop.

    python bench/train.py [--quick] [--device cpu|cuda] [--seconds S]

Same model (NeuMF, factors 32, MLP 64-32-16), same batch (8192 samples = 1638
positives + 4 negatives each), one run:

* ``trainer``: ``Trainer.step`` in replay mode: replay sampling from the
  store, negative sampling against it, RowAdagrad on touched rows. The whole
  online step, not just the optimizer.
* ``train_batch``: the trainer's optimization step alone on pre-drawn batches.
* ``sparseadam``: NeuMF as commonly written (four ``nn.Embedding(sparse=True)``
  tables, concatenations) + ``torch.optim.SparseAdam`` (Adam on the dense
  layers), pre-drawn batches: the baseline the issue measured.
* ``sparseadam_fused_tables``: this project's model layout (one table per side)
  with SparseAdam, to separate the optimizer's share of the speedup.
* ``dense_adam``: ``nn.Embedding`` + ``torch.optim.Adam`` over everything, the
  plain offline loop.
* ``device_step``: ``Trainer.step`` with the device-resident step on
  (:mod:`ncf_stream.device_step`: replay, negatives against the live mirror of
  the store, the fresh queue and the update on the trainer's device), at each
  of ``--batches``: launch overhead caps small batches on a GPU, so its rate is
  a curve (what a larger batch costs in quality: bench/batch_curve.py); then
  the fastest of them under ``torch.autocast`` in bfloat16 (AMP).

``train_samples_per_s`` is the best online trainer step measured (the host
step at 8192, or the device step at its best batch). The data: a synthetic
stream with Zipf items (``--users``, ``--items``, ``--events``; the issue's GPU
target is stated for 1M x 200k x 100M). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.model import NeuMFConfig, Tower
from ncf_stream.synth import SynthConfig, SynthStream, generate
from ncf_stream.trainer import Trainer, TrainerConfig

BATCH = 8192


class EmbeddingNeuMF(nn.Module):
    """The same NeuMF with nn.Embedding tables, for the torch-optimizer baselines."""

    def __init__(self, cfg: NeuMFConfig, n_users: int, n_items: int, sparse: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.users = nn.Embedding(n_users, cfg.row_dim, sparse=sparse)
        self.items = nn.Embedding(n_items, cfg.row_dim, sparse=sparse)
        for e in (self.users, self.items):
            nn.init.normal_(e.weight, std=cfg.init_std)
        self.tower = Tower(cfg)

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        f, m = self.cfg.factors, self.cfg.mlp_dim
        pu_g, pu_m = torch.split(self.users(u), [f, m], dim=1)
        qi_g, qi_m = torch.split(self.items(i), [f, m], dim=1)
        return self.tower(pu_g * qi_g, pu_m, qi_m)


class TextbookNeuMF(nn.Module):
    """NeuMF as commonly written (e.g. guoyang9/NCF): four embedding tables and
    concatenations. The SparseAdam figure the issue quotes comes from this shape."""

    def __init__(self, cfg: NeuMFConfig, n_users: int, n_items: int) -> None:
        super().__init__()
        self.user_gmf = nn.Embedding(n_users, cfg.factors, sparse=True)
        self.item_gmf = nn.Embedding(n_items, cfg.factors, sparse=True)
        self.user_mlp = nn.Embedding(n_users, cfg.mlp_dim, sparse=True)
        self.item_mlp = nn.Embedding(n_items, cfg.mlp_dim, sparse=True)
        for e in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(e.weight, std=cfg.init_std)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(cfg.mlp_layers, cfg.mlp_layers[1:], strict=False):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.predict = nn.Linear(cfg.factors + cfg.mlp_layers[-1], 1)

    def embeddings(self) -> list[torch.Tensor]:
        return [e.weight for e in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp)]

    def dense(self) -> list[torch.Tensor]:
        return [*self.mlp.parameters(), *self.predict.parameters()]

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        gmf = self.user_gmf(u) * self.item_gmf(i)
        mlp = self.mlp(torch.cat([self.user_mlp(u), self.item_mlp(i)], dim=1))
        return self.predict(torch.cat([gmf, mlp], dim=1)).squeeze(1)


def filled(trainer: Trainer, stream: SynthStream) -> Trainer:
    """``trainer`` with the whole stream ingested, in large appends."""
    events = stream.to_events()
    for lo in range(0, len(events), 1 << 20):
        trainer.ingest(events.take(np.arange(lo, min(lo + (1 << 20), len(events)))))
    return trainer


def online_of(trainer: Trainer) -> int:
    stats = trainer.step()
    return 0 if stats is None else stats.samples


def timed(step: Callable[[], int], seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        samples += step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def batches(n_users: int, n_items: int, count: int, device: torch.device) -> list[tuple]:
    rng = np.random.default_rng(0)
    out = []
    pos = BATCH // 5
    for _ in range(count):
        u = rng.integers(0, n_users, pos)
        users = np.concatenate([u, np.repeat(u, 4)])
        items = rng.integers(0, n_items, len(users))
        labels = np.zeros(len(users), np.float32)
        labels[:pos] = 1
        out.append(tuple(torch.from_numpy(a).to(device) for a in (users, items, labels)))
    return out


def torch_loop(model: nn.Module, opts: list[torch.optim.Optimizer],
               data: list[tuple]) -> Callable[[], int]:
    it = iter(range(10**12))

    def step() -> int:
        u, i, y = data[next(it) % len(data)]
        loss = F.binary_cross_entropy_with_logits(model(u, i), y, reduction="sum")
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        return len(u)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--events", type=int, help="default 5M, --quick 1M")
    parser.add_argument("--batches",
                        help="device-step batch sizes (default 8192; on CUDA "
                             "8192,65536,262144,1048576)")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    device = torch.device(args.device)
    torch.manual_seed(0)

    events = args.events or (1_000_000 if args.quick else 5_000_000)
    stream = generate(SynthConfig(users=args.users, items=args.items, events=events, seed=0))
    trainer = filled(Trainer(TrainerConfig(batch_size=BATCH), device=device), stream)
    n_users, n_items = len(trainer.user_ids), len(trainer.item_ids)
    print(f"{len(trainer.store):,} interactions, {n_users:,} users, {n_items:,} items on "
          f"{device}", file=sys.stderr)

    data = batches(n_users, n_items, 64, device)
    it = iter(range(10**12))

    def batch_only() -> int:
        u, i, y = data[next(it) % len(data)]
        trainer.train_batch(u.cpu().numpy(), i.cpu().numpy(), y.cpu().numpy())
        return len(u)

    textbook = TextbookNeuMF(trainer.cfg.model, n_users, n_items).to(device)
    textbook_opts: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam(textbook.embeddings(), lr=1e-3),
        torch.optim.Adam(textbook.dense(), lr=1e-3)]
    sparse = EmbeddingNeuMF(trainer.cfg.model, n_users, n_items, sparse=True).to(device)
    sparse_opts: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam([sparse.users.weight, sparse.items.weight], lr=1e-3),
        torch.optim.Adam(sparse.tower.parameters(), lr=1e-3)]
    dense = EmbeddingNeuMF(trainer.cfg.model, n_users, n_items, sparse=False).to(device)
    dense_opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense.parameters(), lr=1e-3)]

    rates = {
        "samples_per_s": timed(lambda: online_of(trainer), seconds),
        "train_batch_samples_per_s": timed(batch_only, seconds),
        "sparseadam_samples_per_s": timed(torch_loop(textbook, textbook_opts, data), seconds),
        "sparseadam_fused_tables_samples_per_s": timed(torch_loop(sparse, sparse_opts, data),
                                                       seconds),
        "dense_adam_samples_per_s": timed(torch_loop(dense, dense_opts, data), seconds),
    }
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f}", file=sys.stderr)
    del textbook, sparse, dense, textbook_opts, sparse_opts, dense_opts  # free their memory

    sizes = ([int(b) for b in args.batches.split(",")] if args.batches
             else [BATCH, 65536, 262144, 1048576] if device.type == "cuda" else [BATCH])
    device_trainer = filled(Trainer(TrainerConfig(batch_size=BATCH, device_step="on"),
                                    device=device), stream)
    curve: dict[str, float] = {}
    for size in sizes:
        # One mirror for every size: the batch is read from the config at each step.
        device_trainer.cfg = dataclasses.replace(device_trainer.cfg, batch_size=size)
        curve[str(size)] = timed(lambda: online_of(device_trainer), seconds)
        print(f"device step, batch {size}: {curve[str(size)]:,.0f}", file=sys.stderr)
    best = max(curve, key=lambda k: curve[k])
    device_trainer.cfg = dataclasses.replace(device_trainer.cfg, batch_size=int(best))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        amp = timed(lambda: online_of(device_trainer), seconds)
    print(f"device step, batch {best}, bf16 autocast: {amp:,.0f}", file=sys.stderr)
    short, _ = device_trainer.negative_shortfall()
    k = device_trainer.cfg.negatives
    shortfall = round(short / max(1, device_trainer.samples_trained * k // (1 + k)), 6)
    print(json.dumps({
        "device": str(device), "batch": BATCH, "users": n_users, "items": n_items,
        **{k: round(v) for k, v in rates.items()},
        "device_step_samples_per_s": {k: round(v) for k, v in curve.items()},
        "device_step_best_batch": int(best),
        "amp_samples_per_s": round(amp),
        "device_step_negative_shortfall": shortfall,
        "train_samples_per_s": round(max(rates["samples_per_s"], curve[best])),
        "speedup_vs_sparseadam": round(rates["samples_per_s"] / rates["sparseadam_samples_per_s"],
                                       2),
        "speedup_vs_sparseadam_fused_tables": round(
            rates["samples_per_s"] / rates["sparseadam_fused_tables_samples_per_s"], 2),
    }))


if __name__ == "__main__":
    main()
