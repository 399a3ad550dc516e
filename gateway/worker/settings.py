"""`WorkerSettings`: the plain values the worker runs with (gateway.app builds them from the
config; tests construct them directly)."""

from __future__ import annotations

import dataclasses

from gateway.ackpolicy import AckPolicy, DkimSettings
from gateway.retry import DEFAULT_BASE, DEFAULT_CAP
from gateway.spool.base import AckLimits


@dataclasses.dataclass
class WorkerSettings:
    concurrency: int = 8
    fallback_charsets: tuple[str, ...] = ()  # [mail] fallback_charsets, for parse
    retry_base: float = DEFAULT_BASE  # [retry] base, max_delay: see gateway.retry
    retry_max_delay: float = DEFAULT_CAP
    retry_deadline: float = 5 * 24 * 3600.0
    paused_check: float = 60.0
    max_crashes: int = 5
    own_addresses: frozenset[str] = frozenset()
    timezone: str = "UTC"
    followup_closed: str = "append"
    followup_sender: str = "any"
    # who may get an acknowledgement (see gateway.ackpolicy) and the hourly limits (AckLimits)
    ack_policy: AckPolicy = dataclasses.field(default_factory=AckPolicy)
    dkim: DkimSettings = dataclasses.field(default_factory=DkimSettings)
    ack_limits: AckLimits = dataclasses.field(default_factory=AckLimits)
    ack_from_address: str = ""
    ack_from_name: str = "Support"
    ack_envelope_from: str = ""
    hostname: str = "ticket-gateway.localdomain"
    wait_original: float = 5.0  # a follow-up whose original is still queued waits this long
    # backend -> calls in flight allowed across the cluster (`concurrency` of the backend)
    backend_concurrency: dict[str, int] = dataclasses.field(default_factory=dict)
    shared_pauses: bool = False  # record and honour backend pauses in the spool
