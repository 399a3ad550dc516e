"""Backend for the SuperOffice Service customer SOAP port (`type = "superoffice-soap"`).

Owns `SuperOfficeSoapConfig` (the `[backends.NAME]` keys of this type) and `SuperOfficeSoapBackend`.
The port's contract is in shared/contracts/superoffice-soap.md; in short: `login` → `newTicket`
(no body) → `addMessage` (the text, with the real sender in its header block) with attachments
uploaded first by `addAttachment`. The logged-in customer account is the author of everything.

Every call answers an error-code string first ("0" = ok); the text of a failure comes from
`getErrorMessage(sessionKey)`. How failures map onto the error tree (`map_code`, `map_exception`):

    code 1, 2, 3, 4, 15, 19 (login, rights, licence)      BackendUnavailable
    code 5 (session expired or corrupt)                    log in again once and retry the call;
                                                           a second code 5 → BackendUnavailable
    any other code (6 illegal, 7 custom, 8 category,       PermanentError, message
      9 priority, 10 sLevel, 12 extra field, 13 unknown      "superoffice-soap code N: <text of
      ticket, 16 attachment, 17 field, ...)                  getErrorMessage> (<operation>)"
    an HTTP status other than 200/500, timeouts, connect
      / read / protocol errors, an answer too large        the shared mapping, gateway.backends.http
    a 200 that is not SOAP                                 BackendUnavailable (wrong URL or config)
    SOAP Fault, server side (faultcode Server/Receiver,
      or none: an HTTP 500 without a Fault element)        TransientError
    SOAP Fault, VersionMismatch / MustUnderstand           BackendUnavailable (protocol mismatch)
    SOAP Fault, client side (Client/Sender/other)          PermanentError for the calls that carry
                                                           the mail (newTicket, addMessage,
                                                           addAttachment); BackendUnavailable for
                                                           the others (login, getTicket...), which
                                                           carry nothing but config: the documented
                                                           "exception" for a client IP outside the
                                                           allowed ranges lands here
    request or answer that does not fit the WSDL           BackendUnavailable

The WSDL (our synthetic one, or an installation's own via `wsdl`) is loaded once, at construction
(a `wsdl` URL is fetched there, synchronously: point it at a saved file to keep start-up offline),
and the service is bound to `url`; calls use zeep's async transport over one httpx.AsyncClient.
SuperOffice publishes no WSDL, only each call's parameter order and that the error code comes
first (shared/contracts/superoffice-soap.md), so nothing here depends on names we chose:
- parameters are passed by position, in the documented order;
- answers are read by the shape of the WSDL's output message (`WsdlShape`): its first part is
  the error code, the next ones the out parameters in the documented order, whatever their names;
- arrays are built as the WSDL's types define them: a literal wrapper of repeated elements, or a
  SOAP-encoded array (`soapenc:Array`; the SOAP encoding schema ships with the package, so such a
  WSDL loads without a network fetch).
Ticket status is numeric in the real system (EnumTicketBaseStatus: 0 unknown, 1 active, 2 closed,
3 postponed, 4 deleted, 5 merged); words are understood too, and `closed_statuses` says which
count as closed. The password and the session key are never logged, nor is any text of the mail.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import zeep
from zeep.cache import InMemoryCache
from zeep.exceptions import Error as ZeepError
from zeep.exceptions import Fault, TransportError
from zeep.proxy import AsyncServiceProxy
from zeep.wsdl.bindings.soap import SoapBinding
from zeep.wsdl.utils import etree_to_string
from zeep.xsd import AnyObject
from zeep.xsd import Element as XsdElement

from gateway.backends.base import Progress
from gateway.backends.config import SuperOfficeSoapConfig
from gateway.backends.http import (
    ResponseBudget,
    make_client,
    status_error,
    tls_context,
    transport_error,
)
from gateway.backends.soap import AnswerTransport
from gateway.backends.text import reply_view, select_attachments, ticket_text
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    PermanentError,
    Problem,
    TransientError,
)
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.secrets import resolve_secret

log = logging.getLogger("gateway.backend.superoffice_soap")

SYSTEM = "superoffice-soap"
PACKAGED_WSDL = ("gateway.backends", "wsdl", "superoffice_customer.wsdl")
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
SOAP_ENCODING_XSD = ("gateway.backends", "wsdl", "soap-encoding.xsd")
OPEN_STATUSES = frozenset({"1", "3", "open", "active", "postponed"})
MAX_TITLE_CHARS = 255  # the title column's length is undocumented; keep it to a safe size
LOGOUT_TIMEOUT = 2.0  # seconds aclose() waits for a courtesy logout

# shared/contracts/superoffice-soap.md, "Error codes" (SoapError<Name>)
CODE_NAMES: dict[int, str] = {
    1: "IncorrectLoginCustomer",
    2: "IncorrectLoginUser",
    3: "UnknownCustomer",
    4: "InsufficientRights",
    5: "InvalidSessionKey",
    6: "OperationIllegal",
    7: "CustomError",
    8: "InvalidCategory",
    9: "InvalidPriority",
    10: "InvalidSLevel",
    11: "InvalidDomain",
    12: "InvalidExtraField",
    13: "UnknownTicket",
    14: "UserNameExists",
    15: "EmptyPassword",
    16: "UnknownAttachment",
    17: "InvalidField",
    18: "UnknownMessage",
    19: "NoLicense",
}
CODE_SESSION = 5
CODE_UNKNOWN_TICKET = 13
UNAVAILABLE_CODES = frozenset({1, 2, 3, 4, 15, 19})
POSSIBLE_FIRST_PROBES = 10  # earlier ticket ids `possible_first` reads at most
CONTENT_OPS = frozenset({"newTicket", "addMessage", "addAttachment"})
SLEVELS = {"external": 2, "internal": 1, "2": 2, "1": 1}

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


class _HttpStatus(Exception):
    """An HTTP answer that carries no SOAP (anything but 200 and 500)."""

    def __init__(self, status: int, headers: httpx.Headers) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers


class _Transport(AnswerTransport):
    """zeep's async transport without its debug log of whole envelopes (password, mail text),
    and with HTTP statuses that carry no SOAP turned into `_HttpStatus` right away."""

    _payloads: dict[str, bytes]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._payloads = {}  # stand-in text -> bytes that go out base64-encoded in its place

    def stand_in(self, data: bytes) -> str:
        """A marker to pass to zeep instead of base64 text: the request carries `data`
        base64-encoded in its place, encoded piece by piece as it is sent (an attachment is
        never held encoded, nor in zeep's XML tree). `release` it after the call."""
        marker = f"@@gateway-payload-{uuid.uuid4().hex}@@"
        self._payloads[marker] = data
        return marker

    def release(self, marker: str) -> None:
        self._payloads.pop(marker, None)

    async def post(
        self,
        address: str,
        message: bytes | AsyncIterator[bytes],
        headers: dict[str, str],
        length: int | None = None,
    ) -> httpx.Response:
        # as zeep's own post, without its debug log of whole envelopes; a streamed body goes out
        # with its length (httpx then sends it as it is produced, not chunked)
        if length is not None:
            headers = {**headers, "Content-Length": str(length)}
        return await self.client.post(address, content=message, headers=headers)

    async def post_xml(self, address: str, envelope: Any, headers: dict[str, str]) -> Any:
        message = etree_to_string(envelope)
        content: bytes | AsyncIterator[bytes] = message
        length: int | None = None
        for marker, data in self._payloads.items():
            at = message.find(marker.encode("ascii"))
            if at >= 0:
                prefix, suffix = message[:at], message[at + len(marker) :]
                length = len(prefix) + 4 * ((len(data) + 2) // 3) + len(suffix)
                content = _base64_between(prefix, data, suffix)
                break
        response = await self.post(address, content, headers, length)
        if response.status_code not in (200, 500):
            raise _HttpStatus(response.status_code, response.headers)
        return self.new_response(response)


_B64_PIECE = 3 * 65536  # bytes encoded at a time (a multiple of 3: no padding inside)


async def _base64_between(prefix: bytes, data: bytes, suffix: bytes) -> AsyncIterator[bytes]:
    yield prefix
    view = memoryview(data)
    for start in range(0, len(view), _B64_PIECE):
        yield base64.b64encode(view[start : start + _B64_PIECE])
    yield suffix


def _get(obj: Any, name: str) -> Any:
    """A part or member by name from whatever zeep returned (dict-like, object or None)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return obj[name]
    except (KeyError, TypeError, IndexError, AttributeError):
        return getattr(obj, name, None)


def _items(obj: Any) -> list[Any]:
    """The items of an array answer: a list (SOAP-encoded arrays, repeated elements), or a
    wrapper holding one repeated member whatever its name, one item, or nothing."""
    if obj is None:
        return []
    if isinstance(obj, list | tuple):
        return list(obj)
    if isinstance(obj, Mapping):
        members = list(obj.values())
    else:
        try:
            members = [obj[k] for k in obj]
        except TypeError:
            return [obj]
    if len(members) == 1:
        inner = members[0]
        if inner is None:
            return []
        return list(inner) if isinstance(inner, list | tuple) else [inner]
    return [obj]


class WsdlShape:
    """What the loaded WSDL says about each operation the gateway calls: the names of its
    output parts in order (read by position) and the types of its input parts (to build
    arrays as the WSDL defines them). Built from zeep's public binding objects."""

    def __init__(self, binding: Any) -> None:
        self.binding = binding
        self._outputs: dict[str, list[str]] = {}

    def _operation(self, op: str) -> Any:
        try:
            return self.binding.get(op)
        except (ValueError, KeyError, ZeepError) as exc:
            raise BackendUnavailable(f"superoffice-soap: the WSDL has no operation {op}") from exc

    def outputs(self, op: str) -> list[str]:
        names = self._outputs.get(op)
        if names is None:
            body = self._operation(op).output.body
            elements = getattr(getattr(body, "type", None), "elements", None)
            names = [name for name, _ in elements] if elements else [getattr(body, "name", "")]
            self._outputs[op] = names
        return names

    def parts(self, op: str, result: Any) -> list[Any]:
        """The answer's parts in the order of the output message (one part: the value)."""
        names = self.outputs(op)
        if len(names) <= 1:
            return [result]
        if isinstance(result, str):  # a server that sent only the code
            return [result] + [None] * (len(names) - 1)
        return [_get(result, name) for name in names]

    def array(self, op: str, index: int, items: list[Any]) -> Any:
        """The value of input part `index` (counting the session key) holding `items`."""
        elements = self._operation(op).input.body.type.elements
        if index >= len(elements):
            raise BackendUnavailable(f"superoffice-soap: the WSDL's {op} has too few parts")
        kind = elements[index][1].type
        item_type = next(
            (
                a.array_type
                for _, a in getattr(kind, "attributes", [])
                if getattr(a, "array_type", None) is not None
            ),
            None,
        )
        if item_type is not None:  # soapenc:Array: <item> elements of the declared type
            element = XsdElement("item", item_type)
            return kind(
                [AnyObject(element, item_type(**i) if isinstance(i, dict) else i) for i in items]
            )
        members = getattr(kind, "elements", [])
        if len(members) == 1:  # a literal wrapper of one repeated element
            return {members[0][0]: items}
        return items


def _clean(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (lxml would refuse the whole request)."""
    return _XML_INVALID.sub("", text)


class CodeRefused(PermanentError):
    """A business error code (see `map_code`); `code` is the system's number."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def map_code(op: str, code: int, text: str) -> BackendError:
    """The error for a non-zero error code (code 5 is handled by the caller first)."""
    name = CODE_NAMES.get(code, "unknown code")
    detail = text.strip()[:500] or name
    message = f"superoffice-soap code {code}: {detail} ({op})"
    if code in UNAVAILABLE_CODES or code == CODE_SESSION:
        return BackendUnavailable(message)
    return CodeRefused(message, code=code)


def map_exception(op: str, exc: BaseException) -> BackendError:
    """The error for a failed HTTP/SOAP exchange (see the module docstring)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, _HttpStatus):
        return status_error(f"superoffice-soap {op}", exc.status, exc.headers)
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return transport_error(f"superoffice-soap {op}", exc)
    if isinstance(exc, Fault):
        code = str(exc.code or "").rsplit(":", 1)[-1].strip().lower()
        msg = f"superoffice-soap {op}: SOAP fault {code or '?'}: {str(exc.message or '')[:300]}"
        if not code or code in ("server", "receiver") or code.startswith("server."):
            return TransientError(msg)  # server side, or an HTTP 500 without a fault code
        if code in ("versionmismatch", "mustunderstand") or op not in CONTENT_OPS:
            return BackendUnavailable(msg)
        return PermanentError(msg)
    if isinstance(exc, TransportError):
        status = int(exc.status_code or 0)
        if status >= 500:
            return TransientError(f"superoffice-soap {op}: HTTP {status} without SOAP")
        return BackendUnavailable(f"superoffice-soap {op}: answer is not SOAP (HTTP {status})")
    if isinstance(exc, ZeepError | TypeError | ValueError):
        return BackendUnavailable(
            f"superoffice-soap {op}: does not fit the WSDL: {type(exc).__name__}: {exc}"
        )
    return TransientError(f"superoffice-soap {op}: {type(exc).__name__}: {exc}")


def _slevel(value: Any, what: str) -> int:
    level = SLEVELS.get(str(value).strip().lower())
    if level is None:
        raise PermanentError(
            f"superoffice-soap: {what} must be external/internal or 2/1: {value!r}"
        )
    return level


def _int_field(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value).strip())
    except ValueError:
        raise PermanentError(
            f"superoffice-soap: ticket field {what} must be an id: {value!r}"
        ) from None


def _known_schemas() -> InMemoryCache:
    """A cache that holds the SOAP encoding schema, which WSDLs with SOAP-encoded arrays use
    and zeep would otherwise fetch from the network."""
    cache = InMemoryCache()
    ref = resources.files(SOAP_ENCODING_XSD[0]).joinpath(*SOAP_ENCODING_XSD[1:])
    cache.add(SOAP_ENCODING, ref.read_bytes())
    return cache


def _load_client(wsdl: str, transport: _Transport, base_dir: Path) -> Any:
    """Load the WSDL (file or URL) once; returns the zeep client."""
    settings = zeep.Settings(strict=False, xml_huge_tree=True, forbid_entities=True)
    if wsdl.startswith("file://"):
        location = urlparse(wsdl).path
    elif urlparse(wsdl).scheme in ("http", "https"):
        location = wsdl  # read once, synchronously, by the transport's WSDL client
    else:
        path = Path(wsdl).expanduser()
        location = str(path if path.is_absolute() else base_dir / path)
    try:
        return zeep.AsyncClient(location, transport=transport, settings=settings)
    except (OSError, ZeepError, httpx.HTTPError, ValueError) as exc:
        raise ConfigError(
            [Problem(wsdl, 0, f"superoffice-soap: cannot load WSDL: {type(exc).__name__}: {exc}")]
        ) from exc


def _binding(client: Any, url: str) -> Any:
    """The first SOAP binding of the WSDL's services (else its first binding)."""
    for service in client.wsdl.services.values():
        for port in service.ports.values():
            if isinstance(port.binding, SoapBinding):
                return port.binding
    for binding in client.wsdl.bindings.values():
        return binding
    raise ConfigError([Problem(url, 0, "superoffice-soap: the WSDL has no SOAP binding")])


def _service(client: Any, binding: Any, url: str) -> Any:
    """Bind `binding` to `url` as an async proxy.

    `zeep.AsyncClient.create_service` returns a synchronous proxy (zeep 4.3), so the async proxy
    is built the same way by hand.
    """
    return AsyncServiceProxy(client, binding, address=url)


class SuperOfficeSoapBackend:
    """The SuperOffice customer SOAP port as a ticket backend. See `Backend` (backends/base.py)."""

    system = SYSTEM
    searchable = False  # the customer port cannot list or search tickets

    def __init__(
        self,
        name: str,
        cfg: SuperOfficeSoapConfig,
        *,
        base_dir: Path,
        budget: ResponseBudget | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        password = resolve_secret(
            cfg.password,
            cfg.password_file,
            cfg.password_env,
            what=f"backends.{name}.password",
            base_dir=base_dir,
        )
        assert password is not None  # required=True
        self._password = password
        self._http = make_client(
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            max_response_bytes=cfg.max_response_bytes,
            budget=budget,
        )
        # fetches a `wsdl` URL and its imports; the process's TLS context (loading a CA bundle
        # of its own cost more CPU than the rest of the client)
        wsdl_http = httpx.Client(timeout=cfg.timeout, verify=tls_context())
        try:
            transport = self._transport = _Transport(
                client=self._http, wsdl_client=wsdl_http, cache=_known_schemas()
            )
            if cfg.wsdl:
                client = _load_client(cfg.wsdl, transport, base_dir)
            else:
                ref = resources.files(PACKAGED_WSDL[0]).joinpath(*PACKAGED_WSDL[1:])
                with resources.as_file(ref) as path:
                    client = _load_client(str(path), transport, base_dir)
            binding = _binding(client, cfg.url)
            self._shape = WsdlShape(binding)
            self._service = _service(client, binding, cfg.url)
        finally:
            wsdl_http.close()
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._login_lock = asyncio.Lock()
        self._session: str | None = None
        self._closed = frozenset(v.strip().lower() for v in cfg.closed_statuses)

    # -- calls --------------------------------------------------------------------------------

    async def _call(self, op: str, *args: Any) -> Any:
        """One SOAP call, bounded by `concurrency`; failures of the exchange are mapped."""
        started = time.monotonic()
        async with self._sem:
            try:
                method = getattr(self._service, op)
                result = await method(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = map_exception(op, exc)
                log.warning(
                    "call_failed",
                    extra={
                        "fields": {
                            "backend": self.name,
                            "op": op,
                            "error": type(err).__name__,
                            "cause": type(exc).__name__,
                            "ms": int((time.monotonic() - started) * 1000),
                        }
                    },
                )
                raise err from exc
        log.debug(
            "call",
            extra={
                "fields": {
                    "backend": self.name,
                    "op": op,
                    "ms": int((time.monotonic() - started) * 1000),
                }
            },
        )
        return result

    def _code(self, op: str, result: Any) -> int:
        raw = self._shape.parts(op, result)[0]
        try:
            return int(str(raw).strip())
        except ValueError:
            raise BackendUnavailable(
                f"superoffice-soap {op}: answer has no error code (does the WSDL fit?)"
            ) from None

    async def _login(self) -> str:
        result = await self._call("login", self.cfg.username, self._password.get_secret_value())
        code = self._code("login", result)
        key = self._out(result, "login")
        if code != 0 or not key:
            log.error("login_refused", extra={"fields": {"backend": self.name, "code": code}})
            name = CODE_NAMES.get(code, "no session key")
            raise BackendUnavailable(
                f"superoffice-soap code {code}: login refused for {self.cfg.username} ({name})"
            )
        log.info("login", extra={"fields": {"backend": self.name}})
        return str(key)

    async def _session_key(self) -> str:
        async with self._login_lock:
            if self._session is None:
                self._session = await self._login()
            return self._session

    async def _forget(self, key: str) -> None:
        async with self._login_lock:
            if self._session == key:
                self._session = None

    async def _error_text(self, key: str) -> str:
        """getErrorMessage, best effort: a failure here must not hide the code being reported."""
        try:
            result = await self._call("getErrorMessage", key)
        except BackendError:
            return ""
        text = self._shape.parts("getErrorMessage", result)[0]
        return str(text or "")

    def _out(self, result: Any, op: str, n: int = 1) -> Any:
        """Out parameter `n` of an answer (0 is the error code), by its position."""
        parts = self._shape.parts(op, result)
        return parts[n] if n < len(parts) else None

    async def _session_call(self, op: str, *args: Any) -> Any:
        """Call `op(sessionKey, *args)`; log in when needed and once more on code 5."""
        for attempt in (1, 2):
            key = await self._session_key()
            result = await self._call(op, key, *args)
            code = self._code(op, result)
            if code == 0:
                return result
            if code == CODE_SESSION:
                await self._forget(key)
                log.info(
                    "session_expired",
                    extra={"fields": {"backend": self.name, "op": op, "attempt": attempt}},
                )
                if attempt == 1:
                    continue
                raise BackendUnavailable(
                    f"superoffice-soap code 5: session refused right after login ({op})"
                )
            text = await self._error_text(key)
            err = map_code(op, code, text)
            log.warning(
                "call_refused",
                extra={
                    "fields": {
                        "backend": self.name,
                        "op": op,
                        "code": code,
                        "error": type(err).__name__,
                    }
                },
            )
            raise err
        raise AssertionError("unreachable")

    # -- steps --------------------------------------------------------------------------------

    def _ticket_params(self, decision: Decision, mail: ParsedMail) -> tuple[Any, ...]:
        t = decision.ticket
        slevel = _slevel(t.get("slevel", self.cfg.slevel), "slevel")
        category = _int_field(t.get("category", self.cfg.default_category), "category")
        priority = _int_field(t.get("priority", self.cfg.default_priority), "priority")
        extra = t.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise PermanentError("superoffice-soap: ticket field extra must be a table x_N = text")
        pairs = [
            {"field": str(k), "value": _clean(self._expand(str(v), mail))} for k, v in extra.items()
        ]
        title = _clean(mail.subject.strip() or "(no subject)")[:MAX_TITLE_CHARS]
        extra_field = self._shape.array("newTicket", 5, pairs)
        return (title, str(slevel), str(category), str(priority), extra_field)

    @staticmethod
    def _expand(value: str, mail: ParsedMail) -> str:
        """`{sender}` / `{sender_name}` in an extra field's value name the mail's real sender."""
        return value.replace("{sender}", mail.from_addr).replace("{sender_name}", mail.from_name)

    async def _attachments(self, atts: list[Attachment], progress: Progress) -> list[str]:
        """Upload each forwarded file once; ids are kept in `progress` ("addAttachment.N").

        No `begin` here: a repeated upload only leaves an unreferenced attachment behind, never
        a visible duplicate, so it must not make the mail `uncertain`.
        """
        ids: list[str] = []
        for n, att in enumerate(atts):
            step = f"addAttachment.{n}"
            done = progress.data.get(step) or {}
            if done.get("attachment_id") and done.get("filename") == att.filename:
                ids.append(str(done["attachment_id"]))
                continue
            marker = self._transport.stand_in(att.data)
            try:
                result = await self._session_call(
                    "addAttachment",
                    _clean(att.filename or "attachment"),
                    att.content_type or "application/octet-stream",
                    marker,
                )
            finally:
                self._transport.release(marker)
            att_id = self._out(result, "addAttachment")
            if not att_id:
                raise BackendUnavailable(
                    "superoffice-soap addAttachment: answer has no attachmentId"
                )
            await progress.done(step, attachment_id=str(att_id), filename=att.filename)
            ids.append(str(att_id))
        return ids

    async def _message(
        self, ticket_id: str, mail: ParsedMail, progress: Progress, *, automatic: bool
    ) -> None:
        if progress.data.get("addMessage"):
            return
        keep, skipped = select_attachments(
            mail,
            max_bytes=self.cfg.max_attachment_bytes,
            max_total=self.cfg.max_total_attachment_bytes,
            blocked_extensions=self.cfg.blocked_extensions,
        )
        att_ids = await self._attachments(keep, progress)
        text = ticket_text(
            mail,
            header_fields=self.cfg.header_fields,
            max_chars=self.cfg.max_body_chars,
            not_forwarded=skipped,
            automatic=automatic,
        )
        await progress.begin("addMessage")
        result = await self._session_call(
            "addMessage",
            _clean(text),
            ticket_id,
            str(self.cfg.message_slevel),
            self._shape.array("addMessage", 4, att_ids),
        )
        message_id = str(self._out(result, "addMessage") or "")
        await progress.done("addMessage", message_id=message_id)
        log.info(
            "message_added",
            extra={
                "fields": {
                    "backend": self.name,
                    "ticket_id": ticket_id,
                    "attachments": len(att_ids),
                    "skipped": len(skipped),
                }
            },
        )

    # -- Backend ------------------------------------------------------------------------------

    async def open_ticket(
        self, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> TicketRef:
        """See `Backend`."""
        mail = reply_view(mail, self.cfg.quoted, followup=False)
        done = progress.data.get("newTicket") or {}
        ticket_id = str(done.get("ticket_id") or "")
        if ticket_id:
            log.info("resume", extra={"fields": {"backend": self.name, "ticket_id": ticket_id}})
        else:
            params = self._ticket_params(decision, mail)
            await progress.begin("newTicket")
            result = await self._session_call("newTicket", *params)
            ticket_id = str(self._out(result, "newTicket") or "")
            if not ticket_id:
                raise BackendUnavailable("superoffice-soap newTicket: answer has no ticketId")
            await progress.done("newTicket", ticket_id=ticket_id)
            log.info(
                "ticket_created",
                extra={
                    "fields": {"backend": self.name, "ticket_id": ticket_id, "rule": decision.rule}
                },
            )
        await self._message(ticket_id, mail, progress, automatic=decision.automatic)
        return TicketRef(backend=self.name, system=SYSTEM, id=ticket_id, ref=ticket_id)

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None:
        """See `Backend`."""
        mail = reply_view(mail, self.cfg.quoted, followup=True)
        await self._message(ref.id, mail, progress, automatic=automatic)

    async def ticket_status(self, ref: TicketRef) -> str | None:
        """See `Backend`. `ticket.status` is a number (EnumTicketBaseStatus) or a word; those in
        `closed_statuses` are closed, 1/3 and open/active/postponed open, others → None."""
        fields = self._shape.array("getTicket", 2, ["ticket.id", "ticket.status"])
        try:
            result = await self._session_call("getTicket", ref.id, fields)
        except CodeRefused as exc:
            if exc.code == CODE_UNKNOWN_TICKET:
                raise PermanentError(f"superoffice-soap: unknown ticket {ref.id}") from exc
            raise
        for item in _items(self._out(result, "getTicket")):
            if str(_get(item, "field") or "") == "ticket.status":
                value = str(_get(item, "value") or "").strip().lower()
                if value in self._closed:
                    return "closed"
                if value in OPEN_STATUSES:
                    return "open"
                return None
        return None

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None:
        """See `Backend`. The customer port cannot search tickets: always None."""
        return None

    async def possible_first(self, ref: TicketRef, mail: ParsedMail) -> str | None:
        """See `Backend`. The port cannot search, but it can read a ticket by id, and ids are
        given out in order: the nearest earlier ticket of ours with the same title (the lost
        create made it moments before) is the likely first copy. Best effort: None on any error.
        """
        try:
            newest = int(ref.id)
        except ValueError:
            return None
        title = _clean(mail.subject.strip() or "(no subject)")[:MAX_TITLE_CHARS]
        for tid in range(newest - 1, max(0, newest - 1 - POSSIBLE_FIRST_PROBES), -1):
            try:
                result = await self._session_call(
                    "getTicket", str(tid), {"item": ["ticket.id", "ticket.title"]}
                )
            except BackendError:
                continue  # not ours, not external, or gone
            for item in _items(_get(result, "ticketResult")):
                if str(_get(item, "field") or "") == "ticket.title":
                    if str(_get(item, "value") or "").strip() == title.strip():
                        return str(tid)
        return None

    async def aclose(self) -> None:
        """Log out (best effort, briefly) and close the HTTP client."""
        key, self._session = self._session, None
        if key is not None:
            try:
                await asyncio.wait_for(self._call("logout", key), LOGOUT_TIMEOUT)
            except (BackendError, TimeoutError):
                pass
        await self._http.aclose()
