"""config.example.toml documents every key of the config model, each with a comment.

The test walks the pydantic models (`gateway.config.Config`, every `[[imap]]` key, and the model of
every backend type in the registry) and looks for each key in the example, either set or
commented out (`# key = value  # what it does`). A key added to a model without a line in the
example fails here, naming the section and the key.
"""

from __future__ import annotations

import re
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from gateway.backends.config import BackendConfigBase
from gateway.backends.registry import BACKEND_TYPES, config_model
from gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

# the commented-out block listing the keys every backend type has
SHARED = "backends.NAME"
# set by the loader, not by the file
NOT_KEYS = {("", "path"), ("", "backends")}  # backends: checked per type below

_HEADER = re.compile(r"^\s*(?:#\s*)?\[\[?\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*(#\s*)?([A-Za-z_][A-Za-z0-9_\-]*)\s*=\s*(.*)$")


@dataclass
class Section:
    name: str  # "gateway", "imap", "backends.whmcs", ...
    keys: dict[str, bool] = field(default_factory=dict)  # key -> has an explanatory comment
    type: str | None = None  # for backends.NAME: its `type`


def _has_comment(rest: str) -> bool:
    """True when the text after `key =` carries a `#` comment (outside a string)."""
    in_str: str | None = None
    for ch in rest:
        if in_str:
            if ch == in_str:
                in_str = None
        elif ch in "\"'":
            in_str = ch
        elif ch == "#":
            return True
    return False


def scan_example(text: str) -> list[Section]:
    """Sections of the example with the keys each sets or shows commented out."""
    sections: list[Section] = [Section("")]
    lines = text.splitlines()
    prev_comment = False  # the line above is a comment-only line (explaining what follows)
    last_key: str | None = None
    for line in lines:
        stripped = line.strip()
        head = _HEADER.match(line)
        if head and not _KEY.match(line):
            name = head.group(1).replace('"', "")
            sections.append(Section(name))
            prev_comment, last_key = False, None
            continue
        m = _KEY.match(line)
        sec = sections[-1]
        if m:
            key, rest = m.group(2), m.group(3)
            commented = _has_comment(rest)
            sec.keys[key] = sec.keys.get(key, False) or commented or prev_comment
            if key == "type" and sec.name.startswith("backends.") and sec.name != SHARED:
                tm = re.match(r"\s*\"([^\"]+)\"", rest)
                if tm:
                    sec.type = tm.group(1)
            last_key = key
            prev_comment = False
            continue
        if stripped.startswith("#"):
            # a comment line under a key (continuation, e.g. after a multi-line list) explains it
            if last_key is not None and line.startswith((" ", "\t")):
                sec.keys[last_key] = True
            prev_comment = True
            continue
        if not stripped:
            prev_comment, last_key = False, None
            continue
        # continuation of a multi-line value: a comment on it explains the key
        if last_key is not None and _has_comment(line):
            sec.keys[last_key] = True
    return sections


def model_keys(model: type[BaseModel], where: str = "") -> list[tuple[str, str]]:
    """(section, key) for every field, descending into nested section models."""
    out: list[tuple[str, str]] = []
    for key, info in model.model_fields.items():
        ann = info.annotation
        sub = _model_of(ann)
        if sub is not None and where == "":
            out.extend(model_keys(sub, key))
        else:
            out.append((where, key))
    return out


def _model_of(ann: object) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) is list:
        (arg,) = typing.get_args(ann)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _index(
    sections: list[Section],
) -> tuple[dict[str, dict[str, bool]], dict[str, dict[str, bool]]]:
    """(plain sections by name, backend keys by type); backend sections without a type are
    the shared-keys block and are filed under the type ""."""
    plain: dict[str, dict[str, bool]] = {}
    backends: dict[str, dict[str, bool]] = {}
    for sec in sections:
        if sec.name.startswith("backends."):
            into = backends.setdefault(sec.type or "", {})
        else:
            into = plain.setdefault(sec.name, {})
        for k, c in sec.keys.items():
            into[k] = into.get(k, False) or c
    return plain, backends


def missing_keys(text: str) -> tuple[list[str], list[str]]:
    """(keys not in the example, keys in it without a comment), as dotted names."""
    plain, backends = _index(scan_example(text))
    missing: list[str] = []
    bare: list[str] = []

    def look(where: dict[str, bool] | None, name: str, key: str) -> bool:
        if where is None or key not in where:
            return False
        if not where[key]:
            bare.append(name)
        return True

    for section, key in model_keys(Config):
        if (section, key) in NOT_KEYS:
            continue
        name = f"{section}.{key}" if section else key
        if not look(plain.get(section), name, key):
            missing.append(name)
    shared = backends.get("", {})
    for btype in BACKEND_TYPES:
        model = config_model(btype)
        for key in model.model_fields:
            name = f"backends.<{btype}>.{key}"
            if key == "type":
                if btype not in backends:
                    missing.append(f"backends: no [backends.NAME] section with type = {btype!r}")
                continue
            if look(backends.get(btype), name, key):
                continue
            if key in BackendConfigBase.model_fields and look(shared, name, key):
                continue
            missing.append(name)
    return missing, bare


def test_every_config_key_is_in_the_example() -> None:
    missing, _ = missing_keys(EXAMPLE.read_text())
    assert not missing, (
        "config.example.toml lacks these keys (set or commented out):\n" + "\n".join(missing)
    )


def test_every_key_in_the_example_has_a_comment() -> None:
    _, bare = missing_keys(EXAMPLE.read_text())
    assert not bare, "these keys in config.example.toml have no comment:\n" + "\n".join(bare)


def unknown_keys(text: str) -> list[str]:
    """Keys shown in the example (also commented out) that the model does not have: stale docs."""
    plain, backends = _index(scan_example(text))
    known: dict[str, set[str]] = {}
    for section, key in model_keys(Config):
        known.setdefault(section, set()).add(key)
    out = [
        f"{section}.{key}" if section else key
        for section, keys in plain.items()
        for key in keys
        if key not in known.get(section, set())
    ]
    for btype, keys in backends.items():
        model = config_model(btype) if btype in BACKEND_TYPES else BackendConfigBase
        out += [f"backends.<{btype or 'shared'}>.{k}" for k in keys if k not in model.model_fields]
    return out


def test_no_key_in_the_example_is_unknown_to_the_model() -> None:
    stale = unknown_keys(EXAMPLE.read_text())
    assert not stale, "config.example.toml shows keys the config model does not have:\n" + (
        "\n".join(stale)
    )


def test_the_scanner_sees_a_missing_key() -> None:
    """The check itself can fail: dropping one key's line is reported, by its dotted name."""
    text = EXAMPLE.read_text()
    cut = "\n".join(
        ln for ln in text.splitlines() if not re.match(r"\s*#?\s*drain_timeout\s*=", ln)
    )
    missing, _ = missing_keys(cut)
    assert missing == ["gateway.drain_timeout"]
    cut = "\n".join(ln for ln in text.splitlines() if not re.match(r"\s*#?\s*noemail\s*=", ln))
    assert missing_keys(cut)[0] == ["backends.<whmcs>.noemail"]
    bare = re.sub(r"(?m)^(from_name = \"Support\").*$", r"\1", text)
    assert missing_keys(bare)[1] == ["ack.from_name"]
    stale = text.replace("# move_to = ", "# move_too = ")
    assert unknown_keys(stale) == ["imap.move_too"]


def test_the_example_is_the_working_quick_start_config(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "config.toml")
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    cfg = load_config(tmp_path / "config.toml")
    assert cfg.smtp.listen == "127.0.0.1:2525"
    assert cfg.health.listen == "127.0.0.1:8025"
    assert cfg.ack.relay == "127.0.0.1:2526"
    assert cfg.spool_path == tmp_path / "var" / "gateway.sqlite"
    assert {b.type for b in cfg.backends.values()} == set(BACKEND_TYPES)
    assert all(b.url.startswith("http://127.0.0.1:8900/") for b in cfg.backends.values())
