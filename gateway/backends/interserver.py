"""InterServer backend: tickets through the "MyAdmin" SOAP API (shared/contracts/interserver.md).

Owns `InterServerConfig` (`[backends.NAME]` with `type = "interserver"`) and
`InterServerBackend`, which speaks to `api.php` with zeep over httpx (AsyncTransport). The WSDL is
the packaged synthetic one (`wsdl/interserver.wsdl`, rpc/literal), loaded once per backend; its
service is bound to `url` from config.

Calls: new ticket = `api_login` (session id cached) → `api_openTicket(sid, user_email, user_ip,
subject, product, body, box_auth_value)`; follow-up = `api_ticketPost(sid, ticketID, content)`;
status = `api_viewTicket` (`statustitle`); crash recovery = `api_getTicketList` + `api_viewTicket`.
Tickets belong to the API account: `user_email` must be that account's e-mail, and the real sender
heads the body (`gateway.backends.text.ticket_text`).

`user_ip` is the sender's client IP, taken from the first of: the mail's `X-Originating-IP`; the
earliest `Received: from ... [IP]` hop with a public-looking address (the hop nearest to the
sender); the SMTP peer in the `X-Gateway-Peer` header, which the worker adds to the parsed mail
(replacing any copy the sender wrote) because the envelope is not part of the `Backend` call;
else `127.0.0.1`.

Error mapping (one boundary, `_call`):
- login returns an empty session id, or a fresh session is refused at once → `BackendUnavailable`
- HTTP 401/403/404/405/410 → `BackendUnavailable` (credentials or URL wrong)
- a lost session (SOAP Fault or `status_text` naming the session) → log in again once, retry
- `status` "Failed"/"error" in a `return` struct → `PermanentError(status_text)`
- SOAP Fault with a Client faultcode, HTTP 400/413 and other 4xx → `PermanentError`
- connection errors, timeouts, HTTP 408/429/5xx, Server faults, unreadable replies →
  `TransientError`
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import zeep
from lxml import etree
from pydantic import SecretStr, model_validator
from zeep.exceptions import Error as ZeepError
from zeep.exceptions import Fault, TransportError
from zeep.helpers import serialize_object
from zeep.proxy import AsyncServiceProxy
from zeep.transports import AsyncTransport

from gateway.backends.base import Progress
from gateway.backends.config import BackendConfigBase
from gateway.backends.http import make_client
from gateway.backends.text import reply_view, ticket_text
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.models import Decision, ParsedMail, TicketRef
from gateway.secrets import resolve_secret

log = logging.getLogger("gateway.backend.interserver")

SYSTEM = "interserver"
WSDL_FILE = Path(__file__).parent / "wsdl" / "interserver.wsdl"
BINDING = "{urn:myapi}myapiBinding"
PEER_HEADER = "X-Gateway-Peer"
DEFAULT_IP = "127.0.0.1"
STEP_OPEN = "openTicket"
STEP_POST = "ticketPost"

FIND_WINDOW = 3 * 24 * 3600.0  # a ticket older than this is not the one a crash interrupted
FIND_PAGES = 3  # list pages (newest first) searched by find_existing
FIND_LIMIT = 50  # tickets per list page
FIND_VIEWS = 5  # candidates whose text find_existing compares at most

_OK = frozenset({"ok", "success"})
_FAILED = frozenset({"failed", "fail", "error"})
_SESSION_RE = re.compile(r"session|\bsid\b", re.IGNORECASE)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_RECEIVED_FROM = re.compile(r"^\s*from\s+(?P<clause>.*?)(?:\bby\b|;|$)", re.IGNORECASE | re.DOTALL)
_BRACKETED = re.compile(r"\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+)\]")
_NON_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


class InterServerConfig(BackendConfigBase):
    """`[backends.NAME]` for `type = "interserver"`."""

    type: Literal["interserver"]
    username: str  # the account's e-mail address (api_login username)
    password: SecretStr | None = None  # the account password or its API key; or:
    password_file: str | None = None
    password_env: str | None = None
    account_email: str | None = None  # user_email of new tickets; default: username
    default_product: str = ""  # product when no rule sets `product`

    @model_validator(mode="after")
    def _password_source(self) -> InterServerConfig:
        if self.password is None and not self.password_file and not self.password_env:
            raise ValueError("set password, password_file or password_env")
        if not self.username.strip():
            raise ValueError("username (the account e-mail) must not be empty")
        return self

    @property
    def user_email(self) -> str:
        return (self.account_email or self.username).strip()


class _SessionLost(Exception):
    """The server refused the session id; log in again."""


class _QuietTransport(AsyncTransport):
    """zeep's AsyncTransport without its debug log of every request and reply (those bodies hold
    the password, session ids and mail text), and with HTTP errors that carry no SOAP Fault
    turned into `TransportError(status_code)`: in non-strict mode zeep's parser would otherwise
    read a text or HTML error page as an empty document and fail obscurely."""

    async def post(self, address: str, message: bytes | str, headers: dict[str, str]) -> Any:
        response = await self.client.post(address, content=message, headers=headers)
        content = response.content.lstrip(b"\xef\xbb\xbf \t\r\n")
        if response.status_code != 200 and b"Fault" not in content:
            raise TransportError(status_code=response.status_code)
        html = "html" in response.headers.get("content-type", "").lower()
        if html or not content.startswith(b"<"):
            raise TransportError(status_code=response.status_code)
        return response


# ---------------------------------------------------------------- helpers (pure)


def _public(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_multicast:
        return False
    return not any(addr.version == net.version and addr in net for net in _NON_PUBLIC)


def _valid_ip(value: str) -> str | None:
    value = value.strip().strip("[]").strip()
    if value.lower().startswith("ipv6:"):
        value = value[5:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def originating_ip(mail: ParsedMail) -> str:
    """The sender's client IP for `user_ip` (see the module docstring for the order)."""
    xoip = _valid_ip(mail.header("X-Originating-IP") or "")
    if xoip and _public(xoip):
        return xoip
    # Headers are in order, newest hop first: walk from the oldest hop towards us.
    for received in reversed(mail.header_all("Received")):
        m = _RECEIVED_FROM.match(received)
        if not m:
            continue
        for found in _BRACKETED.finditer(m.group("clause")):
            ip = _valid_ip(found.group("ip"))
            if ip and _public(ip):
                return ip
    peer = _valid_ip(mail.header(PEER_HEADER) or "")
    return peer or DEFAULT_IP


def _xml_safe(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (NUL, most C0 controls)."""
    return _NOT_XML.sub("", text)


def _subject(mail: ParsedMail) -> str:
    return " ".join(_xml_safe(mail.subject).split()) or "(no subject)"


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[dict[str, Any]]:
    """Array members: `<x><item/>...</x>` (a dict with "item"), a list, or one struct."""
    if isinstance(value, dict) and "item" in value:
        value = value["item"]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _status(result: Any) -> tuple[str, str]:
    data = _as_dict(result)
    return (
        str(data.get("status") or "").strip().lower(),
        str(data.get("status_text") or "").strip(),
    )


def _session_failure(result: Any) -> bool:
    status, text = _status(result)
    return status in _FAILED and bool(_SESSION_RE.search(text))


def _business_failure(result: Any) -> str | None:
    """status_text of a "Failed" reply (or a placeholder), None when the reply is not a failure."""
    status, text = _status(result)
    if status in _FAILED:
        return text or f"status {status!r} without status_text"
    return None


def _float(value: Any) -> float | None:
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


def _total_pages(value: Any) -> int:
    """`totalPages` is sent unrounded ("4.1" means 5 pages)."""
    pages = _float(value)
    return 0 if pages is None else max(math.ceil(pages), 0)


def _norm(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- the backend


class InterServerBackend:
    """InterServer MyAdmin SOAP API. See `Backend`."""

    system = SYSTEM

    def __init__(self, name: str, cfg: InterServerConfig, *, base_dir: Path) -> None:
        self.name = name
        self.cfg = cfg
        secret = resolve_secret(
            cfg.password,
            cfg.password_file,
            cfg.password_env,
            what=f"backends.{name}.password",
            base_dir=base_dir,
        )
        assert secret is not None  # required=True: resolve_secret raised otherwise
        self._password = secret
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._login_lock = asyncio.Lock()
        self._sid: str | None = None
        self._http = make_client(timeout=cfg.timeout, concurrency=cfg.concurrency)
        wsdl_http = httpx.Client(timeout=cfg.timeout)  # only for imports; ours has none
        try:
            transport = _QuietTransport(client=self._http, wsdl_client=wsdl_http)
            settings = zeep.Settings(strict=False, xml_huge_tree=True)
            client = zeep.AsyncClient(str(WSDL_FILE), transport=transport, settings=settings)
        finally:
            wsdl_http.close()
        self._client = client
        self._service = AsyncServiceProxy(client, client.wsdl.bindings[BINDING], address=cfg.url)

    # ------------------------------------------------------------ transport boundary

    async def _call(self, op: str, **params: Any) -> Any:
        """One SOAP call; maps every failure into the error tree (or `_SessionLost`)."""
        started = time.monotonic()
        outcome = "ok"
        try:
            async with self._sem:
                result = await self._service[op](**params)
            return serialize_object(result, target_cls=dict)
        except Fault as exc:
            code = str(exc.code or "")
            text = " ".join(str(exc.message or "").split())[:300]
            outcome = "fault"
            if _SESSION_RE.search(text):
                outcome = "session_lost"
                raise _SessionLost(text) from None
            if "client" in code.lower():
                raise PermanentError(
                    f"InterServer {op} refused: SOAP fault {code}: {text}"
                ) from None
            raise TransientError(f"InterServer {op}: SOAP fault {code or '?'}: {text}") from None
        except TransportError as exc:
            outcome = f"http_{exc.status_code}"
            raise self._http_error(op, int(exc.status_code or 0)) from None
        except httpx.TimeoutException:
            outcome = "timeout"
            raise TransientError(
                f"InterServer {op}: no answer within {self.cfg.timeout:g}s"
            ) from None
        except httpx.HTTPError as exc:
            outcome = "connection"
            raise TransientError(
                f"InterServer {op}: {type(exc).__name__} talking to {httpx.URL(self.cfg.url).host}"
            ) from None
        except (ZeepError, etree.LxmlError) as exc:
            outcome = "unreadable"
            raise TransientError(
                f"InterServer {op}: unreadable reply ({type(exc).__name__})"
            ) from None
        finally:
            log.debug(
                "event=call backend=%s op=%s outcome=%s ms=%.0f",
                self.name,
                op,
                outcome,
                (time.monotonic() - started) * 1000,
            )

    def _http_error(
        self, op: str, status: int
    ) -> TransientError | PermanentError | BackendUnavailable:
        where = f"InterServer {op}: HTTP {status}"
        if status in (401, 403):
            return BackendUnavailable(f"{where}: access refused (credentials or IP)")
        if status in (404, 405, 410):
            return BackendUnavailable(f"{where}: no API at the configured url (check url)")
        if status in (0, 200, 408, 429) or status >= 500:
            return TransientError(f"{where}: temporary failure or unreadable reply")
        return PermanentError(f"{where}: request refused")

    # ------------------------------------------------------------ sessions

    async def _login(self) -> str:
        try:
            result = await self._call(
                "api_login",
                username=self.cfg.username,
                password=self._password.get_secret_value(),
            )
        except (_SessionLost, PermanentError) as exc:
            raise BackendUnavailable(f"InterServer login failed: {exc}") from None
        sid = result.strip() if isinstance(result, str) else ""
        if not sid:
            log.warning("event=login_refused backend=%s", self.name)
            raise BackendUnavailable(
                "InterServer login refused (blank session id): check username and password/API key"
            )
        log.info("event=login backend=%s", self.name)
        return sid

    async def _session(self) -> str:
        async with self._login_lock:
            if self._sid is None:
                self._sid = await self._login()
            return self._sid

    async def _with_session(self, op: str, **params: Any) -> Any:
        """Call `op` with the cached session; on a lost session log in again once and retry."""
        for attempt in (1, 2):
            sid = await self._session()
            try:
                result = await self._call(op, sid=sid, **params)
            except _SessionLost:
                pass
            else:
                if not _session_failure(result):
                    return result
            async with self._login_lock:
                if self._sid == sid:  # another task may have renewed it already
                    self._sid = None
            log.info("event=session_lost backend=%s op=%s attempt=%d", self.name, op, attempt)
        raise BackendUnavailable(f"InterServer {op}: a fresh session was refused at once")

    # ------------------------------------------------------------ Backend

    def _text(self, mail: ParsedMail, *, automatic: bool) -> str:
        # The API takes no attachments: every real attachment is named in the text instead.
        skipped = [a.filename or "attachment" for a in mail.attachments if not a.inline]
        return _xml_safe(
            ticket_text(
                mail,
                header_fields=self.cfg.header_fields,
                max_chars=self.cfg.max_body_chars,
                not_forwarded=skipped,
                automatic=automatic,
            )
        )

    def _open_params(self, decision: Decision, mail: ParsedMail) -> dict[str, str]:
        product = decision.ticket.get("product", self.cfg.default_product)
        box = decision.ticket.get("box_auth_value", "")
        return {
            "user_email": self.cfg.user_email,
            "user_ip": originating_ip(mail),
            "subject": _subject(mail),
            "product": _xml_safe("" if product is None else str(product)),
            "body": self._text(mail, automatic=decision.automatic),
            "box_auth_value": _xml_safe("" if box is None else str(box)),
        }

    def _ref(self, ticket_id: str) -> TicketRef:
        return TicketRef(backend=self.name, system=SYSTEM, id=ticket_id, ref=ticket_id)

    async def open_ticket(
        self, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> TicketRef:
        mail = reply_view(mail, self.cfg.quoted, followup=False)
        done = progress.data.get(STEP_OPEN)
        if isinstance(done, dict) and done.get("id"):
            return self._ref(str(done["id"]))  # made before a restart
        params = self._open_params(decision, mail)
        await progress.begin(STEP_OPEN)
        result = await self._with_session("api_openTicket", **params)
        ticket_id = await self._created_id(result, decision, mail)
        await progress.done(STEP_OPEN, id=ticket_id)
        log.info("event=ticket_opened backend=%s id=%s", self.name, ticket_id)
        return self._ref(ticket_id)

    async def _created_id(self, result: Any, decision: Decision, mail: ParsedMail) -> str:
        """The ticket_reference_id (as a string) of a successful api_openTicket reply."""
        data = _as_dict(result)
        status, text = _status(result)
        raw = data.get("ticket_reference_id")
        ticket_id = "" if raw is None else str(raw).strip()
        number = int(ticket_id) if re.fullmatch(r"-?\d+", ticket_id) else None
        if not ((number is not None and number > 0) or status in _OK):
            log.info("event=open_failed backend=%s status=%s", self.name, status or "-")
            raise PermanentError(f"InterServer api_openTicket: {text or f'status {status!r}'}")
        if ticket_id and (number is None or number > 0):
            return ticket_id
        # "ok" without a usable id: the ticket exists; find it rather than make another.
        found = await self.find_existing(decision, mail)
        if found is not None:
            return found.id
        raise PermanentError(
            "InterServer api_openTicket answered ok without a ticket_reference_id "
            "and the ticket was not found in the list; check the helpdesk before retrying"
        )

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None:
        mail = reply_view(mail, self.cfg.quoted, followup=True)
        if STEP_POST in progress.data:
            return  # posted before a restart
        content = self._text(mail, automatic=automatic)
        await progress.begin(STEP_POST)
        result = await self._with_session("api_ticketPost", ticketID=ref.id, content=content)
        failure = _business_failure(result)
        if failure is not None:
            raise PermanentError(f"InterServer api_ticketPost on ticket {ref.id}: {failure}")
        await progress.done(STEP_POST)
        log.info("event=message_added backend=%s id=%s", self.name, ref.id)

    async def _view(self, ticket_id: str) -> dict[str, Any]:
        result = await self._with_session("api_viewTicket", ticketID=ticket_id)
        failure = _business_failure(result)
        if failure is not None:
            raise PermanentError(f"InterServer api_viewTicket on ticket {ticket_id}: {failure}")
        return _as_dict(_as_dict(result).get("result"))

    async def ticket_status(self, ref: TicketRef) -> str | None:
        detail = await self._view(ref.id)
        title = str(detail.get("statustitle") or "").strip().lower()
        if not title:
            return None
        return "closed" if "closed" in title or "resolved" in title else "open"

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None:
        subject = _subject(mail)
        expected = _norm(self._text(mail, automatic=decision.automatic))[:500]
        now = time.time()
        candidates: list[str] = []
        for page in range(1, FIND_PAGES + 1):
            result = await self._with_session(
                "api_getTicketList", page=page, limit=FIND_LIMIT, status=""
            )
            failure = _business_failure(result)
            if failure is not None:
                # Unable to look: retry later rather than risk a second ticket.
                raise TransientError(f"InterServer api_getTicketList: {failure}")
            tickets = _items(_as_dict(result).get("tickets"))
            for t in tickets:
                if " ".join(str(t.get("subject") or "").split()) != subject:
                    continue
                stamp = _float(t.get("lastactivity"))
                if stamp is not None and stamp > 1e9 and now - stamp > FIND_WINDOW:
                    continue
                ticket_id = str(t.get("ticket_reference_id") or "").strip()
                if ticket_id:
                    candidates.append(ticket_id)
            if not tickets or page >= _total_pages(_as_dict(result).get("totalPages")):
                break
        for ticket_id in candidates[:FIND_VIEWS]:
            try:
                detail = await self._view(ticket_id)
            except PermanentError:
                continue
            posts = _items(detail.get("posts"))
            if not posts or any(
                _norm(str(p.get("contents") or "")).startswith(expected) for p in posts
            ):
                log.info("event=found_existing backend=%s id=%s", self.name, ticket_id)
                return self._ref(ticket_id)
        return None

    async def aclose(self) -> None:
        await self._http.aclose()
