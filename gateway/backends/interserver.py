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

What the server's own code shows (`detain/myadmin-kayako-support` `src/api.php`, see
shared/contracts/interserver.md "Corrections"), and how the backend meets it:
- `api_openTicket` succeeds with `status "success"` (other calls say "ok"/"Success"); success is
  also any non-empty `ticket_reference_id` that is not a number <= 0. The reference is Kayako's
  display id, a mask such as `KVO-530-34143` (the WSDL says int): it is kept as a string
  everywhere (ack token, spool maps, follow-up calls).
- A non-empty `product` makes the server rewrite the ticket: body `"<product>\n\n<body>"`, and
  a subject shorter than 30 characters becomes `"<product> : <subject>"`; `find_existing`
  allows for both.
- Kayako's own failures are lowercase `status "failed"` with "... Please try again!": temporary.
  One of them ("updating root/admin pass") comes after the ticket was created, as does an "ok"
  without a usable reference: then the ticket is looked up instead of being made again, and
  until it is found the mail is retried (the spool records that it exists, so no retry ever
  creates a second one).
- `box_auth_value` is encrypted into the Kayako custom field "Root Password (VPS / Dedicated
  Server)": it comes only from config (`box_auth_value` / `_file` / `_env`), never from a rule
  or the mail; empty by default.
- `user_ip` must not be empty (see below: it never is).

Error mapping (one boundary, `_call`, and `_failure` for the `status` of a `return` struct):
- login returns an empty session id, or a fresh session is refused at once → `BackendUnavailable`
- an HTTP status other than 200 without a SOAP Fault, timeouts, connection errors, an answer
  too large → the one mapping shared by all backends (`gateway.backends.http`)
- a lost session (SOAP Fault or `status_text` naming the session) → log in again once, retry
- lowercase `status "failed"` whose text says "try again" → `TransientError(status_text)`
- any other `status` "Failed"/"error" in a `return` struct → `PermanentError(status_text)`
- SOAP Fault with a Client faultcode → `PermanentError`
- Server faults, unreadable replies (a 200 that is not XML) → `TransientError`
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import zeep
from lxml import etree
from zeep.exceptions import Error as ZeepError
from zeep.exceptions import Fault, TransportError
from zeep.helpers import serialize_object
from zeep.proxy import AsyncServiceProxy

from gateway.backends.base import Progress
from gateway.backends.config import InterServerConfig
from gateway.backends.http import (
    ResponseBudget,
    make_client,
    status_error,
    tls_context,
    transport_error,
)
from gateway.backends.soap import AnswerTransport
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
_TRY_AGAIN = re.compile(r"try\s+again", re.IGNORECASE)
# Kayako failures the server reports after the ticket was made (api.php, openTicket)
_AFTER_CREATE = re.compile(r"root/admin\s+pass", re.IGNORECASE)
SHORT_SUBJECT = 30  # the server prefixes the product to subjects shorter than this
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


class _SessionLost(Exception):
    """The server refused the session id; log in again."""


class _HttpStatus(Exception):
    """An HTTP answer other than 200 that carries no SOAP Fault."""

    def __init__(self, status: int, headers: httpx.Headers) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.headers = status, headers


class _QuietTransport(AnswerTransport):
    """zeep's AsyncTransport without its debug log of every request and reply (those bodies hold
    the password, session ids and mail text), and with HTTP errors that carry no SOAP Fault
    raised as `_HttpStatus` (and a 200 that is not XML as `TransportError`): in non-strict mode
    zeep's parser would otherwise read a text or HTML error page as an empty document and fail
    obscurely."""

    async def post(self, address: str, message: bytes | str, headers: dict[str, str]) -> Any:
        response = await self.client.post(address, content=message, headers=headers)
        content = response.content.lstrip(b"\xef\xbb\xbf \t\r\n")
        if response.status_code != 200 and b"Fault" not in content:
            raise _HttpStatus(response.status_code, response.headers)
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


def _temporary(result: Any) -> bool:
    """Kayako's own failure: lowercase "failed" with "Please try again!" (api.php)."""
    data = _as_dict(result)
    status = str(data.get("status") or "").strip()
    return status == "failed" and bool(_TRY_AGAIN.search(str(data.get("status_text") or "")))


def _raise_failure(what: str, result: Any) -> None:
    """Raise the error a failed `return` struct stands for; return when it is no failure."""
    failure = _business_failure(result)
    if failure is None:
        return
    if _temporary(result):
        raise TransientError(f"{what}: {failure}")
    raise PermanentError(f"{what}: {failure}")


def usable_reference(value: Any) -> str | None:
    """A ticket reference from an answer as a string: a mask or a positive number, else None.

    The WSDL declares int but the server sends Kayako's mask; a PHP SoapServer may turn the
    mask into 0, and failures carry -1.
    """
    text = "" if value is None else str(value).strip()
    if not text or (re.fullmatch(r"[-+]?\d+", text) and int(text) <= 0):
        return None
    return text


def rewritten(product: str, subject: str, body: str) -> tuple[str, str]:
    """Subject and body as the server stores them when `product` is not empty."""
    if not product:
        return subject, body
    body = f"{product}\n\n{body}"
    if len(subject) < SHORT_SUBJECT:
        subject = f"{product} : {subject}"
    return subject, body


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
    searchable = True  # find_existing searches the system

    def __init__(
        self,
        name: str,
        cfg: InterServerConfig,
        *,
        base_dir: Path,
        budget: ResponseBudget | None = None,
    ) -> None:
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
        self._box_auth_value = resolve_secret(
            cfg.box_auth_value,
            cfg.box_auth_value_file,
            cfg.box_auth_value_env,
            what=f"backends.{name}.box_auth_value",
            base_dir=base_dir,
            required=False,
        )
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._login_lock = asyncio.Lock()
        self._sid: str | None = None
        self._http = make_client(
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            max_response_bytes=cfg.max_response_bytes,
            budget=budget,
        )
        # only for imports (ours has none); the process's TLS context, not a CA bundle of its own
        wsdl_http = httpx.Client(timeout=cfg.timeout, verify=tls_context())
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
        except _HttpStatus as exc:
            outcome = f"http_{exc.status}"
            raise status_error(f"InterServer {op}", exc.status, exc.headers) from None
        except TransportError as exc:
            outcome = f"http_{exc.status_code}"
            raise TransientError(
                f"InterServer {op}: HTTP {exc.status_code}: unreadable reply (not SOAP)"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            outcome = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
            raise transport_error(f"InterServer {op}", exc) from None
        except (ZeepError, etree.LxmlError) as exc:
            outcome = "unreadable"
            raise TransientError(
                f"InterServer {op}: unreadable reply ({type(exc).__name__})"
            ) from None
        finally:
            log.debug(
                "call",
                extra={
                    "fields": {
                        "backend": self.name,
                        "op": op,
                        "outcome": outcome,
                        "ms": f"{(time.monotonic() - started) * 1000:.0f}",
                    }
                },
            )

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
            log.warning("login_refused", extra={"fields": {"backend": self.name}})
            raise BackendUnavailable(
                "InterServer login refused (blank session id): check username and password/API key"
            )
        log.info("login", extra={"fields": {"backend": self.name}})
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
            log.info(
                "session_lost",
                extra={"fields": {"backend": self.name, "op": op, "attempt": attempt}},
            )
        raise BackendUnavailable(f"InterServer {op}: a fresh session was refused at once")

    # ------------------------------------------------------------ Backend

    def _text(self, mail: ParsedMail, *, automatic: bool) -> str:
        # The API takes no attachments: every real attachment is named in the text instead.
        skipped = [
            f"{a.filename or 'attachment'} (InterServer's API takes no attachments)"
            for a in mail.attachments
        ]
        return _xml_safe(
            ticket_text(
                mail,
                header_fields=self.cfg.header_fields,
                max_chars=self.cfg.max_body_chars,
                not_forwarded=skipped,
                automatic=automatic,
            )
        )

    def _product(self, decision: Decision) -> str:
        product = decision.ticket.get("product", self.cfg.default_product)
        return _xml_safe("" if product is None else str(product))

    def _open_params(self, decision: Decision, mail: ParsedMail) -> dict[str, str]:
        # box_auth_value: config only (a rule may not set it: gateway check refuses it).
        box = self._box_auth_value.get_secret_value() if self._box_auth_value else ""
        return {
            "user_email": self.cfg.user_email,
            "user_ip": originating_ip(mail) or DEFAULT_IP,
            "subject": _subject(mail),
            "product": self._product(decision),
            "body": self._text(mail, automatic=decision.automatic),
            "box_auth_value": _xml_safe(box),
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
        if isinstance(done, dict) and done.get("created"):
            # made by an earlier attempt that got no usable reference: look, never create again
            return self._ref(await self._look_for_made(decision, mail, progress))
        params = self._open_params(decision, mail)
        await progress.begin(STEP_OPEN)
        result = await self._with_session("api_openTicket", **params)
        ticket_id = await self._created_id(result, decision, mail, progress)
        await progress.done(STEP_OPEN, id=ticket_id)
        log.info("ticket_opened", extra={"fields": {"backend": self.name, "id": ticket_id}})
        return self._ref(ticket_id)

    async def _created_id(
        self, result: Any, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> str:
        """The ticket_reference_id (a string) of the ticket an api_openTicket call made."""
        data = _as_dict(result)
        status, text = _status(result)
        ticket_id = usable_reference(data.get("ticket_reference_id"))
        after_create = _temporary(result) and bool(_AFTER_CREATE.search(text))
        if status in _FAILED and not after_create:
            log.info("open_failed", extra={"fields": {"backend": self.name, "status": status}})
            _raise_failure("InterServer api_openTicket", result)
        if ticket_id is not None and not after_create:
            return ticket_id
        if not (after_create or status in _OK):
            log.info(
                "open_failed", extra={"fields": {"backend": self.name, "status": status or "-"}}
            )
            raise PermanentError(f"InterServer api_openTicket: {text or f'status {status!r}'}")
        # The ticket exists (a failure after creating it, or "success" without a usable
        # reference): record that, so that no retry makes a second one, and look it up.
        log.info(
            "created_without_reference", extra={"fields": {"backend": self.name, "status": status}}
        )
        await progress.done(STEP_OPEN, created=True)
        return await self._look_for_made(decision, mail, progress)

    async def _look_for_made(self, decision: Decision, mail: ParsedMail, progress: Progress) -> str:
        found = await self.find_existing(decision, mail)
        if found is not None:
            return found.id
        raise TransientError(
            "InterServer api_openTicket made a ticket without returning its reference and it is "
            "not in the ticket list yet; looking again later (it is never created twice)"
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
        _raise_failure(f"InterServer api_ticketPost on ticket {ref.id}", result)
        await progress.done(STEP_POST)
        log.info("message_added", extra={"fields": {"backend": self.name, "id": ref.id}})

    async def _view(self, ticket_id: str) -> dict[str, Any]:
        result = await self._with_session("api_viewTicket", ticketID=ticket_id)
        _raise_failure(f"InterServer api_viewTicket on ticket {ticket_id}", result)
        return _as_dict(_as_dict(result).get("result"))

    async def ticket_status(self, ref: TicketRef) -> str | None:
        detail = await self._view(ref.id)
        title = str(detail.get("statustitle") or "").strip().lower()
        if not title:
            return None
        return "closed" if "closed" in title or "resolved" in title else "open"

    async def possible_first(self, ref: TicketRef, mail: ParsedMail) -> str | None:
        """See `Backend`. Searchable: `find_existing` answers instead."""
        return None

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None:
        """See `Backend`. The list is searched for our subject, as sent or as the server
        rewrites it for a product; a candidate is ours when one of its posts starts with our
        text (with or without the product line the server puts in front)."""
        product = self._product(decision)
        subject = _subject(mail)
        text = self._text(mail, automatic=decision.automatic)
        subjects = {subject, rewritten(product, subject, "")[0]}
        expected = {_norm(text)[:500], _norm(rewritten(product, subject, text)[1])[:500]}
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
                if " ".join(str(t.get("subject") or "").split()) not in subjects:
                    continue
                stamp = _float(t.get("lastactivity"))
                if stamp is not None and stamp > 1e9 and now - stamp > FIND_WINDOW:
                    continue
                ticket_id = usable_reference(t.get("ticket_reference_id"))
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
            contents = [_norm(str(p.get("contents") or "")) for p in posts]
            if not posts or any(c.startswith(e) for c in contents for e in expected):
                log.info(
                    "found_existing", extra={"fields": {"backend": self.name, "id": ticket_id}}
                )
                return self._ref(ticket_id)
        return None

    async def aclose(self) -> None:
        await self._http.aclose()
