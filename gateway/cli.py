"""The `gateway` command: run, check, route, deliver, queue, spool, erase, simulate (README, "Commands")."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

from gateway.config import DEFAULT_CONFIG, Config, config_path, load_config
from gateway.errors import ConfigError, GatewayError, ParseError
from gateway.limits import raise_open_files
from gateway.logs import setup_logging

if TYPE_CHECKING:
    from gateway import routing


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _print_problems(exc: ConfigError) -> None:
    for p in exc.problems:
        print(str(p), file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import EXIT_CONFIG, EXIT_STARTUP, Daemon

    try:
        cfg = _load(args)
        from gateway.app import load_rule_set

        load_rule_set(cfg)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    role = "intake" if cfg.gateway.worker_process else "all"
    try:
        setup_logging(cfg.gateway.log_level, cfg.gateway.log_format, cfg.log_file, role=role)
    except OSError as exc:
        print(f"gateway: cannot open the log file {cfg.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_STARTUP
    sock = _activation_socket()
    raise_open_files()
    try:
        return asyncio.run(Daemon(cfg, smtp_sock=sock, role=role).serve())
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker process that `gateway run` starts (see gateway.workerproc); not for users."""
    import logging

    from gateway.app import EXIT_CONFIG, Daemon
    from gateway.workerproc import lower_priority

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    # before any thread starts: niceness and policy are per thread, inherited by new ones
    priority = lower_priority(cfg.gateway.worker_nice, cfg.gateway.worker_scheduling)
    setup_logging(cfg.gateway.log_level, cfg.gateway.log_format, cfg.log_file, role="worker")
    logging.getLogger("gateway.workerproc").info(
        "worker_priority",
        extra={
            "fields": {
                "nice": cfg.gateway.worker_nice,
                "scheduling": cfg.gateway.worker_scheduling,
                "applied": priority or "none",
            }
        },
    )
    return asyncio.run(Daemon(cfg, role="worker", worker_index=args.index).serve())


def _activation_socket() -> Any:
    """The SMTP socket passed by systemd socket activation (LISTEN_FDS), or None."""
    import os
    import socket

    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    return socket.socket(fileno=3)


def cmd_check(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from gateway.app import load_rule_set
    from gateway.backends.registry import make_backend
    from gateway.secrets import unit_credentials, unit_files
    from gateway.tomlpos import load_toml

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    except GatewayError as exc:
        print(f"{config_path(args.config)}: {exc}", file=sys.stderr)
        return 1
    try:
        rules, _ = load_rule_set(cfg, tests=False)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    test_problems: list[str] = []  # rule test failures: `rules/tests/FILE:LINE: ...`
    tested = ""
    if not args.no_tests:
        from gateway import classify, ruletests

        summary = ruletests.run_rule_tests(
            rules,
            cfg.rules_dir,
            own_addresses=cfg.own_addresses(),
            token_formats=classify.token_formats(b.subject_token for b in cfg.backends.values()),
            timezone=cfg.gateway.timezone,
            fallback_charsets=cfg.mail.fallback_charsets,
        )
        test_problems.extend(str(p) for p in summary.problems)
        tested = f", {summary.cases} rule tests"
    _, lines = load_toml(cfg.path)
    creds_env = os.environ.get("CREDENTIALS_DIRECTORY")
    unit = Path(args.unit) if getattr(args, "unit", None) else None
    if unit is not None and not unit.is_file():
        print(f"gateway check: --unit: no such file: {unit}", file=sys.stderr)
        return EX_NOINPUT
    units = unit_files(unit) if not creds_env else []
    creds = unit_credentials(units) if units else {}
    problems: list[tuple[int, str]] = []  # (line, message) in cfg.path
    bad_sections: set[str] = set()
    for loc, model, base in _secret_sources(cfg):
        dotted = _dotted(loc)
        inline = getattr(model, base)
        file = getattr(model, f"{base}_file", None)
        env = getattr(model, f"{base}_env", None)
        if inline is not None:
            continue
        if file:
            path, how = _secret_path(cfg, file, creds_env, creds)
            key = (*loc, f"{base}_file")
            try:
                path.read_bytes()
            except OSError as exc:
                problems.append(
                    (
                        lines.line_of(key),
                        _secret_file_problem(
                            f"{dotted}.{base}_file", file, path, how, exc, creds_env, units
                        ),
                    )
                )
                bad_sections.add(dotted)
        elif env and os.environ.get(env) is None:
            problems.append(
                (
                    lines.line_of((*loc, f"{base}_env")),
                    f"{dotted}.{base}_env: environment variable {env} is not set"
                    " (under systemd: Environment= or EnvironmentFile= in a drop-in)",
                )
            )
            bad_sections.add(dotted)
    for idx, icfg in enumerate(cfg.imap):
        if icfg.auth == "xoauth2" and icfg.oauth2_token_file:
            path, how = _secret_path(cfg, icfg.oauth2_token_file, creds_env, creds)
            try:
                path.read_bytes()
            except OSError as exc:
                problems.append(
                    (
                        lines.line_of(("imap", idx, "oauth2_token_file")),
                        _secret_file_problem(
                            f"imap[{idx}].oauth2_token_file",
                            icfg.oauth2_token_file,
                            path,
                            how,
                            exc,
                            creds_env,
                            units,
                        ),
                    )
                )
    # Building each backend checks what only it knows (a WSDL, its URL). Bare-name secret files
    # found through the unit's LoadCredential= are offered to it as systemd would: in a
    # $CREDENTIALS_DIRECTORY of links, for this check only.
    with tempfile.TemporaryDirectory(prefix="gateway-check-creds-") as tmp:
        if creds and not creds_env:
            for cid, (path, _) in creds.items():
                if "/" not in cid:
                    (Path(tmp) / cid).symlink_to(path)
            os.environ["CREDENTIALS_DIRECTORY"] = tmp

        async def build() -> None:
            for name, b in cfg.backends.items():
                if f"backends.{name}" in bad_sections:
                    continue
                try:
                    backend = make_backend(name, b, base_dir=cfg.base_dir)
                except GatewayError as exc:
                    msg = str(exc)
                    if not msg.startswith(f"backends.{name}"):
                        msg = f"backends.{name}: {msg}"
                    problems.append((lines.line_of(("backends", name)), msg))
                    continue
                await backend.aclose()

        try:
            asyncio.run(build())
        finally:
            if creds and not creds_env:
                os.environ.pop("CREDENTIALS_DIRECTORY", None)
    _warn_permissions(cfg, lines, creds_env, creds)
    _warn_ack_policy(cfg)
    if problems or test_problems:
        for line, msg in sorted(problems):
            print(f"{cfg.path}:{line}: {msg}" if line else f"{cfg.path}: {msg}", file=sys.stderr)
        for problem in test_problems:
            print(problem, file=sys.stderr)
        return 1
    print(
        f"{cfg.path}: ok: {len(cfg.backends)} backends, {len(rules.rule_names)} rules,"
        f" {len(cfg.imap)} IMAP mailboxes{tested}"
    )
    return 0


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _secret_sources(cfg: Config) -> list[tuple[tuple[str | int, ...], Any, str]]:
    """(where in the file, model, key) of every secret triple key / key_file / key_env."""
    from pydantic import BaseModel

    out: list[tuple[tuple[str | int, ...], Any, str]] = []

    def walk(model: BaseModel, loc: tuple[str | int, ...]) -> None:
        fields = type(model).model_fields
        for key in fields:
            if f"{key}_file" in fields and f"{key}_env" in fields:
                out.append((loc, model, key))

    walk(cfg.ack, ("ack",))
    for i, icfg in enumerate(cfg.imap):
        if icfg.auth == "password":
            walk(icfg, ("imap", i))
    for name, bcfg in cfg.backends.items():
        walk(bcfg, ("backends", name))
    return out


def _secret_path(
    cfg: Config, value: str, creds_env: str | None, creds: dict[str, tuple[Path, str]]
) -> tuple[Path, str]:
    """Where the daemon would read a secret file, and how it was found (as `resolve_secret`)."""
    path = Path(value)
    if path.is_absolute():
        return path, ""
    if "/" not in value:
        if creds_env and (Path(creds_env) / value).exists():
            return Path(creds_env) / value, "in $CREDENTIALS_DIRECTORY"
        if value in creds:
            return creds[value][0], f"from {creds[value][1]}"
    return cfg.base_dir / path, ""


def _secret_file_problem(
    key: str,
    value: str,
    path: Path,
    how: str,
    exc: OSError,
    creds_env: str | None,
    units: list[Path],
) -> str:
    why = exc.strerror or str(exc)
    found = f" ({how})" if how else ""
    msg = f"{key}: cannot read secret file {path}{found}: {why}"
    if isinstance(exc, PermissionError):
        return msg + " (systemd reads credentials as root: run `gateway check` as root)"
    if "/" in value or Path(value).is_absolute() or how:
        return msg
    if creds_env:
        return msg + f"; not in $CREDENTIALS_DIRECTORY ({creds_env}) either"
    where = (
        f"nor named by a LoadCredential= in {', '.join(map(str, units))}"
        if units
        else "and no ticket-gateway.service unit was found"
    )
    return (
        f"{msg}; $CREDENTIALS_DIRECTORY is not set {where}: set CREDENTIALS_DIRECTORY to the"
        f" directory holding {value!r} (or name the unit with --unit FILE)"
    )


def _inline_secrets(cfg: Config) -> list[str]:
    """Dotted names of the secrets written into the config file itself (never their values)."""
    from pydantic import BaseModel, SecretStr

    found: list[str] = []

    def walk(model: BaseModel, where: str) -> None:
        for key in type(model).model_fields:
            value = getattr(model, key)
            name = f"{where}.{key}" if where else key
            if isinstance(value, SecretStr):
                found.append(name)
            elif isinstance(value, BaseModel):
                walk(value, name)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        walk(item, f"{name}[{i}]")

    walk(cfg, "")
    for bname, bcfg in cfg.backends.items():
        walk(bcfg, f"backends.{bname}")
    return found


def _warn_permissions(
    cfg: Config, lines: Any, creds_env: str | None, creds: dict[str, tuple[Path, str]]
) -> None:
    """Warn (never fail) about secrets that other users of the machine can read."""
    try:
        mode = cfg.path.stat().st_mode
    except OSError:
        return
    inline = _inline_secrets(cfg)
    if inline and mode & 0o004:
        print(
            f"{cfg.path}: warning: the file is world-readable and holds inline secrets"
            f" ({', '.join(inline)}); chmod 640 it or move the secrets to *_file / *_env /"
            " systemd credentials",
            file=sys.stderr,
        )
    for loc, model, base in _secret_sources(cfg):
        value = getattr(model, f"{base}_file", None)
        if not value or getattr(model, base) is not None:
            continue
        path, _ = _secret_path(cfg, value, creds_env, creds)
        try:
            fmode = path.stat().st_mode
        except OSError:
            continue  # unreadable sources are reported as problems
        if fmode & 0o004:
            line = lines.line_of((*loc, f"{base}_file"))
            print(
                f"{cfg.path}:{line}: warning: {_dotted(loc)}.{base}_file: the secret file {path}"
                " is world-readable; chmod 600 it",
                file=sys.stderr,
            )


def _warn_ack_policy(cfg: Config) -> None:
    """Warn (never fail) when acknowledgements answer any sender on an intake that strangers can
    reach: forged senders would make the gateway send mail to anyone (backscatter, spam)."""
    import ipaddress

    if cfg.ack.enabled and cfg.ack.verify_dkim and cfg.ack.require != "authenticated":
        print(
            f"{cfg.path}:{_line_of(cfg, ('ack', 'verify_dkim'))}: warning: ack.verify_dkim has"
            ' no effect unless ack.require = "authenticated"',
            file=sys.stderr,
        )
    if not cfg.ack.enabled or cfg.ack.require != "none":
        return
    reachable: list[str] = []
    if cfg.smtp.enabled:
        host = cfg.smtp.listen.rpartition(":")[0].strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            reachable.append(f"smtp.listen {cfg.smtp.listen}")
    reachable.extend(f"imap {i.name}" for i in cfg.imap)
    if reachable:
        print(
            f"{cfg.path}:{_line_of(cfg, ('ack', 'require'))}: warning:"
            f' acknowledgements go to any sender (ack.require = "none") while mail can come'
            f" from beyond loopback ({', '.join(reachable)}): forged senders make the gateway"
            ' mail strangers; set ack.require = "authenticated" and ack.trusted_authserv_ids'
            " (the MTA or mailbox provider that adds Authentication-Results)",
            file=sys.stderr,
        )


def _line_of(cfg: Config, loc: tuple[str, ...]) -> int:
    """The line of `loc` (or of its nearest enclosing table) in the config file; 0 unknown."""
    from gateway.tomlpos import load_toml

    try:
        _data, lines = load_toml(cfg.path)
    except Exception:
        return 0
    return lines.line_of(loc)


def cmd_route(args: argparse.Namespace) -> int:
    from gateway import dkimcheck, routing
    from gateway.ackpolicy import apply_policy, from_domain, own_dkim_wanted
    from gateway.app import ack_policy, dkim_settings, load_rule_set
    from gateway.mail import parse
    from gateway.models import Envelope

    try:
        cfg = _load(args)
        rules, _ = load_rule_set(cfg, tests=False)  # the dry run is how a failing case is studied
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    intakes = {"smtp", "pipe", *(i.name for i in cfg.imap)}
    if args.intake not in intakes:
        print(
            f"gateway route: --intake: unknown intake {args.intake!r};"
            f" one of {', '.join(sorted(intakes))}",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        raw = Path(args.message).read_bytes() if args.message != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        print(f"gateway route: cannot read {args.message}: {exc.strerror or exc}", file=sys.stderr)
        return EX_NOINPUT
    try:
        mail = parse(raw, fallback_charsets=cfg.mail.fallback_charsets)
    except ParseError as exc:
        out: dict[str, Any] = {
            "rule": "",
            "backend": "",
            "action": "suppress",
            "ticket": {},
            "followup_of": None,
            "ack": False,
            "reasons": [f"quarantine: unreadable: {exc}"],
        }
        print(json.dumps(out) if args.json else f"quarantine: unreadable: {exc}")
        return 0
    rcpts = tuple(a.lower() for a in args.rcpt) if args.rcpt else (*mail.to, *mail.cc)
    env = Envelope(
        mail_from=args.mail_from if args.mail_from is not None else mail.from_addr,
        rcpt_tos=rcpts,
        intake=args.intake,
        received_at=time.time(),
    )
    tz = ZoneInfo(cfg.gateway.timezone)
    now = args.at or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=tz)
    ctx = routing.context(mail, env, now.astimezone(tz), cfg.own_addresses())
    followup = _followup_from_spool(cfg, rules, mail, env, ctx)
    decision = routing.route(rules, mail, env, ctx, followup)
    # the worker's own acknowledgement policy (hourly limits are counted when it is queued)
    policy = ack_policy(cfg)
    dkim = None
    if own_dkim_wanted(decision, mail, env, policy):  # the worker's own DKIM check, done alike
        dkim = dkimcheck.check(raw, from_domain(mail), dkim_settings(cfg))
    decision, _verdict = apply_policy(decision, mail, env, policy, dkim)
    if args.json:
        print(json.dumps(decision.to_json(), ensure_ascii=False))
    else:
        print(f"rule:     {decision.rule}")
        print(f"backend:  {decision.backend or '-'}")
        print(f"action:   {decision.action}")
        print(f"ticket:   {json.dumps(decision.ticket, ensure_ascii=False)}")
        print(f"followup: {decision.followup_of or '-'}")
        print(f"ack:      {'yes (' + decision.ack + ')' if decision.ack else 'no'}")
        for r in decision.reasons:
            print(f"  - {r}")
    return 0


def _followup_from_spool(
    cfg: Config, rules: Any, mail: Any, env: Any, ctx: Any
) -> routing.Followup:
    """Read-only look-up of the spool's ticket and thread maps (the dry run calls nothing)."""
    from gateway import classify, routing

    tokens = classify.token_formats(b.subject_token for b in cfg.backends.values())
    ref = routing.subject_token(mail, tokens)
    unknown = routing.Followup.unknown_token(ref) if ref is not None else routing.Followup()
    if not cfg.spool.url and not cfg.spool_path.exists():
        return unknown

    async def look() -> routing.Followup:
        from gateway.config import spool_settings
        from gateway.spool import open_spool

        spool = await open_spool(spool_settings(cfg, read_only=True))
        try:
            if ref is not None:
                # as the worker does: the ref is looked up preferring the backend the rules pick
                prefer = routing.preferred_backend(rules, mail, env, ctx) or None
                known = await spool.ticket_by_ref(ref, prefer_backend=prefer)
                if known is not None:
                    return routing.Followup(
                        ref, known.backend, f"follow-up by subject token of ticket {ref}"
                    )
                return unknown
            hit = await spool.thread_lookup(classify.thread_ids(mail))
            if hit is not None:
                note = f"follow-up by In-Reply-To/References of ticket {hit.ref}"
                return routing.Followup(hit.ref, hit.backend, note)
            return unknown
        finally:
            await spool.close()

    try:
        return asyncio.run(look())
    except GatewayError:  # no spool yet, or one this gateway cannot read: no follow-up known
        return unknown


def cmd_deliver(args: argparse.Namespace) -> int:
    from gateway.intake.pipe import EX_TEMPFAIL, deliver

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EX_TEMPFAIL  # the MTA keeps the mail until the config is fixed
    setup_logging(cfg.gateway.log_level, cfg.gateway.log_format)
    from gateway.config import spool_settings

    try:
        settings = spool_settings(cfg)
    except GatewayError as exc:
        print(f"gateway deliver: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return deliver(
        settings,
        sys.stdin.buffer,
        rcpts=args.rcpt,
        mail_from=args.mail_from or "",
        max_size=cfg.smtp.max_size,
        accepted=cfg.smtp.recipients,
    )


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "intake": row.envelope.intake,
        "received_at": row.envelope.received_at,
        "size": row.size,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at,
        "last_error": row.last_error,
        "rule": row.rule,
        "backend": row.backend,
        "action": row.action,
        "ticket_ref": row.ticket_ref,
        "ticket_id": row.ticket_id,
        "message_id": row.message_id,
        "subject": row.subject,
        "uncertain": row.uncertain,
        "claimed_by": row.claimed_by,
    }


def _open_for_command(cfg: Config) -> Any:
    """The spool as the maintenance commands open it (creating or migrating it if needed)."""
    from gateway.config import spool_settings
    from gateway.spool import open_spool

    return open_spool(spool_settings(cfg))


def cmd_queue(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    if not cfg.spool.url and not cfg.spool_path.exists():
        # never create one here: as root it would belong to the wrong user
        print(
            f"gateway queue: no spool at {cfg.spool_path} (the daemon creates it when it starts)",
            file=sys.stderr,
        )
        return 1
    return asyncio.run(_queue(args, cfg))


async def _queue(args: argparse.Namespace, cfg: Config) -> int:
    spool = await _open_for_command(cfg)
    try:
        if args.qcmd == "ls":
            rows = await spool.list_messages(args.state)
            if args.json:
                print(json.dumps([_row_json(r) for r in rows], ensure_ascii=False))
            else:
                for r in rows:
                    when = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(r.envelope.received_at)
                    )
                    detail = r.ticket_ref or r.last_error.split("\n", 1)[0][:80]
                    # a mail in hand names the node (and worker process) holding its claim
                    holder = r.claimed_by if r.state == "processing" and r.claimed_by else "-"
                    print(
                        f"{r.id:>7} {r.state:<10} {when} {r.envelope.intake:<8}"
                        f" {r.rule or '-':<12} {holder:<16} {detail}"
                    )
            return 0
        if args.qcmd == "show":
            row = await spool.load(args.id, with_raw=args.raw)
            if row is None:
                print(f"gateway queue show: no message {args.id}", file=sys.stderr)
                return 1
            if args.raw and row.raw is not None:
                sys.stdout.buffer.write(row.raw)
                return 0
            data = _row_json(row)
            data["envelope"] = {
                "mail_from": row.envelope.mail_from,
                "rcpt_tos": list(row.envelope.rcpt_tos),
                "peer": row.envelope.peer,
            }
            data["progress"] = row.progress
            print(json.dumps(data, indent=2, ensure_ascii=False))
            return 0
        if args.qcmd == "retry":
            n = (
                await spool.retry(None, all_dead=True)
                if args.all_dead
                else await spool.retry(args.id)
            )
            if not n and not args.all_dead:
                print(
                    f"gateway queue retry: no deferred or dead message {args.id}", file=sys.stderr
                )
                return 1
            print(f"requeued {n}")
            return 0
        if args.qcmd == "drop":
            n = await spool.drop(args.id)
            if not n:
                print(f"gateway queue drop: no message {args.id}", file=sys.stderr)
                return 1
            print(f"dropped {n}")
            return 0
        if args.qcmd == "stats":
            counts = await spool.counts()
            out: dict[str, Any] = counts.to_dict()  # per state, flat (scripts use it)
            oldest = await spool.oldest_pending()
            out["oldest_waiting_age_s"] = int(time.time() - oldest) if oldest else 0
            if spool.engine == "sqlite":
                out["spool_bytes"] = cfg.spool_path.stat().st_size if cfg.spool_path.exists() else 0
            out.update(await spool.stats())
            print(json.dumps(out, indent=2))
            return 0
    finally:
        await spool.close()
    return 2


def cmd_spool(args: argparse.Namespace) -> int:
    """`gateway spool backup DEST`: a consistent copy while the daemon runs;
    `gateway spool copy --to postgresql://...`: a stopped SQLite spool into an empty database."""
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    if args.scmd == "copy":
        return _spool_copy(args, cfg)
    if cfg.spool.url:
        print(
            "gateway: spool backup is for a SQLite spool; back PostgreSQL up with pg_dump",
            file=sys.stderr,
        )
        return 1
    src_path = cfg.spool_path
    if not src_path.exists():
        print(f"gateway: no spool at {src_path}", file=sys.stderr)
        return 1
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{src_path.stem}-{time.strftime('%Y%m%dT%H%M%S')}.sqlite"

    async def run() -> int:
        spool = await _open_for_command(cfg)
        try:
            return int(await spool.backup(dest))
        finally:
            await spool.close()

    # The daemon keeps writing meanwhile (WAL); the copy is the spool as of one commit.
    try:
        size = asyncio.run(run())
    except (GatewayError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"gateway spool backup: {src_path} to {dest} failed: {why}", file=sys.stderr)
        return 1
    print(f"backed up {src_path} to {dest} ({size} bytes, checked)")
    return 0


def _spool_copy(args: argparse.Namespace, cfg: Config) -> int:
    """Exit 0 copied, 1 refused (target not empty, source in use, target unreachable)."""
    import os

    from gateway.spool.copy import copy_sqlite_to_postgres

    if cfg.spool.url:
        print("gateway: spool copy copies a SQLite spool ([spool] path)", file=sys.stderr)
        return 1
    if not args.to.startswith(("postgresql://", "postgres://")):
        print("gateway: --to must be a postgresql:// URL", file=sys.stderr)
        return 1
    try:
        # the target's password as libpq takes it: PGPASSWORD or ~/.pgpass
        result = copy_sqlite_to_postgres(
            cfg.spool_path, args.to, password=os.environ.get("PGPASSWORD")
        )
    except GatewayError as exc:
        print(f"gateway: spool copy refused: {exc}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{n} {t}" for t, n in result.rows.items())
    print(f"copied {cfg.spool_path} into PostgreSQL: {rows}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """`gateway erase --address ADDR [--dry-run]`: every stored mail and map entry of ADDR."""
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    address = args.address.strip().lower()
    if "@" not in address:
        print(f"gateway: {args.address!r} is not an e-mail address", file=sys.stderr)
        return 1
    if not cfg.spool.url and not cfg.spool_path.exists():
        print(f"gateway: no spool at {cfg.spool_path}", file=sys.stderr)
        return 1

    async def run() -> Any:
        spool = await _open_for_command(cfg)
        try:
            found = await spool.find_erasure(address)
            return found if args.dry_run else await spool.erase(address, found)
        finally:
            await spool.close()

    er = asyncio.run(run())
    head = "would remove (dry run, nothing changed)" if args.dry_run else "removed"
    print(f"erase {address}: {head}")
    print(f"  messages {er.messages:>6}  ({er.raw_bytes} bytes of mail)")
    print(f"  tickets  {er.tickets:>6}  (ticket map entries with this requester)")
    print(f"  threads  {er.threads:>6}  (Message-ID map entries)")
    print(f"  outbox   {er.outbox:>6}  (acknowledgements)")
    rc = 0
    if er.busy:
        print(
            f"  skipped  {len(er.busy):>6}  message(s) being processed right now"
            f" ({', '.join(map(str, er.busy))}): run the command again in a minute",
            file=sys.stderr,
        )
        rc = 1
    if not args.dry_run:
        if er.compacted:
            print("  compacted the spool file (VACUUM) and truncated its WAL")
        else:
            print(
                "  warning: the WAL could not be truncated (the daemon held a read); its old"
                " pages are overwritten at the next checkpoint: run the command again",
                file=sys.stderr,
            )
            rc = 1
    from gateway.spool.migrations import backup_path

    backups = (
        []
        if cfg.spool.url
        else sorted(p for v in range(1, 100) if (p := backup_path(cfg.spool_path, v)).exists())
    )
    for p in backups:
        print(f"  note: {p} (a copy taken before a schema upgrade) is not changed", file=sys.stderr)
    print("  note: tickets already in the ticket systems are outside the gateway: erase them there")
    return rc


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulators.server import serve_forever

    setup_logging("info", "kv")
    try:
        asyncio.run(serve_forever(args.listen, args.smtp))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"gateway simulate: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


# -- command line -------------------------------------------------------------------------------

EX_USAGE = 64  # sysexits: the command line is wrong (unknown option, bad value)
EX_NOINPUT = 66  # an input file named on the command line cannot be read
EX_SOFTWARE = 70  # a bug: an unexpected exception (one line; GATEWAY_TRACEBACK=1 shows it)

EXIT_CODES = """\
exit codes (every command):
  0   success
  1   config or rules invalid, or the command found problems / was refused (named on stderr)
  64  bad command line: unknown option, bad value (e.g. --state, --at, an id)
  66  an input file named on the command line cannot be read
  70  internal error (a bug: please report it with GATEWAY_TRACEBACK=1 output)
`gateway run` also: 2 cannot open the spool or bind a listen address, 3 a core task died.
`gateway deliver`: 0 stored, 65 not a mail, 67 recipient not accepted, 75 try again later."""


class _Parser(argparse.ArgumentParser):
    """argparse with one line on stderr and exit 64 (EX_USAGE) for a bad command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _iso_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO time: {value!r} (e.g. 2026-12-07T09:30 or 2026-12-07T09:30+01:00)"
        ) from None


def _address(value: str) -> str:
    addr = value.strip().strip("<>").strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in addr):
        raise argparse.ArgumentTypeError(f"not an e-mail address: {value!r}")
    return addr


def _sender(value: str) -> str:
    """--from: an address, or empty / <> for the null sender (bounces)."""
    if value.strip() in ("", "<>"):
        return ""
    return _address(value)


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {value!r}")
    return value


def _message_id(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a message id: {value!r})")
    return int(value)


def _states() -> list[str]:
    from gateway.spool.base import State

    return [s.value for s in State]


def build_parser() -> argparse.ArgumentParser:
    from gateway import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="gateway",
        description="ticket-gateway: mail in (SMTP, IMAP, MTA pipe), tickets out (SuperOffice,"
        " InterServer, WHMCS).",
        epilog="examples:\n"
        "  gateway check -c /etc/ticket-gateway/config.toml\n"
        "  gateway -c config.toml route --json mail.eml\n"
        "  gateway queue ls --state dead\n\n"
        "`-c FILE` may stand before or after the command; default: $GATEWAY_CONFIG, else"
        f" {DEFAULT_CONFIG}.\n\n" + EXIT_CODES,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"gateway (ticket-gateway) {__version__}")
    config_help = f"config file (default: $GATEWAY_CONFIG, else {DEFAULT_CONFIG})"
    p.add_argument("-c", "--config", metavar="FILE", help=config_help)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
    sub.required = True

    def command(
        name: str, help: str, examples: str, exits: str = "", config: bool = True
    ) -> argparse.ArgumentParser:
        epilog = "examples:\n" + examples
        if exits:
            epilog += "\n\nexit codes:\n" + exits
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=fmt)
        if config:
            # SUPPRESS: a -c given before the command is not overwritten by this default
            sp.add_argument(
                "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help
            )
        return sp

    sp = command(
        "run",
        "run the daemon (SMTP/IMAP intake, worker, acknowledgements, /healthz)",
        "  gateway run -c /etc/ticket-gateway/config.toml",
        "  0 clean stop (SIGTERM/SIGINT)\n  1 config or rules invalid\n"
        "  2 cannot open the spool or bind a listen address\n  3 a core task died",
    )
    sp.set_defaults(func=cmd_run)

    sp = command(
        "check",
        "validate config, rules, templates and secrets; print file:line: message per problem",
        "  gateway check -c /etc/ticket-gateway/config.toml\n"
        "  CREDENTIALS_DIRECTORY=/etc/ticket-gateway/credentials gateway check",
        "  0 no problems\n  1 problems (one `file:line: message` per line on stderr)",
    )
    sp.add_argument(
        "--unit",
        metavar="FILE",
        help="systemd unit whose LoadCredential= lines locate bare-name secret files when"
        " $CREDENTIALS_DIRECTORY is not set (default: the installed ticket-gateway.service"
        " and its drop-ins)",
    )
    sp.add_argument(
        "--no-tests",
        action="store_true",
        help="skip the rule tests (<rules dir>/tests/*.toml)",
    )
    sp.set_defaults(func=cmd_check)

    sp = command(
        "route",
        "dry run: classify and route one message, call nothing, explain the decision",
        "  gateway route -c config.toml mail.eml\n"
        "  gateway route --json --rcpt billing@example.com --at 2026-12-07T20:00 mail.eml\n"
        "  cat mail.eml | gateway route -",
        "  0 routed (the decision is printed)\n  1 config or rules invalid\n"
        "  64 bad option value (--at, --rcpt, --from, --intake)\n  66 MESSAGE cannot be read",
    )
    sp.add_argument("message", metavar="MESSAGE", help="the mail file (RFC 5322); - reads stdin")
    sp.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: rule, backend, action, ticket, followup_of, ack, reasons",
    )
    sp.add_argument(
        "--rcpt",
        action="append",
        default=[],
        type=_address,
        metavar="ADDR",
        help="envelope recipient (repeatable); default: the To and Cc addresses",
    )
    sp.add_argument(
        "--from",
        dest="mail_from",
        type=_sender,
        metavar="ADDR",
        help="envelope sender; default: the From address",
    )
    sp.add_argument(
        "--intake",
        default="smtp",
        metavar="NAME",
        help="intake the mail came through: smtp (default), pipe or an [[imap]] name",
    )
    sp.add_argument(
        "--at",
        type=_iso_time,
        metavar="ISO-TIME",
        help="route as if at this time (weekday/time rules); without an offset: [gateway] timezone",
    )
    sp.set_defaults(func=cmd_route)

    sp = command(
        "deliver",
        "store one message from stdin in the spool (an MTA pipe transport: Postfix, Exim)",
        "  gateway deliver -c /etc/ticket-gateway/config.toml --from alice@example.org \\\n"
        "      --rcpt support@example.com < mail.eml",
        "  0  stored durably in the spool\n"
        "  64 (EX_USAGE) bad command line (no --rcpt, a bad address)\n"
        "  65 (EX_DATAERR) the input is not a mail or exceeds [smtp] max_size\n"
        "  67 (EX_NOUSER) a recipient is not in [smtp] recipients: nothing stored\n"
        "  75 (EX_TEMPFAIL) the spool or the config cannot be read or written: try later",
    )
    sp.add_argument(
        "--rcpt",
        action="append",
        required=True,
        type=_address,
        metavar="ADDR",
        help="envelope recipient (repeatable, at least one); each must be in [smtp] recipients",
    )
    sp.add_argument(
        "--from",
        dest="mail_from",
        type=_sender,
        metavar="ADDR",
        help="envelope sender (Postfix ${sender}); empty or <> for a bounce",
    )
    sp.set_defaults(func=cmd_deliver)

    sp = command(
        "queue",
        "inspect and repair the spool: ls, show, retry, drop, stats",
        "  gateway queue ls --state dead\n  gateway queue show 42 --raw > 42.eml\n"
        "  gateway queue retry --all-dead\n  gateway queue drop 42\n  gateway queue stats",
        "  0 done\n  1 config invalid, or no such message / nothing to retry\n"
        "  64 bad command line (unknown state, an id that is not a number)",
    )
    qs = sp.add_subparsers(dest="qcmd", metavar="SUBCOMMAND", title="subcommands")
    qs.required = True
    sp.set_defaults(func=cmd_queue)

    def qcommand(name: str, help: str) -> argparse.ArgumentParser:
        q = qs.add_parser(name, help=help, description=help)
        q.add_argument(
            "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help
        )
        return q

    q = qcommand("ls", "list messages (newest 1000), optionally of one state")
    q.add_argument(
        "--state",
        choices=_states(),
        metavar="STATE",
        help=f"only this state: {', '.join(_states())}",
    )
    q.add_argument("--json", action="store_true", help="print a JSON list")
    q = qcommand("show", "show one message's envelope, state, progress and last error")
    q.add_argument("id", type=_message_id, metavar="ID", help="message id (from `queue ls`)")
    q.add_argument("--raw", action="store_true", help="print the stored message bytes")
    q = qcommand("retry", "put a deferred or dead message back in the queue now")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("id", type=_message_id, nargs="?", metavar="ID", help="message id")
    g.add_argument("--all-dead", action="store_true", help="every dead message")
    q = qcommand("drop", "remove one message from the spool")
    q.add_argument("id", type=_message_id, metavar="ID", help="message id")
    qcommand("stats", "counts per state, oldest waiting age, spool size (JSON)")

    sp = command(
        "spool",
        "spool maintenance: backup (SQLite), copy (SQLite to PostgreSQL)",
        "  gateway spool backup /var/backups/ticket-gateway/\n"
        "  gateway spool backup /srv/backup/spool.sqlite\n"
        "  PGPASSWORD=... gateway spool copy --to postgresql://gateway@db:5432/gateway",
        "  0 copied (and checked)\n"
        "  1 config invalid, no spool, the copy failed, or copy refused (target not empty)",
    )
    ss = sp.add_subparsers(dest="scmd", metavar="SUBCOMMAND", title="subcommands")
    ss.required = True
    q = ss.add_parser(
        "backup",
        help="consistent copy of the spool while the daemon runs",
        description="consistent copy of the spool while the daemon runs",
    )
    q.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    q.add_argument(
        "dest",
        metavar="DEST",
        help="file to write (replaced atomically), or a directory (a dated file in it)",
    )
    q = ss.add_parser(
        "copy",
        help="copy a stopped SQLite spool into an empty PostgreSQL spool",
        description="copy a stopped SQLite spool into an empty PostgreSQL spool (queue, maps,"
        " outbox, counters); the password as libpq takes it: PGPASSWORD or ~/.pgpass",
    )
    q.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    q.add_argument(
        "--to",
        required=True,
        metavar="postgresql://USER@HOST:PORT/DB",
        help="the empty PostgreSQL spool to fill (no password in the URL)",
    )
    sp.set_defaults(func=cmd_spool)

    sp = command(
        "erase",
        "remove every stored mail and map entry of one address (data-protection requests)",
        "  gateway erase --address alice@example.org --dry-run\n"
        "  gateway erase --address alice@example.org",
        "  0 erased\n  1 config invalid, no spool, or some mails were busy (run it again)\n"
        "  64 not an e-mail address",
    )
    sp.add_argument(
        "--address",
        required=True,
        type=_address,
        metavar="ADDR",
        help="the e-mail address to erase",
    )
    sp.add_argument("--dry-run", action="store_true", help="print what would go; change nothing")
    sp.set_defaults(func=cmd_erase)

    sp = command(
        "simulate",
        "run the four ticket-system simulators and an SMTP sink for acknowledgements (demo, tests)",
        "  gateway simulate\n  gateway simulate --listen 127.0.0.1:9900 --smtp 127.0.0.1:9925",
        "  0 stopped (Ctrl-C)\n  1 cannot listen\n  64 bad IP:PORT",
        config=False,
    )
    sp.add_argument(
        "--listen",
        default="127.0.0.1:8900",
        type=_hostport,
        metavar="IP:PORT",
        help="HTTP simulators and /_sim API (default 127.0.0.1:8900)",
    )
    sp.add_argument(
        "--smtp",
        default="127.0.0.1:2526",
        type=_hostport,
        metavar="IP:PORT",
        help="SMTP sink for acknowledgements (default 127.0.0.1:2526)",
    )
    sp.set_defaults(func=cmd_simulate)
    return p


def _worker_parser() -> argparse.ArgumentParser:
    """`gateway _worker -c FILE`: the worker process `gateway run` starts; not in --help."""
    p = _Parser(prog="gateway _worker", add_help=False)
    p.add_argument("-c", "--config")
    p.add_argument("--index", type=int, default=0)  # which of `worker_processes`
    p.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        args = _worker_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or port the command needs: say which, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"gateway {getattr(args, 'cmd', '_worker')}:{where} {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        if os.environ.get("GATEWAY_TRACEBACK"):
            raise
        what = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"gateway {getattr(args, 'cmd', '_worker')}: internal error: {type(exc).__name__}: {what}"
            " (GATEWAY_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return EX_SOFTWARE


if __name__ == "__main__":
    raise SystemExit(main())
