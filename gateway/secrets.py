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
