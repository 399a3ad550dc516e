"""The one validated config model, loaded from TOML with `file:line` errors.

Every key is commented in config.example.toml. Unknown keys are refused. Relative paths resolve
against the directory of the config file. Backend sections are validated by the model of their
`type`, looked up once in `gateway.backends.registry` (an unknown type is a config error).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.backends.config import BackendConfigBase
from gateway.backends.registry import BACKEND_TYPES, config_model
from gateway.classify import compile_token_pattern
from gateway.errors import ConfigError, Problem
from gateway.intake.imap import ImapConfig
from gateway.retry import DEFAULT_BASE, DEFAULT_CAP
from gateway.secrets import resolve_secret
from gateway.spool.base import SpoolSettings
from gateway.tomlpos import load_toml, pydantic_problems

DEFAULT_CONFIG = "/etc/ticket-gateway/config.toml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class GatewaySection(_Model):
    own_addresses: list[str] = []  # more addresses whose mail is a loop (besides recipients etc.)
    hostname: str = "ticket-gateway.localdomain"  # right side of our Message-IDs; SMTP banner
    workers: int = Field(8, ge=1, le=512)  # messages processed concurrently
    # The worker (parse, route, backends, acknowledgements) runs in a child process of its own at
    # a lower CPU priority, so that accepting mail never waits behind ticket creation.
    worker_process: bool = True
    worker_nice: int = Field(10, ge=0, le=19)  # niceness of the worker process above the intake
    # the worker's kernel scheduling policy: batch (SCHED_BATCH) | idle (SCHED_IDLE) | normal
    worker_scheduling: Literal["batch", "idle", "normal"] = "batch"
    parse_processes: int = Field(0, ge=0, le=16)  # 0: parse in the worker; N: a pool of N processes
    timezone: str = "UTC"  # for weekday/time rule conditions (an IANA name)
    followup_closed: Literal["append", "new"] = "append"  # follow-up to a closed ticket
    followup_sender: Literal["any", "address", "domain"] = "any"  # who may follow up a ticket
    log_format: Literal["kv", "json"] = "kv"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str = ""  # "" = stderr (journald under systemd); else a file, reopened on SIGHUP
    drain_timeout: float = Field(20.0, ge=0)  # seconds in-flight work may finish at SIGTERM
    node: str = ""  # this node's name among several on one spool; "" = the host name
    worker_processes: int = Field(1, ge=1, le=64)  # worker processes claiming from the spool
    # bytes that all backend answers being read at once may hold in the worker process; past it
    # the calls fail as temporary (their mails are deferred), so a hostile endpoint cannot
    # exhaust memory (each answer is also capped by [backends.NAME] max_response_bytes)
    max_response_bytes_in_flight: int = Field(64 * 1024 * 1024, ge=1024 * 1024)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r} (an IANA name such as Europe/Berlin or UTC)"
            ) from None
        return v


class SpoolSection(_Model):
    """Where the spool lives: a SQLite file (`path`, the default) or a PostgreSQL database
    (`url`) that several gateway nodes share. `path` and `url` are exclusive."""

    path: str = "var/gateway.sqlite"
    url: str = ""  # postgresql://USER@HOST:PORT/DB; the password never in it
    password_file: str = ""  # PostgreSQL password, read from this file
    password_env: str = ""  # ... or from this environment variable
    lease: float = Field(30.0, ge=2, le=3600)  # s before another node takes a dead one's work
    pool_size: int = Field(4, ge=1, le=64)  # PostgreSQL connections per process

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must start with postgresql://")
        if v:
            netloc = v.split("://", 1)[1].split("/", 1)[0]
            if ":" in netloc.rpartition("@")[0]:
                raise ValueError("no password in url: use password_file or password_env")
        return v

    @model_validator(mode="after")
    def _exclusive(self) -> SpoolSection:
        if self.url and "path" in self.model_fields_set:
            raise ValueError("path and url are exclusive: a spool is a SQLite file or a database")
        if (self.password_file or self.password_env) and not self.url:
            raise ValueError("password_file/password_env need url")
        return self

    # /healthz fails below this much free space on the spool's file system (an int in bytes, or
    # "500MiB", "2GB"...); 0 = no check. Below it the intake soon refuses mail (452).
    min_free: ByteSize = ByteSize(256 * 1024 * 1024)


class SmtpSection(_Model):
    enabled: bool = True
    listen: str = "127.0.0.1:2525"
    recipients: list[str] = []  # accepted RCPT TO addresses; everything else 550 5.1.1
    max_size: int = Field(25 * 1024 * 1024, ge=1024)  # bytes, advertised as EHLO SIZE
    max_recipients: int = Field(100, ge=1)
    max_connections_per_ip: int = Field(64, ge=1)
    data_timeout: float = Field(300.0, gt=0)  # seconds a client may take to send a message

    _listen = field_validator("listen")(classmethod(lambda cls, v: _hostport(v)))

    @field_validator("recipients")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        for addr in v:
            if "@" not in addr:
                raise ValueError(f"{addr!r} is not an e-mail address")
        return [a.strip().lower() for a in v]


class HealthSection(_Model):
    listen: str = "127.0.0.1:8025"
    oldest_queued_max: float = Field(900.0, gt=0)  # seconds before /healthz reports a stuck queue
    backend_down_max: float = Field(300.0, gt=0)  # seconds a backend may fail before 503

    _listen = field_validator("listen")(classmethod(lambda cls, v: _hostport(v)))


class RulesSection(_Model):
    dir: str = "rules"
    watch: bool = True  # reload when a rule file, template or the config changes (as on SIGHUP)
    watch_interval: float = Field(2.0, gt=0)  # seconds between looks at the files


def _known_charsets(value: list[str]) -> list[str]:
    import codecs

    for name in value:
        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(f"unknown charset {name!r}") from None
    return value


class MailSection(_Model):
    # undeclared 8-bit text that is not UTF-8 is tried in these charsets, in order, before the
    # charset detector and Windows-1252 (e.g. ["koi8-r"] for a site whose senders write KOI8-R)
    fallback_charsets: list[str] = []

    _charsets = field_validator("fallback_charsets")(classmethod(lambda cls, v: _known_charsets(v)))


class RetrySection(_Model):
    base: float = Field(DEFAULT_BASE, gt=0)  # first retry delay, seconds; doubles each attempt
    max_delay: float = Field(DEFAULT_CAP, gt=0)  # cap of one delay (gateway.retry)
    deadline: float = Field(5 * 24 * 3600.0, gt=0)  # give up (dead-letter) after this long
    paused_check: float = Field(60.0, gt=0)  # how often a paused backend is tried again
    max_crashes: int = Field(5, ge=1)  # a mail that keeps killing the worker is set aside


class AckSection(_Model):
    enabled: bool = True
    relay: str = "127.0.0.1:2526"  # SMTP relay for acknowledgements
    relay_tls: Literal["none", "starttls", "tls"] = "none"
    relay_username: str | None = None
    relay_password: SecretStr | None = None
    relay_password_file: str | None = None
    relay_password_env: str | None = None
    from_address: str = ""  # "" = the support address the mail was sent to
    from_name: str = "Support"
    envelope_from: str = ""  # "" = the null sender <>, so a bounce of an ack cannot loop
    templates_dir: str = "templates"
    # who may get one (gateway.ackpolicy): "none" answers any sender (a loopback demo, or an
    # intake only trusted hosts can reach); "authenticated" only a sender that a trusted
    # Authentication-Results header vouches for (DMARC pass, aligned DKIM or SPF pass)
    require: Literal["none", "authenticated"] = "none"
    trusted_authserv_ids: list[str] = []  # authserv-ids whose Authentication-Results count
    # with "authenticated": where no trusted header vouches, verify the mail's DKIM signature
    # (aligned with From) with dkimpy, looking the key up in DNS (gateway.dkimcheck)
    verify_dkim: bool = False
    dkim_nameservers: list[str] = []  # "ip" or "ip:port" for the key look-ups; [] = resolv.conf
    rate_limit: int = Field(5, ge=0)  # per normalised sender (case, +tag, gmail dots) per hour
    domain_rate_limit: int = Field(100, ge=0)  # per recipient domain per hour; 0 = no limit
    global_rate_limit: int = Field(5000, ge=0)  # acknowledgements per hour in all; 0 = no limit
    # share of global_rate_limit that senders without an earlier ticket may use: the rest stays
    # for customers with a ticket conversation while strangers flood
    stranger_share: float = Field(0.8, gt=0, le=1)
    never_to: list[str] = [  # no acknowledgement to these (globs, case-insensitive)
        "noreply@*",
        "no-reply@*",
        "no_reply@*",
        "*-noreply@*",
        "*.noreply@*",
        "donotreply@*",
        "do-not-reply@*",
        "do_not_reply@*",
        "mailer-daemon@*",
        "postmaster@*",
        "bounce@*",
        "bounces@*",
        "bounce-*@*",
        "bounces+*@*",
    ]

    _relay = field_validator("relay")(classmethod(lambda cls, v: _hostport(v)))

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        out = []
        for value in v:
            value = value.strip().lower().rstrip(".")
            if not value or any(c.isspace() or c in ";()" for c in value):
                raise ValueError(
                    f"{value!r} is not an authserv-id (a host name such as mx.example.com)"
                )
            out.append(value)
        return out

    @field_validator("dkim_nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        for value in v:
            host, sep, port = value.rpartition(":")
            if not sep or (host.count(":") and not host.endswith("]")):
                host, port = value, "53"  # a bare IPv4 or IPv6 address
            try:
                ipaddress.ip_address(host.strip("[]"))
                if not 0 < int(port) < 65536:
                    raise ValueError(port)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a name server (an IP address, optionally :port)"
                ) from None
        return v


class RetentionSection(_Model):
    """How long the spool keeps what (days; see gateway.spool.retention)."""

    enabled: bool = True  # run the background purge in the daemon
    done_raw_days: float = Field(30.0, gt=0)  # raw bytes of ticketed mail (row and maps stay)
    suppressed_raw_days: float = Field(7.0, gt=0)  # raw bytes of suppressed (automatic, loop) mail
    duplicate_raw_days: float = Field(7.0, gt=0)  # raw bytes of duplicates (the original is kept)
    dead_days: float = Field(90.0, gt=0)  # dead/quarantined mail not handled in this time goes
    maps_days: float = Field(365.0, gt=0)  # rows of finished mail, ticket and Message-ID maps
    outbox_days: float = Field(7.0, ge=1 / 24)  # sent/failed acks (>= the rate-limit hour)
    batch: int = Field(500, ge=1, le=100_000)  # rows per writer job
    interval: float = Field(3600.0, gt=0)  # seconds between purges


class Config(_Model):
    gateway: GatewaySection = GatewaySection()
    spool: SpoolSection = SpoolSection()
    smtp: SmtpSection = SmtpSection()
    health: HealthSection = HealthSection()
    rules: RulesSection = RulesSection()
    mail: MailSection = MailSection()
    retry: RetrySection = RetrySection()
    ack: AckSection = AckSection()
    retention: RetentionSection = RetentionSection()
    imap: list[ImapConfig] = []
    backends: dict[str, BackendConfigBase] = {}

    # set by load(), not by the file
    path: Path = Path("config.toml")

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else (self.base_dir / path)

    @model_validator(mode="after")
    def _worker_processes(self) -> Config:
        if self.gateway.worker_processes > 1 and not self.gateway.worker_process:
            raise ValueError("gateway.worker_processes > 1 needs gateway.worker_process = true")
        return self

    @property
    def node(self) -> str:
        return self.gateway.node or socket.gethostname() or "localhost"

    @property
    def spool_path(self) -> Path:
        return self.resolve(self.spool.path)

    @property
    def rules_dir(self) -> Path:
        return self.resolve(self.rules.dir)

    @property
    def templates_dir(self) -> Path:
        return self.resolve(self.ack.templates_dir)

    @property
    def log_file(self) -> Path | None:
        return self.resolve(self.gateway.log_file) if self.gateway.log_file else None

    def own_addresses(self) -> set[str]:
        """Recipients, ack From addresses, IMAP usernames and [gateway] own_addresses."""
        own = {a.lower() for a in self.smtp.recipients}
        own |= {a.lower() for a in self.gateway.own_addresses}
        if self.ack.from_address:
            own.add(self.ack.from_address.lower())
        own |= {i.username.lower() for i in self.imap if "@" in i.username}
        return own


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)


# keys of earlier versions, with what took their place; a config naming one gets a clear problem
REMOVED_KEYS = {
    "worker_yield_rate": "the worker no longer steps back during SMTP bursts, the OS scheduler"
    " decides (the worker runs at worker_nice)",
}


def load_config(path: Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every `file:line: problem`."""
    data, lines = load_toml(path)
    fname = str(path)
    problems: list[Problem] = []
    gateway_raw = data.get("gateway")
    if isinstance(gateway_raw, dict):
        for key, why in REMOVED_KEYS.items():
            if key in gateway_raw:
                del gateway_raw[key]
                problems.append(
                    Problem(
                        fname,
                        lines.line_of(("gateway", key)),
                        f"gateway.{key} is no longer supported: {why}; remove it",
                    )
                )
    backends_raw = data.pop("backends", {})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, fname, lines))
        cfg = None
    backends: dict[str, BackendConfigBase] = {}
    if not isinstance(backends_raw, dict):
        problems.append(Problem(fname, lines.line_of(("backends",)), "backends must be a table"))
        backends_raw = {}
    for name, raw in backends_raw.items():
        loc: tuple[str | int, ...] = ("backends", name)
        if not isinstance(raw, dict):
            problems.append(Problem(fname, lines.line_of(loc), f"backends.{name} must be a table"))
            continue
        btype = raw.get("type")
        if btype not in BACKEND_TYPES:
            problems.append(
                Problem(
                    fname,
                    lines.line_of((*loc, "type")),
                    f"backends.{name}.type: unknown backend type {btype!r};"
                    f" one of {', '.join(BACKEND_TYPES)}",
                )
            )
            continue
        try:
            backends[name] = config_model(btype).model_validate(raw)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, fname, lines, prefix=loc))
            continue
        try:
            compile_token_pattern(backends[name].subject_token)
        except ValueError as exc:
            problems.append(
                Problem(
                    fname,
                    lines.line_of((*loc, "subject_token")),
                    f"backends.{name}.subject_token: {exc}",
                )
            )
    if cfg is not None:
        names = [i.name for i in cfg.imap]
        for idx, n in enumerate(names):
            if names.index(n) != idx:
                problems.append(
                    Problem(
                        fname, lines.line_of(("imap", idx, "name")), f"duplicate imap name {n!r}"
                    )
                )
        if cfg.smtp.enabled and not cfg.smtp.recipients:
            problems.append(
                Problem(
                    fname,
                    lines.line_of(("smtp",)),
                    "smtp.recipients is empty: the listener would refuse every mail",
                )
            )
        for section in ("smtp", "health"):
            host = getattr(cfg, section).listen.rpartition(":")[0].strip("[]")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                problems.append(
                    Problem(
                        fname,
                        lines.line_of((section, "listen")),
                        f"{section}.listen: {host!r} is not an IP address",
                    )
                )
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    cfg.backends = backends
    cfg.path = path.resolve()
    return cfg


def spool_settings(
    cfg: Config, *, durable: bool = True, worker: int = 0, read_only: bool = False
) -> SpoolSettings:
    """`[spool]` and `[gateway] node` as the plain values `open_spool` takes."""
    password = None
    if cfg.spool.url:
        secret = resolve_secret(
            None,
            cfg.spool.password_file,
            cfg.spool.password_env,
            what="spool.password",
            base_dir=cfg.base_dir,
            required=False,
        )
        password = secret.get_secret_value() if secret is not None else None
    return SpoolSettings(
        path=None if cfg.spool.url else cfg.spool_path,
        url=cfg.spool.url,
        password=password,
        node=cfg.node,
        worker=worker,
        lease=cfg.spool.lease,
        durable=durable,
        read_only=read_only,
        pool_size=cfg.spool.pool_size,
    )
