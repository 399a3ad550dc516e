"""The spool: the single source of truth for every message, ticket map and pending acknowledgement."""

from gateway.spool.base import (
    AckRow,
    MessageRow,
    PutResult,
    Spool,
    State,
)

__all__ = ["AckRow", "MessageRow", "PutResult", "Spool", "State"]
