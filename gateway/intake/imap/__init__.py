"""IMAP intake (aioimaplib): fetch mail from hosted mailboxes; move, flag or delete it only after
the spool commit.

One `ImapIntake` per `[[imap]]` section. Its `run()` keeps one connection per watched folder
(an IMAP connection has one folder selected, and IDLE watches only that one), so a section with
`folders = ["INBOX", "Spam"]` holds two connections; different sections run as different tasks.

Per connection: connect (implicit TLS, STARTTLS or plain-to-loopback; certificates verified by
default, against `ca_file` alone when it is set), LOGIN or AUTHENTICATE XOAUTH2 (the token is read
from a file or produced by a command on every connection, so a refreshed token is picked up),
create `move_to` when missing, SELECT the folder and read its UIDVALIDITY. Then rounds:

1. `UID SEARCH` for what is not yet handled: `UNSEEN UNDELETED` with `after = "seen"`, otherwise
   `UNDELETED` (everything still in the folder; handled mail has left it).
2. In chunks of `batch` UIDs (their source keys looked up in the spool in one query): a UID
   whose source key `imap:{name}:{folder}:{uidvalidity}:{uid}` is already in the spool is not
   fetched again, only given its after-action (this completes a move that a crash
   interrupted, without a second ticket). The others are fetched with
   `UID FETCH (UID BODY.PEEK[])` (PEEK: fetching never sets \\Seen), stored with `spool.put`, and
   only when every put of the chunk has returned (durable) is the after-action applied to them:
   `UID MOVE` (or COPY + STORE \\Deleted + (UID) EXPUNGE without MOVE), STORE +FLAGS \\Seen, or
   STORE \\Deleted + (UID) EXPUNGE. A crash anywhere in between leaves the mail in the folder,
   and the next round either stores it or (key known) just finishes the action.
3. A `SpoolError` leaves the chunk's unstored mail untouched (no flag, no move); the intake shows
   itself down with the reason and tries again with backoff on the same connection.
4. Then IDLE where the server offers it, re-issued every `idle_timeout` (before the 29-minute
   limit of RFC 2177 servers); `EXISTS`/`RECENT` ends it at once and a new round starts. Without
   IDLE the folder is searched again every `poll_interval` seconds.

UIDVALIDITY: the source keys contain it, so after a change every UID is a new key and mail still
in the folder is stored again. That is on purpose (after a UIDVALIDITY change the old UIDs mean
nothing); the duplicates are caught later by the worker, which de-duplicates by Message-ID and
content. The change is logged (`event=imap_uidvalidity_changed`).

Failures: any connection or protocol error drops the connection and reconnects with exponential
backoff and jitter (capped at `retry_cap`); after `down_after` consecutive failures the status
component is set down with the reason (shown in /healthz) and set ok again once a folder is
selected. Refused credentials (or a token that cannot be obtained) and a certificate that does
not verify are reported at once (`event=imap_login_failed`, `event=imap_tls_failed`) and retried
slowly (from `login_retry` seconds, doubling up to `retry_cap`): no crash loop, no tight loop.

Too large mail (`max_size`, read with RFC822.SIZE before the fetch) is left in the folder for a
human and logged once. The envelope is what the mailbox knows: mail-from is the Return-Path
header ("" when there is none), the recipients are the X-Original-To headers, else the topmost
Delivered-To, else the username. Logger `gateway.intake.imap`, one key=value event per line,
never a password, token or message content (aioimaplib's own logger, which would log bytes on
the wire at DEBUG, is set to WARNING unless the application configured it).

Modules (each imports only those above it)
    config    `ImapConfig`: one `[[imap]]` section, checked at load
    errors    `ImapError` and its kinds (login, TLS); the spool-blocked signal of a chunk
    wire      what is read from and written to the wire: mailbox names in modified UTF-7, UID
              sets, FETCH responses, the envelope from the delivery headers
    session   the protocol hooks aioimaplib lacks, and `_Session`: one connection with one
              folder selected (connect, TLS, login, SELECT, SEARCH, FETCH, after-action, IDLE)
    intake    `ImapIntake`: the per-folder loop (rounds, chunks, puts, backoff, status) and the
              XOAUTH2 token
"""

from __future__ import annotations

from gateway.intake.imap.config import ImapConfig
from gateway.intake.imap.errors import ImapError, ImapLoginError, ImapTlsError
from gateway.intake.imap.intake import BATCH_BYTES, ImapIntake
from gateway.intake.imap.wire import _imap_utf7, envelope_fields, parse_fetch, uid_set

__all__ = [
    "BATCH_BYTES",
    "ImapConfig",
    "ImapError",
    "ImapIntake",
    "ImapLoginError",
    "ImapTlsError",
    "_imap_utf7",
    "envelope_fields",
    "parse_fetch",
    "uid_set",
]
