"""The PostgreSQL spool's ticket and thread maps and its outbox of acknowledgements."""

from __future__ import annotations

from gateway.spool.base import AckRow, ThreadHit, TicketInfo
from gateway.spool.postgres.plumbing import PostgresBase
from gateway.spool.rows import ack_row, pick_ticket


class Maps(PostgresBase):
    """See `Spool.ticket_by_ref`, `Spool.thread_lookup`, `Spool.due_acks`."""

    # -- ticket and thread maps ------------------------------------------------------------------------

    async def ticket_by_ref(
        self, ref: str, *, prefer_backend: str | None = None
    ) -> TicketInfo | None:
        rows = await self._all(
            "SELECT backend, system, ticket_id, requester FROM tickets WHERE ref = %s"
            " ORDER BY created_at DESC",
            (ref,),
        )
        return pick_ticket(rows, prefer_backend)

    async def thread_lookup(self, message_ids: list[str]) -> ThreadHit | None:
        if not message_ids:
            return None
        rows = await self._all(
            "SELECT message_id, backend, ref FROM threads WHERE message_id = ANY(%s)",
            (list(message_ids),),
        )
        found = {r["message_id"]: r for r in rows}
        for mid in message_ids:  # the first in the mail's order wins
            if mid in found:
                return ThreadHit(found[mid]["backend"], found[mid]["ref"])
        return None

    async def pending_original(self, message_ids: list[str], before_id: int) -> int | None:
        if not message_ids:
            return None
        row = await self._one(
            "SELECT id FROM messages WHERE message_id = ANY(%s) AND id < %s"
            " AND state IN ('queued', 'deferred', 'processing') ORDER BY id LIMIT 1",
            (list(message_ids), before_id),
        )
        return int(row["id"]) if row else None

    # -- outbox --------------------------------------------------------------------------------------------

    async def acks_since(self, sender_key: str | None, since: float) -> int:
        if sender_key is None:
            row = await self._one(
                "SELECT COUNT(*) AS n FROM outbox WHERE created_at >= %s", (since,)
            )
        else:
            row = await self._one(
                "SELECT COUNT(*) AS n FROM outbox WHERE sender_key = %s AND created_at >= %s",
                (sender_key.lower(), since),
            )
        return int(row["n"]) if row else 0

    async def due_acks(self, limit: int = 50) -> list[AckRow]:
        now = self.clock()
        rows = await self._all(
            "UPDATE outbox SET claimed_by = %(owner)s, lease_until = %(until)s"
            " WHERE id IN (SELECT id FROM outbox WHERE state = 'pending'"
            "  AND next_attempt_at <= %(now)s"
            "  AND (claimed_by = %(owner)s OR claimed_by = '' OR lease_until < %(now)s)"
            "  ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, message_id, rcpt, mail_from, data, attempts, next_attempt_at",
            {"owner": self.owner, "until": now + self.lease, "now": now, "limit": limit},
        )
        return [ack_row(r) for r in sorted(rows, key=lambda r: r["id"])]

    async def ack_result(
        self, ack_id: int, *, sent: bool, error: str = "", retry_in: float | None = None
    ) -> None:
        now = self.clock()
        if sent:
            await self._exec(
                "UPDATE outbox SET state = 'sent', sent_at = %s, attempts = attempts + 1,"
                " claimed_by = '', lease_until = NULL WHERE id = %s",
                (now, ack_id),
            )
        elif retry_in is None:
            await self._exec(
                "UPDATE outbox SET state = 'failed', last_error = %s, attempts = attempts + 1,"
                " claimed_by = '', lease_until = NULL WHERE id = %s",
                (error[:2000], ack_id),
            )
        else:
            await self._exec(
                "UPDATE outbox SET last_error = %s, attempts = attempts + 1,"
                " next_attempt_at = %s, claimed_by = '', lease_until = NULL WHERE id = %s",
                (error[:2000], now + retry_in, ack_id),
            )
