"""The PostgreSQL spool's schema (version 1), its migrations, and the names the spool's modules
share: the NOTIFY channels, the advisory lock keys, the timeouts."""

from __future__ import annotations

SCHEMA_VERSION = 1
MIGRATE_LOCK = 0x67617465  # pg_advisory_xact_lock key for schema changes ("gate")
ACK_LIMIT_LOCK = 0x61636B6C  # pg_advisory_xact_lock key for queueing a limited ack ("ackl")
CHANNEL = "gateway_work"
SLOT_CHANNEL = "gateway_slots"  # payload: the backend whose call slot was released
CONNECT_TIMEOUT = 3.0  # s to get a connection before the spool counts as unreachable
MAX_BATCH = 256  # puts in one transaction

# -- the schema (version 1) -------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id BIGSERIAL PRIMARY KEY,
    state TEXT NOT NULL,
    intake TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    received_at DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    source_key TEXT UNIQUE,
    message_id TEXT NOT NULL DEFAULT '',
    digest TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    first_attempt_at DOUBLE PRECISION,
    last_error TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL DEFAULT '',
    ticket_ref TEXT NOT NULL DEFAULT '',
    ticket_id TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    inflight TEXT NOT NULL DEFAULT '',
    uncertain INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL,
    purged_at DOUBLE PRECISION,
    crashes INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_attempt_at, id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_claims ON messages (claimed_by, lease_until)
    WHERE state = 'processing';
CREATE INDEX IF NOT EXISTS messages_msgid ON messages (message_id);
CREATE INDEX IF NOT EXISTS messages_digest ON messages (digest);
CREATE INDEX IF NOT EXISTS messages_age ON messages (state, updated_at);
CREATE TABLE IF NOT EXISTS bodies (
    id BIGINT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    system TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    requester TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (backend, ref)
);
CREATE INDEX IF NOT EXISTS tickets_ref ON tickets (ref);
CREATE INDEX IF NOT EXISTS tickets_age ON tickets (created_at);
CREATE TABLE IF NOT EXISTS threads (
    message_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_ticket ON threads (backend, ref, created_at);
CREATE INDEX IF NOT EXISTS threads_age ON threads (created_at);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY,
    message_id BIGINT NOT NULL,
    rcpt TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    data BYTEA NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION,
    claimed_by TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION,
    sender_key TEXT NOT NULL DEFAULT '',  -- normalised rcpt: the per-sender ack limit
    domain TEXT NOT NULL DEFAULT '',      -- organisational domain: the per-domain ack limit
    known INTEGER NOT NULL DEFAULT 0      -- rcpt had a ticket before: the global limit's split
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_rcpt ON outbox (rcpt, created_at);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (state, created_at);
CREATE INDEX IF NOT EXISTS outbox_message ON outbox (message_id);
CREATE INDEX IF NOT EXISTS outbox_sender ON outbox (sender_key, created_at);
CREATE INDEX IF NOT EXISTS outbox_domain ON outbox (domain, created_at);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at, known);
CREATE INDEX IF NOT EXISTS tickets_requester ON tickets (requester);
CREATE TABLE IF NOT EXISTS nodes (
    owner TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    backend TEXT NOT NULL,
    msg_id BIGINT NOT NULL,
    owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (backend, msg_id)
);
CREATE TABLE IF NOT EXISTS pauses (
    backend TEXT PRIMARY KEY,
    until DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""

# every table `gateway spool copy` fills and refuses to overwrite
DATA_TABLES = ("messages", "bodies", "tickets", "threads", "outbox")

# Migrations: version -> statements that bring a spool from version - 1 to it. Never edit a
# released one; add a new one and raise SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, ...]] = {}
