"""Spool schema versions: the current schema, every released one, and the steps between them.

The spool records its version in `meta.schema_version`. At start-up (`prepare`, called by
`SqliteSpool.__init__` on the write connection):

- no schema yet: the current `SCHEMA` is created and stamped `SCHEMA_VERSION`;
- an older version: a copy is taken first with SQLite's online backup API to
  `<spool>.v<old>.bak`, then every migration step up to `SCHEMA_VERSION` runs in ONE transaction
  together with the new version stamp, so a failure (or a crash) leaves the spool exactly at its old
  version and the gateway refuses to start with the reason;
- a newer version: refused with a clear message (an older gateway must not write a spool whose
  meaning it does not know).

Two processes may open the same old spool at once (the daemon and a `gateway queue` command): the
version is read again under the write lock, so only one of them migrates.

Released schemas are frozen here as text (`SCHEMA_V1`) so that a test can build the old spool,
migrate it and compare the result with a freshly created one: the migrations and `SCHEMA` cannot
drift apart unnoticed. Never edit a released schema or a released migration; add a new one.

History:
  1  the first release: meta, messages, tickets, threads, outbox.
  2  retention and erasure: `messages.purged_at` (when retention removed the raw bytes; the row
     and its metadata stay) and the indexes the background purge and the erasure walk need
     (final messages by age, maps by age and by ticket, outbox by age and by message).
  3  `messages.crashes`.
  4  `bodies`: the raw bytes leave `messages` for a table of their own (see `_V4_BODIES`).
  5  claims and leases: `messages.claimed_by`/`lease_until` (which worker process of which node
     holds a mail it processes), `outbox.claimed_by`/`lease_until`, and the tables `nodes`
     (heartbeats), `leases` (one holder at a time: IMAP mailboxes, retention), `slots`
     (backend calls in flight) and `pauses` (paused backends), so that several worker processes
     share one spool (see `_V5_LEASES`).
  6  acknowledgement limits that cannot be dodged: `outbox.sender_key` (normalised address),
     `outbox.domain` (organisational domain), `outbox.known` (the recipient had a ticket
     before), their indexes, and `tickets_requester` (who has a ticket conversation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import SpoolError

log = logging.getLogger("gateway.spool")

# -- the first released schema (frozen) ----------------------------------------------------------

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    intake TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,            -- JSON list
    peer TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    raw BLOB,                           -- NULL once purged by retention
    source_key TEXT UNIQUE,             -- e.g. imap:<mailbox>:<uidvalidity>:<uid>
    message_id TEXT NOT NULL DEFAULT '',
    digest TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL DEFAULT '',
    ticket_ref TEXT NOT NULL DEFAULT '',
    ticket_id TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}', -- JSON: completed backend steps and what they returned
    inflight TEXT NOT NULL DEFAULT '',  -- a backend step begun and not yet recorded done
    uncertain INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_msgid ON messages (message_id);
CREATE INDEX IF NOT EXISTS messages_digest ON messages (digest);
CREATE TABLE IF NOT EXISTS tickets (        -- every ticket the gateway made: ref -> (backend, id)
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    system TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    requester TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (backend, ref)
);
CREATE INDEX IF NOT EXISTS tickets_ref ON tickets (ref);
CREATE TABLE IF NOT EXISTS threads (        -- Message-ID (incoming mails and our acks) -> ticket
    message_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    data BLOB NOT NULL,
    state TEXT NOT NULL,                -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_rcpt ON outbox (rcpt, created_at);
"""

# -- version 2: what retention and erasure need ----------------------------------------------------

_V2_INDEXES = """
CREATE INDEX IF NOT EXISTS messages_age ON messages (state, updated_at);
CREATE INDEX IF NOT EXISTS messages_raw_age ON messages (state, updated_at) WHERE raw IS NOT NULL;
CREATE INDEX IF NOT EXISTS tickets_age ON tickets (created_at);
CREATE INDEX IF NOT EXISTS threads_ticket ON threads (backend, ref, created_at);
CREATE INDEX IF NOT EXISTS threads_age ON threads (created_at);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (state, created_at);
CREATE INDEX IF NOT EXISTS outbox_message ON outbox (message_id);
"""

# -- version 4: the raw bytes in a table of their own ------------------------------------------------

# SQLite rewrites a whole row on every UPDATE, overflow pages included: with the raw bytes in
# `messages`, each state change of a mail copied all of it (and a 10 MiB mail cost 10 MiB of
# memory per change). A row of `bodies` is written once and read once.
_V4_BODIES = """
CREATE TABLE IF NOT EXISTS bodies (        -- the raw bytes of a message; no row once purged (v4)
    id INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw BLOB NOT NULL
);
"""
_V4_RAW_AGE = (
    "CREATE INDEX IF NOT EXISTS messages_raw_age ON messages (state, updated_at)"
    " WHERE purged_at IS NULL;"
)

# -- version 5: claims, leases, heartbeats -------------------------------------------------------------

_V5_COLUMNS = (
    "ALTER TABLE messages ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE messages ADD COLUMN lease_until REAL",
    "ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN lease_until REAL",
)
_V5_LEASES = """
CREATE INDEX IF NOT EXISTS messages_claims ON messages (claimed_by) WHERE state = 'processing';
CREATE TABLE IF NOT EXISTS nodes (          -- worker processes and their last heartbeat (v5)
    owner TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    seen_at REAL NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (         -- one holder at a time: imap:<name>, retention (v5)
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (          -- backend calls in flight, per mail (v5)
    backend TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    owner TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (backend, msg_id)
);
CREATE TABLE IF NOT EXISTS pauses (         -- backends paused for every worker (v5)
    backend TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""

# -- version 6: acknowledgement limit keys -----------------------------------------------------------

_V6_COLUMNS = (
    "ALTER TABLE outbox ADD COLUMN sender_key TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN domain TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN known INTEGER NOT NULL DEFAULT 0",
)
_V6_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_sender ON outbox (sender_key, created_at);
CREATE INDEX IF NOT EXISTS outbox_domain ON outbox (domain, created_at);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at, known);
CREATE INDEX IF NOT EXISTS tickets_requester ON tickets (requester);
"""

# -- the current schema, for a new spool ----------------------------------------------------------

SCHEMA = (
    SCHEMA_V1.replace(
        "    uncertain INTEGER NOT NULL DEFAULT 0,\n    updated_at REAL NOT NULL\n",
        "    uncertain INTEGER NOT NULL DEFAULT 0,\n    updated_at REAL NOT NULL,\n"
        "    purged_at REAL,                     -- when retention removed the raw bytes (v2)\n"
        "    crashes INTEGER NOT NULL DEFAULT 0, -- times a crash interrupted its processing (v3)\n"
        "    claimed_by TEXT NOT NULL DEFAULT '', -- owner (node/worker) while processing (v5)\n"
        "    lease_until REAL                    -- the owner's lease on it (v5)\n",
    )
    .replace(
        "    created_at REAL NOT NULL,\n    sent_at REAL\n",
        "    created_at REAL NOT NULL,\n    sent_at REAL,\n"
        "    claimed_by TEXT NOT NULL DEFAULT '', -- the sender sending it now (v5)\n"
        "    lease_until REAL,\n"
        "    sender_key TEXT NOT NULL DEFAULT '', -- normalised rcpt: the per-sender limit (v6)\n"
        "    domain TEXT NOT NULL DEFAULT '',     -- organisational domain: the per-domain limit (v6)\n"
        "    known INTEGER NOT NULL DEFAULT 0     -- rcpt had a ticket before: global split (v6)\n",
    )
    .replace("    raw BLOB,                           -- NULL once purged by retention\n", "")
    + _V2_INDEXES.replace(
        "CREATE INDEX IF NOT EXISTS messages_raw_age ON messages (state, updated_at)"
        " WHERE raw IS NOT NULL;",
        _V4_RAW_AGE,
    )
    + _V4_BODIES
    + _V5_LEASES
    + _V6_INDEXES
)
assert "purged_at" in SCHEMA and "raw BLOB,  " not in SCHEMA  # the replaces above matched
assert "WHERE purged_at IS NULL" in SCHEMA
assert "outbox" in SCHEMA and SCHEMA.count("claimed_by TEXT") == 2
assert "sender_key TEXT" in SCHEMA


@dataclass(frozen=True)
class Migration:
    """One step: `apply` brings a spool from `version - 1` to `version` (inside a transaction)."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _v2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE messages ADD COLUMN purged_at REAL")
    for statement in statements(_V2_INDEXES):
        conn.execute(statement)


def _v3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE messages ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")


def _v4(conn: sqlite3.Connection) -> None:
    for statement in statements(_V4_BODIES):
        conn.execute(statement)
    conn.execute("INSERT INTO bodies (id, raw) SELECT id, raw FROM messages WHERE raw IS NOT NULL")
    # "has its raw bytes" is now "not purged": a row without them counts as purged
    conn.execute(
        "UPDATE messages SET purged_at = COALESCE(purged_at, updated_at) WHERE raw IS NULL"
    )
    conn.execute("DROP INDEX IF EXISTS messages_raw_age")
    conn.execute("ALTER TABLE messages DROP COLUMN raw")
    conn.execute(_V4_RAW_AGE)


def _v5(conn: sqlite3.Connection) -> None:
    for statement in _V5_COLUMNS:
        conn.execute(statement)
    for statement in statements(_V5_LEASES):
        conn.execute(statement)


def _v6(conn: sqlite3.Connection) -> None:
    for statement in _V6_COLUMNS:
        conn.execute(statement)
    # acks of the last hour keep counting: their exact address and domain are close enough
    conn.execute(
        "UPDATE outbox SET sender_key = LOWER(rcpt),"
        " domain = LOWER(SUBSTR(rcpt, INSTR(rcpt, '@') + 1))"
    )
    for statement in statements(_V6_INDEXES):
        conn.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "messages.purged_at; indexes for retention and erasure", _v2),
    Migration(3, "messages.crashes: set aside a mail that keeps killing the worker", _v3),
    Migration(4, "bodies: the raw bytes apart from the often-updated messages row", _v4),
    Migration(5, "claims and leases: several worker processes share the spool", _v5),
    Migration(6, "outbox sender_key, domain, known: acknowledgement limits by key", _v6),
)

SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else 1


def statements(script: str) -> list[str]:
    """Split a schema script into single statements (each can then run inside a transaction;
    `executescript` would commit first)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]!r}")
    return out


def read_version(conn: sqlite3.Connection) -> int | None:
    """The spool's schema version, or None for a file without a schema yet."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def backup_path(path: Path, version: int) -> Path:
    return path.with_name(f"{path.name}.v{version}.bak")


def online_backup(src: sqlite3.Connection, dest: Path, *, mode_of: Path | None = None) -> int:
    """Copy the database behind `src` to `dest` consistently; return the copy's size in bytes.

    SQLite's online backup API copies every page in one step (`pages=-1`): the copy is one
    snapshot, taken under a read transaction, so in WAL mode other connections keep writing
    meanwhile and the copy is the state of one commit. The copy is written to `dest.tmp` in
    rollback-journal mode (one self-contained file, no -wal beside it), synced, checked with
    `PRAGMA quick_check`, and then renamed over `dest`, so `dest` is never a half-written file.
    It gets the permissions of `mode_of` (the spool: it holds the same mail), else 0600.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    mode = 0o600
    if mode_of is not None:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(mode_of.stat().st_mode) & 0o660 or 0o600
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode))
    try:
        out = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(out, pages=-1)
            out.execute("PRAGMA journal_mode=DELETE")
            check = out.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise SpoolError(f"{dest}: the copy failed its check: {check}")
        finally:
            out.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        for suffix in ("", "-journal"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    return dest.stat().st_size


def prepare(conn: sqlite3.Connection, path: Path) -> int:
    """Create, check or migrate the schema behind `conn` (a connection in autocommit mode).

    Returns the version the spool had when it was opened (None counts as the current one).
    """
    found = read_version(conn)
    if found is None:
        _in_transaction(conn, lambda: _create(conn))
        return SCHEMA_VERSION
    if found > SCHEMA_VERSION:
        raise SpoolError(_newer(path, found))
    if found == SCHEMA_VERSION:
        return found
    bak = backup_path(path, found)
    try:
        online_backup(conn, bak, mode_of=path)
    except (OSError, sqlite3.Error, SpoolError) as exc:
        raise SpoolError(
            f"{path}: cannot take the backup copy {bak} before migrating the spool from schema"
            f" {found} to {SCHEMA_VERSION}: {exc}; the spool is unchanged"
        ) from exc
    log.warning(
        "spool_migrating",
        extra={"fields": {"path": path, "from": found, "to": SCHEMA_VERSION, "backup": bak}},
    )

    def migrate() -> None:
        current = read_version(conn)  # again, under the write lock: another process may have won
        if current is None or current >= SCHEMA_VERSION:
            if current is not None and current > SCHEMA_VERSION:
                raise SpoolError(_newer(path, current))
            return
        for step in MIGRATIONS:
            if step.version > current:
                step.apply(conn)
                log.info(
                    "spool_migrated_step",
                    extra={"fields": {"version": step.version, "what": step.description}},
                )
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )

    try:
        _in_transaction(conn, migrate)
    except sqlite3.Error as exc:
        raise SpoolError(
            f"{path}: migrating the spool from schema {found} to {SCHEMA_VERSION} failed: {exc};"
            f" nothing was changed (the copy taken before is {bak})"
        ) from exc
    log.warning(
        "spool_migrated", extra={"fields": {"path": path, "from": found, "to": SCHEMA_VERSION}}
    )
    return found


def _create(conn: sqlite3.Connection) -> None:
    if read_version(conn) is not None:  # another process created it meanwhile
        return
    for statement in statements(SCHEMA):
        conn.execute(statement)
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[], None]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        fn()
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _newer(path: Path, found: int) -> str:
    return (
        f"{path}: spool schema version {found} is newer than this gateway understands"
        f" ({SCHEMA_VERSION}); upgrade the gateway (or restore the copy a newer gateway took"
        f" before it migrated: {backup_path(path, SCHEMA_VERSION)})"
    )
