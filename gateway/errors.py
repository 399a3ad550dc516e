"""The gateway's error tree. Each stage translates its library's errors at one boundary.

GatewayError
 ├── ConfigError            config or rule file is wrong (carries file:line problems)
 ├── SpoolError             the spool could not commit (intake answers 451 / exit 75)
 ├── ParseError             the mail cannot be read at all (quarantine with the reason)
 └── BackendError           a ticket system call failed
      ├── TransientError     try again later (backoff with jitter, up to a deadline)
      ├── PermanentError     this mail will never succeed here (dead-letter with the reason)
      └── BackendUnavailable the backend's credentials/configuration are refused: pause the
                             backend, keep its mails deferred, show it in /healthz
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a config or rule file, printed as `file:line: message`."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        # line 0: the problem is the file (or directory) as a whole
        if self.line <= 0:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(GatewayError):
    """A config or rule file is invalid; `problems` lists every `file:line: message`."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class SpoolError(GatewayError):
    """The spool could not store or update a message durably."""

    @property
    def disk_full(self) -> bool:
        """True when the cause is a full disk (SMTP then answers 452 4.3.1, not 451)."""
        exc: BaseException | None = self
        while exc is not None:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                return True
            if getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
                return True
            text = str(exc).lower()
            if "disk is full" in text or "no space left on device" in text:
                return True
            exc = exc.__cause__ or exc.__context__
        return False


class ParseError(GatewayError):
    """The raw bytes cannot be turned into a mail at all."""


class BackendError(GatewayError):
    """A ticket-system call failed. `message` is safe to log and store (no secrets)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientError(BackendError):
    """Temporary failure (network, timeout, 5xx, server busy): retry with backoff."""


class PermanentError(BackendError):
    """The system refused this mail for good (bad category, unknown ticket...): dead-letter."""


class BackendUnavailable(BackendError):
    """Credentials or configuration refused: pause the backend, defer its mails, never dead-letter."""
