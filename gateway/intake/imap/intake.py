"""`ImapIntake`: fetches one `[[imap]]` mailbox into the spool, one `_Session` per watched folder;
rounds of search and chunks (puts first, then the after-action), backoff, the status component,
and the XOAUTH2 access token. The whole behaviour is described in `gateway.intake.imap`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import ssl
import time
from pathlib import Path

from gateway import retry
from gateway.errors import SpoolError
from gateway.intake.imap.config import ImapConfig
from gateway.intake.imap.errors import ImapError, ImapLoginError, ImapTlsError, _SpoolBlocked
from gateway.intake.imap.session import _first, _Session
from gateway.intake.imap.wire import envelope_fields, uid_set
from gateway.models import Envelope
from gateway.secrets import SecretError, resolve_secret
from gateway.spool.base import Spool
from gateway.status import Component

log = logging.getLogger("gateway.intake.imap")

# Memory bound of one FETCH round trip, besides the `batch` count (one message may exceed it).
BATCH_BYTES = 32 * 1024 * 1024


# -- the intake ---------------------------------------------------------------------------------


class ImapIntake:
    """Fetches one `[[imap]]` mailbox into the spool. See the package docstring
    (`gateway.intake.imap`).

    `retry_base`, `retry_cap`, `login_retry`, `spool_retry_cap` and `down_after` shape the
    backoff; tests shorten them instead of sleeping.
    """

    def __init__(
        self,
        cfg: ImapConfig,
        spool: Spool,
        status: Component,
        *,
        base_dir: Path,
        retry_base: float = retry.IMAP.base,
        retry_cap: float = retry.IMAP.cap,
        login_retry: float = 60.0,
        spool_retry_cap: float = 60.0,
        down_after: int = 3,
        stop_grace: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.status = status
        # aioimaplib logs every byte at DEBUG (message bodies, the XOAUTH2 string) and each
        # unsolicited EXISTS/EXPUNGE at INFO: keep it to warnings unless configured explicitly.
        lib_log = logging.getLogger("aioimaplib.aioimaplib")
        if lib_log.level == logging.NOTSET:
            lib_log.setLevel(logging.WARNING)
        self.base_dir = Path(base_dir)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.login_retry = login_retry
        self.spool_retry_cap = spool_retry_cap
        self.down_after = down_after
        self.stop_grace = stop_grace
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._problems: dict[str, str] = {}  # folder -> why it is down
        self._uidvalidity: dict[str, int] = {}
        self._too_large: set[str] = set()  # source keys already reported
        # Counters (tests, bench, metrics).
        self.stored = 0
        self.actioned = 0
        self.connects = 0
        self.login_failures = 0
        self.idles = 0  # IDLE commands issued (re-issued every idle_timeout)
        if cfg.security != "plain" and not cfg.verify:
            log.warning(
                "imap_tls_unverified",
                extra={
                    "fields": {"mailbox": cfg.name, "host": cfg.host, "note": "verify_is_false"}
                },
            )

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch every folder (one connection each) until `stop()`."""
        if self._stopping.is_set():
            return
        self._tasks = [
            asyncio.create_task(self._folder_loop(f), name=f"imap:{self.cfg.name}:{f}")
            for f in self.cfg.folders
        ]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Finish the chunk in hand (its puts and after-action), log out, return."""
        self._stopping.set()
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=self.stop_grace)
        for t in still:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- status -----------------------------------------------------------------------------

    def _set_problem(self, folder: str, reason: str | None) -> None:
        if reason is None:
            self._problems.pop(folder, None)
        else:
            self._problems[folder] = reason
        if self._problems:
            self.status.set_down(
                "; ".join(f"{self.cfg.name}/{f}: {r}" for f, r in sorted(self._problems.items()))
            )
        else:
            self.status.set_ok(f"{len(self.cfg.folders)} folder(s) watched")

    def _delay(self, failures: int, base: float) -> float:
        """The one retry policy (gateway.retry) with this poller's bounds."""
        return retry.IMAP.replace(base=base, cap=self.retry_cap).delay(failures)

    # -- per folder -------------------------------------------------------------------------

    async def _folder_loop(self, folder: str) -> None:
        name = self.cfg.name
        failures = 0
        while not self._stopping.is_set():
            session = _Session(self, folder)
            slow = False
            try:
                self.connects += 1
                await session.open()
                self._selected(session)
                failures = 0
                self._set_problem(folder, None)
                await self._serve(session)
            except ImapLoginError as exc:
                failures += 1
                slow = True
                self.login_failures += 1
                log.error(
                    "imap_login_failed",
                    extra={
                        "fields": {
                            "mailbox": name,
                            "folder": folder,
                            "user": self.cfg.username,
                            "reason": str(exc),
                        }
                    },
                )
                self._set_problem(folder, f"login failed: {exc}")
            except ImapTlsError as exc:
                failures += 1
                slow = True
                log.error(
                    "imap_tls_failed",
                    extra={"fields": {"mailbox": name, "folder": folder, "reason": str(exc)}},
                )
                self._set_problem(folder, str(exc))
            except (TimeoutError, ImapError, OSError, ssl.SSLError) as exc:
                failures += 1
                reason = str(exc) or type(exc).__name__
                log.warning(
                    "imap_connection_failed",
                    extra={
                        "fields": {
                            "mailbox": name,
                            "folder": folder,
                            "failures": failures,
                            "reason": reason,
                        }
                    },
                )
                if failures >= self.down_after:
                    self._set_problem(folder, f"{failures} connection failures: {reason}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the intake: log it and reconnect
                failures += 1
                log.exception(
                    "imap_unexpected_error",
                    extra={"fields": {"mailbox": name, "folder": folder, "error": str(exc)}},
                )
                if failures >= self.down_after:
                    self._set_problem(folder, f"unexpected error: {exc}")
            finally:
                await session.close()
            if self._stopping.is_set():
                break
            delay = self._delay(failures, self.login_retry if slow else self.retry_base)
            log.info(
                "imap_reconnect",
                extra={"fields": {"mailbox": name, "folder": folder, "in_seconds": f"{delay:.1f}"}},
            )
            await _first([self._stopping], delay)
        log.info("imap_stopped", extra={"fields": {"mailbox": name, "folder": folder}})

    def _selected(self, s: _Session) -> None:
        old = self._uidvalidity.get(s.folder)
        if old is not None and old != s.uidvalidity:
            log.warning(
                "imap_uidvalidity_changed",
                extra={
                    "fields": {
                        "mailbox": self.cfg.name,
                        "folder": s.folder,
                        "old": old,
                        "new": s.uidvalidity,
                        "note": "mail_still_in_folder_is_stored_again_and_deduplicated_by_the_worker",
                    }
                },
            )
            prefix = f"imap:{self.cfg.name}:{s.folder}:"
            self._too_large = {k for k in self._too_large if not k.startswith(prefix)}
        self._uidvalidity[s.folder] = s.uidvalidity
        log.info(
            "imap_connected",
            extra={
                "fields": {
                    "mailbox": self.cfg.name,
                    "folder": s.folder,
                    "uidvalidity": s.uidvalidity,
                    "idle": s.can_idle,
                }
            },
        )

    async def _serve(self, s: _Session) -> None:
        spool_failures = 0
        while not self._stopping.is_set():
            s.news.clear()
            try:
                handled = await self._round(s)
            except _SpoolBlocked as exc:
                spool_failures += 1
                delay = min(self.spool_retry_cap, self._delay(spool_failures, self.retry_base))
                log.error(
                    "imap_spool_failed",
                    extra={
                        "fields": {
                            "mailbox": self.cfg.name,
                            "folder": s.folder,
                            "failures": spool_failures,
                            "reason": str(exc),
                            "retry_in_seconds": f"{delay:.1f}",
                            "note": "mail_left_untouched",
                        }
                    },
                )
                self._set_problem(s.folder, f"spool unavailable: {exc}")
                await _first([self._stopping, s.lost], delay)
                if s.lost.is_set():
                    raise ImapError("connection lost") from None
                continue
            if spool_failures:
                spool_failures = 0
                self._set_problem(s.folder, None)
            if self._stopping.is_set():
                return
            if handled or s.news.is_set():
                continue  # something may have arrived while we worked: look again first
            if s.can_idle:
                await s.idle(self._stopping)
            else:
                await _first([self._stopping, s.lost], self.cfg.poll_interval)
                if s.lost.is_set():
                    raise ImapError("connection lost")

    def _key(self, folder: str, uidvalidity: int, uid: int) -> str:
        return f"imap:{self.cfg.name}:{folder}:{uidvalidity}:{uid}"

    async def _round(self, s: _Session) -> int:
        """One search and its chunks; returns how many mails were stored or finished."""
        uids = await s.search()
        handled = 0
        for start in range(0, len(uids), self.cfg.batch):
            if self._stopping.is_set():
                break
            handled += await self._chunk(s, uids[start : start + self.cfg.batch])
        return handled

    async def _chunk(self, s: _Session, chunk: list[int]) -> int:
        keys = {uid: self._key(s.folder, s.uidvalidity, uid) for uid in chunk}
        wanted = [uid for uid in chunk if keys[uid] not in self._too_large]
        try:
            stored_keys = await self.spool.known_source_keys([keys[uid] for uid in wanted])
        except SpoolError as exc:
            raise _SpoolBlocked(exc) from exc
        known = [uid for uid in wanted if keys[uid] in stored_keys]
        fresh = [uid for uid in wanted if keys[uid] not in stored_keys]
        stored: list[int] = []
        blocked: SpoolError | None = None
        if fresh:
            sizes = await s.sizes(fresh)
            plan: list[list[int]] = [[]]
            plan_bytes = 0
            for uid in fresh:
                size = sizes.get(uid)
                if size is None:
                    continue  # expunged meanwhile by someone else
                if size > self.cfg.max_size:
                    self._too_large.add(keys[uid])
                    log.warning(
                        "imap_message_too_large",
                        extra={
                            "fields": {
                                "mailbox": self.cfg.name,
                                "folder": s.folder,
                                "uid": uid,
                                "size": size,
                                "max_size": self.cfg.max_size,
                                "note": "left_in_folder",
                            }
                        },
                    )
                    continue
                if plan[-1] and plan_bytes + size > BATCH_BYTES:
                    plan.append([])
                    plan_bytes = 0
                plan[-1].append(uid)
                plan_bytes += size
            for part in plan:
                if not part:
                    continue
                bodies = await s.bodies(part)
                order = [uid for uid in part if uid in bodies]
                results = await asyncio.gather(
                    *(self._store(s.folder, keys[uid], bodies[uid]) for uid in order),
                    return_exceptions=True,
                )
                for uid, res in zip(order, results, strict=True):
                    if isinstance(res, SpoolError):
                        blocked = res
                    elif isinstance(res, BaseException):
                        raise res
                    else:
                        stored.append(uid)
                if blocked is not None:
                    break
        done = sorted(known + stored)
        if done:
            # Only now, with every put above returned (durable), is the mail moved/flagged.
            await s.after(done)
            self.actioned += len(done)
            log.info(
                "imap_batch",
                extra={
                    "fields": {
                        "mailbox": self.cfg.name,
                        "folder": s.folder,
                        "stored": len(stored),
                        "finished": len(known),
                        "uids": uid_set(done),
                    }
                },
            )
        if blocked is not None:
            raise _SpoolBlocked(blocked)
        return len(done)

    async def _store(self, folder: str, key: str, raw: bytes) -> int:
        mail_from, rcpt_tos = envelope_fields(raw, self.cfg.username)
        envelope = Envelope(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            peer="",
            intake=self.cfg.name,
            received_at=time.time(),
        )
        result = await self.spool.put(raw, envelope, source_key=key)
        if not result.duplicate:
            self.stored += 1
        log.debug(
            "imap_stored",
            extra={
                "fields": {
                    "mailbox": self.cfg.name,
                    "folder": folder,
                    "key": key,
                    "id": result.id,
                    "size": len(raw),
                    "duplicate": result.duplicate,
                }
            },
        )
        return result.id

    # -- XOAUTH2 ----------------------------------------------------------------------------

    async def _oauth2_token(self) -> str:
        """The access token, fresh for this connection (file re-read, or command re-run)."""
        cfg = self.cfg
        if cfg.oauth2_token_file:
            try:
                secret = resolve_secret(
                    None,
                    cfg.oauth2_token_file,
                    None,
                    what=f"imap {cfg.name} oauth2 token",
                    base_dir=self.base_dir,
                )
            except SecretError as exc:
                raise ImapLoginError(str(exc)) from exc
            token = secret.get_secret_value().strip() if secret else ""
            if not token:
                raise ImapLoginError(f"oauth2_token_file {cfg.oauth2_token_file} is empty")
            return token
        command = cfg.oauth2_token_command
        assert command is not None
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ImapLoginError("oauth2_token_command is empty")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.base_dir,
            )
        except OSError as exc:
            raise ImapLoginError(f"oauth2_token_command {argv[0]}: {exc.strerror}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), cfg.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ImapLoginError(
                f"oauth2_token_command {argv[0]} gave no token within {cfg.timeout:g}s"
            ) from None
        if proc.returncode != 0:
            last = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
            raise ImapLoginError(
                f"oauth2_token_command {argv[0]} exited with {proc.returncode}: {last}"
            )
        token = out.decode("utf-8", "replace").strip()
        if not token:
            raise ImapLoginError(f"oauth2_token_command {argv[0]} printed no token")
        return token
