"""The IMAP intake's errors: each one drops the connection; login and TLS failures are retried
slowly. `_SpoolBlocked` carries a spool failure out of a chunk (the mail stays untouched)."""

from __future__ import annotations

from gateway.errors import GatewayError, SpoolError


class ImapError(GatewayError):
    """The connection broke or a command failed: drop the connection and reconnect."""


class ImapLoginError(ImapError):
    """Credentials refused, or the password/token could not be obtained: retry slowly."""


class ImapTlsError(ImapError):
    """The server certificate did not verify (or the CA file cannot be read): retry slowly."""


class _SpoolBlocked(Exception):
    def __init__(self, cause: SpoolError) -> None:
        super().__init__(str(cause))
        self.cause = cause
