"""`gateway check`: the config, rules, templates, secrets and their files, before a start."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import EX_NOINPUT, _load, _print_problems
from gateway.config import Config, config_path
from gateway.errors import ConfigError, GatewayError


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
