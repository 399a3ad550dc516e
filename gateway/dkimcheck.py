"""The gateway's own DKIM check (`[ack] verify_dkim`), for a mail no trusted header vouches for.

With `require = "authenticated"` an acknowledgement needs the sender authenticated. Behind an MTA
that checks DKIM/DMARC, its `Authentication-Results` header says so (gateway.ackpolicy). Where no
such MTA stands in front (a plain relay, an IMAP mailbox whose provider adds no header), the
gateway can verify a DKIM signature itself with dkimpy (RFC 6376): a signature that verifies and
whose `d=` is aligned with the From domain (relaxed alignment, RFC 7489 §3.1.1: the same
organisational domain) authenticates the sender.

The cost is bounded, since a stranger chooses how many signatures a mail carries: the check runs
only when `ackpolicy.own_dkim_wanted` says so (authentication required, no trusted header vouched,
the rules want an acknowledgement, a DKIM-Signature is present); only signatures whose `d=` is
aligned are tried, at most `MAX_SIGNATURES` of them, each with one DNS look-up bounded by the
timeout; a mail over `MAX_BYTES` is not hashed at all. Signatures with `l=` (a body length: text
appended after it is unsigned) do not count.

Key look-ups go through dkimpy's `dnsfunc` hook: `DnsTxt` asks the system's resolver, or the
servers in `[ack] dkim_nameservers`; tests hand in their own function (or a resolver on loopback),
so nothing here reaches the network unless configured to.

Blocking (DNS, hashing): the worker runs `check` in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from email import policy as email_policy
from email.parser import BytesParser

import dkim
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.ackpolicy import DkimResult, DkimSettings, org_domain

__all__ = ["MAX_BYTES", "MAX_SIGNATURES", "DkimSettings", "DnsTxt", "check"]

MAX_SIGNATURES = 3  # aligned signatures tried per mail
MAX_BYTES = 10 * 1024 * 1024  # larger mails are not hashed: no acknowledgement by own DKIM check
MIN_KEY_BITS = 1024  # RFC 8301: shorter RSA keys are not accepted

TxtLookup = Callable[..., bytes | None]  # dkimpy's dnsfunc: (name, timeout=...) -> TXT or None


class DnsTxt:
    """dkimpy's `dnsfunc`: the TXT record at a selector's name, through dnspython's resolver."""

    def __init__(self, settings: DkimSettings) -> None:
        if settings.nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(s) for s in settings.nameservers]
        else:
            self._resolver = dns.resolver.Resolver()  # /etc/resolv.conf
        self._timeout = settings.timeout

    def __call__(self, name: bytes | str, timeout: float = 5.0) -> bytes | None:
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = self._resolver.resolve(
                qname,
                dns.rdatatype.TXT,
                lifetime=min(timeout, self._timeout),
                raise_on_no_answer=False,
                search=False,
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(f"key look-up of {qname} timed out") from exc
        except (dns.exception.DNSException, ValueError):
            return None  # a name no server can hold (a stranger wrote d= and s=)
        for rrset in answer.response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    return b"".join(rdata.strings)
        return None


def _nameserver(spec: str) -> dns.nameserver.Nameserver:
    """ "192.0.2.53", "127.0.0.1:5353", "2001:db8::53", "[2001:db8::53]:5353" (as config.py
    checks them)."""
    host, sep, port = spec.rpartition(":")
    if not sep or (host.count(":") and not host.endswith("]")):
        host, port = spec, "53"  # a bare IPv4 or IPv6 address
    return dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))


def _signatures(raw: bytes) -> list[bytes]:
    """The DKIM-Signature header values in the order dkimpy numbers them (topmost is 0)."""
    headers = BytesParser(policy=email_policy.compat32).parsebytes(raw, headersonly=True)
    values = headers.get_all("DKIM-Signature") or []
    return [
        "".join(str(v).split("\n")).replace("\r", "").encode("utf-8", "surrogateescape")
        for v in values
    ]


def check(
    raw: bytes,
    from_domain: str,
    settings: DkimSettings,
    dnsfunc: TxtLookup | None = None,
) -> DkimResult:
    """Verify the mail's DKIM signatures aligned with `from_domain`; the first that verifies
    authenticates the sender. `dnsfunc` replaces the DNS look-up (tests)."""
    if len(raw) > MAX_BYTES:
        return DkimResult("", f"not verified: the mail is larger than {MAX_BYTES} bytes")
    want = org_domain(from_domain)
    lookup = dnsfunc if dnsfunc is not None else DnsTxt(settings)
    problems: list[str] = []
    tried = 0
    for idx, value in enumerate(_signatures(raw)):
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            problems.append(f"signature {idx + 1} unreadable")
            continue
        d = tags.get(b"d", b"").decode("ascii", "replace").strip().lower().rstrip(".")
        if not d or org_domain(d) != want:
            problems.append(f"d={d or '?'} not aligned with From ({from_domain})")
            continue
        if b"l" in tags:
            problems.append(f"d={d} signs only part of the body (l=)")
            continue
        if tried >= MAX_SIGNATURES:
            problems.append(f"more than {MAX_SIGNATURES} aligned signatures: the rest not tried")
            break
        tried += 1
        verifier = dkim.DKIM(raw, minkey=MIN_KEY_BITS, timeout=settings.timeout)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=lookup)
        except dkim.DKIMException as exc:
            # e.g. "body hash mismatch (got b'...', expected b'...')": the hashes say nothing
            problems.append(f"d={d}: {str(exc).split(' (got ', 1)[0][:200]}")
            continue
        except Exception as exc:  # a stranger's bytes must never cost the mail its ticket
            problems.append(f"d={d}: cannot be verified ({type(exc).__name__})")
            continue
        if ok:
            return DkimResult(f"dkim=pass (d={d}, aligned with From) verified by the gateway", "")
        problems.append(f"d={d}: signature did not verify")
    if not problems:
        return DkimResult("", "no DKIM-Signature")
    return DkimResult("", "own DKIM check failed: " + "; ".join(problems))
