"""The Kafka source in a process of its own, one batch ahead of the engine.

kafka-python unpacks every record in pure Python, and the events are decoded
and validated record by record: under full ingest that was 65% of the time
any thread of the daemon held the GIL (py-spy --gil; the trainer's steps were
17%). Requests then waited for the GIL at each of their few dozen hand-offs,
behind a thread at nice 19. Here a child process runs the
:class:`~consumers.kafka_source.KafkaSource` (consumer, decoder, dead-letter
writer) and hands the daemon decoded columnar batches over a socket pair; it
fetches and decodes the next batch while the daemon trains on this one.

Positions: the child seeks on every assignment to the positions it was started
with plus every batch it has delivered since. The daemon applies every batch it
receives, in order, so that is exactly the daemon's state; a batch in flight
when the daemon dies is lost with the daemon's memory, and the restart begins
from the checkpoint's offsets again. (Several source processes, kafka_sources > 1,
cannot rely on that alone: consumers.parallel_source.)

Ids: given the engine's id maps, the child maps ids to rows as well
(:class:`~ncf_stream.ids.RowMapper`, started from the maps' ids) and the batches
carry rows plus only the ids the engine has not seen
(:class:`~ncf_stream.ids.MappedEvents`). Under full ingest, hashing every id of
every event and unpickling its string were a fifth of the time the daemon's
threads held the GIL (py-spy --gil at 1M events), time each request could wait
behind. The maps stay equal because the engine applies every batch, in order,
as the positions above assume.

Metrics stay in the daemon's registry: the child reports records, skips,
rejections by reason and the consumer lag with each batch.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from consumers.kafka_source import count_batch
from ncf_stream.events import Events
from ncf_stream.ids import IdMap, RowMapper
from ncf_stream.metrics import IngestMetrics
from ncf_stream.settings import Settings
from ncf_stream.source import LAG_EVERY_S, Blocked, EventBatch, Partition, SourceError
from ncf_stream.threads import BackgroundPolicy, background_thread

log = logging.getLogger(__name__)

AHEAD_POLL_S = 0.05  # how long the child waits for records while fetching ahead
# ... and before it holds a partition: the join must not span many short polls (one that
# timed out mid-join once left the consumer without its assignment; see
# kafka_source.UNASSIGNED_REJOIN_S). A request then waits up to this long, at start-up.
JOIN_POLL_S = 1.0
REPLY_TIMEOUT_S = 120.0  # a flush waits up to 30 s for the dead-letter topic; commit too


class SourceProcessError(SourceError):
    """The source process died or stopped answering."""


@dataclass(frozen=True)
class Delivery:
    """One poll's answer from the child."""

    batch: EventBatch | None
    lag: int | None  # the consumer lag, when the child measured it since the last delivery
    blocked: dict[Partition, Blocked]  # the partitions stopped at an undecodable batch
    # Per partition of the batch: where the child read it from (its position before the
    # batch; None: the partition's beginning). consumers.parallel_source checks that this
    # is where the engine is; one source process never needs to.
    bases: dict[Partition, int | None] = field(default_factory=dict)


class ProcessSource:
    """An :class:`~ncf_stream.source.EventSource` whose Kafka client runs in a child process.

    ``positions`` are where the engine's state is (its checkpoint's offsets);
    the child seeks there on assignment, then past every batch it delivers.
    ``background``: the policy for the child's decoding thread
    (:func:`ncf_stream.threads.background_thread`); None leaves it alone.
    ``id_maps``: the engine's (user, item) maps; the child then delivers
    :class:`~ncf_stream.ids.MappedEvents` that continue them, and the engine must
    apply every batch, in order (:meth:`ncf_stream.trainer.Trainer.rows`).
    ``wait``: False returns once the child is spawned; :meth:`started` waits for it
    (several children then start side by side).

    One request is in flight at a time: :meth:`poll` is :meth:`request_poll` and
    :meth:`delivery`, which a caller waiting on several children calls apart.
    """

    def __init__(self, settings: Settings, *, metrics: IngestMetrics | None = None,
                 positions: Mapping[Partition, int] | None = None,
                 background: BackgroundPolicy | None = None,
                 id_maps: tuple[IdMap, IdMap] | None = None, wait: bool = True) -> None:
        self._metrics = metrics
        self._lag = 0
        self._blocked: dict[Partition, Blocked] = {}
        parent, child = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "consumers.source_process", str(child.fileno()),
             str(os.getpid())],
            pass_fds=[child.fileno()], cwd=os.path.dirname(os.path.dirname(__file__)))
        child.close()
        self._conn = Connection(parent.detach())
        self._closed = False
        self._reply_by: float | None = None  # when the request in flight must be answered
        self._reply_s = 0.0  # ... counted from when it was sent
        self._stall_s = settings.source_stall_s
        self._out_of_step = False
        self._default_timeout = settings.kafka_poll_timeout_s
        # Rows mapped here continue the engine's maps only while nothing else changes
        # them: the engine reopens such a source after an admin deletion (Engine.forget).
        self.maps_ids = id_maps is not None
        ids = None if id_maps is None else tuple(m.all_ids().tolist() for m in id_maps)
        self._send("start", settings, dict(positions or {}), logging.getLogger().level,
                   background, ids)
        if wait:
            self.started()

    def started(self) -> None:
        """Wait until the child has started its source (raises what it raised)."""
        self._receive()

    @property
    def connection(self) -> Connection:
        """Readable when the answer to the request in flight has arrived (or the child died)."""
        return self._conn

    def _send(self, *request: Any, reply_s: float = REPLY_TIMEOUT_S) -> None:
        if self._closed:
            raise SourceProcessError("the source is closed")
        try:
            self._conn.send(request)
        except OSError as e:
            raise SourceProcessError(f"the source process is gone ({e})") from e
        self._reply_by = time.monotonic() + reply_s
        self._reply_s = reply_s

    def answering(self) -> None:
        """Raise SourceProcessError if the child has died, or has not answered the request
        in flight by its time (wedged)."""
        if self._reply_by is None:
            return
        if self._proc.poll() is None and time.monotonic() <= self._reply_by:
            return
        code = self._proc.returncode
        self._out_of_step = True  # a late reply would answer the next request
        raise SourceProcessError("the source process " + (
            f"stopped answering for {self._reply_s:.0f} s (wedged)" if code is None
            else f"exited with {code}"))

    def _receive(self) -> Any:
        """The answer to the request in flight."""
        if self._reply_by is None:
            raise SourceProcessError("no request in flight to take an answer for")
        try:
            while not self._conn.poll(min(0.5, max(0.0, self._reply_by - time.monotonic()))):
                self.answering()
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise SourceProcessError(f"the source process is gone ({e})") from e
        self._reply_by = None
        if not ok:
            raise value  # the child's exception, re-raised on the engine's thread
        return value

    def _call(self, *request: Any, reply_s: float = REPLY_TIMEOUT_S) -> Any:
        self._send(*request, reply_s=reply_s)
        return self._receive()

    def request_poll(self, deadline: float | None = None,
                     seeks: Mapping[Partition, int | None] | None = None) -> None:
        """Ask for the next batch by ``deadline`` (time.monotonic(); None: the default
        poll timeout from now), having first read ``seeks`` again from those offsets
        (:meth:`_Child.reposition`). The answer: :meth:`delivery`."""
        # A deadline rather than a timeout: the child may be finishing a fetch ahead
        # when the request arrives, and that wait counts (CLOCK_MONOTONIC is system-wide).
        wait = self._default_timeout if deadline is None else max(
            0.0, deadline - time.monotonic())
        self._send("poll", deadline, dict(seeks) if seeks else None,
                   reply_s=wait + self._stall_s)

    def delivery(self) -> Delivery:
        """The answer to :meth:`request_poll`; its lag and blocked partitions noted here."""
        delivery: Delivery = self._receive()
        self._blocked = delivery.blocked
        if delivery.lag is not None:
            self._lag = delivery.lag
            if self._metrics is not None:
                self._metrics.consumer_lag.set(delivery.lag)
        return delivery

    def poll(self, timeout_s: float | None = None) -> EventBatch | None:
        self.request_poll(None if timeout_s is None else time.monotonic() + timeout_s)
        batch = self.delivery().batch
        if batch is not None and self._metrics is not None:
            count_batch(self._metrics, batch)
        return batch

    def flush(self, timeout_s: float = 30.0) -> None:
        self._call("flush", timeout_s)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self._call("commit", dict(offsets))

    def commit_owned(self, offsets: Mapping[Partition, int]) -> None:
        """Commit those of ``offsets`` whose partitions the child holds now (one member of
        several in a group: consumers.parallel_source)."""
        self._call("commit", dict(offsets), True)

    def owned(self) -> set[Partition]:
        """The partitions the child's consumer holds now."""
        owned: set[Partition] = self._call("owned")
        return owned

    def partition_count(self) -> int:
        """The topic's partitions (0 while the topic is unknown)."""
        count: int = self._call("partitions")
        return count

    def _drain(self) -> None:
        """Take and drop the answer in flight, if any: the child answers in order."""
        if self._reply_by is None:
            return
        try:
            self._receive()
        except SourceProcessError:
            raise  # gone or wedged: close kills it
        except Exception as e:  # what the child raised: moot, we are closing
            log.debug("source process: dropped an answer on close: %s", e)

    def lag(self) -> int:
        """The lag the child measured last (it measures once a second)."""
        return self._lag

    def blocked(self) -> dict[Partition, Blocked]:
        """As of the last poll."""
        return self._blocked

    def close(self) -> None:
        """Stop the child (it flushes its dead letters first); one that is gone or does
        not answer is killed, since it has nothing left to flush that a replay would not
        send again."""
        if self._closed:
            return
        try:
            if self._proc.poll() is None and not self._out_of_step:
                self._drain()
                self._call("close", reply_s=self._stall_s)
        except SourceError as e:
            log.warning("source process: %s; killing it", e)
        finally:
            self._closed = True
            self._conn.close()
            try:
                self._proc.wait(0 if self._out_of_step else 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class _Child:
    """The child's side: a KafkaSource that fetches one batch ahead between requests."""

    def __init__(self, conn: Connection, settings: Settings, positions: dict[Partition, int],
                 ids: tuple[list[str], list[str]] | None) -> None:
        from consumers.kafka_source import KafkaSource

        self.conn = conn
        self.positions = positions  # the engine's state once it has applied what we sent
        self.source = KafkaSource(settings, positions=lambda: self.positions)
        self.default_timeout = settings.kafka_poll_timeout_s
        self.ahead: tuple[bool, Any] | None = None  # a fetched (ok, batch or error)
        # Fetch ahead only while records flow. On an idle stream the engine rests inside
        # its poll, and a fetch ahead in progress (up to AHEAD_POLL_S) delayed every one
        # of those polls: the rest overran and idle replay fell to a quarter of its duty.
        self.flowing = True
        # Every fetched batch is delivered, in order: so mapping at fetch keeps the order.
        self.mapper = None if ids is None else RowMapper(*ids)
        self.last_lag = 0.0

    def fetch(self, timeout_s: float) -> tuple[bool, Any]:
        """(True, the batch or None) or (False, the error)."""
        try:
            batch = self.source.poll(timeout_s)
        except Exception as e:  # the engine decides; it sees the same error
            return False, e
        if batch is not None and self.mapper is not None:
            assert isinstance(batch.events, Events)
            if len(batch.deletions):  # rare: sent by id, the engine maps in stream order
                self.mapper.follow(batch.events, batch.deletions)
            else:
                batch = replace(batch, events=self.mapper.map(batch.events))
        return True, batch

    def deliver(self, deadline: float | None,
                seeks: dict[Partition, int | None] | None = None) -> tuple[bool, Any]:
        if seeks:
            self.reposition(seeks)
        ok, batch = self.ahead if self.ahead is not None else self.fetch(
            self.default_timeout if deadline is None else max(0.0, deadline - time.monotonic()))
        self.ahead = None
        if not ok:
            return ok, batch
        self.flowing = batch is not None
        bases: dict[Partition, int | None] = {}
        if batch is not None:
            # Nothing moves positions between a fetch and its delivery (a fetch ahead is
            # delivered before the next one; reposition drops it), so they are the bases.
            bases = {tp: self.positions.get(tp) for tp in batch.offsets}
            self.positions.update(batch.commit_offsets())
        lag = None
        if time.monotonic() - self.last_lag >= LAG_EVERY_S:
            self.last_lag = time.monotonic()
            try:
                lag = self.source.lag()
            except Exception as e:  # a lag is a gauge, not worth failing for
                log.debug("lag unavailable: %s", e)
        return True, Delivery(batch, lag, self.source.blocked(), bases)

    def reposition(self, seeks: dict[Partition, int | None]) -> None:
        """Read these partitions again from these offsets (None: the beginning): the
        parallel source refused a batch of ours that did not start where the engine is.
        A batch fetched ahead over any of them was read from the old place: it is dropped
        and its partitions read again too."""
        if self.mapper is not None:  # its maps have taken in what would be dropped
            raise ValueError("a source process that maps ids cannot be repositioned")
        for tp, offset in seeks.items():
            if offset is None:
                self.positions.pop(tp, None)
            else:
                self.positions[tp] = offset
        again = set(seeks)
        if self.ahead is not None and self.ahead[0] and self.ahead[1] is not None:
            fetched = set(self.ahead[1].offsets)
            if fetched & again:
                again |= fetched
                self.ahead = None
        self.source.seek({tp: self.positions.get(tp) for tp in again})

    def commit(self, offsets: dict[Partition, int], owned_only: bool = False) -> None:
        """``owned_only``: only the partitions we hold, a member of several in the group.
        kafka-python and a classic group's coordinator take a member's commit of any
        partition, but a member in a rebalance has its whole commit refused, and N
        members committing everything is N times the writes; so each partition's offset
        goes to its owner alone. A partition between owners now is committed at the next
        checkpoint (the engine commits every position each time)."""
        if owned_only:
            owned = self.source.owned()
            offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        self.source.commit(offsets)

    def serve(self) -> None:
        while True:
            # Fetch ahead while the engine works on what it has; a request waits at
            # most one AHEAD_POLL_S for the fetch in progress (JOIN_POLL_S at start-up).
            assigned = self.source.assigned()
            if (self.ahead is None and (self.flowing or not assigned)
                    and not self.conn.poll(0)):
                self.ahead = self.fetch(AHEAD_POLL_S if assigned else JOIN_POLL_S)
                if self.ahead[0] and self.ahead[1] is None:
                    self.ahead = None  # nothing arrived: nothing to hold
                    self.flowing = False
                continue
            try:
                request = self.conn.recv()
            except (EOFError, OSError):  # the engine is gone: so are we
                self.source.close()
                return
            kind, args = request[0], request[1:]
            try:
                if kind == "poll":
                    ok, value = self.deliver(*args)
                    reply: tuple[bool, Any] = (ok, value)
                elif kind == "flush":
                    self.source.flush(*args)
                    reply = (True, None)
                elif kind == "commit":
                    self.commit(*args)
                    reply = (True, None)
                elif kind == "owned":
                    reply = (True, self.source.owned())
                elif kind == "partitions":
                    reply = (True, self.source.partition_count())
                elif kind == "close":
                    self.source.close()
                    self.conn.send((True, None))
                    return
                else:
                    reply = (False, ValueError(f"unknown request {kind!r}"))
            except Exception as e:  # sent to the engine, raised there
                reply = (False, e)
            try:
                self.conn.send(_picklable(reply))
            except OSError:  # the engine died while we worked
                self.source.close()
                return


def _picklable(reply: tuple[bool, Any]) -> tuple[bool, Any]:
    ok, value = reply
    if ok:
        return reply
    try:
        pickle.dumps(value)
        return reply
    except Exception:  # an exception that does not pickle travels as text
        return False, SourceProcessError(f"{type(value).__name__}: {value}")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(parent: int) -> bool:
    """SIGKILL this process when ``parent`` dies (Linux; False elsewhere).

    Closing the connection only reaches a child that reads it: one spinning inside
    the Kafka client on an undecodable batch outlived a kill -9 of its daemon at 100%
    CPU, adopted by init. The kernel signals when the *thread* that started us ends:
    the daemon's first source is started on its main thread, a rebuilt one on the
    trainer's, which closes it before it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def main(fd: int, parent: int) -> None:
    die_with(parent)
    conn = Connection(fd)
    try:
        _, settings, positions, level, background, ids = conn.recv()
    except EOFError:
        return
    # Ctrl-C reaches the whole process group: the engine decides when we stop (it closes
    # the connection), so that a last checkpoint can still flush the dead letters here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks to stderr
    logging.basicConfig(level=level or logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        child = _Child(conn, settings, positions, ids)
    except Exception as e:  # the engine raises it
        conn.send(_picklable((False, e)))
        return
    # Only this thread (record parsing, decoding) steps aside for requests. kafka-python's
    # network and heartbeat threads, started above, keep their priority, so the group
    # protocol is not starved on a busy machine (beside four CPU-bound processes: first
    # batch after 6.9 s this way, 13 s with the whole child at nice 19).
    if background:
        background_thread(background)
    conn.send((True, None))
    child.serve()


if __name__ == "__main__":
    # Through the package, so what is pickled names consumers.source_process, not __main__.
    from consumers import source_process

    source_process.main(int(sys.argv[1]), int(sys.argv[2]))
