"""The commands that run something: run, _worker, route, deliver, queue, spool, erase, simulate."""

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

from gateway.cli.common import EX_NOINPUT, EX_USAGE, _load, _print_problems
from gateway.config import Config
from gateway.errors import ConfigError, GatewayError, ParseError
from gateway.limits import raise_open_files
from gateway.logs import setup_logging

if TYPE_CHECKING:
    from gateway import routing


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
