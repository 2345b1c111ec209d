"""The host pool: which build hosts exist, for which platform, with how many slots.

The pool is YAML validated by ``hostpool.schema.json``. Konflux MPC's flat
``host-config`` keys (``host.<name>.address|user|platform|secret|concurrency``,
``local-platforms``, ``allowed-namespaces``) are converted to the same model
so an existing pool migrates unchanged: lists may have trailing commas and
backslash line continuations, ``local``/``localhost`` are local platforms,
platforms may carry a flavour (``linux-m2xlarge/arm64``) and allowed
namespaces are regular expressions matched against the whole name (in both
forms). Every problem is reported with its path, all at once.

Dynamic platforms (``dynamic``: cloud VMs launched per build, ``Dynamic``)
come from the same document; Konflux's ``dynamic-platforms``,
``dynamic-pool-platforms``, ``instance-tag``, ``additional-instance-tags`` and
``dynamic.<platform with - for />.<key>`` keys map to them
(``_KONFLUX_DYNAMIC_FIELDS``); Konflux keys mpc has no use for are ignored
with a warning.

A host with ``drain: true`` gets no new builds; the ones it runs finish and
release their slots normally. Konflux's flat keys have no equivalent (a
Konflux pool drains a host by removing it, which mpc handles too: see
``slots``), so there is no ``host.<name>.drain`` key.
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
    drain: bool = False     # no new builds; running ones finish and release normally
    builder: str = contract.BUILDER_CONTAINER   # or BUILDER_HOST: the build script runs as root

    @property
    def known_hosts_line(self) -> str | None:
        if not self.host_key:
            return None
        target = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{target} {self.host_key}"


@dataclass(frozen=True)
class AwsSettings:
    """EC2 settings of a dynamic platform (``$defs/aws`` in the schema)."""

    region: str
    ami: str
    instance_type: str
    key_name: str
    credentials_secret: str
    endpoint: str | None = None
    ca_bundle: str | None = None        # PEM: trusted for the endpoint instead of public CAs
    subnet: str | None = None
    security_group_id: str | None = None
    security_group: str | None = None
    instance_profile: str | None = None
    disk_gib: int = 40
    iops: int | None = None
    throughput: int | None = None
    spot: bool = False
    spot_max_price: str | None = None
    user_data: str | None = None


@dataclass(frozen=True)
class Dynamic:
    """A platform served by VMs launched on demand (``$defs/dynamic``)."""

    platform: str
    provider: str
    secret: str
    max_instances: int
    ssh_user: str = "ec2-user"
    max_instances_per_namespace: int | None = None
    min_idle: int = 0
    max_age_seconds: int = 86400
    max_builds_per_vm: int = 1
    boot_timeout_seconds: int = 600
    launch_attempts: int = 3
    sudo_commands: tuple[str, ...] = ()
    limits: tuple[tuple[str, int], ...] = ()
    aws: AwsSettings | None = None

    def vm_host(self, name: str, address: str, host_key: str) -> Host:
        """One VM of this platform as a pool host, so the static hosts' SSH path serves it."""
        return Host(name=name, address=address, user=self.ssh_user, secret=self.secret,
                    platform=self.platform, concurrency=self.max_builds_per_vm,
                    host_key=host_key, sudo_commands=self.sudo_commands, limits=self.limits)


@dataclass(frozen=True)
class Pool:
    hosts: tuple[Host, ...] = ()
    local_platforms: tuple[str, ...] = ()
    allowed_namespaces: tuple[str, ...] | None = None  # regular expressions, full match
    max_wait_seconds: int = 3600
    warnings: tuple[str, ...] = ()  # 'path: message' for what was read but is ignored
    dynamic: tuple[Dynamic, ...] = ()
    instance_tag: str | None = None
    additional_instance_tags: tuple[tuple[str, str], ...] = ()
    layer_cache: tuple[str, ...] = ()   # regular expressions of namespaces with a layer cache
    look_ahead: bool = False    # provision builds a PipelineRun will create (glue/predict.py)

    def dynamic_for(self, platform: str) -> Dynamic | None:
        return next((d for d in self.dynamic if d.platform == platform), None)

    def hosts_for(self, platform: str) -> list[Host]:
        return [h for h in self.hosts if h.platform == platform]

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def platforms(self) -> list[str]:
        return sorted({h.platform for h in self.hosts} | set(self.local_platforms)
                      | {d.platform for d in self.dynamic})

    def layer_cache_for(self, namespace: str) -> bool:
        """Whether builds of ``namespace`` keep a layer cache on the hosts (``layerCache``)."""
        return any(re.fullmatch(p, namespace) for p in self.layer_cache)

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
    """The namespace lists' entries that are no regular expression, with their paths."""
    if not isinstance(doc, dict):
        return []
    cache = doc.get("layerCache")
    lists = (("$.allowedNamespaces", doc.get("allowedNamespaces")),
             ("$.layerCache.namespaces", cache.get("namespaces") if isinstance(cache, dict) else None))
    errors = []
    for path, entries in lists:
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            if not isinstance(entry, str):
                continue  # the schema reports it
            try:
                re.compile(entry)
            except re.error as e:
                errors.append(f"{path}[{i}]: {entry!r} is not a valid regular expression: {e}")
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
    return errors + _dynamic_errors(doc, local)


def _dynamic_errors(doc: dict, local: set[str]) -> list[str]:
    """Consistency of the dynamic platforms (the schema checked each entry)."""
    errors: list[str] = []
    static = {h["platform"] for h in doc.get("hosts", [])}
    seen: dict[str, int] = {}
    entries = doc.get("dynamic", [])
    if entries and "instanceTag" not in doc:
        errors.append("$.instanceTag: required when the pool has dynamic platforms (a value "
                      "unique to this installation in the cloud account: the sweep terminates "
                      "every VM carrying it that no record accounts for)")
    for i, d in enumerate(entries):
        p = d["platform"]
        if p in seen:
            errors.append(f"$.dynamic[{i}].platform: duplicate dynamic platform {p!r} "
                          f"(also $.dynamic[{seen[p]}])")
        seen.setdefault(p, i)
        if p in local:
            errors.append(f"$.dynamic[{i}].platform: {p!r} is also a local platform")
        if p in static:
            errors.append(f"$.dynamic[{i}].platform: {p!r} also has static hosts")
        if d.get("minIdle", 0) > d["maxInstances"]:
            errors.append(f"$.dynamic[{i}].minIdle: {d['minIdle']} is more than maxInstances "
                          f"({d['maxInstances']})")
    return errors


def _aws(a: dict) -> AwsSettings:
    return AwsSettings(
        region=a["region"], ami=a["ami"], instance_type=a["instanceType"], key_name=a["keyName"],
        credentials_secret=a["credentialsSecret"], endpoint=a.get("endpoint"),
        ca_bundle=a.get("caBundle"), subnet=a.get("subnet"),
        security_group_id=a.get("securityGroupId"),
        security_group=a.get("securityGroup"), instance_profile=a.get("instanceProfile"),
        disk_gib=a.get("diskGiB", 40), iops=a.get("iops"), throughput=a.get("throughput"),
        spot=a.get("spot", False) or "spotMaxPrice" in a, spot_max_price=a.get("spotMaxPrice"),
        user_data=a.get("userData"))


def _dynamic(d: dict) -> Dynamic:
    return Dynamic(
        platform=d["platform"], provider=d["provider"], secret=d["secret"],
        max_instances=d["maxInstances"], ssh_user=d.get("sshUser", "ec2-user"),
        max_instances_per_namespace=d.get("maxInstancesPerNamespace"),
        min_idle=d.get("minIdle", 0), max_age_seconds=d.get("maxAgeSeconds", 86400),
        max_builds_per_vm=d.get("maxBuildsPerVM", 1),
        boot_timeout_seconds=d.get("bootTimeoutSeconds", 600),
        launch_attempts=d.get("launchAttempts", 3),
        sudo_commands=tuple(d.get("sudoCommands", ())),
        limits=tuple(sorted(d.get("limits", {}).items())),
        aws=_aws(d["aws"]) if "aws" in d else None)


def from_document(doc: Any) -> Pool:
    errors = validate(doc)
    if errors:
        raise PoolError(errors)
    hosts = tuple(Host(
        name=h["name"], address=h["address"], user=h["user"], secret=h["secret"],
        platform=h["platform"], concurrency=h["concurrency"], port=h.get("port", 22),
        host_key=h.get("hostKey"), sudo_commands=tuple(h.get("sudoCommands", ())),
        limits=tuple(sorted(h.get("limits", {}).items())),
        drain=h.get("drain", False),
        builder=h.get("builder", contract.BUILDER_CONTAINER)) for h in doc["hosts"])
    allowed = doc.get("allowedNamespaces")
    return Pool(hosts=hosts, local_platforms=tuple(doc.get("localPlatforms", ())),
                allowed_namespaces=tuple(allowed) if allowed is not None else None,
                max_wait_seconds=doc.get("maxWaitSeconds", 3600),
                dynamic=tuple(_dynamic(d) for d in doc.get("dynamic", ())),
                instance_tag=doc.get("instanceTag"),
                additional_instance_tags=tuple(sorted(doc.get("additionalInstanceTags", {}).items())),
                layer_cache=tuple((doc.get("layerCache") or {}).get("namespaces", ())),
                look_ahead=doc.get("lookAhead", False))


def parse_yaml(text: str) -> Pool:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PoolError([f"$: not valid YAML: {e}"]) from None
    return from_document(doc)


_KONFLUX_FIELDS = {"address": "address", "user": "user", "platform": "platform",
                   "secret": "secret", "concurrency": "concurrency", "host-key": "hostKey",
                   "port": "port", "sudo-commands": "sudoCommands"}
# Konflux's global keys of dynamic (cloud) hosts, converted by _konflux_dynamic.
_KONFLUX_DYNAMIC_GLOBALS = ("dynamic-platforms", "dynamic-pool-platforms", "instance-tag",
                            "additional-instance-tags")
# dynamic.<platform>.<key>: (where it goes: "field" of the entry or "aws.field", kind)
_KONFLUX_DYNAMIC_FIELDS = {
    "type": ("provider", "str"), "ssh-secret": ("secret", "str"),
    "max-instances": ("maxInstances", "int"), "sudo-commands": ("sudoCommands", "list"),
    "allocation-timeout": ("bootTimeoutSeconds", "int"), "concurrency": ("maxBuildsPerVM", "int"),
    "max-age": ("maxAgeSeconds", "minutes"),
    "region": ("aws.region", "str"), "ami": ("aws.ami", "str"),
    "instance-type": ("aws.instanceType", "str"), "key-name": ("aws.keyName", "str"),
    "aws-secret": ("aws.credentialsSecret", "str"), "security-group": ("aws.securityGroup", "str"),
    "security-group-id": ("aws.securityGroupId", "str"), "subnet-id": ("aws.subnet", "str"),
    "spot-price": ("aws.spotMaxPrice", "str"), "instance-profile-name": ("aws.instanceProfile", "str"),
    "instance-profile-arn": ("aws.instanceProfile", "str"), "disk": ("aws.diskGiB", "int"),
    "iops": ("aws.iops", "int"), "throughput": ("aws.throughput", "int"),
    "user-data": ("aws.userData", "raw"),
}
_KONFLUX_PROVIDERS = {"aws": "aws"}
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
    dynamic: dict[str, str] = {}
    hosts: dict[str, dict] = {}
    doc: dict[str, Any] = {"hosts": []}
    for key in sorted(data):
        value = data[key]
        if key == "local-platforms":
            doc["localPlatforms"] = _konflux_list(value)
        elif key == "allowed-namespaces":
            doc["allowedNamespaces"] = _konflux_list(value)
        elif key in _KONFLUX_DYNAMIC_GLOBALS or key.startswith("dynamic."):
            dynamic[key] = value
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
    doc["hosts"] = [hosts[n] for n in sorted(hosts)]
    if dynamic:
        doc.update(_konflux_dynamic(dynamic, errors, warnings))
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
    errors += konflux_paths(validate(doc), doc)
    if errors:
        raise PoolError(errors)
    return dataclasses.replace(from_document(doc), warnings=tuple(warnings))


def _konflux_dynamic(data: Mapping[str, str], errors: list[str], warnings: list[str]) -> dict:
    """Konflux's dynamic keys as the pool document's ``instanceTag``,
    ``additionalInstanceTags`` and ``dynamic`` entries (errors and warnings appended)."""
    doc: dict[str, Any] = {}
    pooled = _konflux_list(data.get("dynamic-pool-platforms", ""))
    listed = list(dict.fromkeys(_konflux_list(data.get("dynamic-platforms", "")) + pooled))
    if "instance-tag" in data:
        doc["instanceTag"] = _konflux_value(data["instance-tag"])
    if "additional-instance-tags" in data:
        tags = {}
        for item in _konflux_list(data["additional-instance-tags"]):
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                errors.append(f"$.additional-instance-tags: {item!r} is not key=value")
            tags[k.strip()] = v.strip()
        doc["additionalInstanceTags"] = tags
    by_key = {p.replace("/", "-"): p for p in listed}
    entries: dict[str, dict] = {p: {"platform": p} for p in listed}
    skipped: set[str] = set()
    for key in sorted(k for k in data if k.startswith("dynamic.")):
        plat, _, fld = key[len("dynamic."):].rpartition(".")
        if plat not in by_key:
            warnings.append(f"$.{key}: ignored: {plat or '(none)'} is not listed in "
                            "dynamic-platforms or dynamic-pool-platforms")
            continue
        if fld == "instance-tag":
            warnings.append(f"$.{key}: ignored: mpc tags every VM with the pool's instance-tag "
                            "and its platform")
            continue
        if fld not in _KONFLUX_DYNAMIC_FIELDS:
            warnings.append(f"$.{key}: ignored: mpc has no use for dynamic key {fld!r}")
            continue
        target, kind = _KONFLUX_DYNAMIC_FIELDS[fld]
        raw = data[key]
        if kind == "raw":
            value: Any = str(raw)
        elif kind == "list":
            value = _konflux_list(raw)
        elif kind in ("int", "minutes"):
            try:
                value = int(_konflux_value(raw)) * (60 if kind == "minutes" else 1)
            except ValueError:
                errors.append(f"$.{key}: {raw!r} is not an integer")
                continue
        else:
            value = _konflux_value(raw)
        if fld == "type":
            if value not in _KONFLUX_PROVIDERS:
                warnings.append(f"$.{key}: provider {value!r} is not supported yet (supported: "
                                f"{', '.join(_KONFLUX_PROVIDERS)}); {by_key[plat]} is not served")
                skipped.add(by_key[plat])
                continue
            value = _KONFLUX_PROVIDERS[value]
        entry = entries[by_key[plat]]
        if target.startswith("aws."):
            entry.setdefault("aws", {})[target[4:]] = value
        else:
            entry[target] = value
    for p in pooled:
        entries[p].setdefault("maxBuildsPerVM", 1)
    doc["dynamic"] = [entries[p] for p in listed if p not in skipped]
    return doc


_DOC_PATH = re.compile(r"^\$\.dynamic\[(\d+)\](\.aws)?(?:\.([A-Za-z]+))?: (.*)$")
_REQUIRED = re.compile(r"^'([A-Za-z]+)' is a required property$")


def konflux_paths(errors: list[str], doc: dict) -> list[str]:
    """Errors of a converted Konflux pool with the flat keys' paths for dynamic entries
    (``$.dynamic.linux-arm64.ami``, not ``$.dynamic[0].aws.ami``)."""
    back: dict[str, str] = {}
    for k, (target, _) in _KONFLUX_DYNAMIC_FIELDS.items():
        back.setdefault(target, k)
    out = []
    for e in errors:
        m = _DOC_PATH.match(e)
        entries = doc.get("dynamic") or []
        if not m or int(m.group(1)) >= len(entries):
            out.append(e)
            continue
        plat = entries[int(m.group(1))]["platform"].replace("/", "-")
        field, msg = m.group(3), m.group(4)
        req = _REQUIRED.match(msg)
        if req and not field:
            field, msg = req.group(1), "required but not set"
        target = ("aws." if m.group(2) else "") + (field or "")
        key = back.get(target)
        out.append(f"$.dynamic.{plat}.{key}: {msg}" if key else
                   f"$.dynamic.{plat} ({target or 'entry'}): {msg}")
    return out
