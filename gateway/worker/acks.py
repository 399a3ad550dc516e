"""Acknowledgements for one mail, as the `Worker` decides them (it inherits `Acknowledgements`):
the gateway's own DKIM check, whether the mail gets an acknowledgement (or a suppress rule's
notice) and for whom (`gateway.ackpolicy`, the same policy as `gateway route`), the rendered draft
the spool queues with the outcome, and the metric of those withheld."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.ack import Template, build_ack
from gateway.ackpolicy import NO_ACK, AckVerdict, DkimResult, ack_verdict, from_domain, rate_keys
from gateway.models import Decision, ParsedMail, TicketRef
from gateway.spool.base import AckDraft, MessageRow, Spool
from gateway.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.worker")


class Acknowledgements:
    """The `Worker`'s acknowledgement methods (it inherits them), and `_count`, its counter."""

    spool: Spool
    s: WorkerSettings
    templates: dict[str, Template]
    tokens: dict[str, str]
    metrics: Metrics | None
    _dkim: dict[int, DkimResult]  # mail -> the gateway's own DKIM check, if made
    _verdicts: dict[int, AckVerdict]  # mail -> apply_policy's ack verdict

    async def _own_dkim(self, row: MessageRow, mail: ParsedMail) -> DkimResult:
        """The gateway's own DKIM check (`[ack] verify_dkim`), in a thread: DNS and hashing.
        The raw bytes were let go after parsing; this rare path reads them again."""
        from gateway import dkimcheck  # dkimpy, dnspython: loaded once, by the first such mail

        if row.size > dkimcheck.MAX_BYTES:
            return DkimResult("", f"not verified: larger than {dkimcheck.MAX_BYTES} bytes")
        data = await self.spool.read_body(row.id)
        if data is None:
            return DkimResult("", "not verified: the raw message is gone")
        result = await asyncio.to_thread(dkimcheck.check, data, from_domain(mail), self.s.dkim)
        log.info(
            "dkim_checked",
            extra={
                "fields": {
                    "id": row.id,
                    "result": "pass" if result.passed else "fail",
                    "detail": (result.passed or result.why)[:300],
                }
            },
        )
        return result

    async def _ack(
        self, mail: ParsedMail, row: MessageRow, decision: Decision, ref: TicketRef, action: str
    ) -> AckDraft | None:
        ack_name = decision.ack
        if ack_name is None and decision.action == "followup" and action == "new":
            # the follow-up's ticket was unknown or closed: it became a new ticket, which the
            # sender must learn the reference of
            ack_name = "default"
        if ack_name is None or decision.automatic:
            for reason in decision.reasons:
                if reason.startswith(NO_ACK):  # the policy's (apply_policy), not the rules'
                    log.info(
                        "ack_skipped",
                        extra={"fields": {"id": row.id, "reason": reason[len(NO_ACK) :]}},
                    )
                    self._withheld(reason.removeprefix(NO_ACK))
            return None
        return await self._reply(mail, row, ack_name, ref)

    async def _reply(
        self, mail: ParsedMail, row: MessageRow, template_name: str, ref: TicketRef | None
    ) -> AckDraft | None:
        """Render an acknowledgement (or a suppress rule's notice) if the policy allows one
        (`gateway.ackpolicy`: RFC 3834, own and no-reply addresses, sender authentication).
        The hourly limits are checked by the spool when it queues it (`AckLimits`)."""
        s = self.s
        verdict = self._verdicts.get(row.id)
        if verdict is None:  # apply_policy had none: the rules asked for no acknowledgement
            verdict = ack_verdict(mail, row.envelope, s.ack_policy, self._dkim.get(row.id))
        rcpt = verdict.rcpt
        if rcpt is None:
            log.info("ack_skipped", extra={"fields": {"id": row.id, "reason": verdict.reason}})
            self._withheld(verdict.reason)
            return None
        template = self.templates.get(template_name) or self.templates.get("default")
        if template is None:
            return None
        from_address = (
            s.ack_from_address or next(iter(row.envelope.rcpt_tos), "") or "support@localhost"
        )
        if ref is not None:
            token = self.tokens.get(ref.backend, "[Ticket #{ref}]").replace("{ref}", ref.ref)
        else:
            token = ""
        data, ack_id = build_ack(
            template,
            mail,
            rcpt=rcpt,
            ref=ref.ref if ref else "",
            token=token,
            from_address=from_address,
            from_name=s.ack_from_name,
            hostname=s.hostname,
            backend=ref.backend if ref else "",
        )
        sender_key, domain = rate_keys(rcpt)
        return AckDraft(
            rcpt=rcpt,
            mail_from=s.ack_envelope_from,
            data=data,
            message_id=ack_id,
            sender_key=sender_key,
            domain=domain,
            limits=s.ack_limits,
        )

    def _withheld(self, reason: str) -> None:
        label = _withheld_label(reason)
        if label != "disabled":
            self._count("acks_withheld", reason=label)

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name, **labels)


def _withheld_label(reason: str) -> str:
    """A fixed metric label for why the policy allowed no acknowledgement (never an address)."""
    for prefix, label in (
        ("sender not authenticated", "unauthenticated"),
        ("null envelope sender", "null_sender"),
        ("the reply address is one of our own", "own_address"),
        ("the reply address is a no-reply", "no_reply_address"),
        ("the sender asked for no automatic replies", "suppress_requested"),
        ("acknowledgements are off", "disabled"),
    ):
        if reason.startswith(prefix):
            return label
    return "no_address"
