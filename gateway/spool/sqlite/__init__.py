"""The embedded spool: one SQLite file in WAL mode with synchronous=FULL. See `Spool`.

One class per concern, each in a module of its own, composed into `SqliteSpool` (the PostgreSQL
engine, `gateway.spool.postgres`, has the same modules and classes, to be read side by side):

- `plumbing`: `SqliteBase`: the connections, the writer thread (group commit) and the reader
  threads, closing, and the owner lock;
- `intake`: `put` and the source keys;
- `claims`: crash recovery, claims, heartbeats and leases of the queue;
- `messages`: one claimed mail: its row and bytes, identity, steps, defer, finish;
- `maps`: the ticket and thread maps and the outbox;
- `slots`: named leases, backend call slots and pauses;
- `inspection`: counts, listings, retry and drop, statistics;
- `lifecycle`: retention, erasure, backup, the integrity check.

The schema, its version and the migrations of an older spool live in `gateway.spool.migrations`
(run when the spool is opened); retention, statistics and erasure in `gateway.spool.retention`.
"""

from __future__ import annotations

from gateway.spool.base import BLOB_STREAM_MIN
from gateway.spool.migrations import SCHEMA, SCHEMA_VERSION
from gateway.spool.sqlite.claims import Claims
from gateway.spool.sqlite.inspection import Inspection
from gateway.spool.sqlite.intake import BLOB_CHUNK, SOURCE_KEYS_PER_QUERY, Intake
from gateway.spool.sqlite.lifecycle import DataLifecycle
from gateway.spool.sqlite.maps import Maps, thread_lookup, ticket_by_ref
from gateway.spool.sqlite.messages import BodyReader, Messages, read_body
from gateway.spool.sqlite.plumbing import SqliteBase
from gateway.spool.sqlite.slots import Slots

__all__ = [
    "BLOB_CHUNK",
    "BLOB_STREAM_MIN",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SOURCE_KEYS_PER_QUERY",
    "BodyReader",
    "SqliteBase",
    "SqliteSpool",
    "read_body",
    "thread_lookup",
    "ticket_by_ref",
]


class SqliteSpool(Intake, Claims, Messages, Maps, Slots, Inspection, DataLifecycle):
    """See `Spool`. `clock` is injectable so retention and retry tests control time."""
