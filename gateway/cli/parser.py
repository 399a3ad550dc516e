"""The command line: every sub-command's arguments, exit codes, and `main`."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import NoReturn

from gateway.cli.check import cmd_check
from gateway.cli.commands import (
    cmd_deliver,
    cmd_erase,
    cmd_queue,
    cmd_route,
    cmd_run,
    cmd_simulate,
    cmd_spool,
    cmd_worker,
)
from gateway.cli.common import EX_SOFTWARE, EX_USAGE, _print_problems
from gateway.config import DEFAULT_CONFIG
from gateway.errors import ConfigError, GatewayError

# -- command line -------------------------------------------------------------------------------


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
