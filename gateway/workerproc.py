"""The worker runs in a process of its own, supervised by the intake process.

Why: on a small machine, parsing and the SOAP/HTTP work of the backends (zeep, httpx) cost far more
CPU than accepting mail. In one process they share one event loop and one GIL with the SMTP
intake, and every SMTP step waits behind them. Split, the operating system schedules the two, and
the worker runs `worker_nice` steps below the intake, so that accepting (and durably storing)
mail comes first and ticket creation catches up right after a burst.

The channel between the two is the child's standard streams:
- parent -> child stdin: one byte per wake-up ("mail stored"); EOF means the parent is gone and
  the worker stops.
- child -> parent stdout: JSON lines, `{"t": "status", ...}` (component states for /healthz) and
  `{"t": "outcome" | "latency", ...}` (metrics). Logs go to the shared stderr.
Signals: SIGHUP reloads (the child re-reads config, rules, templates, secrets), SIGTERM drains.
The spool (SQLite in WAL mode) is shared; both processes open it, each with its own writer.
If the worker dies, the supervisor starts it again with backoff; a worker starts by taking its
owner name in the spool (`Spool.hold_owner`, so that a worker left draining by a crashed intake
finishes first) and putting back what was left `processing` under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway import retry
from gateway.metrics import Metrics
from gateway.status import StatusBoard

log = logging.getLogger("gateway.workerproc")

WAKE = b"w"
STOP_MARGIN = 4.0  # seconds the worker may take beyond the drain grace to stop


class EventMetrics:
    """The worker's side of `Metrics`: each observation becomes a JSON line for the parent.

    The lines of one turn of the event loop go out in one write (a ticket makes several: its
    outcome, each backend call's latency, its acknowledgement), so the parent wakes once for
    them, not once per line. Outside a running loop a line goes out at once.
    """

    def __init__(self, out: Any) -> None:
        self.out = out
        self._lines: list[str] = []
        self._flush_scheduled = False

    def _emit(self, event: dict[str, Any]) -> None:
        self._lines.append(json.dumps(event, separators=(",", ":")) + "\n")
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines not yet written (the loop calls it once per turn; a stop, last)."""
        self._flush_scheduled = False
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self.out.write("".join(lines))
            self.out.flush()
        except (OSError, ValueError):  # parent gone: nothing left to tell
            pass

    def outcome(self, name: str, intake: str, rule: str, backend: str) -> None:
        self._emit(
            {"t": "outcome", "name": name, "intake": intake, "rule": rule, "backend": backend}
        )

    def count(self, name: str, **labels: str) -> None:
        self._emit({"t": "count", "name": name, "labels": labels})

    def backend_latency(self, backend: str, seconds: float, ok: bool) -> None:
        self._emit({"t": "latency", "backend": backend, "seconds": seconds, "ok": ok})

    def recovered_mails(self, requeued: int, uncertain: int) -> None:
        self._emit({"t": "recovered", "requeued": requeued, "uncertain": uncertain})

    def status(self, board: StatusBoard, skip: tuple[str, ...] = ()) -> None:
        for comp in board.components.values():
            if comp.name in skip:
                continue
            self._emit(
                {
                    "t": "status",
                    "name": comp.name,
                    "kind": comp.kind,
                    "ok": comp.ok,
                    "detail": comp.detail,
                    "since": comp.since,
                    "extra": comp.extra,
                }
            )


def apply_event(event: dict[str, Any], status: StatusBoard, metrics: Metrics) -> None:
    """Parent side: fold one event line of the worker into /healthz and /metrics."""
    kind = event.get("t")
    if kind == "outcome":
        metrics.outcome(
            str(event.get("name", "")),
            str(event.get("intake", "")),
            str(event.get("rule", "")),
            str(event.get("backend", "")),
        )
    elif kind == "count":
        labels = event.get("labels") or {}
        try:
            metrics.count(str(event.get("name", "")), **{str(k): str(v) for k, v in labels.items()})
        except ValueError as exc:  # a newer worker's counter: never let it stop the reader
            log.warning("unknown_metric", extra={"fields": {"error": str(exc)}})
    elif kind == "latency":
        metrics.backend_latency(
            str(event.get("backend", "")), float(event.get("seconds", 0.0)), bool(event.get("ok"))
        )
    elif kind == "recovered":
        metrics.recovered_mails(int(event.get("requeued", 0)), int(event.get("uncertain", 0)))
    elif kind == "status":
        comp = status.register(str(event["name"]), str(event.get("kind", "worker")))
        comp.ok = bool(event.get("ok"))
        comp.detail = str(event.get("detail", ""))
        comp.since = float(event.get("since", time.time()))
        comp.extra = dict(event.get("extra") or {})


class WorkerSupervisor:
    """Starts the worker process, wakes it, reads its events, restarts it when it dies."""

    def __init__(
        self,
        config_path: Path,
        status: StatusBoard,
        metrics: Metrics,
        *,
        python: str = sys.executable,
        index: int = 0,
    ) -> None:
        self.config_path = config_path
        self.index = index  # `[gateway] worker_processes`: the N-th worker of this node
        self.status = status
        self.metrics = metrics
        self.python = python
        self.proc: asyncio.subprocess.Process | None = None
        self.component = status.register("worker" if index == 0 else f"worker:{index}", "worker")
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._reported = asyncio.Event()
        self._wake_scheduled = False
        self.restarts = 0

    def start(self) -> None:
        """Start the worker (and restart it whenever it dies)."""
        self._task = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker has reported its components (or `timeout`)."""
        try:
            await asyncio.wait_for(self._reported.wait(), timeout)
        except TimeoutError:
            log.warning("worker_slow_start", extra={"fields": {"timeout": f"{timeout:.0f}"}})

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "gateway",
            "_worker",
            "-c",
            str(self.config_path),
            "--index",
            str(self.index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the worker logs to the same stream as the intake
            limit=1 << 20,
            # its own process group: a Ctrl-C in a terminal reaches only the intake, which then
            # drains the worker with SIGTERM; if the intake dies, stdin EOF stops the worker.
            # Not its own session: Linux puts each session in its own scheduling autogroup,
            # where worker_nice would no longer weigh the worker against the intake.
            process_group=0,
            env=worker_environment(os.environ),
        )

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            self.proc = await self._spawn()
            self.component.set_ok(f"pid {self.proc.pid}")
            self.wake()  # whatever was queued before it started
            await self._read_events(self.proc)
            rc = await self.proc.wait()
            if self._stopping:
                break
            self.restarts += 1
            self.component.set_down(f"worker exited with {rc}; restarting")
            log.error("worker_died", extra={"fields": {"rc": rc, "restarts": self.restarts}})
            # the next worker puts back what this one left `processing` (see Daemon.startup)
            failures = 1 if time.monotonic() - started > 60 else failures + 1
            await asyncio.sleep(retry.SUPERVISOR.delay(failures))

    async def _read_events(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                apply_event(event, self.status, self.metrics)
                if event.get("t") == "status":
                    self._reported.set()

    def wake(self) -> None:
        """Wake the worker; wake-ups within one turn of the event loop share one byte. How much
        CPU the worker gets while the intake is busy is the OS scheduler's call (`worker_nice`).
        """
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        asyncio.get_running_loop().call_soon(self._write_wake)

    def _write_wake(self) -> None:
        self._wake_scheduled = False
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        transport = proc.stdin.transport
        # one byte per stored mail is plenty; never let the pipe's buffer grow without bound
        if transport.get_write_buffer_size() < 64:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.write(WAKE)

    def reload(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    async def stop(self, grace: float, *, force: bool = False) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            if force:
                proc.send_signal(signal.SIGTERM)  # a second one: the worker stops at once
            try:
                # the worker drains for `grace` and needs about 2 s more to put back what it cut
                # and close; past that it is killed (its `processing` mails are requeued at
                # the next start), so that a stop takes at most drain_timeout + 5 s
                await asyncio.wait_for(proc.wait(), timeout=grace + STOP_MARGIN)
            except TimeoutError:
                log.error("worker_kill", extra={"fields": {"reason": "drain_timeout"}})
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def forward_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)


async def read_wakeups(notify: Any, on_eof: Any) -> None:
    """Child side: call `notify()` per read of wake-up bytes on stdin; `on_eof()` when the parent
    is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        data = await reader.read(4096)
        if not data:
            on_eof()
            return
        notify()


# glibc's documented tunables (not mallopt through ctypes): big buffers in mappings of their own,
# given back to the kernel when freed, so a large mail costs memory only while it is handled;
# an admin's own GLIBC_TUNABLES wins, other C libraries ignore the variable
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=524288"


def worker_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: the parent's, less what systemd means for the main process only
    (NotifyAccess=main, socket activation), plus `MALLOC_TUNABLES` unless the admin set some."""
    env = {
        k: v
        for k, v in parent.items()
        if k
        not in (
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        )
    }
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return env


SCHEDULING_POLICIES = {
    "batch": getattr(os, "SCHED_BATCH", None),
    "idle": getattr(os, "SCHED_IDLE", None),
    "normal": None,
}


def lower_priority(steps: int, scheduling: str = "batch") -> str:
    """Put the calling process below the intake: `steps` of niceness and a scheduling policy.

    Call it first thing in the worker process, before it starts any thread: on Linux both the
    niceness and the policy belong to a thread and are inherited by the threads (and parser
    processes) it starts later.

    - "batch" (SCHED_BATCH, the default): the kernel treats the worker as CPU-bound background
      work; it does not preempt the intake when it wakes, and the niceness weighs its share.
    - "idle" (SCHED_IDLE): the worker runs only on CPU time that nothing else on the host wants.
      The intake keeps a whole core through a burst, but a host kept busy by other work stops
      ticketing until it has time to spare.
    - "normal": niceness only.

    Returns what was applied, for the log (`nice=10 policy=batch`); a policy the kernel or the
    service's sandbox refuses is left out of it, never an error.
    """
    applied = []
    if steps > 0:
        with contextlib.suppress(OSError):
            os.nice(steps)
            applied.append(f"nice={steps}")
    policy = SCHEDULING_POLICIES.get(scheduling)
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            pass
        else:
            applied.append(f"policy={scheduling}")
    return " ".join(applied)
