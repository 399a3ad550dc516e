"""The spool's data lifecycle: retention (a background purge), statistics, and erasure.

Retention (`purge`, run by the daemon every `[retention] interval` seconds) removes, by age:

- the raw bytes of finished mails: `done` after `done_raw_days`, `suppressed` after
  `suppressed_raw_days`, `duplicate` after `duplicate_raw_days`. The row and its metadata
  (envelope, Message-ID, digest, subject, ticket) stay; `purged_at` says when. The age counts from
  `updated_at`, i.e. from when the mail reached its final state;
- whole rows of finished mails after `maps_days`;
- `dead` mails (failed for good, or quarantined) after `dead_days` since they went dead; a mail
  put back with `gateway queue retry` starts again, so "kept until handled or M days";
- the ticket map and the Message-ID map of a conversation `maps_days` after its last mail (a
  follow-up keeps the whole conversation threadable);
- sent and failed acknowledgements after `outbox_days` (pending ones never).

Mails still waiting (queued, deferred, processing) are never touched. A run takes the spool's
`retention` lease first: with several nodes on one spool, one purge per interval for the cluster.
Every step runs in small
batches (`batch` rows), each one job in the spool's writer, so intake shares at most one small
batch's commit; the purge yields between batches. Purged pages are reused for new mail (the file
stops growing); `gateway erase` compacts the file (VACUUM) when bytes must really be gone.

The SQL here is SQLite's (`SqliteSpool.purge`, `.stats`, `.find_erasure`, `.erase` call it);
the PostgreSQL engine has its own. `stats` is what `gateway queue stats` prints. `find_erasure`/`erase` serve `gateway erase`: every
stored mail and map entry of one address, then VACUUM and a WAL checkpoint so that no copy of the
deleted rows survives in the spool's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import email.utils
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.spool.base import Erasure, PurgeResult, RetentionPolicy, Spool, State
from gateway.spool.migrations import read_version

__all__ = [
    "Erasure",
    "PurgeResult",
    "RetentionPolicy",
    "RetentionTask",
    "compact",
    "erase_job",
    "find_erasure",
    "header_addresses",
    "purge",
    "stats",
]

log = logging.getLogger("gateway.spool.retention")

DAY = 86400.0
FINAL_RAW_STATES = (State.DONE, State.SUPPRESSED, State.DUPLICATE)


# -- one batch of each kind: (rows, bytes) ------------------------------------------------------
# Each runs inside the writer's transaction; `limit` rows at most.

_Step = Callable[[sqlite3.Connection, int], tuple[int, int]]


def _purge_raw(state: str, cutoff: float, now: float) -> _Step:
    def step(conn: sqlite3.Connection, limit: int) -> tuple[int, int]:
        rows = conn.execute(
            "SELECT id, size FROM messages INDEXED BY messages_raw_age"
            " WHERE state = ? AND updated_at < ? AND purged_at IS NULL LIMIT ?",
            (state, cutoff, limit),
        ).fetchall()
        if rows:
            conn.executemany("DELETE FROM bodies WHERE id = ?", [(r[0],) for r in rows])
            conn.executemany(
                "UPDATE messages SET purged_at = ? WHERE id = ?", [(now, r[0]) for r in rows]
            )
        return len(rows), sum(r[1] for r in rows)

    return step


def _delete_messages(states: tuple[str, ...], cutoff: float) -> _Step:
    marks = ",".join("?" * len(states))

    def step(conn: sqlite3.Connection, limit: int) -> tuple[int, int]:
        ids = [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM messages WHERE state IN ({marks}) AND updated_at < ? LIMIT ?",
                (*states, cutoff, limit),
            )
        ]
        outbox = 0
        for i in ids:
            outbox += conn.execute("DELETE FROM outbox WHERE message_id = ?", (i,)).rowcount
            conn.execute("DELETE FROM bodies WHERE id = ?", (i,))  # (also by ON DELETE CASCADE)
            conn.execute("DELETE FROM messages WHERE id = ?", (i,))
        return len(ids), outbox

    return step


def _delete_threads(cutoff: float) -> _Step:
    def step(conn: sqlite3.Connection, limit: int) -> tuple[int, int]:
        # A conversation ends maps_days after its last mail: keep every Message-ID of a ticket
        # that has a newer thread entry or was created more recently.
        n = conn.execute(
            "DELETE FROM threads WHERE rowid IN (SELECT t.rowid FROM threads t"
            " WHERE t.created_at < :cut"
            " AND NOT EXISTS (SELECT 1 FROM threads u WHERE u.backend = t.backend"
            "  AND u.ref = t.ref AND u.created_at >= :cut)"
            " AND NOT EXISTS (SELECT 1 FROM tickets k WHERE k.backend = t.backend"
            "  AND k.ref = t.ref AND k.created_at >= :cut)"
            " LIMIT :limit)",
            {"cut": cutoff, "limit": limit},
        ).rowcount
        return n, 0

    return step


def _delete_tickets(cutoff: float) -> _Step:
    def step(conn: sqlite3.Connection, limit: int) -> tuple[int, int]:
        n = conn.execute(
            "DELETE FROM tickets WHERE rowid IN (SELECT k.rowid FROM tickets k"
            " WHERE k.created_at < :cut"
            " AND NOT EXISTS (SELECT 1 FROM threads t WHERE t.backend = k.backend"
            "  AND t.ref = k.ref AND t.created_at >= :cut)"
            " LIMIT :limit)",
            {"cut": cutoff, "limit": limit},
        ).rowcount
        return n, 0

    return step


def _delete_outbox(cutoff: float) -> _Step:
    def step(conn: sqlite3.Connection, limit: int) -> tuple[int, int]:
        n = conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
            " WHERE state IN ('sent', 'failed') AND created_at < ? LIMIT ?)",
            (cutoff, limit),
        ).rowcount
        return n, 0

    return step


def sqlite_steps(policy: RetentionPolicy, now: float) -> list[tuple[str, _Step]]:
    """The purge's steps for a SQLite spool, in order, as (kind, batch step)."""
    raw_days = {
        State.DONE: policy.done_raw_days,
        State.SUPPRESSED: policy.suppressed_raw_days,
        State.DUPLICATE: policy.duplicate_raw_days,
    }
    maps_cut = now - policy.maps_days * DAY
    steps: list[tuple[str, _Step]] = [
        (f"raw:{s.value}", _purge_raw(s.value, now - raw_days[s] * DAY, now))
        for s in FINAL_RAW_STATES
    ]
    steps += [
        ("messages", _delete_messages(tuple(s.value for s in FINAL_RAW_STATES), maps_cut)),
        ("dead", _delete_messages((State.DEAD.value,), now - policy.dead_days * DAY)),
        ("threads", _delete_threads(maps_cut)),
        ("tickets", _delete_tickets(maps_cut)),
        ("outbox", _delete_outbox(now - policy.outbox_days * DAY)),
    ]
    return steps


def count(result: PurgeResult, kind: str, n: int, extra: int) -> None:
    """Add one batch of step `kind` (rows `n`, and bytes or outbox rows `extra`) to `result`."""
    result.batches += 1
    if kind.startswith("raw:"):
        result.raw_purged += n
        result.raw_bytes += extra
    elif kind == "messages":
        result.messages_deleted += n
        result.outbox_deleted += extra
    elif kind == "dead":
        result.dead_deleted += n
        result.outbox_deleted += extra
    elif kind == "threads":
        result.threads_deleted += n
    elif kind == "tickets":
        result.tickets_deleted += n
    else:
        result.outbox_deleted += n


async def purge(spool: Spool, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
    """Apply `policy` once, at the spool's clock; batches until nothing is left to do."""
    return await spool.purge(policy, pause=pause)


class RetentionTask:
    """The daemon's background purge: `purge` every `interval` seconds until `stop`.

    Once per cluster: a run first takes the spool's `retention` lease, so when several nodes
    (or worker processes) share a spool only one of them purges per interval."""

    LEASE = "retention"

    def __init__(
        self, spool: Spool, policy: RetentionPolicy, *, interval: float, pause: float = 0.01
    ) -> None:
        self.spool = spool
        self.policy = policy
        self.interval = interval
        self.pause = pause
        self.runs = 0
        self.last: PurgeResult | None = None
        self._stop = asyncio.Event()

    async def run_once(self) -> PurgeResult | None:
        """One purge, unless another process holds the lease (then None)."""
        # held for the interval: the next holder purges one interval after this run
        if not await self.spool.try_lease(self.LEASE, max(self.interval, 60.0)):
            return None
        started = time.monotonic()
        result = await purge(self.spool, self.policy, pause=self.pause)
        self.runs += 1
        self.last = result
        if result.changed():
            seconds = f"{time.monotonic() - started:.2f}"
            log.info("retention", extra={"fields": {**result.log_fields(), "seconds": seconds}})
        return result

    async def run(self) -> None:
        """Never dies on an error (the next interval tries again); only `stop` ends it."""
        while not self._stop.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("retention_failed", extra={"fields": {"error": str(exc)}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)

    def stop(self) -> None:
        self._stop.set()


# -- statistics ---------------------------------------------------------------------------------


def stats(conn: sqlite3.Connection, now: float, path: Path | None = None) -> dict[str, Any]:
    """Counts, sizes and ages per state, of the maps and of the outbox; raw bytes held."""

    def age(t: float | None) -> float | None:
        return None if t is None else round(max(0.0, now - t), 1)

    states: dict[str, dict[str, Any]] = {}
    for s in State:
        states[s.value] = {
            "count": 0,
            "bytes": 0,
            "raw_bytes": 0,
            "purged": 0,
            "oldest_age_s": None,
            "oldest_change_age_s": None,
        }
    for r in conn.execute(
        "SELECT state, COUNT(*), COALESCE(SUM(size), 0),"
        " COALESCE(SUM(CASE WHEN purged_at IS NULL THEN size ELSE 0 END), 0),"
        " SUM(CASE WHEN purged_at IS NULL THEN 0 ELSE 1 END), MIN(received_at), MIN(updated_at)"
        " FROM messages GROUP BY state"
    ):
        states[r[0]] = {
            "count": r[1],
            "bytes": r[2],
            "raw_bytes": r[3],
            "purged": r[4],
            "oldest_age_s": age(r[5]),
            "oldest_change_age_s": age(r[6]),
        }
    outbox: dict[str, dict[str, Any]] = {
        s: {"count": 0, "bytes": 0, "oldest_age_s": None} for s in ("pending", "sent", "failed")
    }
    for r in conn.execute(
        "SELECT state, COUNT(*), COALESCE(SUM(LENGTH(data)), 0), MIN(created_at)"
        " FROM outbox GROUP BY state"
    ):
        outbox[r[0]] = {"count": r[1], "bytes": r[2], "oldest_age_s": age(r[3])}
    tickets = conn.execute("SELECT COUNT(*), MIN(created_at) FROM tickets").fetchone()
    threads = conn.execute("SELECT COUNT(*), MIN(created_at) FROM threads").fetchone()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    files: dict[str, Any] = {"free_bytes": page_size * free_pages}
    if path is not None:
        for key, suffix in (("spool_bytes", ""), ("wal_bytes", "-wal")):
            try:
                files[key] = Path(f"{path}{suffix}").stat().st_size
            except OSError:
                files[key] = 0
    return {
        "schema_version": read_version(conn),
        "states": states,
        "raw_bytes": sum(v["raw_bytes"] for v in states.values()),
        "maps": {
            "tickets": tickets[0],
            "threads": threads[0],
            "oldest_ticket_age_s": age(tickets[1]),
            "oldest_thread_age_s": age(threads[1]),
        },
        "outbox": outbox,
        "files": files,
    }


# -- erasure ------------------------------------------------------------------------------------

# Headers that name a person of the mail (besides the envelope sender and recipients).
ADDRESS_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "return-path",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
)
HEAD_BYTES = 65536  # the header block of a mail, read first; the whole mail only if longer
_SCAN_BATCH = 200


def header_addresses(raw: bytes) -> set[str]:
    """Lower-cased addresses in the address headers of a mail's header block."""
    end = len(raw)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i != -1:
            end = min(end, i)
    head = raw[:end]
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    values = [str(v) for h in ADDRESS_HEADERS for v in (msg.get_all(h) or [])]
    return {a.strip().lower() for _, a in email.utils.getaddresses(values) if "@" in a}


def matches(address: str, mail_from: str, rcpt_tos: str, head: bytes | None) -> bool:
    if mail_from.strip().lower() == address:
        return True
    try:
        rcpts = json.loads(rcpt_tos)
    except ValueError:
        rcpts = []
    if any(str(r).strip().lower() == address for r in rcpts):
        return True
    if head is None or address.encode("utf-8", "replace") not in head.lower():
        return False  # cheap test first: the address's bytes do not occur at all
    return address in header_addresses(head)


def _scan(
    conn: sqlite3.Connection, address: str, after: int
) -> tuple[list[tuple[int, str, int]], int]:
    """(id, state, size) of every message after id `after` that names `address`; highest id seen."""
    found: list[tuple[int, str, int]] = []
    last = after
    while True:
        rows = conn.execute(
            "SELECT id, state, size, mail_from, rcpt_tos,"
            " (SELECT SUBSTR(raw, 1, ?) FROM bodies WHERE bodies.id = messages.id)"
            " FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (HEAD_BYTES, last, _SCAN_BATCH),
        ).fetchall()
        if not rows:
            return found, last
        for msg_id, state, size, mail_from, rcpt_tos, head in rows:
            head = bytes(head) if head is not None else None
            if (
                head is not None
                and len(head) == HEAD_BYTES
                and b"\n\n" not in head.replace(b"\r\n", b"\n")
            ):
                full = conn.execute("SELECT raw FROM bodies WHERE id = ?", (msg_id,)).fetchone()
                head = bytes(full[0]) if full and full[0] is not None else head
            if matches(address, mail_from, rcpt_tos, head):
                found.append((msg_id, state, size))
        last = rows[-1][0]


def _map_rows(
    conn: sqlite3.Connection, address: str, msg_ids: list[int]
) -> tuple[list[tuple[str, str]], list[str], list[int]]:
    """(tickets by (backend, ref), thread Message-IDs, outbox ids) that go with the erasure."""
    tickets = [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT backend, ref FROM tickets WHERE LOWER(TRIM(requester)) = ?", (address,)
        )
    ]
    threads: set[str] = set()
    for backend, ref in tickets:
        threads |= {
            r[0]
            for r in conn.execute(
                "SELECT message_id FROM threads WHERE backend = ? AND ref = ?", (backend, ref)
            )
        }
    outbox = {
        r[0] for r in conn.execute("SELECT id FROM outbox WHERE LOWER(TRIM(rcpt)) = ?", (address,))
    }
    for i in msg_ids:
        mid = conn.execute("SELECT message_id FROM messages WHERE id = ?", (i,)).fetchone()
        if mid and mid[0]:
            if conn.execute("SELECT 1 FROM threads WHERE message_id = ?", (mid[0],)).fetchone():
                threads.add(mid[0])
        outbox |= {r[0] for r in conn.execute("SELECT id FROM outbox WHERE message_id = ?", (i,))}
    return tickets, sorted(threads), sorted(outbox)


def find_erasure(conn: sqlite3.Connection, address: str) -> Erasure:
    """Read-only: everything `erase` would remove for `address` (the dry run)."""
    address = address.strip().lower()
    found, last = _scan(conn, address, 0)
    er = Erasure(address=address, scanned_to=last)
    for msg_id, state, size in found:
        if state == State.PROCESSING.value:
            er.busy.append(msg_id)
        else:
            er.message_ids.append(msg_id)
            er.raw_bytes += size
    tickets, threads, outbox = _map_rows(conn, address, er.message_ids)
    er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
    return er


def erase_job(address: str, scanned: Erasure) -> Callable[[sqlite3.Connection], Erasure]:
    """The writer job: redo the cheap part of the scan under the write lock and delete.

    The long scan (`find_erasure`) ran outside the writer; here only mails that arrived after it
    are scanned, and the states are read again (a mail may have been claimed meanwhile).
    """
    address = address.strip().lower()

    def job(conn: sqlite3.Connection) -> Erasure:
        conn.execute("PRAGMA secure_delete = ON")  # overwrite freed content with zeros
        try:
            later, last = _scan(conn, address, scanned.scanned_to)
            candidates = [*scanned.message_ids, *scanned.busy, *(r[0] for r in later)]
            er = Erasure(address=address, scanned_to=last)
            for msg_id in candidates:
                r = conn.execute(
                    "SELECT state, size FROM messages WHERE id = ?", (msg_id,)
                ).fetchone()
                if r is None:
                    continue
                if r[0] == State.PROCESSING.value:
                    er.busy.append(msg_id)
                else:
                    er.message_ids.append(msg_id)
                    er.raw_bytes += r[1]
            tickets, threads, outbox = _map_rows(conn, address, er.message_ids)
            for oid in outbox:
                conn.execute("DELETE FROM outbox WHERE id = ?", (oid,))
            for mid in threads:
                conn.execute("DELETE FROM threads WHERE message_id = ?", (mid,))
            for backend, ref in tickets:
                conn.execute("DELETE FROM tickets WHERE backend = ? AND ref = ?", (backend, ref))
            for msg_id in er.message_ids:
                conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
                conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
            er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
            return er
        finally:
            conn.execute("PRAGMA secure_delete = OFF")

    return job


def compact(path: Path, *, attempts: int = 20) -> bool:
    """VACUUM the spool and truncate its WAL, so deleted rows leave no bytes in either file.

    Returns False when another process kept the WAL from being truncated (it then still holds
    old pages until the next checkpoint; run `gateway erase` again when the daemon is idle).
    """
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("VACUUM")
        for _ in range(attempts):
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy == 0:
                return True
            time.sleep(0.1)
        return False
    finally:
        conn.close()
