"""The `[backends.NAME]` config models: the keys every backend type shares
(`BackendConfigBase`) and each type's own.

They live here, apart from the backends, so that loading a config (the intake process, `gateway
check`, `gateway deliver`) imports no HTTP or SOAP stack (httpx, zeep, lxml): only a process that
builds a backend imports its module (gateway.backends.registry). Each backend module re-exports
its model under its own name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# superoffice-soap: EnumTicketBaseStatus (0 unknown, 1 active, 2 closed, 3 postponed, 4 deleted,
# 5 merged) and words
DEFAULT_CLOSED_STATUSES = ["2", "4", "5", "closed", "deleted", "merged"]
# whmcs: a ticket's priority
Priority = Literal["Low", "Medium", "High"]


class BackendConfigBase(BaseModel):
    """`[backends.NAME]`: keys common to every type (each type adds its own)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    url: str  # the system's endpoint or base URL
    timeout: float = Field(30.0, gt=0)  # seconds per HTTP call
    concurrency: int = Field(8, ge=1, le=256)  # calls in flight at once towards this system
    # bytes one answer may have; past it the read stops and the call fails as temporary
    max_response_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024)
    subject_token: str = "[Ticket #{ref}]"  # how acknowledgements and follow-ups name a ticket
    max_body_chars: int = Field(200_000, ge=1000)  # longer ticket text is truncated with a marker
    header_fields: list[str] = ["From", "To", "Cc", "Date"]  # header block above the body
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=0)  # per file; larger ones are listed
    max_total_attachment_bytes: int = Field(25 * 1024 * 1024, ge=0)
    blocked_extensions: list[str] = [".exe", ".bat", ".cmd", ".com", ".scr", ".pif", ".js", ".vbs"]
    # what a reply's quoted history and signature become in the ticket message (backends/text.py)
    quoted: Literal["fold", "drop", "attach", "keep"] = "fold"


class SuperOfficeSoapConfig(BackendConfigBase):
    """`[backends.NAME]` with `type = "superoffice-soap"` (besides the shared keys)."""

    type: Literal["superoffice-soap"]
    username: str  # the customer login the gateway uses; it becomes the author of every ticket
    password: SecretStr | None = None  # or password_file / password_env
    password_file: str | None = None
    password_env: str | None = None
    wsdl: str | None = None  # path (relative to the config file) or URL; default: packaged WSDL
    slevel: Literal["external", "internal", 1, 2] = "external"  # new tickets, unless a rule says
    message_slevel: Literal[1, 2] = 2  # sLevel of the messages the gateway adds (2 = external)
    default_category: Annotated[int, Field(ge=1)] = 1  # categoryId when no rule sets `category`
    # priorityId when no rule sets `priority`; -1 = let the system decide
    default_priority: Annotated[int, Field(ge=-1)] = -1
    # getTicket's ticket.status values (numbers or words, case-insensitive) that mean closed
    closed_statuses: list[str] = Field(default_factory=lambda: list(DEFAULT_CLOSED_STATUSES))


class SuperOfficeRestConfig(BackendConfigBase):
    """`[backends.NAME]` with `type = "superoffice-rest"`.

    `url` is the tenant's base, without `/api/v1` (e.g. `https://sod.superoffice.com/Cust12345`,
    or `http://127.0.0.1:8900/superoffice` for the simulator).
    """

    type: Literal["superoffice-rest"]
    auth: Literal["basic", "soticket", "bearer"] = "basic"
    # basic
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    password_env: str | None = None
    # soticket (required) and bearer (optional: SO-AppToken header, OAuth client secret)
    app_token: SecretStr | None = None
    app_token_file: str | None = None
    app_token_env: str | None = None
    ticket: SecretStr | None = None
    ticket_file: str | None = None
    ticket_env: str | None = None
    # bearer: an access token, and/or what renews it
    token: SecretStr | None = None
    token_file: str | None = None
    token_env: str | None = None
    refresh_token: SecretStr | None = None
    refresh_token_file: str | None = None
    refresh_token_env: str | None = None
    token_url: str | None = (
        None  # OAuth token endpoint, e.g. https://sod.superoffice.com/login/common/oauth/tokens
    )
    client_id: str | None = None
    # ticket defaults (a rule's [rule.ticket] overrides them)
    default_person: int | None = Field(None, ge=1)  # PersonId for senders not found (or no lookup)
    default_category: int | None = Field(None, ge=1)  # None: keep the server's default
    default_priority: int | None = Field(None, ge=1)  # None: keep the server's default
    default_slevel: Literal["external", "internal"] | None = None
    notify: bool = False  # let SuperOffice notify on new messages (off: the gateway acknowledges)
    person_cache_seconds: float = Field(3600.0, ge=0)  # how long a found PersonId is reused
    find_window_seconds: float = Field(86400.0, gt=0)  # find_existing looks back this far
    error_fields: list[str] = ["Error", "Message", "ExceptionMessage", "error_description", "error"]

    @model_validator(mode="after")
    def _credentials_present(self) -> SuperOfficeRestConfig:
        def has(name: str) -> bool:
            return any(getattr(self, f"{name}{sfx}") is not None for sfx in ("", "_file", "_env"))

        if self.auth == "basic":
            if not self.username or not has("password"):
                raise ValueError("auth = 'basic' needs username and password (or _file/_env)")
        elif self.auth == "soticket":
            if not has("ticket") or not has("app_token"):
                raise ValueError("auth = 'soticket' needs ticket and app_token (or _file/_env)")
        else:
            can_refresh = has("refresh_token")
            if can_refresh and not (self.token_url and self.client_id and has("app_token")):
                raise ValueError(
                    "refresh_token needs token_url, client_id and app_token (the client secret)"
                )
            if not has("token") and not can_refresh:
                raise ValueError("auth = 'bearer' needs token (or _file/_env) or refresh_token")
        return self


class InterServerConfig(BackendConfigBase):
    """`[backends.NAME]` for `type = "interserver"`."""

    type: Literal["interserver"]
    username: str  # the account's e-mail address (api_login username)
    password: SecretStr | None = None  # the account password or its API key; or:
    password_file: str | None = None
    password_env: str | None = None
    account_email: str | None = None  # user_email of new tickets; default: username
    default_product: str = ""  # product when no rule sets `product`
    # The "Root Password (VPS / Dedicated Server)" custom field of new tickets (the API's
    # box_auth_value, stored encrypted by InterServer). Only from here, never from a rule or a
    # mail; empty (the default) sends "".
    box_auth_value: SecretStr | None = None
    box_auth_value_file: str | None = None
    box_auth_value_env: str | None = None

    @model_validator(mode="after")
    def _password_source(self) -> InterServerConfig:
        if self.password is None and not self.password_file and not self.password_env:
            raise ValueError("set password, password_file or password_env")
        if not self.username.strip():
            raise ValueError("username (the account e-mail) must not be empty")
        return self

    @property
    def user_email(self) -> str:
        return (self.account_email or self.username).strip()


class WhmcsConfig(BackendConfigBase):
    """`[backends.NAME]` with `type = "whmcs"`; `url` is the WHMCS root or its `.../api.php`."""

    type: Literal["whmcs"]
    identifier: str = Field(min_length=1)  # API credential identifier
    secret: SecretStr | None = None  # API credential secret (or secret_file / secret_env)
    secret_file: str | None = None
    secret_env: str | None = None
    accesskey: SecretStr | None = None  # configuration.php $api_access_key: skips the IP check
    accesskey_file: str | None = None
    accesskey_env: str | None = None
    default_deptid: int = Field(1, ge=1)  # department when the rule names none
    default_priority: Priority = "Medium"
    noemail: bool = True  # keep WHMCS's own confirmation off: the gateway acknowledges
    markdown: bool = False  # ask WHMCS to render the ticket text as Markdown
    client_lookup: bool = True  # find the client by the sender's e-mail unless the rule says
    client_cache_seconds: float = Field(
        300.0, ge=0
    )  # look-up results (found or not) kept this long
    # statuses that count as closed (case-insensitive); unset: asked of GetSupportStatuses
    closed_statuses: list[str] | None = None
