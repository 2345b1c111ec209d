"""The host pool: which build hosts exist, for which platform, with how many slots.

The pool is YAML validated by ``hostpool.schema.json``. Konflux MPC's flat
``host-config`` keys (``host.<name>.address|user|platform|secret|concurrency``,
``local-platforms``, ``allowed-namespaces``) are converted to the same model
so an existing pool migrates unchanged. Every problem is reported with its
path, all at once.
"""
from __future__ import annotations

import json
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
    allowed_namespaces: tuple[str, ...] | None = None
    max_wait_seconds: int = 3600

    def hosts_for(self, platform: str) -> list[Host]:
        return [h for h in self.hosts if h.platform == platform]

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def platforms(self) -> list[str]:
        return sorted({h.platform for h in self.hosts} | set(self.local_platforms))

    def namespace_allowed(self, namespace: str) -> bool:
        return self.allowed_namespaces is None or namespace in self.allowed_namespaces


def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("hostpool.schema.json").read_text())


def _path(err: jsonschema.ValidationError) -> str:
    p = "$"
    for part in err.absolute_path:
        p += f"[{part}]" if isinstance(part, int) else f".{part}"
    return p


def validate(doc: Any) -> list[str]:
    """Every schema and consistency error of a pool document, as 'path: message'."""
    v = jsonschema.Draft202012Validator(schema())
    errors = [f"{_path(e)}: {e.message}" for e in sorted(v.iter_errors(doc), key=lambda e: list(
        map(str, e.absolute_path)))]
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
_KONFLUX_IGNORED = ("dynamic-platforms", "dynamic-pool-platforms", "instance-tag",
                    "additional-instance-tags")


def konflux_to_document(data: Mapping[str, str]) -> tuple[dict, list[str]]:
    """Convert Konflux MPC ``host-config`` data to a pool document (+ conversion errors)."""
    errors: list[str] = []
    hosts: dict[str, dict] = {}
    doc: dict[str, Any] = {"hosts": []}
    for key in sorted(data):
        value = data[key]
        if key == "local-platforms":
            doc["localPlatforms"] = [p.strip() for p in value.split(",") if p.strip()]
        elif key == "allowed-namespaces":
            doc["allowedNamespaces"] = [n.strip() for n in value.split(",") if n.strip()]
        elif key.startswith("host."):
            name, _, fld = key[len("host."):].rpartition(".")
            if not name or fld not in _KONFLUX_FIELDS:
                errors.append(f"$.{key}: unknown host key (expected host.<name>."
                              f"{'|'.join(_KONFLUX_FIELDS)})")
                continue
            h = hosts.setdefault(name, {"name": name})
            if fld in ("concurrency", "port"):
                try:
                    h[_KONFLUX_FIELDS[fld]] = int(value)
                except ValueError:
                    errors.append(f"$.{key}: {value!r} is not an integer")
            elif fld == "sudo-commands":
                h["sudoCommands"] = [c.strip() for c in value.split(",") if c.strip()]
            else:
                h[_KONFLUX_FIELDS[fld]] = value.strip()
        elif key.startswith(_KONFLUX_IGNORED):
            errors.append(f"$.{key}: dynamic (cloud) hosts are not supported by mpc")
        else:
            errors.append(f"$.{key}: unknown key")
    doc["hosts"] = [hosts[n] for n in sorted(hosts)]
    return doc, errors


def from_configmap_data(name: str, data: Mapping[str, str] | None) -> Pool:
    """A pool from ConfigMap data: key ``pool.yaml``, or Konflux flat keys."""
    data = data or {}
    if contract.POOL_KEY in data:
        return parse_yaml(data[contract.POOL_KEY])
    if not data:
        raise PoolError([f"$: ConfigMap {name} has no data (expected key {contract.POOL_KEY} "
                         "or Konflux host.<name>.* keys)"])
    doc, errors = konflux_to_document(data)
    errors += validate(doc)
    if errors:
        raise PoolError(errors)
    return from_document(doc)
