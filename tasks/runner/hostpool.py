"""The host pool: which build hosts exist, for which platform, with how many slots.

The pool is YAML validated by ``hostpool.schema.json``. Konflux MPC's flat
``host-config`` keys (``host.<name>.address|user|platform|secret|concurrency``,
``local-platforms``, ``allowed-namespaces``) are converted to the same model
so an existing pool migrates unchanged: lists may have trailing commas and
backslash line continuations, ``local``/``localhost`` are local platforms,
platforms may carry a flavour (``linux-m2xlarge/arm64``) and allowed
namespaces are regular expressions matched against the whole name (in both
forms). Keys only dynamic (cloud) hosts use are ignored with a warning
(``Pool.warnings``). Every problem is reported with its path, all at once.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

import jsonschema
import yaml

from . import contract


class PoolError(ValueError):
    """A malformed pool; ``errors`` lists every problem as 'path: message'."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid host pool: " + "; ".join(errors))


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str
    secret: str
    platform: str
    concurrency: int
    port: int = 22
    host_key: str | None = None
    sudo_commands: tuple[str, ...] = ()
    limits: tuple[tuple[str, int], ...] = ()

    @property
    def known_hosts_line(self) -> str | None:
        if not self.host_key:
            return None
        target = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{target} {self.host_key}"


@dataclass(frozen=True)
class Pool:
    hosts: tuple[Host, ...] = ()
    local_platforms: tuple[str, ...] = ()
    allowed_namespaces: tuple[str, ...] | None = None  # regular expressions, full match
    max_wait_seconds: int = 3600
    warnings: tuple[str, ...] = ()  # 'path: message' for what was read but is ignored

    def hosts_for(self, platform: str) -> list[Host]:
        return [h for h in self.hosts if h.platform == platform]

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def platforms(self) -> list[str]:
        return sorted({h.platform for h in self.hosts} | set(self.local_platforms))

    def namespace_allowed(self, namespace: str) -> bool:
        """Whether some allowedNamespaces entry, a regular expression, matches all of
        ``namespace`` (a plain name matches only itself); True without the list."""
        if self.allowed_namespaces is None:
            return True
        return any(re.fullmatch(p, namespace) for p in self.allowed_namespaces)


def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("hostpool.schema.json").read_text())


def _path(err: jsonschema.ValidationError) -> str:
    p = "$"
    for part in err.absolute_path:
        p += f"[{part}]" if isinstance(part, int) else f".{part}"
    return p


def _message(err: jsonschema.ValidationError) -> str:
    # Definitions with "x-expected" say in words what a pattern means.
    expected = err.schema.get("x-expected") if isinstance(err.schema, dict) else None
    if err.validator == "pattern" and expected:
        return f"{err.instance!r} is not {expected}"
    return err.message


def _regex_errors(doc: Any) -> list[str]:
    allowed = doc.get("allowedNamespaces") if isinstance(doc, dict) else None
    errors = []
    for i, entry in enumerate(allowed if isinstance(allowed, list) else ()):
        if not isinstance(entry, str):
            continue  # the schema reports it
        try:
            re.compile(entry)
        except re.error as e:
            errors.append(f"$.allowedNamespaces[{i}]: {entry!r} is not a valid regular "
                          f"expression: {e}")
    return errors


def validate(doc: Any) -> list[str]:
    """Every schema and consistency error of a pool document, as 'path: message'."""
    v = jsonschema.Draft202012Validator(schema())
    errors = [f"{_path(e)}: {_message(e)}" for e in sorted(v.iter_errors(doc), key=lambda e: list(
        map(str, e.absolute_path)))]
    errors += _regex_errors(doc)
    if errors or not isinstance(doc, dict):
        return errors
    seen: dict[str, int] = {}
    for i, h in enumerate(doc.get("hosts", [])):
        if h["name"] in seen:
            errors.append(f"$.hosts[{i}].name: duplicate host name {h['name']!r} "
                          f"(also $.hosts[{seen[h['name']]}])")
        seen.setdefault(h["name"], i)
    local = set(doc.get("localPlatforms", []))
    for i, h in enumerate(doc.get("hosts", [])):
        if h["platform"] in local:
            errors.append(f"$.hosts[{i}].platform: {h['platform']!r} is also a local platform")
    return errors


def from_document(doc: Any) -> Pool:
    errors = validate(doc)
    if errors:
        raise PoolError(errors)
    hosts = tuple(Host(
        name=h["name"], address=h["address"], user=h["user"], secret=h["secret"],
        platform=h["platform"], concurrency=h["concurrency"], port=h.get("port", 22),
        host_key=h.get("hostKey"), sudo_commands=tuple(h.get("sudoCommands", ())),
        limits=tuple(sorted(h.get("limits", {}).items()))) for h in doc["hosts"])
    allowed = doc.get("allowedNamespaces")
    return Pool(hosts=hosts, local_platforms=tuple(doc.get("localPlatforms", ())),
                allowed_namespaces=tuple(allowed) if allowed is not None else None,
                max_wait_seconds=doc.get("maxWaitSeconds", 3600))


def parse_yaml(text: str) -> Pool:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PoolError([f"$: not valid YAML: {e}"]) from None
    return from_document(doc)


_KONFLUX_FIELDS = {"address": "address", "user": "user", "platform": "platform",
                   "secret": "secret", "concurrency": "concurrency", "host-key": "hostKey",
                   "port": "port", "sudo-commands": "sudoCommands"}
# Keys that only matter for dynamic (cloud) hosts, which mpc does not have yet.
_KONFLUX_DYNAMIC_LISTS = ("dynamic-platforms", "dynamic-pool-platforms",
                          "additional-instance-tags")
_KONFLUX_DYNAMIC_GLOBALS = ("instance-tag",)
_DYNAMIC = "ignored until dynamic hosts exist"
# A backslash that ends a line (or the value): Konflux's line continuation.
_CONTINUATION = re.compile(r"\\(?=\s|$)")


def _konflux_value(value: Any) -> str:
    return _CONTINUATION.sub("", str(value)).strip()


def _konflux_list(value: Any) -> list[str]:
    """A Konflux comma list: items trimmed, empty items (trailing comma) dropped."""
    return [v.strip() for v in _CONTINUATION.sub("", str(value)).split(",") if v.strip()]


def konflux_to_document(data: Mapping[str, str]) -> tuple[dict, list[str], list[str]]:
    """Convert Konflux MPC ``host-config`` data to a pool document, conversion
    errors and warnings (keys that are read but ignored)."""
    errors: list[str] = []
    warnings: list[str] = []
    dynamic: dict[str, list[str]] = {}
    hosts: dict[str, dict] = {}
    doc: dict[str, Any] = {"hosts": []}
    for key in sorted(data):
        value = data[key]
        if key == "local-platforms":
            doc["localPlatforms"] = _konflux_list(value)
        elif key == "allowed-namespaces":
            doc["allowedNamespaces"] = _konflux_list(value)
        elif key in _KONFLUX_DYNAMIC_LISTS:
            warnings.append(f"$.{key}: {_DYNAMIC}: {', '.join(_konflux_list(value))}")
        elif key in _KONFLUX_DYNAMIC_GLOBALS:
            warnings.append(f"$.{key}: {_DYNAMIC}: {_konflux_value(value)}")
        elif key.startswith("dynamic."):
            platform, _, fld = key[len("dynamic."):].rpartition(".")
            dynamic.setdefault(f"dynamic.{platform}" if platform else "dynamic", []).append(fld)
        elif key.startswith("host."):
            name, _, fld = key[len("host."):].rpartition(".")
            if not name or fld not in _KONFLUX_FIELDS:
                errors.append(f"$.{key}: unknown host key (expected host.<name>."
                              f"{'|'.join(_KONFLUX_FIELDS)})")
                continue
            h = hosts.setdefault(name, {"name": name})
            if fld in ("concurrency", "port"):
                try:
                    h[_KONFLUX_FIELDS[fld]] = int(_konflux_value(value))
                except ValueError:
                    errors.append(f"$.{key}: {value!r} is not an integer")
            elif fld == "sudo-commands":
                h["sudoCommands"] = _konflux_list(value)
            else:
                h[_KONFLUX_FIELDS[fld]] = _konflux_value(value)
        else:
            errors.append(f"$.{key}: unknown key")
    for prefix, fields in dynamic.items():
        warnings.append(f"$.{prefix}.*: {_DYNAMIC}: {len(fields)} "
                        f"key{'s' if len(fields) != 1 else ''} ({', '.join(sorted(fields))})")
    doc["hosts"] = [hosts[n] for n in sorted(hosts)]
    return doc, errors, warnings


def from_configmap_data(name: str, data: Mapping[str, str] | None) -> Pool:
    """A pool from ConfigMap data: key ``pool.yaml``, or Konflux flat keys."""
    data = data or {}
    if contract.POOL_KEY in data:
        return parse_yaml(data[contract.POOL_KEY])
    if not data:
        raise PoolError([f"$: ConfigMap {name} has no data (expected key {contract.POOL_KEY} "
                         "or Konflux host.<name>.* keys)"])
    doc, errors, warnings = konflux_to_document(data)
    errors += validate(doc)
    if errors:
        raise PoolError(errors)
    return dataclasses.replace(from_document(doc), warnings=tuple(warnings))
