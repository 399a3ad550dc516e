"""The worker: takes due messages from the spool and runs parse -> classify -> route -> backend ->
acknowledge, recording each outcome in one spool transaction.

Decisions about failure live here (STYLE 6): a transient backend error is retried with exponential
backoff and jitter until `retry.deadline`; a permanent one dead-letters the mail with the system's
reason; `BackendUnavailable` pauses that backend (its mails stay deferred, /healthz says why) and
never dead-letters; anything unexpected quarantines the mail (state dead, raw bytes kept, the
traceback as reason) and the worker goes on with the next one. Parsing runs in a process pool so
that a 10 MiB mail never stalls the SMTP intake on the event loop.

Modules (each imports only those above it)
    settings  `WorkerSettings`: the worker's plain values, built from the config by gateway.app
    progress  `SpoolProgress`: a backend's steps for one mail, durable in the spool
    slots     a backend's call slots across the cluster: `SlotGate` (this process's side of
              them) and the worker's methods that take, lend and give back a slot
    acks      the acknowledgement decisions (who gets one, the own DKIM check, the draft)
    pipeline  `Worker`: the loop, one mail's pipeline, delivery to a backend, its outcome
"""

from __future__ import annotations

from gateway.worker.pipeline import DEFAULT_LEASE, LEASE_MARGIN, STREAM_BODY_MIN, Worker
from gateway.worker.progress import PROGRESS_RETRY_FIRST, PROGRESS_RETRY_MAX, SpoolProgress
from gateway.worker.settings import WorkerSettings
from gateway.worker.slots import SLOT_WAIT, SlotGate

__all__ = [
    "DEFAULT_LEASE",
    "LEASE_MARGIN",
    "PROGRESS_RETRY_FIRST",
    "PROGRESS_RETRY_MAX",
    "SLOT_WAIT",
    "STREAM_BODY_MIN",
    "SlotGate",
    "SpoolProgress",
    "Worker",
    "WorkerSettings",
]
