"""The PostgreSQL spool's work on one claimed mail: its row and raw bytes, its identity, the
steps of its backend calls, deferring it, and its outcome (with the maps and the
acknowledgement, under the cluster-wide limits)."""

from __future__ import annotations

import json
from typing import Any

from gateway.spool.base import AckLimits, MessageRow, Outcome, State
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import ACK_LIMIT_LOCK, CHANNEL
from gateway.spool.rows import MSG_COLUMNS, ack_limit_steps, copy_going_first, message_row


class _Body:
    """A message's bytes as a `BodySource` (PostgreSQL hands a bytea over whole)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        self._data = b""


class Messages(PostgresBase):
    """See `Spool.load`, `Spool.set_identity`, `Spool.begin_step`, `Spool.finish`."""

    async def load(self, msg_id: int, *, with_raw: bool = True) -> MessageRow | None:
        if not with_raw:
            r = await self._one(f"SELECT {MSG_COLUMNS} FROM messages WHERE id = %s", (msg_id,))
            return None if r is None else message_row(r, None)
        # one statement (one snapshot): the row and its body together
        columns = ", ".join(f"m.{c.strip()}" for c in MSG_COLUMNS.split(","))
        r = await self._one(
            f"SELECT {columns}, b.raw AS body FROM messages m LEFT JOIN bodies b ON b.id = m.id"
            " WHERE m.id = %s",
            (msg_id,),
        )
        if r is None:
            return None
        body = r.pop("body")
        return message_row(r, None if body is None else bytes(body))

    async def read_body(self, msg_id: int) -> bytes | None:
        row = await self._one("SELECT raw FROM bodies WHERE id = %s", (msg_id,))
        return bytes(row["raw"]) if row else None

    async def open_body(self, msg_id: int) -> _Body | None:
        raw = await self.read_body(msg_id)
        return None if raw is None else _Body(raw)

    async def set_identity(
        self, msg_id: int, message_id: str, digest: str, subject: str
    ) -> int | None:
        """See `Spool.set_identity`: under a transaction advisory lock on the digest, so two
        nodes processing two copies at once see each other (the look-up is a statement after
        the lock: it sees what the other committed). One round trip (`_script`)."""
        row = await self._script(
            [
                ("SELECT pg_advisory_xact_lock(hashtext(%s))", (digest,)),
                (
                    "UPDATE messages SET message_id = %s, digest = %s, subject = %s WHERE id = %s",
                    (message_id, digest, subject[:500], msg_id),
                ),
                (
                    "SELECT id, state FROM messages WHERE digest = %s AND message_id = %s"
                    " AND id != %s AND state NOT IN ('dead', 'duplicate') ORDER BY id LIMIT 1",
                    (digest, message_id, msg_id),
                ),
            ]
        )
        return copy_going_first(msg_id, row)

    async def state_of(self, msg_id: int) -> str | None:
        row = await self._one("SELECT state FROM messages WHERE id = %s", (msg_id,))
        return row["state"] if row else None

    async def begin_step(
        self, msg_id: int, step: str, *, progress: dict[str, Any] | None = None
    ) -> None:
        done = None if progress is None else json.dumps(progress)
        await self._exec(
            "UPDATE messages SET progress = COALESCE(%s, progress), inflight = %s WHERE id = %s",
            (done, step, msg_id),
        )

    async def done_step(self, msg_id: int, progress: dict[str, Any]) -> None:
        await self._exec(
            "UPDATE messages SET progress = %s, inflight = '' WHERE id = %s",
            (json.dumps(progress), msg_id),
        )

    async def defer(
        self,
        msg_id: int,
        *,
        error: str,
        delay: float,
        backend: str = "",
        count_attempt: bool = True,
    ) -> None:
        now = self.clock()
        await self._exec(
            "UPDATE messages SET state = 'deferred', last_error = %s, next_attempt_at = %s,"
            " uncertain = CASE WHEN inflight != '' THEN 1 ELSE uncertain END,"
            " inflight = '', backend = CASE WHEN %s != '' THEN %s ELSE backend END,"
            " attempts = attempts - %s, updated_at = %s, claimed_by = '', lease_until = NULL"
            " WHERE id = %s",
            (error[:4000], now + delay, backend, backend, 0 if count_attempt else 1, now, msg_id),
        )

    async def release_deferred(self, backend: str) -> int:
        now = self.clock()

        async def go(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE messages SET next_attempt_at = %s WHERE state = 'deferred'"
                " AND backend = %s AND next_attempt_at > %s",
                (now, backend, now),
            )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANNEL}")
            return cur.rowcount

        return await self._run(go)

    async def finish(self, msg_id: int, outcome: Outcome) -> str:
        """See `Spool.finish`: the outcome, the maps and the acknowledgement in one transaction
        and one round trip (`_script`). The hourly limits are counted in a statement after the
        cluster-wide lock, which is held to the commit: workers of several nodes cannot slip
        past a limit together."""
        now = self.clock()
        parts: list[tuple[str, tuple[Any, ...]]] = [
            (
                "UPDATE messages SET state = %s, last_error = %s, backend = %s, rule = %s,"
                " action = %s, ticket_ref = %s, ticket_id = %s, inflight = '',"
                " next_attempt_at = 0, claimed_by = '', lease_until = NULL, updated_at = %s"
                " WHERE id = %s",
                (
                    outcome.state.value,
                    outcome.reason[:4000],
                    outcome.backend,
                    outcome.rule,
                    outcome.action,
                    outcome.ticket_ref,
                    outcome.ticket_id,
                    now,
                    msg_id,
                ),
            )
        ]
        if outcome.state == State.DONE and outcome.ticket_ref:
            parts.append(
                (
                    "INSERT INTO tickets (backend, ref, system, ticket_id, requester, subject,"
                    " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (
                        outcome.backend,
                        outcome.ticket_ref,
                        outcome.system,
                        outcome.ticket_id,
                        outcome.requester,
                        outcome.subject[:500],
                        now,
                    ),
                )
            )
            if outcome.message_id:
                parts.append(_thread_insert(outcome.message_id, outcome, now))
        ack = outcome.ack
        if ack is None:
            await self._script(parts)
            return ""
        rcpt = ack.rcpt.lower()
        sender_key = ack.sender_key or rcpt
        domain = ack.domain or rcpt.rpartition("@")[2]
        if ack.limits is not None:
            parts.append(("SELECT pg_advisory_xact_lock(%s)", (ACK_LIMIT_LOCK,)))
            verdict, verdict_args = _ack_verdict_sql(ack.limits, sender_key, domain, now - 3600)
        else:
            verdict, verdict_args = "''", ()
        # known: a ticket conversation from before (the split of the global limit)
        final = (
            "WITH k AS (SELECT EXISTS (SELECT 1 FROM tickets WHERE requester = %s"
            "  AND created_at < %s) AS known),"
            f" v AS (SELECT ({verdict}) AS verdict, known FROM k),"
            " o AS (INSERT INTO outbox (message_id, rcpt, mail_from, data, state, created_at,"
            "  next_attempt_at, sender_key, domain, known)"
            "  SELECT %s, %s, %s, %s, 'pending', %s, 0, %s, %s, known::int FROM v"
            "  WHERE verdict = '' RETURNING 1)"
        )
        args: tuple[Any, ...] = (
            rcpt,
            now,
            *verdict_args,
            msg_id,
            rcpt,
            ack.mail_from,
            ack.data,
            now,
            sender_key,
            domain,
        )
        if ack.message_id and outcome.ticket_ref:  # a reply to the ack threads to the ticket
            final += (
                ", t AS (INSERT INTO threads (message_id, backend, ref, created_at)"
                "  SELECT %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM o) ON CONFLICT DO NOTHING)"
            )
            args += (ack.message_id, outcome.backend, outcome.ticket_ref, now)
        parts.append((final + " SELECT verdict FROM v", args))
        row = await self._script(parts)
        return str(row["verdict"]) if row else ""


def _thread_insert(message_id: str, outcome: Outcome, now: float) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO threads (message_id, backend, ref, created_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (message_id, outcome.backend, outcome.ticket_ref, now),
    )


def _ack_verdict_sql(
    limits: AckLimits, sender_key: str, domain: str, since: float
) -> tuple[str, tuple[Any, ...]]:
    """An SQL expression over `known` (a boolean column beside it): the hourly limit an
    acknowledgement would pass ("sender", "domain", "global"), or "". The steps are
    `ack_limit_steps`' for a known sender and for a stranger, checked in their order."""

    def case(known: bool) -> tuple[str, list[Any]]:
        whens: list[str] = []
        args: list[Any] = []
        for step in ack_limit_steps(limits, sender_key, domain, known):
            if step.most <= 0:
                whens.append("WHEN TRUE THEN %s")
                args.append(step.verdict)
                break
            where = f"{step.column} = %s" if step.column else "TRUE"
            whens.append(
                f"WHEN (SELECT COUNT(*) FROM outbox WHERE {where} AND created_at >= %s) >= %s"
                " THEN %s"
            )
            args += [*((step.value,) if step.column else ()), since, step.most, step.verdict]
        return "CASE " + " ".join(whens) + " ELSE '' END", args

    known_sql, known_args = case(True)
    stranger_sql, stranger_args = case(False)
    return (
        f"CASE WHEN known THEN {known_sql} ELSE {stranger_sql} END",
        (*known_args, *stranger_args),
    )
