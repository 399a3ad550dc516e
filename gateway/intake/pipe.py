"""`gateway deliver`: spool one message from stdin for an MTA pipe transport (Postfix, Exim).

Exit codes are sysexits: 0 stored, 75 (EX_TEMPFAIL) the spool could not commit (the MTA keeps the
mail and retries), 65 (EX_DATAERR) the input is not a mail at all (empty, or no header section),
67 (EX_NOUSER) a recipient is not one the SMTP intake accepts (`[smtp] recipients`): the same
policy as RCPT TO, so the pipe is no way around it (no catch-all tickets, no acknowledgement from
a stranger's address); nothing is stored. The daemon's worker picks the message up from the spool.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Collection
from typing import BinaryIO

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool import PutResult, SpoolSettings, open_spool

log = logging.getLogger("gateway.intake.pipe")

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75


def looks_like_mail(raw: bytes) -> str | None:
    """None when `raw` has a header section; otherwise why it is not a mail."""
    if not raw.strip():
        return "empty input"
    head = raw[:65536].split(b"\n", 1)[0].rstrip(b"\r")
    if head.startswith(b"From ") and b"\n" in raw:  # mbox "From " line from some MTAs
        head = raw.split(b"\n", 2)[1].rstrip(b"\r")
    name, sep, _ = head.partition(b":")
    if not sep or not name or b" " in name.strip():
        return "input does not start with a mail header"
    return None


def refused_recipients(rcpts: Collection[str], accepted: Collection[str]) -> list[str]:
    """The recipients SMTP would refuse at RCPT TO (550 5.1.1); see `gateway.intake.smtp`."""
    ok = {a.lower() for a in accepted}
    return [r for r in rcpts if r.strip().lower() not in ok]


def deliver(
    settings: SpoolSettings,
    stdin: BinaryIO,
    *,
    rcpts: list[str],
    mail_from: str,
    max_size: int,
    accepted: Collection[str],
) -> int:
    if not rcpts:
        print("gateway deliver: no recipient (--rcpt ADDR)", file=sys.stderr)
        return EX_NOUSER
    refused = refused_recipients(rcpts, accepted)
    if refused:
        # before reading the mail: nothing of it is stored, the MTA bounces it with this reason
        print(
            f"gateway deliver: <{refused[0]}>: recipient address not accepted here"
            " (not in [smtp] recipients)",
            file=sys.stderr,
        )
        return EX_NOUSER
    raw = stdin.read(max_size + 1)
    if len(raw) > max_size:
        print(f"gateway deliver: message larger than {max_size} bytes", file=sys.stderr)
        return EX_DATAERR
    if raw.startswith(b"From ") and b"\n" in raw:
        raw = raw.split(b"\n", 1)[1]
    why = looks_like_mail(raw)
    if why is not None:
        print(f"gateway deliver: {why}", file=sys.stderr)
        return EX_DATAERR
    env = Envelope(
        mail_from=mail_from.strip("<>"),
        rcpt_tos=tuple(r.lower() for r in rcpts),
        peer="",
        intake="pipe",
        received_at=time.time(),
    )
    # OSError too: creating the spool's directory fails that way (a file in its place, no
    # permission), and anything but 75 would make the MTA bounce a mail we merely failed to store.

    async def store() -> PutResult:
        spool = await open_spool(settings)
        try:
            return await spool.put(raw, env)
        finally:
            await spool.close()

    try:
        result = asyncio.run(store())
    except (SpoolError, OSError) as exc:
        print(f"gateway deliver: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    log.info("accepted", extra={"fields": {"intake": "pipe", "id": result.id, "size": len(raw)}})
    return EX_OK
