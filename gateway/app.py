"""Builds the daemon from config and runs its lifecycle: startup, main loop, reload, shutdown.

Only this module (and the CLI) reads config; stages get plain values. Signal handlers only record
what was asked (STYLE 9); the main loop acts: SIGHUP reloads config, rules and templates (an
invalid new set leaves the old one in force and /healthz says why), reopens the log file, and
rebuilds each backend whose config or secrets (re-read from their files and variables) changed:
new calls use the new client, calls in flight finish on the old one, which is closed after them.
Adding or removing a backend needs a restart. SIGTERM/SIGINT drain (new SMTP sessions
get 421, in-flight work may finish within `drain_timeout`, the rest stays queued), a second
SIGINT/SIGTERM forces the stop. systemd: READY=1 once the spool is open and intakes listen,
STATUS= with a live summary, WATCHDOG=1 from the main loop.

Exit codes: 0 clean stop; 1 config/rules invalid at start; 2 cannot open the spool or bind;
3 a core task (worker, acknowledgement sender, intake) died: systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from gateway import __version__, classify, ruletests
from gateway.ack import Template, load_templates
from gateway.ackpolicy import AckPolicy, DkimSettings
from gateway.config import Config, load_config, spool_settings
from gateway.errors import ConfigError, GatewayError, Problem
from gateway.logs import setup_logging
from gateway.metrics import Metrics
from gateway.rules import RuleSet, load_rules
from gateway.secrets import SecretError, resolve_secret
from gateway.spool import Recovered, Spool, open_spool
from gateway.spool.base import AckLimits, RetentionPolicy
from gateway.status import StatusBoard
from gateway.workerproc import (
    EventMetrics,
    WorkerSupervisor,
    read_wakeups,
)

# What only one role uses is imported where that role builds it: the intake process never loads
# the pipeline (the worker, the backends' HTTP stack, the ack sender's SMTP client), and a worker
# process never loads the listeners (aiohttp for /healthz, aiosmtpd) or the retention task.
# Every worker (re)start pays its imports: they are most of its start-up CPU.
if TYPE_CHECKING:
    from gateway.ack import AckSender
    from gateway.backends.base import Backend
    from gateway.backends.http import ResponseBudget
    from gateway.health import HealthServer
    from gateway.intake.smtp import SmtpListener
    from gateway.spool.retention import RetentionTask
    from gateway.worker import Worker, WorkerSettings

log = logging.getLogger("gateway.app")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STARTUP = 2
EXIT_FAILED = 3
CLOSE_TIMEOUT = 2.0  # seconds the backends' courtesy logouts may take at a stop
ACK_STOP_TIMEOUT = 10.0  # seconds an acknowledgement on its way may take to finish at a stop


def sd_notify(message: str) -> None:
    """Send a state line to systemd when run as Type=notify; a no-op otherwise."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify_failed", extra={"fields": {"error": str(exc)}})


def load_rule_set(cfg: Config, *, tests: bool = True) -> tuple[RuleSet, dict[str, Template]]:
    """Rules and templates as one unit: both valid, or ConfigError listing every problem.

    With `tests` the rule tests (`<rules dir>/tests/*.toml`) must pass too: a rule change that
    breaks one is refused like a broken rule file (at start-up, on reload, by `gateway check`).
    """
    try:
        templates = load_templates(cfg.templates_dir)
    except ValueError as exc:
        raise ConfigError([Problem(str(cfg.templates_dir), 0, str(exc))]) from exc
    rules = load_rules(
        cfg.rules_dir,
        {name: b.type for name, b in cfg.backends.items()},
        timezone=cfg.gateway.timezone,
        templates=set(templates),
        intakes={"smtp", "pipe", *(i.name for i in cfg.imap)},
    )
    if tests:
        ruletests.load_and_check(
            rules,
            cfg.rules_dir,
            own_addresses=cfg.own_addresses(),
            token_formats=classify.token_formats(b.subject_token for b in cfg.backends.values()),
            timezone=cfg.gateway.timezone,
            fallback_charsets=cfg.mail.fallback_charsets,
        )
    return rules, templates


def retention_policy(cfg: Config) -> RetentionPolicy:
    r = cfg.retention
    return RetentionPolicy(
        done_raw_days=r.done_raw_days,
        suppressed_raw_days=r.suppressed_raw_days,
        duplicate_raw_days=r.duplicate_raw_days,
        dead_days=r.dead_days,
        maps_days=r.maps_days,
        outbox_days=r.outbox_days,
        batch=r.batch,
    )


def relay_password(cfg: Config) -> str | None:
    secret = resolve_secret(
        cfg.ack.relay_password,
        cfg.ack.relay_password_file,
        cfg.ack.relay_password_env,
        what="ack.relay_password",
        base_dir=cfg.base_dir,
        required=False,
    )
    return secret.get_secret_value() if secret is not None else None


def backend_key(cfg: Config, name: str) -> tuple[Any, ...]:
    """What a backend was built from: its config and a digest of each secret it reads now.

    A secret given as *_file or *_env is read again, so a rotated credential file counts as a
    change on SIGHUP. Only digests are kept, never the values.
    """
    bcfg = cfg.backends[name]
    fields = type(bcfg).model_fields
    digests: list[str] = []
    for key in sorted(fields):
        if f"{key}_file" not in fields or f"{key}_env" not in fields:
            continue
        try:
            value = resolve_secret(
                getattr(bcfg, key),
                getattr(bcfg, f"{key}_file"),
                getattr(bcfg, f"{key}_env"),
                what=f"backends.{name}.{key}",
                base_dir=cfg.base_dir,
                required=False,
            )
        except SecretError:
            digests.append(f"{key}:unreadable")
            continue
        text = value.get_secret_value() if value is not None else ""
        digests.append(f"{key}:{hashlib.sha256(text.encode()).hexdigest()}")
    return (bcfg.model_dump_json(), tuple(digests))


def ack_policy(cfg: Config) -> AckPolicy:
    """The `[ack]` settings the acknowledgement decision needs (the worker's and `gateway route`'s)."""
    return AckPolicy(
        enabled=cfg.ack.enabled,
        require=cfg.ack.require,
        trusted_authserv_ids=frozenset(cfg.ack.trusted_authserv_ids),
        own_addresses=frozenset(cfg.own_addresses()),
        never_to=tuple(cfg.ack.never_to),
        verify_dkim=cfg.ack.verify_dkim,
    )


def dkim_settings(cfg: Config) -> DkimSettings:
    """Where the gateway's own DKIM check looks keys up (`[ack] dkim_nameservers`)."""
    return DkimSettings(nameservers=tuple(cfg.ack.dkim_nameservers))


def worker_settings(cfg: Config) -> WorkerSettings:
    from gateway.worker import WorkerSettings

    shared = bool(cfg.spool.url) or cfg.gateway.worker_processes > 1
    return WorkerSettings(
        concurrency=cfg.gateway.workers,
        fallback_charsets=tuple(cfg.mail.fallback_charsets),
        retry_base=cfg.retry.base,
        retry_max_delay=cfg.retry.max_delay,
        retry_deadline=cfg.retry.deadline,
        paused_check=cfg.retry.paused_check,
        max_crashes=cfg.retry.max_crashes,
        own_addresses=frozenset(cfg.own_addresses()),
        timezone=cfg.gateway.timezone,
        followup_closed=cfg.gateway.followup_closed,
        followup_sender=cfg.gateway.followup_sender,
        ack_policy=ack_policy(cfg),
        dkim=dkim_settings(cfg),
        ack_limits=AckLimits(
            per_sender=cfg.ack.rate_limit,
            per_domain=cfg.ack.domain_rate_limit,
            global_limit=cfg.ack.global_rate_limit,
            stranger_share=cfg.ack.stranger_share,
        ),
        ack_from_address=cfg.ack.from_address,
        ack_from_name=cfg.ack.from_name,
        ack_envelope_from=cfg.ack.envelope_from,
        hostname=cfg.gateway.hostname,
        # Shared limits cost spool writes per call: only where more than one process calls
        # the backends (several worker processes, or nodes sharing a PostgreSQL spool).
        backend_concurrency=(
            {name: b.concurrency for name, b in cfg.backends.items()} if shared else {}
        ),
        shared_pauses=shared,
    )


Role = str  # "all": one process; "intake": SMTP/IMAP/health + supervisor; "worker": the child


class Daemon:
    """The daemon in one of three roles (see `gateway.workerproc`): `all` runs everything in one
    process; `intake` (the default `gateway run`) accepts and stores mail, serves /healthz and
    /metrics and supervises the worker process; `worker` (`gateway _worker`) runs the pipeline
    and the acknowledgement sender and reports to its parent over stdout.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        smtp_sock: socket.socket | None = None,
        role: Role = "all",
        worker_index: int = 0,
    ) -> None:
        self.cfg = cfg
        self.role = role
        self.worker_index = worker_index
        self.smtp_sock = smtp_sock
        self.supervisors: list[WorkerSupervisor] = []  # one per `worker_processes`
        self._files_sig: tuple[tuple[str, int, int], ...] = ()
        self.events: EventMetrics | None = None
        self.status = StatusBoard()
        self.metrics = Metrics()
        self.spool: Spool | None = None
        self.backends: dict[str, Backend] = {}
        self.worker: Worker | None = None
        self.smtp: SmtpListener | None = None
        self.health: HealthServer | None = None
        self.ack_sender: AckSender | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self.imaps: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.retention: RetentionTask | None = None
        self._backend_keys: dict[str, tuple[Any, ...]] = {}
        # what all backends' answers in flight may hold in this process (one budget for all;
        # made with the backends, in the roles that call them)
        self._response_budget: ResponseBudget | None = None
        self._retiring: dict[Backend, asyncio.Task[None]] = {}  # replaced on reload, closing
        self.executor: ProcessPoolExecutor | None = None
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self.failed = False  # a core task died: exit non-zero so systemd restarts us
        self._forced = asyncio.Event()  # a second SIGTERM/SIGINT: cut the drain short
        self._signals = 0
        self._wakeup = asyncio.Event()

    # -- signals: record only ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self._signals += 1
            if self.should_exit:
                self.force_exit = True
                self._forced.set()
            self.should_exit = True
        self._wakeup.set()

    # -- startup ------------------------------------------------------------------------------

    async def startup(self) -> None:
        cfg = self.cfg
        self._files_sig = self._files_signature()  # what this start read; the watcher compares
        self.rules, self.templates = load_rule_set(cfg)
        self.rules_status = self.status.register("rules", "rules")
        self.rules_status.set_ok(f"{len(self.rules.rule_names)} rules")
        spool_status = self.status.register("spool", "spool")
        rec = Recovered()
        self.spool = await open_spool(
            spool_settings(cfg, durable=self.role != "worker", worker=self.worker_index)
        )
        if self.role != "intake":
            # Only one process may work under an owner name (node/worker) at a time: after a
            # crash of the intake, the old worker may still be draining; the new one waits for
            # it, then puts back what was left `processing` under its name (and only then, or
            # it would take mails still in flight). A dead node's mails come back by lease.
            await self.spool.hold_owner()
            rec = await self.spool.recover()
            if rec.requeued:
                log.warning(
                    "recovered",
                    extra={"fields": {"requeued": rec.requeued, "uncertain": rec.uncertain}},
                )
        spool_status.set_ok(self.spool.engine if cfg.spool.url else str(cfg.spool_path.name))
        if self.role != "intake":
            self._start_pipeline()
            if rec.requeued and self.worker is not None and self.worker.metrics is not None:
                self.worker.metrics.recovered_mails(rec.requeued, rec.uncertain)
        if self.role == "worker":
            await self._start_worker_role()
            return
        await self._start_intakes()

    def _start_pipeline(self) -> None:
        """Backends, the worker and the acknowledgement sender (roles `all` and `worker`)."""
        from gateway.ack import AckSender
        from gateway.backends.http import ResponseBudget
        from gateway.backends.registry import make_backend
        from gateway.worker import Worker

        cfg = self.cfg
        assert self.spool is not None
        self._response_budget = ResponseBudget(cfg.gateway.max_response_bytes_in_flight)
        metrics: Any = self.metrics
        if self.role == "worker":
            self.events = EventMetrics(sys.stdout)
            metrics = self.events
        for name, bcfg in cfg.backends.items():
            self._backend_keys[name] = backend_key(cfg, name)
            self.backends[name] = make_backend(
                name, bcfg, base_dir=cfg.base_dir, budget=self._response_budget
            )
        if cfg.gateway.parse_processes > 0:
            self.executor = ProcessPoolExecutor(
                max_workers=cfg.gateway.parse_processes,
                mp_context=multiprocessing.get_context("forkserver"),
            )
        self.worker = Worker(
            self.spool,
            self.backends,
            self.rules,
            self.templates,
            worker_settings(cfg),
            tokens={name: b.subject_token for name, b in cfg.backends.items()},
            executor=self.executor,
            status=self.status,
            metrics=metrics,
            on_ack=self._wake_acks,
        )
        outbox_status = self.status.register("outbox", "outbox")
        if cfg.ack.enabled:
            host, _, port = cfg.ack.relay.rpartition(":")
            self.ack_sender = AckSender(
                self.spool,
                host,
                int(port),
                status=outbox_status,
                metrics=metrics,
                relay_tls=cfg.ack.relay_tls,
                username=cfg.ack.relay_username,
                password=relay_password(cfg),
            )
        self.tasks.append(asyncio.create_task(self.worker.run(), name="worker"))
        self.tasks.append(
            asyncio.create_task(self.worker.keep_leases(cfg.spool.lease), name="leases")
        )
        if self.ack_sender is not None:
            self._ack_task = asyncio.create_task(self.ack_sender.run(), name="ack-sender")
            self.tasks.append(self._ack_task)

    async def _start_worker_role(self) -> None:
        """The child (already at its lower priority: `gateway _worker` set it before any thread
        started): wake-ups from stdin, status lines to stdout."""
        assert self.worker is not None
        worker = self.worker

        def parent_gone() -> None:
            log.warning("parent_gone", extra={"fields": {}})
            self.should_exit = True
            self._wakeup.set()

        self.tasks.append(
            asyncio.create_task(read_wakeups(worker.notify, parent_gone), name="wakeups")
        )
        self.tasks.append(asyncio.create_task(self._report_status(), name="status-report"))

    async def _report_status(self) -> None:
        assert self.events is not None
        while True:
            self.events.status(self.status, skip=("rules", "spool"))
            await asyncio.sleep(1.0)

    def _files_signature(self) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and modification times of what a reload reads."""
        cfg = self.cfg
        paths = [cfg.path]
        watched = (
            (cfg.rules_dir, "*.toml"),
            (cfg.rules_dir / ruletests.TESTS_DIR, "*.toml"),
            (cfg.templates_dir, "*.txt"),
        )
        for d, pattern in watched:
            with contextlib.suppress(OSError):
                paths.extend(sorted(d.glob(pattern)))
        sig = []
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            sig.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(sig)

    async def _watch_files(self) -> None:
        """Reload, as on SIGHUP, when an admin saves a rule file, a template or the config."""
        last = self._files_sig
        while True:
            await asyncio.sleep(self.cfg.rules.watch_interval)
            if not self.cfg.rules.watch:
                continue
            now = await asyncio.to_thread(self._files_signature)
            if now != last:
                last = now
                log.info("files_changed", extra={"fields": {"action": "reload"}})
                self.reload_requested = True
                self._wakeup.set()

    async def _start_intakes(self) -> None:
        """SMTP, IMAP, /healthz, retention, and the worker process (roles `all` and `intake`)."""
        from gateway.health import HealthServer
        from gateway.intake.smtp import IntakeHandler, SmtpListener
        from gateway.spool.retention import RetentionTask

        cfg = self.cfg
        assert self.spool is not None
        if self.role == "intake":
            for index in range(cfg.gateway.worker_processes):
                sup = WorkerSupervisor(cfg.path, self.status, self.metrics, index=index)
                sup.start()
                self.supervisors.append(sup)
        if cfg.smtp.enabled:
            smtp_status = self.status.register("intake:smtp", "intake")
            handler = IntakeHandler(
                self.spool,
                set(cfg.smtp.recipients),
                max_recipients=cfg.smtp.max_recipients,
                on_stored=self._on_stored,
            )
            host, _, port = cfg.smtp.listen.rpartition(":")
            self.smtp = SmtpListener(
                handler,
                host,
                int(port),
                hostname=cfg.gateway.hostname,
                max_size=cfg.smtp.max_size,
                max_per_ip=cfg.smtp.max_connections_per_ip,
                data_timeout=cfg.smtp.data_timeout,
            )
            await self.smtp.start(self.smtp_sock)
            smtp_status.set_ok(f"listening on {host}:{self.smtp.port}")
        host, _, port = cfg.health.listen.rpartition(":")
        self.health = HealthServer(
            host,
            int(port),
            self.status,
            self.metrics,
            queue_info=self.queue_info,
            spool_info=self.spool_info,
            node=cfg.node,
            engine=self.spool.engine,
            oldest_queued_max=cfg.health.oldest_queued_max,
            backend_down_max=cfg.health.backend_down_max,
            # a SQLite spool's file system; a PostgreSQL spool's disk is the database server's
            disk_free=self._spool_disk_free if cfg.spool.min_free and not cfg.spool.url else None,
            min_free=int(cfg.spool.min_free),
        )
        self.health.before_scrape = self._refresh_gauges
        await self.health.start()
        for icfg in cfg.imap:
            comp = self.status.register(f"intake:imap:{icfg.name}", "intake")
            self.tasks.append(
                asyncio.create_task(self._mailbox(icfg, comp), name=f"imap:{icfg.name}")
            )
        for sup in self.supervisors:
            await sup.ready()  # its components are on /healthz before READY=1
        self.health.started = True
        self.tasks.append(asyncio.create_task(self._watch_files(), name="watch-files"))
        if cfg.retention.enabled:
            self.retention = RetentionTask(
                self.spool, retention_policy(cfg), interval=cfg.retention.interval
            )
            self.tasks.append(asyncio.create_task(self.retention.run(), name="retention"))

    async def _mailbox(self, icfg: Any, comp: Any) -> None:
        """Poll one `[[imap]]` mailbox while this node holds its lease `imap:NAME` in the spool:
        one node at a time per mailbox across the cluster. Another node takes over within the
        lease when this one dies (its lease is not renewed) or stops (it drops the lease)."""
        from gateway.intake.imap import ImapIntake

        assert self.spool is not None
        name, lease = f"imap:{icfg.name}", self.cfg.spool.lease
        standby = False
        while not self.should_exit:
            if not await self._try_lease(name, lease):
                if not standby:
                    log.info(
                        "imap_standby",
                        extra={"fields": {"mailbox": icfg.name, "node": self.cfg.node}},
                    )
                    comp.set_ok("standby: another node polls this mailbox")
                    standby = True
                await asyncio.sleep(min(2.0, lease / 3))
                continue
            standby = False
            log.info(
                "imap_lease_taken", extra={"fields": {"mailbox": icfg.name, "node": self.cfg.node}}
            )
            intake = ImapIntake(
                icfg, _CountingSpool(self.spool, self), comp, base_dir=self.cfg.base_dir
            )
            self.imaps.append(intake)
            run = asyncio.create_task(intake.run(), name=f"imap-poll:{icfg.name}")
            renewed = time.monotonic()
            try:
                while not run.done():
                    await asyncio.wait({run}, timeout=lease / 3)
                    if run.done() or self.should_exit:
                        break
                    held = await self._try_lease(name, lease)
                    if held:
                        renewed = time.monotonic()
                    elif held is False or time.monotonic() - renewed > lease * 0.8:
                        # taken by another node (or no renewal for most of a lease)
                        log.warning("imap_lease_lost", extra={"fields": {"mailbox": icfg.name}})
                        break
            finally:
                if not run.done():
                    await intake.stop()
                    await asyncio.wait({run}, timeout=30)
                self.imaps.remove(intake)
            if run.done() and not run.cancelled() and run.exception() is not None:
                raise run.exception()  # type: ignore[misc]

    async def _try_lease(self, name: str, seconds: float) -> bool | None:
        """True: held; False: another holds it; None: the spool did not answer."""
        assert self.spool is not None
        try:
            return await self.spool.try_lease(name, seconds)
        except GatewayError as exc:
            log.warning("lease_failed", extra={"fields": {"lease": name, "error": str(exc)}})
            return None

    def _on_stored(self, msg_id: int) -> None:
        self.metrics.received.labels(intake="smtp").inc()
        self.wake_worker(msg_id)

    def wake_worker(self, msg_id: int) -> None:
        if self.worker is not None:
            self.worker.notify(msg_id)
        else:
            for sup in self.supervisors:  # they claim from one spool: whoever is free takes it
                sup.wake()

    def _wake_acks(self) -> None:
        if self.ack_sender is not None:
            self.ack_sender.wake.set()

    async def queue_info(self) -> dict[str, Any]:
        assert self.spool is not None
        counts = await self.spool.counts()
        oldest = await self.spool.oldest_pending()
        return {
            "waiting": counts.waiting,
            "deferred": counts["deferred"],
            "dead": counts["dead"],
            "outbox_pending": counts["outbox_pending"],
            "oldest_queued_age": round(time.time() - oldest, 1) if oldest else None,
        }

    async def spool_info(self) -> dict[str, Any]:
        """/healthz `spool`: the engine and the worker processes (of any node) alive."""
        assert self.spool is not None
        alive = await self.spool.nodes(within=self.cfg.spool.lease)
        return {
            "nodes": sorted({n.node for n in alive}),
            "workers": [
                {
                    "owner": n.owner,
                    "claims": n.claims,
                    "seen_age": round(time.time() - n.seen_at, 1),
                }
                for n in alive
            ],
        }

    def _spool_disk_free(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system."""
        st = os.statvfs(self.cfg.spool_path.parent)
        return st.f_bavail * st.f_frsize

    async def _refresh_gauges(self) -> None:
        # the components first: they are current even when the spool does not answer below
        for comp in self.status.components.values():
            self.metrics.component_up.labels(component=comp.name, kind=comp.kind).set(
                1 if comp.ok else 0
            )
            if comp.kind == "backend":
                paused = not comp.ok and comp.detail.startswith("paused")
                name = comp.name.removeprefix("backend:")
                self.metrics.backend_paused.labels(backend=name).set(1 if paused else 0)
        q = await self.queue_info()
        self.metrics.queue_depth.set(q["waiting"])
        self.metrics.dead_letters.set(q["dead"])
        self.metrics.outbox_pending.set(q["outbox_pending"])
        self.metrics.oldest_age.set(q["oldest_queued_age"] or 0)

    # -- reload ---------------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read config, rules, templates and secrets; keep the old ones when anything is
        invalid. Backends whose config or secrets changed are rebuilt (see the module docstring).
        """
        try:
            new_cfg = load_config(self.cfg.path)
            rules, templates = load_rule_set(new_cfg)
            if set(new_cfg.backends) != set(self.cfg.backends):
                raise GatewayError(
                    "backends were added or removed"
                    f" ({', '.join(sorted(set(new_cfg.backends) ^ set(self.cfg.backends)))}):"
                    " that needs a restart"
                )
            ack_password = relay_password(new_cfg) if self.ack_sender is not None else None
            rebuilt = self._build_changed_backends(new_cfg) if self.role != "intake" else {}
        except (ConfigError, GatewayError) as exc:
            self.rules_status.set_down(
                f"reload refused, old rules in force: {exc}".replace("\n", "; ")
            )
            log.error("reload_refused", extra={"fields": {"problems": str(exc)}})
            return
        for sup in self.supervisors:
            sup.reload()  # the worker re-reads the same, now validated, files
        for name, (backend, key) in rebuilt.items():
            assert self.worker is not None
            old = self.backends[name]
            self.backends[name] = backend  # the worker's dict: new calls use the new client
            self._backend_keys[name] = key
            self.worker.paused.pop(name, None)  # new credentials are tried at once
            self._retire(old)
            log.info("backend_rebuilt", extra={"fields": {"backend": name}})
        if self.ack_sender is not None:
            host, _, port = new_cfg.ack.relay.rpartition(":")
            self.ack_sender.host, self.ack_sender.port = host, int(port)
            self.ack_sender.relay_tls = new_cfg.ack.relay_tls
            self.ack_sender.username = new_cfg.ack.relay_username
            self.ack_sender.password = ack_password
        if self.retention is not None:
            self.retention.policy = retention_policy(new_cfg)
            self.retention.interval = new_cfg.retention.interval
        try:
            setup_logging(
                new_cfg.gateway.log_level, new_cfg.gateway.log_format, new_cfg.log_file
            )  # also reopens the log file after logrotate moved it
        except OSError as exc:
            log.error("log_reopen_failed", extra={"fields": {"error": str(exc)}})
        self.cfg = new_cfg
        if self._response_budget is not None:
            self._response_budget.limit = new_cfg.gateway.max_response_bytes_in_flight
        if self.worker is not None:
            # One assignment each: a mail is routed by the old set or the new set, never a mix.
            self.worker.rules = rules
            self.worker.templates = templates
            self.worker.s = worker_settings(new_cfg)
        if self.smtp is not None:
            self.smtp.handler.recipients = {r.lower() for r in new_cfg.smtp.recipients}
        self.rules, self.templates = rules, templates
        self.rules_status.set_ok(f"{len(rules.rule_names)} rules (reloaded)")
        log.info("reloaded", extra={"fields": {"rules": len(rules.rule_names)}})

    def _build_changed_backends(
        self, new_cfg: Config
    ) -> dict[str, tuple[Backend, tuple[Any, ...]]]:
        """Build a new backend for each one whose config or secrets changed; all or none."""
        from gateway.backends.registry import make_backend

        built: dict[str, tuple[Backend, tuple[Any, ...]]] = {}
        try:
            for name, bcfg in new_cfg.backends.items():
                key = backend_key(new_cfg, name)
                if key != self._backend_keys.get(name):
                    backend = make_backend(
                        name, bcfg, base_dir=new_cfg.base_dir, budget=self._response_budget
                    )
                    built[name] = (backend, key)
        except GatewayError:
            for backend, _ in built.values():
                self._retire(backend, wait=False)
            raise
        return built

    def _retire(self, backend: Backend, *, wait: bool = True) -> None:
        """Close a replaced backend once the messages in flight now (which may use it) are done."""
        inflight = set(self.worker._inflight) if (wait and self.worker is not None) else set()

        async def close() -> None:
            if inflight:
                await asyncio.wait(inflight)
            with contextlib.suppress(Exception):
                await backend.aclose()
            self._retiring.pop(backend, None)

        self._retiring[backend] = asyncio.create_task(close(), name="backend-retire")

    # -- main loop --------------------------------------------------------------------------------

    async def main_loop(self) -> None:
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        interval = max(0.5, watchdog_usec / 2e6) if watchdog_usec else 5.0
        notify = sd_notify if self.role != "worker" else (lambda _msg: None)  # only the main
        notify("READY=1\nSTATUS=started")
        log.info(
            "worker_ready" if self.role == "worker" else "ready",
            extra={"fields": {"version": __version__}},
        )
        while not self.should_exit:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=interval)
            if self.reload_requested:
                self.reload_requested = False
                notify("RELOADING=1")
                await self.reload()
                notify("READY=1")
            for task in self.tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error(
                        "task_failed",
                        extra={"fields": {"task": task.get_name(), "error": str(task.exception())}},
                    )
                    self.should_exit = True
                    self.failed = True
            if watchdog_usec:
                notify("WATCHDOG=1")
            with contextlib.suppress(Exception):
                q = await self.queue_info()
                notify(
                    f"STATUS=waiting={q['waiting']} dead={q['dead']} outbox={q['outbox_pending']}"
                )

    async def shutdown(self) -> None:
        if self.role != "worker":
            sd_notify("STOPPING=1")
        log.info("stopping", extra={"fields": {}})
        grace = 0.0 if self.force_exit else self.cfg.gateway.drain_timeout
        # Everything below fits in drain_timeout + 5 s: the SMTP sessions still open finish
        # (at most 5 s) while the worker drains, new connections get 421 meanwhile, and what is
        # cut stays queued.
        smtp_stopped: asyncio.Future[None] | None = None
        if self.smtp is not None:
            self.smtp.drain()
            smtp_stopped = asyncio.ensure_future(
                self.smtp.sessions_done(0.0 if self.force_exit else min(grace, 5.0))
            )
        for intake in list(self.imaps):
            await intake.stop()
        if self.spool is not None and self.role != "worker":
            for icfg in self.cfg.imap:  # another node takes the mailbox over at once
                with contextlib.suppress(GatewayError):
                    await self.spool.drop_lease(f"imap:{icfg.name}")
        cut = 0
        if self.supervisors:
            stopping: asyncio.Future[Any] = asyncio.ensure_future(
                asyncio.gather(*(s.stop(grace, force=self.force_exit) for s in self.supervisors))
            )
            forced = asyncio.ensure_future(self._forced.wait())
            await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():  # a second signal: the workers cut their drain short too
                for sup in self.supervisors:
                    sup.forward_signal(signal.SIGTERM)
                await stopping
            forced.cancel()
        if self.worker is not None:
            # The grace is fixed when the drain starts, so a second signal during it must
            # interrupt the wait: then what is still in flight is cut now (it stays queued).
            draining = asyncio.ensure_future(self.worker.drain(grace))
            forced = asyncio.ensure_future(self._forced.wait())
            await asyncio.wait({draining, forced}, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if draining.done():
                cut = draining.result()
            else:
                draining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await draining
                log.warning("drain_forced", extra={"fields": {}})
                cut = await self.worker.drain(0.0)
        if smtp_stopped is not None and self.smtp is not None:
            await smtp_stopped
            await self.smtp.stop(grace=0.0)
        if self.ack_sender is not None:
            self.ack_sender.stop()
            if self._ack_task is not None:
                # the acknowledgement on its way goes out and is recorded as sent: cut between
                # the relay's 250 and that record, it would be sent again after the restart
                await asyncio.wait({self._ack_task}, timeout=ACK_STOP_TIMEOUT)
        if self.retention is not None:
            self.retention.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.backends:  # courtesy logouts, all at once and briefly
            closing = [asyncio.ensure_future(b.aclose()) for b in self.backends.values()]
            _, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*closing, return_exceptions=True)
        if self._retiring:  # in-flight work is drained or cancelled by now
            await asyncio.wait(set(self._retiring.values()), timeout=5)
        if self.health is not None:
            await self.health.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.spool is not None:
            await self.spool.close()
        if self.events is not None:
            self.events.flush()  # the last metric lines, before the loop stops
        log.info("stopped", extra={"fields": {"cut_short": cut}})

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.startup()
        except ConfigError:
            raise
        except (GatewayError, OSError) as exc:
            log.error("startup_failed", extra={"fields": {"error": str(exc)}})
            await self.shutdown()
            return EXIT_STARTUP
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return EXIT_FAILED if self.failed else EXIT_OK


class _CountingSpool:
    """The spool as an IMAP intake sees it: every stored mail counts and wakes the worker."""

    def __init__(self, spool: Spool, daemon: Daemon) -> None:
        self._spool = spool
        self._daemon = daemon

    async def put(self, raw: bytes, envelope: Any, *, source_key: str | None = None) -> Any:
        result = await self._spool.put(raw, envelope, source_key=source_key)
        if not result.duplicate:
            self._daemon.metrics.received.labels(intake=envelope.intake).inc()
            self._daemon.wake_worker(result.id)
        return result

    async def has_source_key(self, source_key: str) -> bool:
        return await self._spool.has_source_key(source_key)

    async def known_source_keys(self, source_keys: Any) -> set[str]:
        return await self._spool.known_source_keys(source_keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)
