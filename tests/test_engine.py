"""The engine loop on an in-memory source: what it publishes, when it rests, what it commits."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import running  # tests/conftest.py

from ncf_stream import engine as engine_module
from ncf_stream.engine import Engine, Resume, TrainedWatermark
from ncf_stream.events import Events
from ncf_stream.settings import Settings
from ncf_stream.source import EventBatch, MemorySource, Partition, SourceError
from ncf_stream.synth import SynthConfig, generate

SMALL = dict(device="cpu", factors=8, mlp_layers=[16, 8], batch_size=512, checkpoint_dir=None,
             eval_interval_s=3600.0)


def stream(n: int = 3000, seed: int = 0) -> Events:
    return generate(SynthConfig(users=120, items=90, events=n, seed=seed, topics=4)).to_events()


def test_trained_watermark_follows_the_oldest_untrained_batch() -> None:
    w = TrainedWatermark(consumed=10)  # restored: 10 consumed before
    w.ingested(queued=5, consumed=20)
    w.ingested(queued=0, consumed=25)  # only hold-outs moved: nothing to train
    w.ingested(queued=3, consumed=30)
    assert w.trained(pending=8) == 10
    assert w.trained(pending=4) == 10  # the first batch is not done yet
    assert w.trained(pending=3) == 25  # first batch done; the second had nothing
    assert w.trained(pending=0) == 30


def test_a_snapshot_counts_only_events_whose_positives_are_trained(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race behind a flaky outage test: a publish that is overdue while fresh
    positives still wait must not claim their events; else the next publish (once
    they are trained) changes the model after snapshot_events said it was complete.
    Slow steps are the injected barrier, and a drain cut to one step per slice (as a
    backlog past FRESH_SLICE_MAX_STEPS is): the first publish happens mid-training."""
    monkeypatch.setattr(engine_module, "FRESH_SLICE_MAX_STEPS", 1)
    events = stream(4000)
    s = Settings(**SMALL, replay=False, publish_every_s=0.01)
    engine = Engine(s, MemorySource(events, batch_size=len(events)))
    step = engine.trainer.step

    def slow_step():  # one step per slice: every slice ends with positives pending
        time.sleep(0.06)
        return step()

    engine.trainer.step = slow_step  # type: ignore[method-assign]
    published: list[tuple[int, int, int]] = []  # (version, events, pending)
    engine.on_publish.append(lambda v: published.append(
        (v, engine.holder.get().events, engine.trainer.pending)))  # type: ignore[union-attr]
    engine.run(until=lambda: engine.trainer.pending == 0 and engine.counters.consumed > 0
               and engine.status().snapshot_events == len(events))
    assert published[0][2] > 0  # the barrier worked: a snapshot while positives waited
    assert all(ev < len(events) for _, ev, pending in published if pending)
    settled = engine.status().model_version
    for _ in range(20):  # idle turns with replay off: nothing left to publish
        engine.cycle()
    assert engine.status().model_version == settled


def test_idle_engine_rests_in_poll_and_wakes_when_events_arrive() -> None:
    """While idle the engine waits inside the source's poll (here a long rest: replay
    takes 1% of the time), and a push wakes it at once, not after the rest."""
    s = Settings(**SMALL, replay_duty=0.01, kafka_poll_timeout_s=30.0)
    source = MemorySource(stream(2000), batch_size=500)
    engine = Engine(s, source)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while engine.counters.consumed < 2000 or engine.trainer.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # into the idle rest: one slice of replay, then ~5 s asleep
        steps = engine.trainer.steps
        time.sleep(0.5)
        assert engine.trainer.steps - steps <= 2 * (1 + 1)  # resting, not replaying
        pushed = time.monotonic()
        source.push(stream(200, seed=1))
        while engine.counters.consumed < 2200:
            assert time.monotonic() - pushed < 2.0, "the push did not wake the engine"
            time.sleep(0.005)
    finally:
        stop.set()
        source.push(stream(0))  # wake it for the stop
        thread.join(10)


def test_memory_source_batches_lag_and_wakes() -> None:
    events = stream(10)
    source = MemorySource(events, batch_size=4)
    assert source.lag() == 10
    sizes = []
    while (b := source.poll(0.0)) is not None:
        sizes.append(len(b.events))
    assert sizes == [4, 4, 2] and source.lag() == 0
    assert b is None
    start = time.monotonic()
    assert source.poll(0.05) is None and time.monotonic() - start >= 0.04
    source.push(events)
    batch = source.poll(10.0)
    assert batch is not None and batch.offsets == {("memory", 0): (10, 14)}
    assert list(batch.events.users) == list(events.users[:4])


class FlakyCommits(MemorySource):
    def commit(self, offsets: Mapping[Partition, int]) -> None:
        raise SourceError("broker away")


def test_checkpoint_then_commit_and_resume_from_its_offsets(tmp_path: Path) -> None:
    events = stream(3000)
    s = Settings(**{**SMALL, "checkpoint_dir": str(tmp_path)})
    first = MemorySource(events, batch_size=1000)
    engine = Engine(s, first)
    engine.run(until=lambda: engine.counters.consumed == 3000 and not engine.trainer.pending)
    engine.close()
    assert first.committed == {("memory", 0): 3000}  # committed after the checkpoint

    seen: list[dict[Partition, int]] = []

    def factory(resume: Resume) -> MemorySource:
        seen.append(dict(resume.positions))
        assert resume.user_ids is not None and len(resume.user_ids) > 0
        return FlakyCommits(offset=resume.positions[("memory", 0)])

    again = Engine(s, factory)
    assert seen == [{("memory", 0): 3000}]
    assert again.counters.consumed == 3000
    assert np.array_equal(again.trainer.store.holdout().items,
                          engine.trainer.store.holdout().items)
    again.source.push(stream(100, seed=2))  # type: ignore[attr-defined]
    again.run(until=lambda: again.counters.consumed == 3100)
    again.close()  # the commit fails: logged, the checkpoint stands
    assert again.positions == {("memory", 0): 3100}


def test_a_failing_poll_stops_the_loop_with_the_source_error() -> None:
    class Broken(MemorySource):
        def poll(self, timeout_s: float = 0.0) -> EventBatch | None:
            raise SourceError("gone")

    engine = Engine(Settings(**SMALL), Broken())
    with pytest.raises(SourceError, match="gone"):
        engine.run()


class Flaky:
    """A source factory: the sources it builds fail as scripted, and it counts them."""

    def __init__(self, events: Events, script: list[str]) -> None:
        self.events, self.script, self.calls = events, script, 0
        self.statuses: list[tuple[str, str]] = []  # the engine's ingest status at each call

    def __call__(self, resume: Resume) -> MemorySource:
        self.calls += 1
        action = self.script.pop(0) if self.script else "ok"
        if action == "refuse":
            raise SourceError("broker unreachable")
        offset = resume.positions.get(("memory", 0), 0)
        rest = self.events.take(np.arange(offset, len(self.events)))
        source = MemorySource(rest, batch_size=500, offset=offset)
        if action.startswith("fail-after-"):
            polls = int(action.rsplit("-", 1)[1])

            def poll(timeout_s: float = 0.0, inner=source.poll) -> EventBatch | None:
                nonlocal polls
                if polls == 0:
                    raise SourceError("connection reset")
                polls -= 1
                return inner(timeout_s)

            source.poll = poll  # type: ignore[method-assign]
        return source


def test_a_failed_source_is_rebuilt_where_the_state_is_and_nothing_is_lost_or_doubled() -> None:
    events = stream(3000)
    # Built once at start; fails on its 3rd poll; the first rebuild is refused.
    flaky = Flaky(events, ["fail-after-2", "refuse", "ok"])
    engine = Engine(Settings(**SMALL, replay=False), flaky)
    seen: list[tuple[str, str]] = []  # the ingest status at every turn

    def done() -> bool:
        seen.append((engine.status().ingest, engine.status().ingest_reason))
        return engine.counters.consumed == 3000 and not engine.trainer.pending

    engine.run(until=done)
    reference = Engine(Settings(**SMALL, replay=False), MemorySource(events, batch_size=500))
    reference.run(until=lambda: reference.counters.consumed == 3000)
    got, want = engine.trainer.store, reference.trainer.store
    assert got.events == want.events == 3000 and len(got) == len(want)  # once each
    assert np.array_equal(got.holdout().items, want.holdout().items)
    assert flaky.calls == 3
    assert ("degraded", "poll: connection reset") in seen
    assert ("degraded", "start: broker unreachable") in seen
    assert engine.status().ingest == "ok" and engine.health.backoff == 1.0  # doubled once
    reg = engine.metrics.registry
    for during, n in (("poll", 1), ("start", 1), ("flush", 0)):
        assert reg.get_sample_value("ncf_stream_source_restarts_total", {"reason": during}) == n
    assert reg.get_sample_value("ncf_stream_source_up") == 1


def test_the_daemon_serves_its_last_snapshot_while_the_source_is_down() -> None:
    import httpx


    events = stream(3000)
    # Fails once everything is consumed; then refused for a while (0.5 + 1 + 2 s).
    flaky = Flaky(events, ["fail-after-8", "refuse", "refuse", "refuse"])
    s = Settings(**SMALL, replay=False, http_port=0, grpc_port=0, shutdown_grace_s=0.5)
    with running(s, source=flaky) as (daemon, thread), \
            httpx.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=10) as c:
        deadline = time.monotonic() + 60
        while daemon.engine.status().ingest == "ok" or daemon.engine.holder.get() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Down for 3.5 s (three refused rebuilds): these checks come well within it.
        degraded = c.get("/healthz").json()
        assert degraded["status"] == "degraded" and "connection reset" in degraded["reason"]
        assert c.get("/v1/status").json()["ingest"] == "degraded"
        assert c.get("/readyz").status_code == 200
        answered = 0
        while daemon.engine.status().ingest == "degraded":
            assert time.monotonic() < deadline
            r = c.post("/v1/recommend", json={"user": str(events.users[0]), "k": 5})
            assert r.status_code == 200 and r.json()["items"]
            answered += 1
        assert answered > 10 and thread.is_alive()
        assert c.get("/healthz").json() == {"status": "ok"}
        assert flaky.calls == 5


def test_model_age_counts_from_new_events_not_from_replay_publishes() -> None:
    engine = Engine(Settings(**SMALL, publish_every_s=0.01), MemorySource(stream(2000)))
    engine.run(until=lambda: engine.counters.consumed == 2000 and not engine.trainer.pending
               and engine.status().snapshot_events == 2000)
    fresh_at, version = engine._fresh_at, engine.publisher.version
    time.sleep(0.3)
    engine.run(until=lambda: engine.publisher.version >= version + 3)  # replay-only publishes
    assert engine._fresh_at == fresh_at
    age = engine.metrics.registry.get_sample_value("ncf_stream_model_age_seconds")
    assert age is not None and age >= 0.3
    engine.source.push(stream(100, seed=3))  # type: ignore[union-attr]
    engine.run(until=lambda: engine.status().snapshot_events == 2100)
    assert engine.metrics.registry.get_sample_value("ncf_stream_model_age_seconds") < 0.3


def test_backpressure_bounds_the_fresh_positives_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst larger than the bound waits in the source: the engine stops polling while
    max_pending_positives wait, and everything is still consumed in the end. (A poll's
    positives are drained before the next poll, up to FRESH_SLICE_MAX_STEPS; cut to one
    step here, so that training falls behind as a slow model with large polls would.)"""
    monkeypatch.setattr(engine_module, "FRESH_SLICE_MAX_STEPS", 1)
    events = stream(6000)
    engine = Engine(Settings(**SMALL, max_pending_positives=700),
                    MemorySource(events, batch_size=500))
    source = engine.source
    assert isinstance(source, MemorySource)
    step = engine.trainer.step

    def slow_step():  # training slower than ingest: the burst
        time.sleep(0.02)
        return step()

    engine.trainer.step = slow_step  # type: ignore[method-assign]
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, engine.trainer.pending)
        return engine.counters.consumed == 6000 and not engine.trainer.pending

    engine.run(until=done)
    assert 700 <= most < 700 + 500  # one batch past the bound, at most
    assert engine.trainer.store.events == 6000 and source.lag() == 0


def test_a_non_finite_loss_stops_publishing_and_checkpoints_the_last_good_snapshot_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(**{**SMALL, "checkpoint_dir": str(tmp_path), "publish_every_s": 0.01})
    source = MemorySource(stream(2000), batch_size=500)
    engine = Engine(s, source)
    engine.run(until=lambda: engine.counters.consumed == 2000 and not engine.trainer.pending)
    engine.checkpoint()
    good = engine.holder.get()
    assert good is not None and engine.status().ingest == "ok"
    checkpoints = sorted(p.name for p in tmp_path.iterdir())
    user = str(engine.trainer.user_ids.ids(np.array([0]))[0])
    before = engine.recommender.recommend(user, 5)

    with torch.no_grad():  # a diverged step: the shared tower goes NaN
        next(engine.trainer.model.tower.parameters()).fill_(float("nan"))
    source.push(stream(500, seed=1))
    with caplog.at_level("ERROR", logger="ncf_stream.engine"):
        engine.run(until=lambda: engine.counters.consumed == 2500 and bool(engine.diverged))
        engine.checkpoint()
        time.sleep(0.05)
        engine.cycle()  # publishing is due, and refused
    assert engine.holder.get() is good  # the last good snapshot serves on
    assert engine.recommender.recommend(user, 5) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == checkpoints  # no broken checkpoint
    st = engine.status()
    assert st.ingest == "degraded" and st.ingest_reason.startswith("training diverged")
    assert engine.metrics.registry.get_sample_value("ncf_stream_train_diverged_total") == 1
    assert sum("training diverged" in r.getMessage() for r in caplog.records) == 1
    steps = engine.trainer.steps
    engine.cycle()
    assert engine.trainer.steps == steps  # training stopped
    engine.close()


def test_a_run_repeats_step_for_step_whatever_the_machines_speed() -> None:
    """The order of polls and steps follows the data, not the clock: each poll's fresh
    positives are trained until drained, so an engine whose steps take longer than a
    replay slice (here 30 ms each, 3 steps a poll) trains exactly what a fast one does.
    Sliced by wall time, the slow one polled again before draining, and diverged."""
    events = stream(3000, seed=5)

    def run(delay: float) -> dict[str, torch.Tensor]:
        engine = Engine(Settings(**(SMALL | {"replay": True, "replay_ratio": 1.0})),
                        MemorySource(events, batch_size=700))
        step = engine.trainer.step

        def timed_step():
            time.sleep(delay)
            return step()

        engine.trainer.step = timed_step  # type: ignore[method-assign]
        trainer = engine.trainer
        engine.run(until=lambda: engine.counters.consumed == len(events) and not trainer.pending)
        engine.run(until=lambda: trainer.replay_budget == 0)
        engine.close(final_checkpoint=False)
        model = trainer.model
        return {"users": model.users.weight.clone(), "items": model.items.weight.clone(),
                **{k: v.clone() for k, v in model.tower.state_dict().items()},
                "samples": torch.tensor(trainer.samples_trained)}

    fast, slow = run(0.0), run(0.03)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
