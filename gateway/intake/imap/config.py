"""`ImapConfig`: one `[[imap]]` section (a mailbox to fetch mail from), checked when the config
is loaded: plain text only towards loopback, one way to log in, `move_to` not a watched folder."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ImapConfig(BaseModel):
    """One `[[imap]]` section: a mailbox to fetch mail from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)  # the intake name rules can match
    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)  # default: 993 for tls, 143 otherwise
    security: Literal["tls", "starttls", "plain"] = "tls"  # plain only towards loopback
    verify: bool = True  # verify the server certificate (and host name)
    ca_file: str | None = None  # trust only this CA bundle instead of the system's
    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: str | None = None  # a bare name is looked up in $CREDENTIALS_DIRECTORY first
    password_env: str | None = None
    auth: Literal["password", "xoauth2"] = "password"
    oauth2_token_file: str | None = None  # XOAUTH2 access token, re-read on every connection
    oauth2_token_command: str | list[str] | None = None  # prints the token on stdout
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    after: Literal["move", "seen", "delete"] = "move"  # what happens once a mail is stored
    move_to: str = "Processed"  # created when missing
    poll_interval: float = Field(60.0, gt=0)  # seconds between searches without IDLE
    idle_timeout: float = Field(25 * 60.0, gt=0, le=29 * 60.0)  # IDLE is re-issued after this
    batch: int = Field(50, ge=1, le=1000)  # messages fetched per round trip
    max_size: int = Field(50 * 1024 * 1024, ge=1024)  # larger mail is left in the folder
    timeout: float = Field(60.0, gt=0)  # seconds for connecting and for each command

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if ":" in v or any(c.isspace() for c in v):
            raise ValueError("an imap name must not contain ':' or white space")
        return v

    @field_validator("folders")
    @classmethod
    def _folders_ok(cls, v: list[str]) -> list[str]:
        if any(not f.strip() for f in v):
            raise ValueError("folder names must not be empty")
        if len(set(v)) != len(v):
            raise ValueError("folders must not repeat")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ImapConfig:
        if self.security == "plain" and not _is_loopback(self.host):
            raise ValueError(
                f'security = "plain" is refused towards {self.host!r}: it would send the '
                'password in clear; use "tls" or "starttls" (plain is only for loopback)'
            )
        if self.port is None:
            self.port = 993 if self.security == "tls" else 143
        secrets = [k for k in ("password", "password_file", "password_env") if getattr(self, k)]
        tokens = [k for k in ("oauth2_token_file", "oauth2_token_command") if getattr(self, k)]
        if self.auth == "password":
            if not secrets:
                raise ValueError("set one of password, password_file or password_env")
            if len(secrets) > 1:
                raise ValueError(f"set only one of {', '.join(secrets)}")
            if tokens:
                raise ValueError(f'{tokens[0]} needs auth = "xoauth2"')
        else:
            if len(tokens) != 1:
                raise ValueError(
                    'auth = "xoauth2" needs exactly one of oauth2_token_file or '
                    "oauth2_token_command"
                )
            if secrets:
                raise ValueError(f'{secrets[0]} is not used with auth = "xoauth2"')
        if self.after == "move":
            if not self.move_to.strip():
                raise ValueError("move_to must not be empty")
            if self.move_to in self.folders:
                raise ValueError(f"move_to {self.move_to!r} is also a watched folder")
        return self

    def server_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)
