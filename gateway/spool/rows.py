"""What both spool engines do the same way around their queries: rows to typed rows, the ticket a
reference means, the order of the acknowledgement limits, and the column list they select.

Engine-neutral: a row is anything indexed by column name (`sqlite3.Row`, psycopg's dict rows);
the engines keep their SQL, their transactions and their way of running them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.models import Envelope
from gateway.spool.base import AckLimits, AckRow, MessageRow, NodeInfo, TicketInfo


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


# the `messages` columns that `message_row` reads, in the engines' SELECTs
MSG_COLUMNS = (
    "id, state, intake, mail_from, rcpt_tos, peer, received_at, size, attempts, next_attempt_at,"
    " first_attempt_at, last_error, backend, rule, action, ticket_ref, ticket_id, message_id,"
    " subject, progress, uncertain, updated_at, crashes, claimed_by, lease_until"
)


def message_row(r: Row, raw: bytes | None = None) -> MessageRow:
    """A `messages` row (the engines' column list) as a `MessageRow`."""
    return MessageRow(
        id=r["id"],
        state=r["state"],
        envelope=Envelope(
            mail_from=r["mail_from"],
            rcpt_tos=tuple(json.loads(r["rcpt_tos"])),
            peer=r["peer"],
            intake=r["intake"],
            received_at=r["received_at"],
        ),
        size=r["size"],
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        first_attempt_at=r["first_attempt_at"],
        last_error=r["last_error"],
        backend=r["backend"],
        rule=r["rule"],
        action=r["action"],
        ticket_ref=r["ticket_ref"],
        ticket_id=r["ticket_id"],
        message_id=r["message_id"],
        subject=r["subject"],
        progress=json.loads(r["progress"] or "{}"),
        uncertain=bool(r["uncertain"]),
        crashes=r["crashes"],
        updated_at=r["updated_at"],
        claimed_by=r["claimed_by"],
        lease_until=r["lease_until"],
        raw=raw,
    )


def ack_row(r: Row) -> AckRow:
    """An `outbox` row as an `AckRow`."""
    return AckRow(
        id=r["id"],
        message_id=r["message_id"],
        rcpt=r["rcpt"],
        mail_from=r["mail_from"],
        data=bytes(r["data"]),
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
    )


def node_info(r: Row) -> NodeInfo:
    """A `nodes` row with its count of claims as a `NodeInfo`."""
    return NodeInfo(
        owner=r["owner"],
        node=r["node"],
        seen_at=r["seen_at"],
        started_at=r["started_at"],
        claims=int(r["claims"]),
    )


def pick_ticket(rows: Sequence[Row], prefer_backend: str | None) -> TicketInfo | None:
    """The ticket a reference means among `tickets` rows, newest first (see
    `Spool.ticket_by_ref`): the one of `prefer_backend` when there is one, else the newest."""
    chosen = next(
        (r for r in rows if prefer_backend is None or r["backend"] == prefer_backend),
        rows[0] if rows else None,
    )
    if chosen is None:
        return None
    return TicketInfo(chosen["backend"], chosen["system"], chosen["ticket_id"], chosen["requester"])


@dataclass(frozen=True)
class LimitStep:
    """One hourly acknowledgement limit: the ack is withheld as `verdict` when the outbox holds
    `most` or more acknowledgements of the last hour whose `column` is `value` (column "": all
    of them). `most` <= 0 withholds without counting."""

    verdict: str  # "sender" | "domain" | "global"
    column: str
    value: object
    most: int


def ack_limit_steps(
    limits: AckLimits, sender_key: str, domain: str, known: bool
) -> list[LimitStep]:
    """The limits an acknowledgement must pass, in the order they are checked (the first that
    holds it names why): per sender, per domain, global, and the strangers' share of global."""
    steps = [LimitStep("sender", "sender_key", sender_key, limits.per_sender)]
    if limits.per_sender <= 0:  # no acknowledgements at all
        return steps
    if limits.per_domain:
        steps.append(LimitStep("domain", "domain", domain, limits.per_domain))
    if limits.global_limit:
        steps.append(LimitStep("global", "", None, limits.global_limit))
        if not known:
            strangers = max(1, int(limits.global_limit * limits.stranger_share))
            steps.append(LimitStep("global", "known", 0, strangers))
    return steps


def copy_going_first(msg_id: int, other: Row | None) -> int | None:
    """`Spool.set_identity`'s answer, given the lowest-numbered other copy of the mail (`id` and
    `state`, or None): that copy when it goes first (an earlier copy, or a later one that is done
    or already in hand: it found no copy when it started), else None (this copy goes first)."""
    if other is None:
        return None
    if other["id"] > msg_id and other["state"] not in ("done", "suppressed", "processing"):
        return None  # a later copy that waits (queued, deferred): this (older) one goes first
    return int(other["id"])
