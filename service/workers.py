"""`--workers N`: N server processes answering on one port, under a supervisor.

The supervisor binds the listening socket once and starts N workers with multiprocessing's
*spawn* context (the socket travels to each through multiprocessing's reduction, as uvicorn's
own supervisor passes it). Each worker is a whole server, `service.httpserver.serve(create_app
(settings), settings, sockets=[sock])`, with its own sessions and batchers; the kernel hands each
new connection to one of them. uvicorn's `Multiprocess` supervisor is not used: it builds its
workers from a `uvicorn.Config`, which cannot carry our protocol class (read timeouts, drain) or
our server's exit code, and it has no hook for the shared state below.

- **Threads.** Intra-op threads are divided so that workers x threads <= cores: with
  `intra_op_threads` 0 each worker gets cores // workers, and a larger value is lowered to it
  (model instances divide a worker's threads further, in service.runtime).
- **Restarts.** A worker that dies is restarted, with an ERROR log line giving its exit status,
  and counted in `onnxserve_worker_restarts_total`; one that keeps dying within
  `STABLE_S` of its start waits longer each time (up to `MAX_BACKOFF_S`). A worker that fails
  while the server first starts (a bad setting, a port in use) stops the server: exit 1.
- **Shutdown.** On SIGTERM or SIGINT the supervisor stops restarting, sends SIGTERM to every
  worker (each drains as service/httpserver.py does), waits up to graceful_timeout_s + drain_s
  + `SHUTDOWN_SLACK_S`, kills what remains, and exits 0.
- **One server to clients.** The supervisor's state folder (`Settings.worker_state_dir`, a
  fresh temporary folder per run) is where the workers share metrics, model state and
  readiness (service/workerstate.py) and the supervisor publishes its roster of workers;
  batch jobs run once through locks in the jobs root (service/jobs.py).
- **auto** (`--workers auto`): the cores this process may use, or 1 when a GPU provider is
  active: each worker would hold its own copy of every model on the GPU and form its own
  batches, so one worker with several model instances uses a GPU better (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from service import workerstate
from service.config import Settings

log = logging.getLogger("service.workers")

#: A worker that lived at least this long is restarted at once; sooner, after a back-off.
STABLE_S = 10.0
MAX_BACKOFF_S = 10.0
#: At shutdown, the time allowed beyond the workers' own graceful timeout and drain.
SHUTDOWN_SLACK_S = 5.0
_TICK_S = 0.2
_PR_SET_PDEATHSIG = 1


def gpu_active(settings: Settings) -> bool:
    """Whether sessions will run on a GPU: a GPU provider is asked for (CUDA is, by default)
    and offered by this onnxruntime, and the NVIDIA driver is present (or `require_gpu`)."""
    import onnxruntime

    from service.runtime import GPU_PROVIDERS, select_providers

    order = select_providers(settings.providers, onnxruntime.get_available_providers())
    if not any(p in GPU_PROVIDERS for p in order):
        return False
    if settings.require_gpu:
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def worker_count(settings: Settings) -> int:
    """The number of server processes: `workers`, with `auto` resolved."""
    if settings.workers != "auto":
        return settings.workers
    from service.runtime import available_cores

    return 1 if gpu_active(settings) else available_cores()


def worker_threads(settings: Settings, workers: int, cores: int) -> int:
    """Intra-op threads per session in each worker: its share of the cores, or less if asked."""
    from service.runtime import intra_op_threads

    return intra_op_threads(settings.intra_op_threads, workers, cores)


def bind(settings: Settings) -> socket.socket:
    """The listening socket every worker accepts on (SO_REUSEADDR, the settings' backlog)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    sock.listen(settings.backlog)
    sock.set_inheritable(True)
    return sock


def _check_grpc_port(settings: Settings) -> None:
    """gRPC: every worker binds the same port (SO_REUSEPORT); refuse one that another
    program holds, which SO_REUSEPORT would otherwise let the workers share silently."""
    if not settings.grpc_port:
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((settings.host.strip("[]"), settings.grpc_port))
        except OSError as exc:
            raise SystemExit(
                f"cannot listen for gRPC on {settings.host}:{settings.grpc_port} ({exc}): "
                "choose another --grpc-port, or 0 to turn gRPC off"
            ) from None


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies (so no orphan keeps the port)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: Settings, sock: socket.socket, slot: int, parent: int) -> None:
    """A worker process's entry point (spawned): serve on the inherited socket until a signal."""
    _die_with_parent(parent)
    logging.basicConfig(
        level=logging.INFO, format=f"%(levelname)s [worker {slot}] %(name)s: %(message)s"
    )
    from service.app import create_app
    from service.httpserver import serve

    sys.exit(serve(create_app(settings), settings, sockets=[sock]))


class Supervisor:
    """Starts, restarts and stops the workers (see the module docstring)."""

    def __init__(self, settings: Settings, workers: int, folder: Path) -> None:
        self.workers = workers
        self.folder = folder
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[BaseProcess | None] = [None] * workers
        self._started_at = [0.0] * workers
        self._due: list[float | None] = [0.0] * workers  # when an empty slot (re)starts
        self._backoff = [0.0] * workers
        self._serving = False  # every worker has started once
        self._stopping = False
        self._sock: socket.socket | None = None
        self._restart_counter: Any = None
        self.restarts = 0

    # -- running --------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if a worker failed to start."""
        from prometheus_client.multiprocess import mark_process_dead

        from service.metrics import worker_restarts

        self._mark_dead = mark_process_dead
        self._restart_counter = worker_restarts()
        self._sock = bind(self.settings)
        _check_grpc_port(self.settings)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "%d workers on %s:%d (intra-op threads %d each; shared state in %s)",
            self.workers, self.settings.host, self.settings.port,
            self.settings.intra_op_threads, self.folder,
        )  # fmt: skip
        try:
            while not self._stopping:
                self._start_due()
                sentinels = [p.sentinel for p in self._procs if p is not None]
                wait(sentinels, timeout=_TICK_S)
                if not self._reap():
                    self._stop_all()
                    return 1
                self._check_started()
            self._stop_all()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._sock.close()

    def _on_signal(self, sig: int, _: FrameType | None) -> None:
        if not self._stopping:
            log.info("%s: stopping the workers", signal.Signals(sig).name)
        self._stopping = True

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot, due in enumerate(self._due):
            if due is None or due > now or self._stopping:
                continue
            process = self._context.Process(
                target=run_worker,
                args=(self.settings, self._sock, slot + 1, os.getpid()),
                name=f"onnxserve-worker-{slot + 1}",
            )
            process.start()
            self._procs[slot], self._due[slot] = process, None
            self._started_at[slot] = time.monotonic()
            self._write_roster()

    def _write_roster(self) -> None:
        pids = [p.pid if p is not None else None for p in self._procs]
        workerstate.write_roster(self.folder, pids)

    def _check_started(self) -> None:
        if not self._serving:
            pids = [p.pid for p in self._procs if p is not None and p.pid is not None]
            self._serving = len(pids) == self.workers and all(
                workerstate.worker_file(self.folder, pid).exists() for pid in pids
            )
            if self._serving:
                log.info("all %d workers started", self.workers)

    def _reap(self) -> bool:
        """Clear the slots of dead workers and schedule their restart; False when a worker
        failed while the server was first starting."""
        for slot, process in enumerate(self._procs):
            if process is None or process.exitcode is None:
                continue
            pid, status = process.pid, process.exitcode
            assert pid is not None
            started = workerstate.worker_file(self.folder, pid).exists()
            self._forget(slot, process)
            if self._stopping:
                continue
            if not self._serving and not started and status is not None and status > 0:
                log.error(
                    "worker %d (pid %d) %s while starting: stopping (see its log above)",
                    slot + 1, pid, _describe(status),
                )  # fmt: skip
                return False
            lived = time.monotonic() - self._started_at[slot]
            delay = 0.0 if lived >= STABLE_S else min(MAX_BACKOFF_S, self._backoff[slot] * 2 or 0.5)
            self._backoff[slot] = delay
            self.restarts += 1
            self._restart_counter.inc()
            log.error(
                "worker %d (pid %d) %s after %.1f s; restarting it%s (%d restarts so far)",
                slot + 1, pid, _describe(status), lived,
                f" in {delay:g} s" if delay else "", self.restarts,
            )  # fmt: skip
            self._due[slot] = time.monotonic() + delay
        return True

    def _forget(self, slot: int, process: BaseProcess) -> None:
        assert process.pid is not None
        process.join()
        self._procs[slot] = None
        self._mark_dead(process.pid, str(self.folder / workerstate.METRICS))
        workerstate.worker_file(self.folder, process.pid).unlink(missing_ok=True)
        workerstate.stats_file(self.folder, process.pid).unlink(missing_ok=True)
        self._write_roster()

    def _stop_all(self) -> None:
        """SIGTERM every worker; wait for their drain; kill what remains."""
        self._stopping = True
        if self._sock is not None:
            _stop_listening(self._sock)
            self._sock.close()
        live = [p for p in self._procs if p is not None and p.exitcode is None]
        for process in live:
            assert process.pid is not None
            _send(process.pid, signal.SIGTERM)
        limit = self.settings.graceful_timeout_s + self.settings.drain_s + SHUTDOWN_SLACK_S
        deadline = time.monotonic() + limit
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in live:
            if process.exitcode is None:
                log.error("worker pid %s did not stop within %g s: killing it", process.pid, limit)
                process.kill()
                process.join()
        for slot, stopped in enumerate(self._procs):
            if stopped is not None:
                self._forget(slot, stopped)


def _stop_listening(sock: socket.socket) -> None:
    """Refuse new connections on the shared socket at once, in every worker.

    Closing our copy is not enough: each worker closes its own when it sees SIGTERM, up to
    uvicorn's 0.1 s tick apart, and a client that one draining worker sends away (Connection:
    close) may reconnect into the queue of another that is about to close, which resets it
    after its request was sent. shutdown(SHUT_RD) stops the socket listening for all of them
    (a connection queued but not yet accepted at this instant is reset). uvloop's server then
    simply stops accepting; asyncio's would log an accept error on every loop turn until its
    worker closes the socket, so without uvloop (uvicorn's choice, `loop="auto"`) each worker
    stops on its own.
    """
    if importlib.util.find_spec("uvloop") is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _send(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to `pid` unless it is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def supervise(settings: Settings, workers: int) -> int:
    """Run `workers` server processes on settings.host:port until SIGTERM/SIGINT (exit code)."""
    from service.runtime import available_cores

    cores = available_cores()
    folder = Path(tempfile.mkdtemp(prefix="onnxserve-workers-"))
    metrics = folder / workerstate.METRICS
    metrics.mkdir()
    # before prometheus_client is imported here, and inherited by every spawned worker
    os.environ[workerstate.METRICS_ENV] = str(metrics)
    threads = worker_threads(settings, workers, cores)
    if settings.intra_op_threads and threads < settings.intra_op_threads:
        log.warning(
            "%d workers x %d threads exceed the %d cores: %d thread(s) per worker",
            workers, settings.intra_op_threads, cores, threads,
        )  # fmt: skip
    own = settings.model_copy(
        update={"workers": workers, "worker_state_dir": folder, "intra_op_threads": threads}
    )
    try:
        return Supervisor(own, workers, folder).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
