"""Config keys every backend type shares; each backend module extends `BackendConfigBase`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BackendConfigBase(BaseModel):
    """`[backends.NAME]`: keys common to every type (each type adds its own)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    url: str  # the system's endpoint or base URL
    timeout: float = Field(30.0, gt=0)  # seconds per HTTP call
    concurrency: int = Field(8, ge=1, le=256)  # calls in flight at once towards this system
    subject_token: str = "[Ticket #{ref}]"  # how acknowledgements and follow-ups name a ticket
    max_body_chars: int = Field(200_000, ge=1000)  # longer ticket text is truncated with a marker
    header_fields: list[str] = ["From", "To", "Cc", "Date"]  # header block above the body
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=0)  # per file; larger ones are listed
    max_total_attachment_bytes: int = Field(25 * 1024 * 1024, ge=0)
    blocked_extensions: list[str] = [".exe", ".bat", ".cmd", ".com", ".scr", ".pif", ".js", ".vbs"]
    # what a reply's quoted history and signature become in the ticket message (backends/text.py)
    quoted: Literal["fold", "drop", "attach", "keep"] = "fold"
