"""The `gateway` command: run, check, route, deliver, queue, spool, erase, simulate (DESIGN, "CLI")."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from gateway.config import Config, config_path, load_config
from gateway.errors import ConfigError, GatewayError, ParseError
from gateway.limits import raise_open_files, return_big_buffers
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
    try:
        setup_logging(cfg.gateway.log_level, cfg.gateway.log_format, cfg.log_file)
    except OSError as exc:
        print(f"gateway: cannot open the log file {cfg.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_STARTUP
    sock = _activation_socket()
    raise_open_files()
    return_big_buffers()
    role = "intake" if cfg.gateway.worker_process else "all"
    try:
        return asyncio.run(Daemon(cfg, smtp_sock=sock, role=role).serve())
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker process that `gateway run` starts (see gateway.workerproc); not for users."""
    from gateway.app import EXIT_CONFIG, Daemon

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    setup_logging(cfg.gateway.log_level, cfg.gateway.log_format, cfg.log_file)
    return_big_buffers()
    return asyncio.run(Daemon(cfg, role="worker").serve())


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
    from gateway.app import load_rule_set

    problems: list[str] = []
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    except GatewayError as exc:
        print(f"{config_path(args.config)}:0: {exc}", file=sys.stderr)
        return 1
    try:
        rules, _ = load_rule_set(cfg, tests=False)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    tested = ""
    if not args.no_tests:
        from gateway import classify, ruletests

        summary = ruletests.run_rule_tests(
            rules,
            cfg.rules_dir,
            own_addresses=cfg.own_addresses(),
            token_formats=classify.token_formats(b.subject_token for b in cfg.backends.values()),
            timezone=cfg.gateway.timezone,
        )
        problems.extend(str(p) for p in summary.problems)
        tested = f", {summary.cases} rule tests"
    # secrets must be readable, but are never printed
    from gateway.backends.registry import make_backend

    async def build() -> None:
        for name, b in cfg.backends.items():
            try:
                backend = make_backend(name, b, base_dir=cfg.base_dir)
            except GatewayError as exc:
                problems.append(f"{cfg.path}:0: backends.{name}: {exc}")
                continue
            await backend.aclose()

    asyncio.run(build())
    from gateway.app import relay_password
    from gateway.secrets import resolve_secret

    try:
        relay_password(cfg)
    except GatewayError as exc:
        problems.append(f"{cfg.path}:0: {exc}")
    for icfg in cfg.imap:
        if icfg.auth == "password":
            try:
                resolve_secret(
                    icfg.password,
                    icfg.password_file,
                    icfg.password_env,
                    what=f"imap {icfg.name} password",
                    base_dir=cfg.base_dir,
                )
            except GatewayError as exc:
                problems.append(f"{cfg.path}:0: {exc}")
    _warn_permissions(cfg)
    _warn_ack_policy(cfg)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    print(
        f"{cfg.path}: ok: {len(cfg.backends)} backends, {len(rules.rule_names)} rules,"
        f" {len(cfg.imap)} IMAP mailboxes{tested}"
    )
    return 0


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


def _secret_files(cfg: Config) -> list[tuple[str, Path]]:
    """(dotted key, path) of every secret read from a file."""
    import os

    from pydantic import BaseModel

    out: list[tuple[str, Path]] = []
    creds = os.environ.get("CREDENTIALS_DIRECTORY")

    def walk(model: BaseModel, where: str) -> None:
        fields = type(model).model_fields
        for key in fields:
            base = key.removesuffix("_file")
            value = getattr(model, key)
            if key.endswith("_file") and f"{base}_env" in fields and isinstance(value, str):
                path = Path(value)
                if not path.is_absolute():
                    if creds and "/" not in value and (Path(creds) / value).exists():
                        path = Path(creds) / value
                    else:
                        path = cfg.base_dir / path
                out.append((f"{where}.{key}" if where else key, path))
            elif isinstance(value, BaseModel):
                walk(value, f"{where}.{key}" if where else key)

    walk(cfg.ack, "ack")
    for i, icfg in enumerate(cfg.imap):
        walk(icfg, f"imap[{i}]")
    for bname, bcfg in cfg.backends.items():
        walk(bcfg, f"backends.{bname}")
    return out


def _warn_permissions(cfg: Config) -> None:
    """Warn (never fail) about secrets that other users of the machine can read."""
    try:
        mode = cfg.path.stat().st_mode
    except OSError:
        return
    inline = _inline_secrets(cfg)
    if inline and mode & 0o004:
        print(
            f"{cfg.path}:0: warning: the file is world-readable and holds inline secrets"
            f" ({', '.join(inline)}); chmod 640 it or move the secrets to *_file / *_env /"
            " systemd credentials",
            file=sys.stderr,
        )
    for key, path in _secret_files(cfg):
        try:
            fmode = path.stat().st_mode
        except OSError:
            continue  # unreadable sources are reported as problems
        if fmode & 0o004:
            print(
                f"{cfg.path}:0: warning: {key}: the secret file {path} is world-readable;"
                " chmod 600 it",
                file=sys.stderr,
            )


def _warn_ack_policy(cfg: Config) -> None:
    """Warn (never fail) when acknowledgements answer any sender on an intake that strangers can
    reach: forged senders would make the gateway send mail to anyone (backscatter, spam)."""
    import ipaddress

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
    from gateway import routing
    from gateway.ackpolicy import apply_policy
    from gateway.app import ack_policy, load_rule_set
    from gateway.mail import parse
    from gateway.models import Envelope

    try:
        cfg = _load(args)
        rules, _ = load_rule_set(cfg, tests=False)  # the dry run is how a failing case is studied
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    raw = Path(args.message).read_bytes() if args.message != "-" else sys.stdin.buffer.read()
    try:
        mail = parse(raw)
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
    now = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=tz)
    ctx = routing.context(mail, env, now.astimezone(tz), cfg.own_addresses())
    followup = _followup_from_spool(cfg, rules, mail, env, ctx)
    decision = routing.route(rules, mail, env, ctx, followup)
    # the worker's own acknowledgement policy (hourly limits are counted when it is queued)
    decision, _verdict = apply_policy(decision, mail, env, ack_policy(cfg))
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
    import sqlite3

    from gateway import classify, routing
    from gateway.spool.sqlite import thread_lookup, ticket_by_ref

    tokens = classify.token_formats(b.subject_token for b in cfg.backends.values())
    ref = routing.subject_token(mail, tokens)
    unknown = routing.Followup.unknown_token(ref) if ref is not None else routing.Followup()
    path = cfg.spool_path
    if not path.exists():
        return unknown
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return unknown
    try:
        if ref is not None:
            # as the worker does: the ref is looked up preferring the backend the rules pick
            prefer = routing.preferred_backend(rules, mail, env, ctx) or None
            known = ticket_by_ref(conn, ref, prefer)
            if known:
                return routing.Followup(
                    ref, known[0], f"follow-up by subject token of ticket {ref}"
                )
            return unknown
        hit = thread_lookup(conn, classify.thread_ids(mail))
        if hit is not None:
            note = f"follow-up by In-Reply-To/References of ticket {hit[1]}"
            return routing.Followup(hit[1], hit[0], note)
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return unknown


def cmd_deliver(args: argparse.Namespace) -> int:
    from gateway.intake.pipe import EX_TEMPFAIL, deliver

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EX_TEMPFAIL  # the MTA keeps the mail until the config is fixed
    setup_logging(cfg.gateway.log_level, cfg.gateway.log_format)
    return deliver(
        cfg.spool_path,
        sys.stdin.buffer,
        rcpts=args.rcpt or [],
        mail_from=args.mail_from or "",
        max_size=cfg.smtp.max_size,
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
    }


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.spool.sqlite import SqliteSpool

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    spool = SqliteSpool(cfg.spool_path)
    try:
        if args.qcmd == "ls":
            rows = spool.list_sync(args.state)
            if args.json:
                print(json.dumps([_row_json(r) for r in rows], ensure_ascii=False))
            else:
                for r in rows:
                    when = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(r.envelope.received_at)
                    )
                    detail = r.ticket_ref or r.last_error.split("\n", 1)[0][:80]
                    print(
                        f"{r.id:>7} {r.state:<10} {when} {r.envelope.intake:<8} {r.rule or '-':<12} {detail}"
                    )
            return 0
        if args.qcmd == "show":
            row = spool.get_sync(args.id, with_raw=args.raw)
            if row is None:
                print(f"no message {args.id}", file=sys.stderr)
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
                spool.retry_sync(None, all_dead=True)
                if args.all_dead
                else spool.retry_sync(args.id)
            )
            print(f"requeued {n}")
            return 0 if n or args.all_dead else 1
        if args.qcmd == "drop":
            n = spool.drop_sync(args.id)
            print(f"dropped {n}")
            return 0 if n else 1
        if args.qcmd == "stats":
            from gateway.spool.retention import stats

            out: dict[str, Any] = dict(spool.counts_sync())  # per state, flat (scripts use it)
            oldest = spool.oldest_pending_sync()
            out["oldest_waiting_age_s"] = int(time.time() - oldest) if oldest else 0
            out["spool_bytes"] = cfg.spool_path.stat().st_size if cfg.spool_path.exists() else 0
            out.update(spool.read_sync(lambda conn: stats(conn, time.time(), cfg.spool_path)))
            print(json.dumps(out, indent=2))
            return 0
    finally:
        spool.close_sync()
    return 2


def cmd_spool(args: argparse.Namespace) -> int:
    """`gateway spool backup DEST`: a consistent copy while the daemon runs."""
    import sqlite3

    from gateway.spool.migrations import online_backup

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    src_path = cfg.spool_path
    if not src_path.exists():
        print(f"gateway: no spool at {src_path}", file=sys.stderr)
        return 1
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{src_path.stem}-{time.strftime('%Y%m%dT%H%M%S')}.sqlite"
    # A connection of its own that only reads: no migration, no writes to the live spool. The
    # daemon keeps writing meanwhile (WAL); the copy is the spool as of one commit.
    try:
        src = sqlite3.connect(src_path, timeout=30.0, isolation_level=None)
        try:
            src.execute("PRAGMA busy_timeout = 30000")
            size = online_backup(src, dest, mode_of=src_path)
        finally:
            src.close()
    except (OSError, sqlite3.Error) as exc:
        print(f"gateway: backup of {src_path} to {dest} failed: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {src_path} to {dest} ({size} bytes, checked)")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """`gateway erase --address ADDR [--dry-run]`: every stored mail and map entry of ADDR."""
    from gateway.spool.migrations import backup_path
    from gateway.spool.retention import compact, erase_job, find_erasure
    from gateway.spool.sqlite import SqliteSpool

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    address = args.address.strip().lower()
    if "@" not in address:
        print(f"gateway: {args.address!r} is not an e-mail address", file=sys.stderr)
        return 1
    if not cfg.spool_path.exists():
        print(f"gateway: no spool at {cfg.spool_path}", file=sys.stderr)
        return 1
    spool = SqliteSpool(cfg.spool_path)
    try:
        found = spool.read_sync(lambda conn: find_erasure(conn, address))
        er = found if args.dry_run else spool.write_sync(erase_job(address, found))
    finally:
        spool.close_sync()
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
        if compact(cfg.spool_path):
            print("  compacted the spool file (VACUUM) and truncated its WAL")
        else:
            print(
                "  warning: the WAL could not be truncated (the daemon held a read); its old"
                " pages are overwritten at the next checkpoint: run the command again",
                file=sys.stderr,
            )
            rc = 1
    backups = sorted(p for v in range(1, 100) if (p := backup_path(cfg.spool_path, v)).exists())
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="ticket-gateway: mail in, tickets out")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c",
            "--config",
            help="config file (default $GATEWAY_CONFIG or /etc/ticket-gateway/config.toml)",
        )
        return sp

    sp = with_config(sub.add_parser("run", help="run the daemon"))
    sp.set_defaults(func=cmd_run)
    sp = with_config(sub.add_parser("_worker", help=argparse.SUPPRESS))
    sp.set_defaults(func=cmd_worker)
    sp = with_config(sub.add_parser("check", help="validate config and rules"))
    sp.add_argument(
        "--no-tests",
        action="store_true",
        help="skip the rule tests (<rules dir>/tests/*.toml)",
    )
    sp.set_defaults(func=cmd_check)
    sp = with_config(sub.add_parser("route", help="dry run: classify and route one message"))
    sp.add_argument("message")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--rcpt", action="append", default=[])
    sp.add_argument("--from", dest="mail_from")
    sp.add_argument("--intake", default="smtp")
    sp.add_argument("--at", help="ISO time to route at (business-hours rules)")
    sp.set_defaults(func=cmd_route)
    sp = with_config(sub.add_parser("deliver", help="spool one message from stdin (MTA pipe)"))
    sp.add_argument("--rcpt", action="append", default=[])
    sp.add_argument("--from", dest="mail_from")
    sp.set_defaults(func=cmd_deliver)
    sp = with_config(sub.add_parser("queue", help="inspect and repair the spool"))
    qs = sp.add_subparsers(dest="qcmd", required=True)
    q = qs.add_parser("ls")
    q.add_argument("--state")
    q.add_argument("--json", action="store_true")
    q = qs.add_parser("show")
    q.add_argument("id", type=int)
    q.add_argument("--raw", action="store_true", help="print the stored message bytes")
    q = qs.add_parser("retry")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("id", type=int, nargs="?")
    g.add_argument("--all-dead", action="store_true")
    q = qs.add_parser("drop")
    q.add_argument("id", type=int)
    qs.add_parser("stats")
    for q in qs.choices.values():
        q.add_argument("-c", "--config", default=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_queue)
    sp = with_config(sub.add_parser("spool", help="spool maintenance: backup"))
    ss = sp.add_subparsers(dest="scmd", required=True)
    q = ss.add_parser("backup", help="consistent copy of the spool while the daemon runs")
    q.add_argument("dest", help="file to write (replaced atomically), or a directory")
    for q in ss.choices.values():
        q.add_argument("-c", "--config", default=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_spool)
    sp = with_config(
        sub.add_parser("erase", help="remove every stored mail and map entry of one address")
    )
    sp.add_argument("--address", required=True)
    sp.add_argument("--dry-run", action="store_true", help="print what would go; change nothing")
    sp.set_defaults(func=cmd_erase)
    sp = sub.add_parser("simulate", help="run the ticket-system simulators and the SMTP sink")
    sp.add_argument("--listen", default="127.0.0.1:8900")
    sp.add_argument("--smtp", default="127.0.0.1:2526")
    sp.set_defaults(func=cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
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
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
