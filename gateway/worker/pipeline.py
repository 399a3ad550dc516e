"""`Worker`: the loop that claims due mail, one mail's pipeline (parse, classify, route, the
backend calls, acknowledge), failure decisions and the outcome recorded in one spool transaction.
See the package docstring (`gateway.worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from gateway import classify, routing
from gateway.ack import Template
from gateway.ackpolicy import (
    AckVerdict,
    DkimResult,
    apply_policy,
    own_dkim_wanted,
)
from gateway.backends.base import Backend
from gateway.errors import (
    BackendUnavailable,
    ParseError,
    PermanentError,
    SpoolError,
    TransientError,
)
from gateway.mail import parse
from gateway.models import Decision, Envelope, ParsedMail, RawSource, TicketRef
from gateway.retry import SLOT_REQUEUE, Backoff
from gateway.rules import RouteContext, RuleSet
from gateway.spool.base import (
    BLOB_STREAM_MIN,
    BodySource,
    MessageRow,
    Outcome,
    Spool,
    State,
)
from gateway.status import StatusBoard
from gateway.worker.acks import Acknowledgements
from gateway.worker.progress import SpoolProgress
from gateway.worker.settings import WorkerSettings
from gateway.worker.slots import CallSlots, SlotGate, _SlotHold

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.worker")

DEFAULT_LEASE = 30.0  # [spool] lease until keep_leases says otherwise
LEASE_MARGIN = 2.0  # s before a claim's lease runs out when a write stops being retried
STREAM_BODY_MIN = BLOB_STREAM_MIN  # mails above this size are parsed from the spool in pieces


class Worker(CallSlots, Acknowledgements):
    def __init__(
        self,
        spool: Spool,
        backends: dict[str, Backend],
        rules: RuleSet,
        templates: dict[str, Template],
        settings: WorkerSettings,
        *,
        tokens: dict[str, str],
        executor: Executor | None = None,
        status: StatusBoard | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.backends = backends
        self.rules = rules
        self.templates = templates
        self.s = settings
        self.tokens = tokens  # backend name -> subject token format
        self.executor = executor
        self.status = status or StatusBoard()
        self.metrics = metrics
        self.clock = clock
        self.on_ack = on_ack
        self.wake = asyncio.Event()
        self.paused: dict[str, float] = {}  # backend -> monotonic time to try again
        self._failing: dict[str, bool] = {}  # backends with deferred mails after errors
        self._probe: dict[str, int] = {}  # backend -> the mail that retries it at a short interval
        self._inflight: set[asyncio.Task[None]] = set()
        self._task_ids: dict[asyncio.Task[None], int] = {}  # in-flight task -> spool message id
        self._stopping = False
        self._stopped = asyncio.Event()
        self._orphans: set[int] = set()  # claims whose processing ended without an outcome
        self._claimed_at: dict[int, float] = {}  # in-flight mail -> when it was claimed
        self._renewed_at = 0.0  # when the last lease renewal was asked for (it succeeded)
        self._lease = DEFAULT_LEASE  # [spool] lease, set by keep_leases
        self._pauses: dict[str, tuple[float, str]] = {}
        self._pauses_read = 0.0
        self._slot_gates: dict[str, SlotGate] = {}
        self._slot_tasks: set[asyncio.Task[None]] = set()  # slots given back from a finally
        self._dkim: dict[int, DkimResult] = {}  # mail -> the gateway's own DKIM check, if made
        self._verdicts: dict[int, AckVerdict] = {}  # mail -> apply_policy's ack verdict
        spool.on_work(self.wake.set)  # another node stored or released mail
        spool.on_slot_freed(self._slot_freed)  # another process released a call slot
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._backend_status = {
            name: self.status.register(f"backend:{name}", "backend") for name in backends
        }
        self._token_formats = classify.token_formats(tokens.values())

    # -- the loop ---------------------------------------------------------------------------------

    def notify(self, _msg_id: int | None = None) -> None:
        self.wake.set()

    async def run(self) -> None:
        while not self._stopping:
            free = self.s.concurrency - len(self._inflight)
            if free <= 0:
                # every seat taken: nothing can be claimed before one frees (the end of its
                # task sets `wake`). A signal of new work meanwhile (another node's puts, the
                # intake) is no reason to ask the spool: it used to make this loop ask for the
                # next due time again and again, as long as the signal stayed set.
                self.wake.clear()
                await self._wait_wake(1.0)
                continue
            self.wake.clear()
            try:
                ids = await self.spool.claim_due(free)
            except SpoolError as exc:
                log.error("claim_failed", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(1.0)
                continue
            claimed = self.clock()
            for msg_id in ids:
                self._claimed_at[msg_id] = claimed
                task = asyncio.create_task(self._process_guarded(msg_id))
                self._inflight.add(task)
                self._task_ids[task] = msg_id
                task.add_done_callback(self._task_done)
            if ids and len(ids) == free:
                await asyncio.sleep(0)  # more may be due: claim again once a seat frees
                continue
            await self._wait_wake(await self._idle_timeout())

    async def keep_leases(self, lease: float) -> None:
        """Renew this process's claims every lease/3 s and put back those of processes whose
        lease ran out (a node or worker killed: its mails come back here, flagged uncertain
        where a backend call was in flight, and the worker looks for the ticket first)."""
        self._lease = lease
        while not self._stopping:
            try:
                asked = self.clock()
                await self.spool.heartbeat(set(self._task_ids.values()), slots=self._held_slots())
                self._renewed_at = asked
                if self._orphans:  # processing cut short by a spool failure: back to the queue
                    orphans = list(self._orphans)
                    await self.spool.release(orphans)
                    self._orphans.difference_update(orphans)
                rec = await self.spool.take_over()
            except SpoolError as exc:
                log.error("lease_renewal_failed", extra={"fields": {"error": str(exc)}})
            else:
                if rec.requeued:
                    log.warning(
                        "claims_taken_over",
                        extra={"fields": {"requeued": rec.requeued, "uncertain": rec.uncertain}},
                    )
                    if self.metrics is not None:
                        self.metrics.recovered_mails(rec.requeued, rec.uncertain)
                    self.wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=lease / 3)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        msg_id = self._task_ids.pop(task, None)
        if msg_id is not None:
            self._claimed_at.pop(msg_id, None)
        self.wake.set()

    def _claim_safe_until(self, msg_id: int) -> float:
        """Until when no other process can take this mail over: its lease from the claim or
        the last renewal, less a margin for clocks and the renewal's own round trip."""
        since = max(self._claimed_at.get(msg_id, 0.0), self._renewed_at)
        return since + self._lease - LEASE_MARGIN

    async def _idle_timeout(self) -> float:
        try:
            nxt = await self.spool.next_due_at()
        except SpoolError:
            return 1.0
        if nxt is None:
            return 5.0
        return max(0.01, min(5.0, nxt - self.clock()))

    async def _wait_wake(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=timeout)

    async def drain(self, grace: float) -> int:
        """Stop taking work; let in-flight messages finish for `grace` s; return how many were cut."""
        self._stopping = True
        self._stopped.set()
        self.wake.set()
        if not self._inflight:
            return 0
        _done, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        cut = [self._task_ids[t] for t in pending if t in self._task_ids]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
            # back in the queue now, as a clean stop (not counted as a crash)
            with contextlib.suppress(SpoolError):
                await self.spool.release(cut)
        return len(pending)

    # -- one message --------------------------------------------------------------------------------

    async def _process_guarded(self, msg_id: int) -> None:
        try:
            await self.process(msg_id)
        except asyncio.CancelledError:
            # cut by shutdown: the message stays `processing` and recovery requeues it
            raise
        except SpoolError as exc:
            # the spool failed (PostgreSQL unreachable, disk full): no outcome can be recorded
            # now, so the mail goes back to the queue once the spool answers again
            log.error(
                "spool_failed_during_processing",
                extra={"fields": {"id": msg_id, "error": str(exc)}},
            )
            self._orphans.add(msg_id)
        except Exception:
            tb = traceback.format_exc(limit=8)
            log.error("worker_internal_error", extra={"fields": {"id": msg_id}})
            with contextlib.suppress(SpoolError):
                await self.spool.finish(
                    msg_id, Outcome(state=State.DEAD, reason=f"quarantined: internal error\n{tb}")
                )
        finally:
            self._dkim.pop(msg_id, None)
            self._verdicts.pop(msg_id, None)

    async def _parse(self, raw: bytes | RawSource) -> ParsedMail:
        parse_one = functools.partial(parse, fallback_charsets=self.s.fallback_charsets)
        if self.executor is None:
            return parse_one(raw)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, parse_one, raw)

    async def process(self, msg_id: int) -> None:
        row = await self.spool.load(msg_id, with_raw=False)
        if row is None:
            return
        env = row.envelope
        # A big mail is parsed and digested from the spool in pieces (never held whole beside its
        # parsed form); a parse process pool needs the bytes themselves.
        body: BodySource | None = None
        raw: bytes | RawSource | None
        if row.size > STREAM_BODY_MIN and self.executor is None:
            raw = body = await self.spool.open_body(msg_id)
        else:
            raw = await self.spool.read_body(msg_id)
        try:
            if raw is None:
                await self._finish(row, Outcome(state=State.DEAD, reason="raw message was purged"))
                return
            if row.crashes >= self.s.max_crashes:
                # it was being processed each time the worker died: set it aside, keep the bytes
                await self._finish(
                    row,
                    Outcome(
                        state=State.DEAD,
                        reason=f"quarantined: its processing was cut by {row.crashes} crashes",
                    ),
                )
                return
            # digest first: parsing lets go of what it has read
            digest = classify.content_digest(raw)
            try:
                mail = await self._parse(raw)
            except ParseError as exc:
                await self._finish(
                    row, Outcome(state=State.DEAD, reason=f"quarantined: unreadable: {exc}")
                )
                return
            except Exception as exc:  # the parser must never take the worker down
                await self._finish(
                    row,
                    Outcome(
                        state=State.DEAD,
                        reason=f"quarantined: parser failed: {type(exc).__name__}: {exc}",
                    ),
                )
                return
        finally:
            if body is not None:
                body.close()
        # the raw bytes are not needed from here on: a big mail's memory goes back before the
        # backend calls (which hold the attachments and their encoded copies)
        del raw, body
        earlier = await self.spool.set_identity(msg_id, mail.message_id, digest, mail.subject)
        if earlier is not None:
            st = await self.spool.state_of(earlier)
            if st in ("done", "suppressed"):
                await self._finish(
                    row,
                    Outcome(
                        state=State.DUPLICATE,
                        reason=f"duplicate of message {earlier} (same Message-ID and content)",
                        message_id=mail.message_id,
                    ),
                )
                return
            if st in ("queued", "deferred", "processing"):
                await self.spool.defer(
                    msg_id,
                    error=f"waiting for copy {earlier} (same Message-ID and content) to finish",
                    delay=2.0,
                    count_attempt=False,
                )
                return

        # -- classify ---------------------------------------------------------------------------
        ctx = routing.context(mail, env, self._now(), self.s.own_addresses)
        f_ref, f_backend, f_note = await self._find_followup(mail, row, ctx)
        if f_note == "wait":
            await self.spool.defer(
                msg_id,
                error="follow-up waiting for its original message to be ticketed",
                delay=self.s.wait_original,
                count_attempt=False,
            )
            return
        decision = routing.route(
            self.rules, mail, env, ctx, routing.Followup(f_ref, f_backend, f_note)
        )
        # the same acknowledgement policy as `gateway route`: the reasons say why none goes out
        dkim = None
        if own_dkim_wanted(decision, mail, env, self.s.ack_policy):
            dkim = self._dkim[msg_id] = await self._own_dkim(row, mail)
        decision, verdict = apply_policy(decision, mail, env, self.s.ack_policy, dkim)
        if verdict is not None:  # the acknowledgement's recipient: decided once per mail
            self._verdicts[msg_id] = verdict
        if decision.action == "suppress":
            notice_name = self.rules.notice_for(decision)
            notice = await self._reply(mail, row, notice_name, None) if notice_name else None
            await self._finish(
                row,
                Outcome(
                    state=State.SUPPRESSED,
                    reason="; ".join(decision.reasons) or "suppressed",
                    rule=decision.rule,
                    action="suppress",
                    message_id=mail.message_id,
                    ack=notice,
                ),
                decision=decision,
            )
            if notice is not None and self.on_ack is not None:
                self.on_ack()
            return
        backend = self.backends.get(decision.backend)
        if backend is None:
            await self._finish(
                row,
                Outcome(
                    state=State.DEAD,
                    reason=f"no backend named {decision.backend!r}",
                    rule=decision.rule,
                ),
            )
            return
        until = self.paused.get(backend.name)
        if until is not None and time.monotonic() < until:
            await self.spool.defer(
                msg_id,
                error=f"backend {backend.name} paused: {self._backend_status[backend.name].detail}",
                delay=max(1.0, until - time.monotonic()),
                backend=backend.name,
                count_attempt=False,
            )
            return
        shared = (await self._cluster_pauses()).get(backend.name) if self.s.shared_pauses else None
        if shared is not None:  # paused by another worker process or node
            await self.spool.defer(
                msg_id,
                error=f"backend {backend.name} paused: {shared[1]}",
                delay=max(1.0, shared[0] - self.clock()),
                backend=backend.name,
                count_attempt=False,
            )
            return
        mail = self._with_peer(mail, env)
        # The backend's concurrency limit holds for the whole cluster: a slot in the spool per
        # call in flight, taken by every worker process of every node.
        limit = self.s.backend_concurrency.get(backend.name, 0)
        label = await self._take_slot(backend.name, limit, msg_id) if limit else None
        if limit and label is None:
            await self.spool.defer(
                msg_id,
                error=f"backend {backend.name}: all {limit} call slots of the cluster busy",
                delay=SLOT_REQUEUE.delay(1),
                backend=backend.name,
                count_attempt=False,
            )
            return
        hold = None
        if label is not None:
            hold = _SlotHold(self, backend.name, label)
        try:
            # the slot goes back as soon as the backend calls are over (before the outcome is
            # written): it stands for a call in flight, and the next mail may start its own
            await self._deliver(row, mail, decision, backend, hold.release if hold else None)
        finally:
            if hold is not None:
                await hold.release()

    async def _cluster_pauses(self) -> dict[str, tuple[float, str]]:
        """The backend pauses recorded in the spool (by any process), read at most once a s."""
        now = time.monotonic()
        if now - self._pauses_read > 1.0:
            self._pauses_read = now
            try:
                self._pauses = await self.spool.backend_pauses()
            except SpoolError:
                pass  # the mail's own spool writes will fail and say so
        return self._pauses

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), tz=UTC).astimezone(ZoneInfo(self.s.timezone))

    def _with_peer(self, mail: ParsedMail, env: Envelope) -> ParsedMail:
        """Backends see only the mail; the SMTP peer IP travels as a header (InterServer user_ip)."""
        # A sender must not choose its own peer address: drop any copy that came with the mail.
        headers = tuple((k, v) for k, v in mail.headers if k.lower() != "x-gateway-peer")
        if env.peer:
            headers = (*headers, ("X-Gateway-Peer", env.peer))
        return dataclasses.replace(mail, headers=headers)

    async def _find_followup(
        self, mail: ParsedMail, row: MessageRow, ctx: RouteContext
    ) -> tuple[str | None, str | None, str]:
        """(ref, backend or None, note). note == "wait" when the original is still queued."""
        ref = routing.subject_token(mail, self._token_formats)
        if ref is not None:
            prefer = routing.preferred_backend(self.rules, mail, row.envelope, ctx)
            known = await self.spool.ticket_by_ref(ref, prefer_backend=prefer or None)
            if known is not None:
                if not self._sender_may_follow_up(mail, known.requester):
                    return (
                        None,
                        None,
                        f"token [{ref}] ignored: sender is not the ticket's requester",
                    )
                return ref, known.backend, f"follow-up by subject token of ticket {ref}"
            unknown = routing.Followup.unknown_token(ref)
            return unknown.ref, unknown.backend, unknown.note
        ids = classify.thread_ids(mail)
        if ids:
            hit = await self.spool.thread_lookup(ids)
            if hit is not None:
                known = await self.spool.ticket_by_ref(hit.ref)
                requester = known.requester if known else ""
                if not self._sender_may_follow_up(mail, requester):
                    return None, None, "In-Reply-To ignored: sender is not the ticket's requester"
                return (
                    hit.ref,
                    hit.backend,
                    f"follow-up by In-Reply-To/References of ticket {hit.ref}",
                )
            pending = await self.spool.pending_original(ids, row.id)
            if pending is not None:
                return None, None, "wait"
        return None, None, ""

    def _sender_may_follow_up(self, mail: ParsedMail, requester: str) -> bool:
        policy = self.s.followup_sender
        if policy == "any" or not requester or not mail.from_addr:
            return True
        if policy == "address":
            return mail.from_addr.lower() == requester.lower()
        return mail.from_addr.rpartition("@")[2].lower() == requester.rpartition("@")[2].lower()

    async def _deliver(
        self,
        row: MessageRow,
        mail: ParsedMail,
        decision: Decision,
        backend: Backend,
        calls_over: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """The backend calls for one mail, then its outcome. `calls_over` is awaited once the
        calls are over, whatever their result (the call slot goes back)."""
        progress = SpoolProgress(
            self.spool,
            row.id,
            row.progress,
            safe_until=lambda: self._claim_safe_until(row.id),
            clock=self.clock,
        )
        started = time.monotonic()

        async def over() -> None:
            # the calls are over: the slot goes on at once, then what they returned is durable
            # before anything else is done with the mail
            if calls_over is not None:
                await calls_over()
            await progress.flush()

        action = decision.action
        notes: list[str] = []
        try:
            ref: TicketRef | None = None
            if decision.action == "followup" and decision.followup_of:
                known = await self.spool.ticket_by_ref(
                    decision.followup_of, prefer_backend=backend.name
                )
                tid = (
                    known.ticket_id
                    if known and known.backend == backend.name
                    else decision.followup_of
                )
                target = TicketRef(backend.name, backend.system, tid, decision.followup_of)
                state: str | None
                try:
                    state = await backend.ticket_status(target)
                except PermanentError as exc:
                    state = "unknown"
                    notes.append(f"ticket {decision.followup_of} unknown to {backend.name} ({exc})")
                if state == "closed" and self.s.followup_closed == "new":
                    notes.append(f"ticket {decision.followup_of} is closed (followup_closed = new)")
                    state = "unknown"
                if state == "unknown" and decision.automatic and not decision.automatic_ticketed:
                    # an auto-reply to a ticket that is unknown (a forged or old token) or closed
                    # is automatic mail like any other: suppressed, not a new ticket
                    action = "suppress"
                    notes.append(
                        "suppressed: automatic mail that follows up no open ticket is not"
                        " ticketed unless a matching rule says match.automatic = true"
                    )
                elif state == "unknown":
                    action = "new"
                    if notes:  # said why just above
                        notes[-1] += ": new ticket"
                else:
                    await backend.add_message(target, mail, progress, automatic=decision.automatic)
                    ref = target
            if ref is None and action != "suppress":
                action = "new"
                recreate = row.uncertain and not progress.data
                if recreate:
                    found = await backend.find_existing(decision, mail)
                    if found is not None:
                        notes.append(f"uncertain after crash: found existing ticket {found.ref}")
                        ref = found
                if ref is None:
                    ref = await backend.open_ticket(decision, mail, progress)
                    if recreate and not backend.searchable:
                        await self._possible_duplicate(row, backend, ref, mail, notes)
        except TransientError as exc:
            await over()
            self._observe(backend.name, started, ok=False)
            self._failing[backend.name] = True
            await self._transient(row, backend.name, str(exc), exc.retry_after, decision)
            return
        except PermanentError as exc:
            await over()
            self._observe(backend.name, started, ok=False)
            await self._finish(
                row,
                Outcome(
                    state=State.DEAD,
                    reason=f"{backend.name}: {exc}",
                    backend=backend.name,
                    rule=decision.rule,
                    action=action,
                ),
                decision=decision,
            )
            return
        except BackendUnavailable as exc:
            await over()
            self._observe(backend.name, started, ok=False)
            self._pause(backend.name, str(exc))
            if self.s.shared_pauses:  # every process and node holds back too
                with contextlib.suppress(SpoolError):
                    await self.spool.pause_backend(
                        backend.name, self.clock() + self.s.paused_check, str(exc)
                    )
            await self.spool.defer(
                row.id,
                error=f"backend {backend.name} unavailable: {exc}",
                delay=self.s.paused_check,
                backend=backend.name,
                count_attempt=False,
            )
            if self.metrics:
                self.metrics.outcome("deferred", row.envelope.intake, decision.rule, backend.name)
            return
        except BaseException:
            # anything else (the spool failed, an internal error, a stop): what the calls
            # returned is still recorded where the spool answers
            with contextlib.suppress(Exception):
                await progress.flush()
            raise
        await over()
        self._observe(backend.name, started, ok=True)
        if self._resume(backend.name) and self.s.shared_pauses:
            self._pauses.pop(backend.name, None)
            with contextlib.suppress(SpoolError):
                await self.spool.clear_pause(backend.name)
        self._probe.pop(backend.name, None)
        if self._failing.pop(backend.name, False):
            # it answers again: what waits for it need not sit out its backoff
            released = await self.spool.release_deferred(backend.name)
            log.info(
                "backend_recovered",
                extra={"fields": {"backend": backend.name, "released": released}},
            )
        if ref is None:  # action "suppress": an automatic follow-up of no open ticket
            await self._finish(
                row,
                Outcome(
                    state=State.SUPPRESSED,
                    reason="; ".join([*decision.reasons, *notes]),
                    backend=backend.name,
                    rule=decision.rule,
                    action="suppress",
                    message_id=mail.message_id,
                ),
                decision=decision,
            )
            return
        ack = await self._ack(mail, row, decision, ref, action)
        reasons = [*decision.reasons, *notes]
        await self._finish(
            row,
            Outcome(
                state=State.DONE,
                reason="; ".join(reasons),
                backend=backend.name,
                rule=decision.rule,
                action=action,
                ticket_ref=ref.ref,
                ticket_id=ref.id,
                system=ref.system,
                requester=mail.from_addr,
                subject=mail.subject,
                message_id=mail.message_id,
                ack=ack,
            ),
            decision=decision,
        )
        if ack is not None and self.on_ack is not None:
            self.on_ack()

    async def _transient(
        self,
        row: MessageRow,
        backend: str,
        error: str,
        retry_after: float | None,
        decision: Decision,
    ) -> None:
        now = self.clock()
        first = row.first_attempt_at or now
        if now - first > self.s.retry_deadline:
            if self._probe.get(backend) == row.id:
                del self._probe[backend]
            await self._finish(
                row,
                Outcome(
                    state=State.DEAD,
                    reason=f"{backend}: gave up after {row.attempts} attempts: {error}",
                    backend=backend,
                    rule=decision.rule,
                ),
                decision=decision,
            )
            return
        backoff = Backoff(base=self.s.retry_base, cap=self.s.retry_max_delay)
        ceiling = backoff.ceiling(row.attempts)
        # One mail per failing backend is its probe: it keeps trying every `retry_base` seconds
        # while the others back off; the probe's success releases them all (see _deliver).
        if self._probe.setdefault(backend, row.id) == row.id:
            ceiling = min(ceiling, self.s.retry_base)
        delay = backoff.delay(row.attempts, ceiling=ceiling)  # jitter spreads a herd
        if retry_after is not None:
            delay = max(delay, retry_after)
        await self.spool.defer(row.id, error=f"{backend}: {error}", delay=delay, backend=backend)
        log.info(
            "deferred",
            extra={
                "fields": {
                    "id": row.id,
                    "backend": backend,
                    "attempt": row.attempts,
                    "retry_in": f"{delay:.1f}",
                    "error": error,
                }
            },
        )
        if self.metrics:
            self.metrics.outcome("deferred", row.envelope.intake, decision.rule, backend)

    def _pause(self, backend: str, reason: str) -> None:
        self.paused[backend] = time.monotonic() + self.s.paused_check
        self._failing[backend] = True
        self._backend_status[backend].set_down(f"paused: {reason}")
        log.warning("backend_paused", extra={"fields": {"backend": backend, "reason": reason}})

    def _resume(self, backend: str) -> bool:
        """True when it was paused (here or, as last read, by another process)."""
        was = self.paused.pop(backend, None) is not None or backend in self._pauses
        if was:
            log.info("backend_resumed", extra={"fields": {"backend": backend}})
        self._backend_status[backend].set_ok()
        return was

    def _observe(self, backend: str, started: float, *, ok: bool) -> None:
        if self.metrics:
            self.metrics.backend_latency(backend, time.monotonic() - started, ok)
        if not ok:
            st = self._backend_status[backend]
            st.extra["last_failure"] = round(time.time(), 3)

    async def _possible_duplicate(
        self, row: MessageRow, backend: Backend, ref: TicketRef, mail: ParsedMail, notes: list[str]
    ) -> None:
        """A create call was in flight at a crash and the system cannot be searched: the ticket
        just made may be the second one. Say so with both ids (the first one as far as the
        system lets us find it) and count it, so that an admin can merge them."""
        try:
            first = await backend.possible_first(ref, mail)
        except Exception:  # best effort: the ticket exists, the mail is done
            first = None
        log.warning(
            "possible_duplicate",
            extra={
                "fields": {
                    "id": row.id,
                    "backend": backend.name,
                    "ticket": ref.id,
                    "first_ticket": first or "unknown",
                }
            },
        )
        notes.append(
            f"possible duplicate: created again after a crash cut the create call; the first"
            f" ticket is {first or 'unknown'} ({backend.system} cannot be searched)"
        )
        self._count("possible_duplicates", backend=backend.name)

    async def _finish(
        self, row: MessageRow, outcome: Outcome, decision: Decision | None = None
    ) -> None:
        withheld = await self.spool.finish(row.id, outcome)
        if withheld:
            # the hourly limits are checked where the acknowledgement is queued (atomically)
            log.info("ack_rate_limited", extra={"fields": {"id": row.id, "limit": withheld}})
            self._count("acks_withheld", reason=f"rate_{withheld}")
        for name, probe in list(self._probe.items()):
            if probe == row.id:  # a probe that ended (dead, ...) hands the role to the next
                del self._probe[name]
        rule = outcome.rule or (decision.rule if decision else "")
        log.info(
            "outcome",
            extra={
                "fields": {
                    "id": row.id,
                    "intake": row.envelope.intake,
                    "state": outcome.state.value,
                    "rule": rule or "-",
                    "backend": outcome.backend or "-",
                    "action": outcome.action or "-",
                    "ref": outcome.ticket_ref or "-",
                    "reason": outcome.reason[:300],
                }
            },
        )
        if self.metrics:
            name = {
                State.DONE: "followup" if outcome.action == "followup" else "ticketed",
                State.DEAD: "dead",
                State.SUPPRESSED: "suppressed",
                State.DUPLICATE: "duplicate",
            }.get(outcome.state, outcome.state.value)
            self.metrics.outcome(name, row.envelope.intake, rule, outcome.backend)
