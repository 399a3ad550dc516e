"""The gateway's own DKIM check (`[ack] verify_dkim`, gateway.dkimcheck): mails signed here with
a key made by openssl and dkimpy's `dkim.sign`, the public key handed in through dkimpy's
`dnsfunc` hook or published on a DNS server on loopback (tests/dns_server.py). Nothing reaches
the network."""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from gateway.ackpolicy import AckPolicy, DkimResult, ack_verdict, apply_policy, own_dkim_wanted
from gateway.config import load_config
from gateway.dkimcheck import MAX_SIGNATURES, DkimSettings, DnsTxt, check
from gateway.errors import ConfigError
from gateway.mail import parse
from gateway.models import Decision, Envelope
from tests.dns_server import TxtServer

ROOT = Path(__file__).resolve().parent.parent
ENV = Envelope(mail_from="anna@customer.example", rcpt_tos=("support@example.com",))
POLICY = AckPolicy(
    require="authenticated",
    trusted_authserv_ids=frozenset({"mx.example.com"}),
    verify_dkim=True,
)


def make_key(tmp: Path, bits: int = 1024) -> tuple[bytes, str]:
    """(PEM private key, the TXT record that publishes it)."""
    key = tmp / f"k{bits}.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(key), str(bits)],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return key.read_bytes(), f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    return make_key(tmp_path_factory.mktemp("dkim"))


def message(from_addr: str = "anna@customer.example", body: str = "Printer broken.") -> bytes:
    return (
        f"From: Anna <{from_addr}>\r\nTo: support@example.com\r\nSubject: Printer\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@customer.example>\r\n\r\n{body}\r\n"
    ).encode()


def signed(raw: bytes, pem: bytes, domain: str, selector: str = "sel", **kw: object) -> bytes:
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        pem,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
        **kw,  # type: ignore[arg-type]
    )
    return bytes(header) + raw


def keys(table: dict[str, str]) -> tuple[Callable[..., bytes | None], list[str]]:
    """A dnsfunc answering from `table`, and the names it was asked for."""
    asked: list[str] = []

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        n = (name.decode() if isinstance(name, bytes) else name).rstrip(".")
        asked.append(n)
        value = table.get(n)
        return value.encode() if value is not None else None

    return lookup, asked


def test_a_signature_of_the_from_domain_authenticates(key: tuple[bytes, str]) -> None:
    pem, txt = key
    lookup, asked = keys({"sel._domainkey.customer.example": txt})
    result = check(
        signed(message(), pem, "customer.example"), "customer.example", DkimSettings(), lookup
    )
    assert (
        result.passed == "dkim=pass (d=customer.example, aligned with From) verified by the gateway"
    )
    assert asked == ["sel._domainkey.customer.example"]


@pytest.mark.parametrize(
    ("signer", "from_addr"),
    [
        ("mail.customer.example", "anna@customer.example"),  # relaxed: same organisational domain
        ("customer.example", "anna@eu.customer.example"),  # d= is a parent of the From domain
        ("customer.co.uk", "anna@support.customer.co.uk"),
    ],
)
def test_relaxed_alignment(key: tuple[bytes, str], signer: str, from_addr: str) -> None:
    pem, txt = key
    lookup, _ = keys({f"sel._domainkey.{signer}": txt})
    raw = signed(message(from_addr), pem, signer)
    assert check(raw, from_addr.split("@")[1], DkimSettings(), lookup).passed


def test_a_changed_body_fails(key: tuple[bytes, str]) -> None:
    pem, txt = key
    lookup, _ = keys({"sel._domainkey.customer.example": txt})
    raw = signed(message(), pem, "customer.example").replace(b"Printer broken.", b"Buy pills!")
    result = check(raw, "customer.example", DkimSettings(), lookup)
    assert result.passed == ""
    assert result.why == "own DKIM check failed: d=customer.example: body hash mismatch"


def test_a_signature_of_another_domain_is_not_even_looked_up(key: tuple[bytes, str]) -> None:
    pem, txt = key
    lookup, asked = keys({"sel._domainkey.spammer.example": txt})
    raw = signed(message("victim@victim.example"), pem, "spammer.example")
    result = check(raw, "victim.example", DkimSettings(), lookup)
    assert result.passed == ""
    assert "d=spammer.example not aligned with From (victim.example)" in result.why
    assert asked == []  # no DNS work for a signature that could not count
    # a public suffix is no one's organisational domain
    raw = signed(message("victim@victim.co.uk"), pem, "co.uk")
    assert not check(raw, "victim.co.uk", DkimSettings(), lookup).passed


def test_no_key_published_fails(key: tuple[bytes, str]) -> None:
    pem, _txt = key
    lookup, _ = keys({})
    result = check(
        signed(message(), pem, "customer.example"), "customer.example", DkimSettings(), lookup
    )
    assert result.passed == "" and result.why.startswith(
        "own DKIM check failed: d=customer.example"
    )


def test_a_body_length_limit_does_not_count(key: tuple[bytes, str]) -> None:
    """`l=`: text appended after the signed length is unsigned, so a stranger could add spam."""
    pem, txt = key
    lookup, asked = keys({"sel._domainkey.customer.example": txt})
    raw = signed(message(), pem, "customer.example", length=True)
    result = check(raw, "customer.example", DkimSettings(), lookup)
    assert result.passed == "" and "signs only part of the body (l=)" in result.why
    assert asked == []


def test_a_short_key_fails(tmp_path: Path) -> None:
    pem, txt = make_key(tmp_path, 768)
    lookup, _ = keys({"sel._domainkey.customer.example": txt})
    result = check(
        signed(message(), pem, "customer.example"), "customer.example", DkimSettings(), lookup
    )
    assert result.passed == "" and "d=customer.example" in result.why


def test_many_signatures_cost_at_most_a_few_lookups(key: tuple[bytes, str]) -> None:
    pem, _txt = key
    lookup, asked = keys({})
    raw = message()
    for n in range(10):
        raw = signed(raw, pem, "customer.example", selector=f"s{n}")
    result = check(raw, "customer.example", DkimSettings(), lookup)
    assert len(asked) == MAX_SIGNATURES
    assert f"more than {MAX_SIGNATURES} aligned signatures" in result.why


def test_the_key_is_looked_up_in_dns_on_the_configured_server(key: tuple[bytes, str]) -> None:
    pem, txt = key
    with TxtServer({"sel._domainkey.customer.example": txt}) as dns:
        settings = DkimSettings(nameservers=(f"127.0.0.1:{dns.port}",), timeout=2)
        assert DnsTxt(settings)("sel._domainkey.customer.example.") == txt.encode()
        assert DnsTxt(settings)(b"nothing._domainkey.customer.example.") is None
        result = check(signed(message(), pem, "customer.example"), "customer.example", settings)
        assert result.passed
        assert "sel._domainkey.customer.example." in dns.queries


# -- the policy: when the check is made, and what its result decides ------------------------------


def decision() -> Decision:
    return Decision(rule="support", backend="whmcs", action="new", ack="default")


def test_own_check_only_where_an_acknowledgement_hinges_on_it(key: tuple[bytes, str]) -> None:
    pem, _txt = key
    mail = parse(signed(message(), pem, "customer.example"))
    assert own_dkim_wanted(decision(), mail, ENV, POLICY)
    off = AckPolicy(require="authenticated", verify_dkim=False)
    assert not own_dkim_wanted(decision(), mail, ENV, off)
    none = AckPolicy(require="none", verify_dkim=True)
    assert not own_dkim_wanted(decision(), mail, ENV, none)
    no_ack = Decision(rule="support", backend="whmcs", action="new", ack=None)
    assert not own_dkim_wanted(no_ack, mail, ENV, POLICY)
    assert not own_dkim_wanted(decision(), parse(message()), ENV, POLICY)  # nothing to verify
    vouched = parse(
        b"Authentication-Results: mx.example.com; dmarc=pass header.from=customer.example\r\n"
        + signed(message(), pem, "customer.example")
    )
    assert not own_dkim_wanted(decision(), vouched, ENV, POLICY)  # the MTA already said so


def test_own_check_decides_the_acknowledgement(key: tuple[bytes, str]) -> None:
    pem, _txt = key
    mail = parse(signed(message(), pem, "customer.example"))
    ok = DkimResult("dkim=pass (d=customer.example, aligned with From) verified by the gateway")
    d, verdict = apply_policy(decision(), mail, ENV, POLICY, ok)
    assert verdict is not None and verdict.rcpt == "anna@customer.example"
    assert d.ack == "default"
    assert (
        "acknowledgement allowed: dkim=pass (d=customer.example, aligned with From)"
        " verified by the gateway" in d.reasons
    )
    bad = DkimResult("", "own DKIM check failed: d=customer.example: signature did not verify")
    d, verdict = apply_policy(decision(), mail, ENV, POLICY, bad)
    assert verdict is not None and verdict.rcpt is None
    assert d.ack is None
    assert d.reasons[-1] == (
        "no acknowledgement: sender not authenticated: no Authentication-Results header from a"
        " trusted authserv-id; own DKIM check failed: d=customer.example: signature did not verify"
    )
    plain = ack_verdict(parse(message()), ENV, POLICY)
    assert plain.rcpt is None and plain.reason.endswith(
        "no DKIM-Signature for the gateway to verify"
    )


def test_nameservers_are_checked_at_load(tmp_path: Path) -> None:
    text = (ROOT / "config.example.toml").read_text()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        text.replace(
            "dkim_nameservers = []", 'dkim_nameservers = ["127.0.0.1:5353", "::1", "[::1]:53"]'
        )
    )
    assert load_config(cfg).ack.dkim_nameservers == ["127.0.0.1:5353", "::1", "[::1]:53"]
    cfg.write_text(text.replace("dkim_nameservers = []", 'dkim_nameservers = ["resolver.example"]'))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "ack.dkim_nameservers" in str(exc.value) and "not a name server" in str(exc.value)


def test_a_signature_no_dns_name_can_hold_fails_quietly(key: tuple[bytes, str]) -> None:
    """d= and s= are a stranger's words: a name DNS cannot carry is a failed check, not an error."""
    pem, _txt = key
    raw = signed(message(), pem, "customer.example", selector="x" * 70)
    with TxtServer() as dns:
        settings = DkimSettings(nameservers=(f"127.0.0.1:{dns.port}",), timeout=2)
        result = check(raw, "customer.example", settings)
    assert result.passed == "" and result.why.startswith(
        "own DKIM check failed: d=customer.example"
    )
