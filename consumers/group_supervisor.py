"""``ncf-stream serve --workers N``: a group of N trainers on this machine, kept running.

Each trainer is a process of its own, ``ncf-stream serve`` with the supervisor's
arguments (less ``--workers``) and its place in the group in its environment:
``NCF_STREAM_GROUP_SIZE`` N, ``NCF_STREAM_GROUP_RANK`` r, and
``NCF_STREAM_GROUP_ADDRESS``, rank 0's rendezvous on a port picked afresh for each
generation (one start of the whole group), so a new group never meets a socket the
last one left behind. Trainer r serves HTTP, gRPC and metrics on the configured
ports plus r (a port of 0 stays 0: each picks a free one).

A trainer that exits while the group is not stopping has failed the group: the
others can no longer exchange item rows with it (their collectives fail and they
exit too). The supervisor stops them (SIGTERM; SIGKILL after ``shutdown_grace_s``
plus SHUTDOWN_MARGIN_S) and starts a new generation, which the engine resumes,
every rank, from the group's last aligned checkpoint. Restarts back off from
GROUP_RESTART_FIRST_S, doubling to GROUP_RESTART_MAX_S, back to the first after a
generation that ran GROUP_STABLE_S.

SIGTERM or SIGINT is passed on to the trainers, which checkpoint and stop; the
supervisor waits for them and exits 0. A second one kills them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from consumers.broker import free_port
from consumers.source_process import PR_SET_PDEATHSIG
from ncf_stream.errors import ConfigError
from ncf_stream.settings import Settings, check_group, env_name

log = logging.getLogger(__name__)

# The group's restarts (not the engine's rebuilds of a source, which back off alone).
GROUP_RESTART_FIRST_S = 1.0
GROUP_RESTART_MAX_S = 30.0
GROUP_STABLE_S = 60.0  # a generation up this long resets the back-off
# Beyond shutdown_grace_s (the servers' drain), a stopping trainer writes its last
# checkpoint before it exits: seconds for a large model's state.
SHUTDOWN_MARGIN_S = 30.0
WATCH_S = 0.2  # how often the trainers' exits are looked for
SERVE = [sys.executable, "-m", "consumers.cli"]  # the trainers' command: this ncf-stream


def trainer_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (the supervisor's, after the program) less ``--workers N``, in any of
    the spellings argparse takes (``--workers=N``, an abbreviation such as ``--work``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag, eq, _ = arg.partition("=")
        if len(flag) >= 3 and "--workers".startswith(flag):
            skip = not eq
            continue
        out.append(arg)
    return out


@dataclass(frozen=True)
class Ports:
    """One trainer's ports: the configured ones plus its rank (0 stays 0)."""

    http: int
    grpc: int
    metrics: int | None

    @classmethod
    def of(cls, settings: Settings, rank: int) -> Ports:
        def shift(port: int) -> int:
            return port + rank if port else 0

        metrics = settings.metrics_port
        return cls(shift(settings.http_port), shift(settings.grpc_port),
                   None if metrics is None else shift(metrics))

    def fixed(self) -> list[int]:
        return [p for p in (self.http, self.grpc, self.metrics) if p]


def _die_with_parent() -> None:
    """In the trainer, before exec: SIGTERM when the supervisor dies (Linux), so a
    supervisor killed with -9 leaves no trainer behind, and each still checkpoints."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs ``workers`` trainers as one group; see the module's docstring.

    ``argv``: the arguments ``ncf-stream`` was given (``serve`` among them);
    ``command``: what runs ``ncf-stream`` (tests give a stub); ``environ``: the
    trainers' environment before their group's (default: this process's)."""

    def __init__(self, settings: Settings, workers: int, argv: Sequence[str], *,
                 command: Sequence[str] = SERVE,
                 environ: Mapping[str, str] | None = None) -> None:
        if workers < 2:
            raise ConfigError(f"a group needs 2 trainers or more, got {workers}")
        check_group(settings.model_copy(update={"group_size": workers, "group_rank": 0}))
        self.settings, self.workers = settings, workers
        self.ports = [Ports.of(settings, r) for r in range(workers)]
        fixed = [p for ports in self.ports for p in ports.fixed()]
        if len(fixed) != len(set(fixed)) or max(fixed, default=0) > 65535:
            raise ConfigError(
                f"{workers} trainers on the HTTP, gRPC and metrics ports plus their rank "
                f"need {len(fixed)} distinct ports up to 65535: {sorted(fixed)}; space "
                "http_port, grpc_port and metrics_port further apart")
        self.argv = [*command, *trainer_argv(argv)]
        self.environ = dict(os.environ if environ is None else environ)
        self.generation = 0
        self.address = ""
        self.procs: list[subprocess.Popen[bytes]] = []
        self._signals = 0

    # ---- signals -------------------------------------------------------------------------

    def _signalled(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        self._send(signal.SIGKILL if self._signals > 1 else signum)

    @property
    def stopping(self) -> bool:
        return self._signals > 0

    def _send(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    proc.send_signal(signum)

    # ---- a generation --------------------------------------------------------------------

    def _start(self) -> None:
        self.generation += 1
        previous, self.address = self.address, ""
        while self.address in ("", previous):
            self.address = f"127.0.0.1:{free_port()}"
        self.procs = []
        s = self.settings
        for rank, ports in enumerate(self.ports):
            env = {**self.environ, env_name("group_size"): str(self.workers),
                   env_name("group_rank"): str(rank), env_name("group_address"): self.address}
            if ports.metrics is not None:
                env[env_name("metrics_port")] = str(ports.metrics)
            proc = subprocess.Popen(
                [*self.argv, "--http-port", str(ports.http), "--grpc-port", str(ports.grpc)],
                env=env, preexec_fn=_die_with_parent)
            self.procs.append(proc)
            if self.stopping:  # a signal came while the group started
                proc.send_signal(signal.SIGTERM)
            metrics = "" if ports.metrics is None else f", metrics :{ports.metrics or 'any'}"
            print(f"ncf-stream group generation {self.generation}: trainer {rank} of "
                  f"{self.workers} (pid {proc.pid}) on http://{s.http_host}:"
                  f"{ports.http or 'any'} and gRPC {s.grpc_host}:{ports.grpc or 'any'}"
                  f"{metrics}; rendezvous {self.address}", flush=True)

    def _watch(self) -> tuple[int, int] | None:
        """Wait until a trainer exits, or a signal: (its rank, its code), or None."""
        while not self.stopping:
            for rank, proc in enumerate(self.procs):
                if (code := proc.poll()) is not None:
                    return rank, code
            time.sleep(WATCH_S)  # a signal's handler runs within it
        return None

    def _wait_all(self, timeout_s: float | None) -> bool:
        """Wait for every trainer to exit, up to ``timeout_s``; whether they all did."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for proc in self.procs:
            while proc.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(WATCH_S)
        return True

    def _stop_group(self) -> None:
        """SIGTERM the trainers still running; SIGKILL those still there after the grace."""
        self._send(signal.SIGTERM)
        if not self._wait_all(self.settings.shutdown_grace_s + SHUTDOWN_MARGIN_S):
            log.warning("trainers still running %.0f s after SIGTERM: killing them",
                        self.settings.shutdown_grace_s + SHUTDOWN_MARGIN_S)
            self._send(signal.SIGKILL)
            self._wait_all(None)

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the group until SIGTERM or SIGINT; then 0, once every trainer has exited.
        From the main thread (it handles those signals)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)
        backoff = GROUP_RESTART_FIRST_S
        while not self.stopping:
            started = time.monotonic()
            self._start()
            failed = self._watch()
            if failed is None:
                break
            if time.monotonic() - started >= GROUP_STABLE_S:
                backoff = GROUP_RESTART_FIRST_S
            rank, code = failed
            log.error("trainer %d of %d (pid %d) exited with %s in generation %d: stopping "
                      "the others and restarting the group in %.0f s", rank, self.workers,
                      self.procs[rank].pid, _describe(code), self.generation, backoff)
            self._stop_group()
            deadline = time.monotonic() + backoff
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(min(WATCH_S, max(0.0, deadline - time.monotonic())))
            backoff = min(2 * backoff, GROUP_RESTART_MAX_S)
        self._wait_all(None)  # the signal was passed on to each of them
        return 0
