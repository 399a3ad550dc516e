"""Ticket fields per backend type (DESIGN: "Ticket fields in rules, per backend type"): one
check per field, used at load and again for the backend finally chosen."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

BACKEND_TYPES = ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")

# --------------------------------------------------------------------------------------------
# Ticket fields per backend type (DESIGN: "Ticket fields in rules, per backend type")
# --------------------------------------------------------------------------------------------

_FieldCheck = Callable[[Any], str | None]  # error message, or None when the value is fine


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _id(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "must be an id (an integer, 1 or more)"


def _soap_priority(v: Any) -> str | None:
    if _is_int(v) and (v >= 1 or v == -1):
        return None
    return "must be a priority id (1 or more) or -1 (let SuperOffice decide)"


def _slevel(v: Any) -> str | None:
    if v in ("external", "internal") and isinstance(v, str):
        return None
    if _is_int(v) and v in (1, 2):
        return None
    return 'must be "external", "internal", 2 (external) or 1 (internal)'


def _whmcs_priority(v: Any) -> str | None:
    return None if v in ("Low", "Medium", "High") else 'must be "Low", "Medium" or "High"'


def _lookup_or_id(v: Any) -> str | None:
    if v == "lookup" or (_is_int(v) and v >= 1):
        return None
    return 'must be "lookup" (find by the sender\'s address) or an id (an integer, 1 or more)'


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _table(key_pattern: str, what: str, values: Callable[[Any], bool]) -> _FieldCheck:
    keys = re.compile(key_pattern)

    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return f"must be a table of {what}"
        for key, value in v.items():
            if not keys.fullmatch(str(key)):
                return f"key {key!r} is not {what.split(' ')[0]}"
            if not values(value):
                return f"value of {key!r} must be a string"
        return None

    return check


FIELDS: dict[str, dict[str, _FieldCheck]] = {
    "superoffice-soap": {
        "category": _id,
        "priority": _soap_priority,
        "slevel": _slevel,
        "extra": _table(r"x_\d+", "x_N → string", lambda v: isinstance(v, str)),
    },
    "superoffice-rest": {
        "category": _id,
        "priority": _id,
        "slevel": _slevel,
        "person": _lookup_or_id,
        "notify": _bool,
    },
    "interserver": {"product": _text, "box_auth_value": _text},
    "whmcs": {
        "deptid": _id,
        "priority": _whmcs_priority,
        "serviceid": _id,
        "customfields": _table(r"\d+", "id → value", lambda v: isinstance(v, str) or _is_int(v)),
        "client": _lookup_or_id,
        "noemail": _bool,
    },
}


def _field_error(backend_type: str, name: str, value: Any) -> str | None:
    checks = FIELDS.get(backend_type, {})
    if name not in checks:
        return f"{name!r} is not a {backend_type} field (those are: {', '.join(checks)})"
    return checks[name](value)
