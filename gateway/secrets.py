"""Secrets from config: inline, from a file, from an environment variable or systemd credentials.

A secret is always held as `pydantic.SecretStr` so that printing a config, an error or a log line
never shows it. `password_file = "imap"` (a bare name) is looked up in `$CREDENTIALS_DIRECTORY`
first, which is where systemd's LoadCredential= puts it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from gateway.errors import GatewayError


class SecretError(GatewayError):
    """A secret named in config cannot be read; the message names the source, never the value."""


def resolve_secret(
    inline: SecretStr | None,
    file: str | None,
    env: str | None,
    *,
    what: str,
    base_dir: Path | None = None,
    required: bool = True,
) -> SecretStr | None:
    """Return the secret from the first source that is set (inline, file, env)."""
    if inline is not None:
        return inline
    if file:
        path = Path(file)
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute():
            if creds and "/" not in file and (Path(creds) / file).exists():
                path = Path(creds) / file
            elif base_dir is not None:
                path = base_dir / path
        try:
            return SecretStr(path.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise SecretError(f"{what}: cannot read secret file {path}: {exc.strerror}") from exc
    if env:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"{what}: environment variable {env} is not set")
        return SecretStr(value)
    if required:
        raise SecretError(f"{what}: no secret given (set it inline, as *_file or as *_env)")
    return None


# -- systemd LoadCredential= for `gateway check` run by hand ---------------------------------------

UNIT_NAME = "ticket-gateway.service"
# where systemd looks for a unit and its drop-ins, most specific first (systemd.unit(5))
UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
# where `LoadCredential=ID` without a path, or with a relative one, is searched (systemd.exec(5))
CREDSTORE_DIRS = (
    "/etc/credstore",
    "/run/credstore",
    "/usr/local/lib/credstore",
    "/usr/lib/credstore",
)


def unit_files(unit: Path | None = None, root: Path = Path("/")) -> list[Path]:
    """The unit file and its drop-ins, in the order systemd applies them."""
    if unit is not None:
        base = [unit] if unit.exists() else []
        dropin_dirs = [unit.parent / f"{unit.name}.d"]
    else:
        found = [root / d.lstrip("/") / UNIT_NAME for d in UNIT_DIRS]
        base = [p for p in found if p.exists()][:1]
        dropin_dirs = [root / d.lstrip("/") / f"{UNIT_NAME}.d" for d in reversed(UNIT_DIRS)]
    dropins: dict[str, Path] = {}
    for d in dropin_dirs:  # a drop-in of the same name in a more specific directory wins
        if d.is_dir():
            for f in sorted(d.glob("*.conf")):
                dropins[f.name] = f
    return base + [dropins[n] for n in sorted(dropins)]


def unit_credentials(files: list[Path], root: Path = Path("/")) -> dict[str, tuple[Path, str]]:
    """credential ID -> (the file systemd would load, the `LoadCredential=` line and its file).

    `LoadCredential=ID:PATH`; a relative or missing PATH is searched in the credstore
    directories; a directory PATH gives one credential `ID_FILE` per file in it; an empty
    `LoadCredential=` resets the list (as systemd does).
    """
    out: dict[str, tuple[Path, str]] = {}
    for unit in files:
        try:
            text = unit.read_text(encoding="utf-8")
        except OSError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            key, sep, value = line.strip().partition("=")
            if not sep or key.strip() != "LoadCredential":
                continue
            value = value.strip()
            if not value:
                out.clear()
                continue
            cid, _, src = value.partition(":")
            where = f"LoadCredential={value} ({unit}:{n})"
            if src.startswith("/"):
                path = root / src.lstrip("/")
            else:
                name = src or cid
                cands = [root / d.lstrip("/") / name for d in CREDSTORE_DIRS]
                path = next((c for c in cands if c.exists()), cands[0])
            if path.is_dir():
                try:
                    for f in sorted(path.iterdir()):
                        if f.is_file():
                            out[f"{cid}_{f.name}"] = (f, where)
                except OSError:
                    out[cid] = (path, where)
            else:
                out[cid] = (path, where)
    return out
