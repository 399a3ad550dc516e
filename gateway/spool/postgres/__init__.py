"""The shared spool: one PostgreSQL database for several gateway nodes. See `Spool`.

Driver: psycopg 3 with its async connection pool (`psycopg_pool`), used through their public API.
What PostgreSQL itself provides does the cluster work:

- Durability: `put` returns after the COMMIT (synchronous_commit as the server has it, `on` by
  default). Puts that arrive while a commit is in flight wait and go together in the next
  transaction, one round trip for the whole batch (pipeline mode): group commit, as in SQLite.
- Claims: `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`: two nodes never claim one
  mail and never wait for each other. Each claim names its owner (`node/worker`) and holds a lease
  (`lease_until`) that the owner's heartbeat renews; after a node dies, any node's `take_over`
  puts its mails back (uncertain where a backend call was in flight).
- Wake-ups: a batch of puts (and every release) sends `NOTIFY gateway_work`; each worker LISTENs
  on a session connection of its own and claims at once instead of polling. A released backend
  call slot sends `NOTIFY gateway_slots, 'BACKEND'`, so that a worker waiting for one tries again
  at once.
- One process per owner name: a session-level advisory lock (`hold_owner`).
- Schema versions: `meta.schema_version`, created or migrated at start-up in one transaction under
  a transaction-level advisory lock, so nodes starting together migrate once, one at a time.
- Limits across the cluster: the ack limits count the shared outbox; backend concurrency is a row
  per call in `slots` (taken under a per-backend advisory lock); pauses are rows in `pauses`;
  named leases (IMAP mailboxes, retention) are rows in `leases`.

Failures: every psycopg error (server down, connection lost, pool exhausted) becomes `SpoolError`,
so SMTP answers 451, IMAP leaves mail in the mailbox and /healthz says `spool: ...`; the pool
reconnects by itself when the server is back.

Times are epoch seconds from the node's clock (as in SQLite), so nodes must keep their clocks in
step (NTP); a lease is long against any sane skew.

One class per concern, each in a module of its own, composed into `PostgresSpool` (the SQLite
engine, `gateway.spool.sqlite`, has the same modules and classes, to be read side by side):

- `plumbing`: `PostgresBase`: the pool and the ways a statement runs on it, the schema's
  creation or migration, closing, and the session connection (LISTEN, the owner lock);
- `schema`: the schema, its migrations, the channel names and lock keys;
- `intake`: `put` (group commit) and the source keys;
- `claims`: recovery, claims, heartbeats and leases of the queue;
- `messages`: one claimed mail: its row and bytes, identity, steps, defer, finish;
- `maps`: the ticket and thread maps and the outbox;
- `slots`: named leases, backend call slots and pauses;
- `inspection`: counts, listings, retry and drop, statistics;
- `lifecycle`: retention, erasure, backup, and `gateway spool copy`'s import.
"""

from __future__ import annotations

from gateway.spool.postgres.claims import Claims
from gateway.spool.postgres.inspection import Inspection
from gateway.spool.postgres.intake import Intake
from gateway.spool.postgres.lifecycle import DataLifecycle
from gateway.spool.postgres.maps import Maps
from gateway.spool.postgres.messages import Messages
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import (
    ACK_LIMIT_LOCK,
    CHANNEL,
    CONNECT_TIMEOUT,
    DATA_TABLES,
    MAX_BATCH,
    MIGRATE_LOCK,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SLOT_CHANNEL,
)
from gateway.spool.postgres.slots import Slots

__all__ = [
    "ACK_LIMIT_LOCK",
    "CHANNEL",
    "CONNECT_TIMEOUT",
    "DATA_TABLES",
    "MAX_BATCH",
    "MIGRATE_LOCK",
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SLOT_CHANNEL",
    "Conn",
    "PostgresBase",
    "PostgresSpool",
]


class PostgresSpool(Intake, Claims, Messages, Maps, Slots, Inspection, DataLifecycle):
    """See `Spool`. Open with `await PostgresSpool.open(settings)`."""
