"""Tekton bundles: which exist, what they hold, and the rules they must obey.

``bundles/bundles.yaml`` declares the bundles by name and lists their objects
as ``Kind/name``. The objects themselves are found by scanning the Tekton
catalog (``tasks/**/*.yaml``) for ``tekton.dev`` documents, so a Task can move
between folders without touching the declaration, and a new Task that no
bundle lists is an error instead of being silently left out.

Bundles are written only by the real ``tkn bundle push`` (see
``bundles_push``); this module checks, before anything is pushed, what the
Tekton bundles resolver would refuse later (more than 20 objects, a kind that
is not lower-case singular, two objects with the same kind and name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

# What the bundles resolver enforces (tektoncd/pipeline: MaximumBundleObjects).
MAX_OBJECTS = 20
TEKTON_GROUP = "tekton.dev"
TEKTON_KINDS = ("Task", "Pipeline", "StepAction")
# One path component of an OCI repository name (distribution reference grammar).
REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
# A Kubernetes object name as Tekton objects use it (DNS-1123 subdomain).
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class BundleError(Exception):
    """A bundle declaration or catalog the resolver (or we) would refuse."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TektonObject:
    """One ``tekton.dev`` document of the catalog."""

    kind: str
    name: str
    api_version: str
    path: Path            # file it came from
    index: int            # document index inside that file
    body: dict = field(compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class Bundle:
    name: str
    description: str
    objects: list[str]                      # "Kind/name" as declared
    resolved: list[TektonObject] = field(default_factory=list)

    def files(self) -> list[Path]:
        """The source files, each once, in declaration order."""
        seen: dict[Path, None] = {}
        for o in self.resolved:
            seen.setdefault(o.path)
        return list(seen)


@dataclass
class Spec:
    path: Path
    source: str
    bundles: list[Bundle]

    def bundle(self, name: str) -> Bundle:
        for b in self.bundles:
            if b.name == name:
                return b
        raise KeyError(name)


# --- loading -------------------------------------------------------------------------

def load_spec(path: Path) -> Spec:
    """Read the declaration; structural mistakes are reported all at once."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BundleError(f"{path}: cannot read bundle declaration: {e}") from e
    problems: list[str] = []
    if not isinstance(raw, dict) or not isinstance(raw.get("bundles"), list):
        raise BundleError(f"{path}: expected a mapping with a `bundles:` list")
    source = raw.get("source", "")
    if not isinstance(source, str):
        problems.append(f"{path}: `source` must be a string (repository URL)")
        source = ""
    bundles: list[Bundle] = []
    seen: set[str] = set()
    for i, b in enumerate(raw["bundles"]):
        where = f"{path}: bundles[{i}]"
        if not isinstance(b, dict):
            problems.append(f"{where}: expected a mapping with name, description, objects")
            continue
        unknown = set(b) - {"name", "description", "objects"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        name = b.get("name")
        if not isinstance(name, str) or not REPO_COMPONENT.match(name):
            problems.append(f"{where}: name {name!r} is not a valid OCI repository component "
                            "(lower-case letters, digits, '.', '_', '-')")
            continue
        where = f"{path}: bundle {name}"
        if name in seen:
            problems.append(f"{where}: declared twice")
        seen.add(name)
        objs = b.get("objects")
        if not isinstance(objs, list) or not objs or not all(isinstance(o, str) for o in objs):
            problems.append(f"{where}: `objects` must be a non-empty list of 'Kind/name' strings")
            continue
        for o in objs:
            if o.count("/") != 1 or not all(o.split("/")):
                problems.append(f"{where}: object {o!r} is not 'Kind/name'")
        desc = b.get("description", "")
        if not isinstance(desc, str):
            problems.append(f"{where}: `description` must be a string")
            desc = ""
        bundles.append(Bundle(name=name, description=" ".join(desc.split()), objects=list(objs)))
    if problems:
        raise BundleError(problems)
    return Spec(path=Path(path), source=source, bundles=bundles)


def _documents(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        raise BundleError(f"{path}: not valid YAML: {e}") from e
    yield from enumerate(docs)


def scan_catalog(root: Path) -> list[TektonObject]:
    """Every ``tekton.dev`` document under ``root`` (``*.yaml``/``*.yml``), sorted by path."""
    found: list[TektonObject] = []
    files = sorted(p for pat in ("*.yaml", "*.yml") for p in Path(root).rglob(pat) if p.is_file())
    for f in files:
        for i, doc in _documents(f):
            if not isinstance(doc, dict):
                continue
            api = str(doc.get("apiVersion", ""))
            if api.split("/")[0] != TEKTON_GROUP:
                continue
            name = (doc.get("metadata") or {}).get("name")
            found.append(TektonObject(kind=str(doc.get("kind", "")), name=str(name or ""),
                                      api_version=api, path=f, index=i, body=doc))
    return found


# --- the rules -------------------------------------------------------------------

def resolver_problems(bundle_name: str, objects: list[TektonObject]) -> list[str]:
    """What tektoncd/pipeline's bundle resolver would refuse, plus what makes lookups ambiguous."""
    problems = []
    if len(objects) > MAX_OBJECTS:
        problems.append(f"bundle {bundle_name}: {len(objects)} objects, the Tekton bundles "
                        f"resolver accepts at most {MAX_OBJECTS}; split it")
    seen: dict[tuple[str, str], TektonObject] = {}
    for o in objects:
        low = o.kind.lower()
        if not o.kind or low.endswith("s") or o.kind not in TEKTON_KINDS:
            problems.append(f"bundle {bundle_name}: {o.path}: kind {o.kind!r} is not one of "
                            f"{', '.join(TEKTON_KINDS)} (the resolver needs a singular kind; "
                            f"tkn stores it lower-case)")
        if not o.name or not OBJECT_NAME.match(o.name):
            problems.append(f"bundle {bundle_name}: {o.path}: metadata.name {o.name!r} is "
                            "missing or not a valid object name")
        k = (low, o.name)
        if k in seen:
            problems.append(f"bundle {bundle_name}: {o.kind}/{o.name} twice "
                            f"({seen[k].path} and {o.path}); kind/name must be unique")
        seen[k] = o
        if o.api_version not in ("tekton.dev/v1", "tekton.dev/v1beta1"):
            problems.append(f"bundle {bundle_name}: {o.path}: apiVersion {o.api_version!r}; "
                            "use tekton.dev/v1")
    return problems


def resolve(spec: Spec, catalog: list[TektonObject]) -> Spec:
    """Attach catalog objects to bundles; refuse anything the push must not go ahead with.

    Problems found: a declared object that is not in the catalog, a catalog
    object in no bundle or in two, the same kind/name defined twice in the
    catalog, a source file whose objects are split across bundles, and every
    resolver rule of ``resolver_problems``.
    """
    problems: list[str] = []
    by_key: dict[str, list[TektonObject]] = {}
    for o in catalog:
        by_key.setdefault(o.key, []).append(o)
    for key, objs in by_key.items():
        if len(objs) > 1:
            problems.append(f"{key} is defined {len(objs)} times in the catalog: "
                            + ", ".join(str(o.path) for o in objs))
    owner: dict[str, str] = {}
    for b in spec.bundles:
        b.resolved = []
        for key in b.objects:
            if key in owner and owner[key] != b.name:
                problems.append(f"{key} is listed in bundle {owner[key]} and in bundle {b.name}; "
                                "an object belongs to exactly one bundle")
            owner.setdefault(key, b.name)
            objs = by_key.get(key)
            if not objs:
                problems.append(f"bundle {b.name}: {key} is declared in {spec.path} but no "
                                f"tekton.dev document with that kind and name exists in the catalog")
                continue
            b.resolved.append(objs[0])
        # a key listed twice resolves twice, so the uniqueness rule below names it
        problems += resolver_problems(b.name, b.resolved)
    for key, objs in sorted(by_key.items()):
        if key not in owner:
            problems.append(f"{key} ({objs[0].path}) is in no bundle; add it to {spec.path}")
    # tkn takes whole files: a file may only feed one bundle
    file_owner: dict[Path, set[str]] = {}
    for o in catalog:
        if o.key in owner:
            file_owner.setdefault(o.path, set()).add(owner[o.key])
    for f, names in sorted(file_owner.items()):
        if len(names) > 1:
            problems.append(f"{f} holds objects of bundles {sorted(names)}; "
                            "put one object per file")
    for b in spec.bundles:
        for f in b.files():
            extra = [o.key for o in catalog if o.path == f and o.key not in b.objects]
            if extra:
                problems.append(f"{f} also holds {extra}, which bundle {b.name} does not list")
    if problems:
        raise BundleError(list(dict.fromkeys(problems)))
    return spec


def load(spec_path: Path, catalog_root: Path) -> Spec:
    return resolve(load_spec(spec_path), scan_catalog(catalog_root))


# --- references between bundles ------------------------------------------------------

def bundle_refs(node: Any) -> Iterator[dict]:
    """Every ``{resolver: bundles, params: [...]}`` mapping inside a parsed document."""
    if isinstance(node, dict):
        if node.get("resolver") == "bundles" and isinstance(node.get("params"), list):
            yield node
        for v in node.values():
            yield from bundle_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from bundle_refs(v)


def ref_params(ref: dict) -> dict[str, Any]:
    return {p.get("name"): p.get("value") for p in ref["params"] if isinstance(p, dict)}


def repository_of(ref: str) -> str:
    """``host:5000/a/b:tag@sha256:..`` -> ``host:5000/a/b``."""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)
    if ":" in last[-1]:
        ref = ref[: ref.rindex(":")]
    return ref


def bundle_name_of(ref: str) -> str:
    """The last repository component, which is how a reference names one of our bundles."""
    return repository_of(ref).rsplit("/", 1)[-1]


PINNED = re.compile(r"^[^@\s]+/[^@/\s]+:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}@sha256:[0-9a-f]{64}$")


def is_pinned(ref: str) -> bool:
    """``registry/repo:tag@sha256:<64 hex>``: readable tag, immutable digest."""
    return bool(PINNED.match(ref))


REF_KINDS = {"taskRef": "Task", "pipelineRef": "Pipeline"}


def object_refs(node: Any, path: str = "") -> Iterator[tuple[str, str, dict]]:
    """(where, key, mapping) for every ``taskRef``/``pipelineRef`` mapping in a document."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            if k in REF_KINDS and isinstance(v, dict):
                yield here, k, v
            yield from object_refs(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            label = v.get("name") if isinstance(v, dict) and isinstance(v.get("name"), str) else i
            yield from object_refs(v, f"{path}[{label}]")


def cluster_ref_key(key: str, ref: dict) -> str | None:
    """``Kind/name`` of a plain (cluster) reference, None for resolver references."""
    if ref.get("resolver") or not isinstance(ref.get("name"), str):
        return None
    return f"{ref.get('kind') or REF_KINDS[key]}/{ref['name']}"


def dependencies(spec: Spec) -> dict[str, set[str]]:
    """bundle -> our other bundles its objects reference (resolver or cluster refs)."""
    names = {b.name for b in spec.bundles}
    holder = {k: b.name for b in spec.bundles for k in b.objects}
    deps: dict[str, set[str]] = {}
    for b in spec.bundles:
        d = deps.setdefault(b.name, set())
        for o in b.resolved:
            for _, key, r in object_refs(o.body):
                if r.get("resolver") == "bundles" and isinstance(r.get("params"), list):
                    target = ref_params(r).get("bundle")
                    if isinstance(target, str) and bundle_name_of(target) in names:
                        d.add(bundle_name_of(target))
                elif (ck := cluster_ref_key(key, r)) in holder:
                    d.add(holder[ck])
        d.discard(b.name)
    return deps


def push_order(spec: Spec) -> list[Bundle]:
    """Referenced bundles first, so a referrer can be pinned to their fresh digests."""
    deps = dependencies(spec)
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise BundleError(f"bundles reference each other in a cycle: {' -> '.join(path + [n])}")
        state[n] = 1
        for d in sorted(deps[n]):
            visit(d, path + [n])
        state[n] = 2
        order.append(n)

    for b in spec.bundles:
        visit(b.name, [])
    return [spec.bundle(n) for n in order]


def check_refs(spec: Spec) -> list[str]:
    """A reference to one of our bundles must name an object that bundle holds."""
    problems = []
    by_name = {b.name: b for b in spec.bundles}
    for b in spec.bundles:
        for o in b.resolved:
            for r in bundle_refs(o.body):
                p = ref_params(r)
                target = p.get("bundle")
                if not isinstance(target, str) or bundle_name_of(target) not in by_name:
                    continue
                kind = str(p.get("kind", "task")).lower()
                held = {(x.kind.lower(), x.name) for x in by_name[bundle_name_of(target)].resolved}
                if (kind, p.get("name")) not in held:
                    problems.append(f"{o.path}: references {kind}/{p.get('name')} in bundle "
                                    f"{bundle_name_of(target)}, which does not hold it")
    return problems
