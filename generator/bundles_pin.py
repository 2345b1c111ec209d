"""Point references at pinned bundles: ``resolver: bundles`` with ``repo:tag@sha256:``.

Three kinds of reference are rewritten, wherever they appear in a YAML file
(Pipelines' ``taskRef``, PipelineRuns' ``pipelineRef``, deploy manifests):

- an ``image:`` (or a kustomize ``images:`` entry) naming one of mpc's own images by
  its placeholder (``localhost/mpc/task-runner``) gets the pushed ``repo:tag@sha256:``
  (``generator/images.py``);

- a ``resolver: bundles`` reference whose ``bundle`` names one of our bundles
  (by the last repository component, so ``task-mpc-provision``,
  ``old.registry/x/task-mpc-provision:0.1`` and a pinned ref all match) gets
  the pinned ref;
- a cluster reference (``taskRef: {kind: Task, name: mpc-provision}``) to an
  object one of our bundles holds becomes a ``resolver: bundles`` reference
  to that bundle.

Files are round-tripped with ruamel.yaml, so comments, quoting and key order
survive; files with nothing to rewrite are not touched.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import LiteralScalarString

from . import admission
from .bundles import (bundle_name_of, bundle_refs, cluster_ref_key, is_pinned,
                      object_refs, ref_params, repository_of)

@dataclass
class Pins:
    """Pinned refs by bundle name, and which bundle holds each ``Kind/name``."""

    refs: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    # image placeholder repository (localhost/mpc/task-runner) -> pushed repo:tag@sha256:...
    images: dict[str, str] = field(default_factory=dict)

    def add(self, bundle: str, ref: str, objects: Iterable[str]) -> None:
        self.refs[bundle] = ref
        for o in objects:
            self.holder[o] = bundle


@dataclass(frozen=True)
class Change:
    path: Path | None
    where: str
    old: str
    new: str


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


def image_repository(ref: str) -> str:
    """``host/path/name`` of an image reference, without ``:tag`` or ``@digest``."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _pin_images(node: Any, pins: Pins, path: Path | None, where: str = "") -> list[Change]:
    """Every ``image:`` naming one of our image placeholders (steps, sidecars, containers),
    and kustomize ``images:`` entries for them, point at the pushed digest."""
    changes: list[Change] = []
    if isinstance(node, dict):
        img = node.get("image")
        if isinstance(img, str) and image_repository(img) in pins.images:
            new = pins.images[image_repository(img)]
            if new != img:
                node["image"] = new
                changes.append(Change(path, f"{where}.image", img, new))
        if node.get("kind") == "Kustomization" and isinstance(node.get("images"), list):
            for i, e in enumerate(node["images"]):
                if isinstance(e, dict) and e.get("name") in pins.images:
                    new = pins.images[e["name"]]
                    e.pop("newTag", None)
                    e["newName"], e["digest"] = new.split("@")[0].rsplit(":", 1)[0], \
                        new.split("@")[1]
                    changes.append(Change(path, f"{where}.images[{i}]", e["name"], new))
        for k, v in node.items():
            if k != "image":
                changes += _pin_images(v, pins, path, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            changes += _pin_images(v, pins, path, f"{where}[{i}]")
    return changes


def _pin_admission(doc: Any, pins: Pins, path: Path | None) -> list[Change]:
    """The admission policy's params (ConfigMap mpc-admission) list the registries the
    pinned bundles live in, so runs of those bundles may run as mpc-tasks; entries
    already listed are kept."""
    if not (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"
            and (doc.get("metadata") or {}).get("name") == admission.ADMISSION_CONFIGMAP
            and pins.refs):
        return []
    if not isinstance(doc.get("data"), dict):
        doc["data"] = CommentedMap()
    old = str(doc["data"].get(admission.BUNDLE_REGISTRIES_KEY) or "")
    have = [line.strip() for line in old.splitlines() if line.strip()]
    ours = sorted({repository_of(r).rsplit("/", 1)[0] for r in pins.refs.values()})
    want = have + [r for r in ours if r not in have and r + "/" not in have]
    if want == have:
        return []
    new = "".join(f"{r}\n" for r in want)
    doc["data"][admission.BUNDLE_REGISTRIES_KEY] = LiteralScalarString(new)
    return [Change(path, f"ConfigMap/{admission.ADMISSION_CONFIGMAP}.data."
                         f"{admission.BUNDLE_REGISTRIES_KEY}", old.strip() or "(none)",
                   ", ".join(want))]


PLACEHOLDER_PREFIX = "localhost/mpc/"   # how the checked-in sources name mpc's own images


def _placeholder_images(node: Any, where: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        img = node.get("image")
        if isinstance(img, str) and img.startswith(PLACEHOLDER_PREFIX):
            found.append((f"{where}.image", img))
        for k, v in node.items():
            found += _placeholder_images(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _placeholder_images(v, f"{where}[{i}]")
    return found


def pin_document(doc: Any, pins: Pins, path: Path | None = None) -> list[Change]:
    """Rewrite one parsed (ruamel round-trip or plain) document in place."""
    changes: list[Change] = _pin_images(doc, pins, path) if pins.images else []
    changes += _pin_admission(doc, pins, path)
    for where, key, ref in object_refs(doc):
        if ref.get("resolver") == "bundles" and isinstance(ref.get("params"), list):
            for p in ref["params"]:
                if not isinstance(p, dict) or p.get("name") != "bundle":
                    continue
                old = p.get("value")
                if isinstance(old, str) and bundle_name_of(old) in pins.refs:
                    new = pins.refs[bundle_name_of(old)]
                    if new != old:
                        p["value"] = new
                        changes.append(Change(path, where, old, new))
            continue
        ck = cluster_ref_key(key, ref)
        holder = pins.holder.get(ck) if ck else None
        if holder is None:
            continue
        kind = ck.split("/")[0]
        new_ref = pins.refs[holder]
        name = ref["name"]
        for k in ("name", "kind", "apiVersion"):
            ref.pop(k, None)
        params = [{"name": "bundle", "value": new_ref}, {"name": "name", "value": name},
                  {"name": "kind", "value": kind.lower()}]
        if isinstance(ref, CommentedMap):
            params = CommentedSeq(CommentedMap(p) for p in params)
        ref["resolver"] = "bundles"
        ref["params"] = params
        changes.append(Change(path, where, f"{kind}/{name} (cluster)", new_ref))
    return changes


def pin_text(text: str, pins: Pins, path: Path | None = None) -> tuple[str, list[Change]]:
    y = _yaml()
    docs = list(y.load_all(text))
    changes: list[Change] = []
    for d in docs:
        changes += pin_document(d, pins, path)
    if not changes:
        return text, []
    buf = io.StringIO()
    y.dump_all(docs, buf)
    return buf.getvalue(), changes


def yaml_files(roots: Iterable[Path]) -> list[Path]:
    out = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += sorted(p for pat in ("*.yaml", "*.yml") for p in root.rglob(pat) if p.is_file())
    return out


def pin_files(roots: Iterable[Path], pins: Pins, base: Path, out: Path | None,
              copy_unchanged: bool = False) -> list[Change]:
    """Pin every YAML file under ``roots``; into ``out`` (same paths below ``base``) or in place.

    With ``out``, only files that reference our bundles or objects are written, unless
    ``copy_unchanged`` (a complete tree, e.g. for ``kubectl kustomize``).
    """
    changes: list[Change] = []
    for f in yaml_files(roots):
        text = f.read_text()
        new, ch = pin_text(text, pins, f)
        if not ch and not (copy_unchanged and out is not None):
            continue
        if out is None:
            f.write_text(new)
        else:
            try:
                rel = f.resolve().relative_to(Path(base).resolve())
            except ValueError:
                rel = Path(f.name)
            dest = Path(out) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(new)
        changes += ch
    return changes


def unpinned(roots: Iterable[Path], pins: Pins | None = None) -> list[str]:
    """References a release must not contain.

    Every ``resolver: bundles`` reference must be ``repo:tag@sha256:<digest>``;
    given ``pins``, a reference to one of our bundles must be exactly the
    pinned ref, and no cluster reference to an object we ship may remain.
    """
    bad = []
    safe = YAML(typ="safe")
    for f in yaml_files(roots):
        try:
            docs = list(safe.load_all(f.read_text()))
        except Exception as e:  # noqa: BLE001 - report, don't crash the check
            bad.append(f"{f}: not valid YAML: {e}")
            continue
        for doc in docs:
            for ref in bundle_refs(doc):
                v = ref_params(ref).get("bundle")
                if not isinstance(v, str) or not is_pinned(v):
                    bad.append(f"{f}: bundle reference {v!r} is not pinned (repo:tag@sha256:...)")
                elif pins and bundle_name_of(v) in pins.refs and v != pins.refs[bundle_name_of(v)]:
                    bad.append(f"{f}: {v} is not the pushed {pins.refs[bundle_name_of(v)]}")
            bad += [f"{f}: {w} names the unpublished image {img}; pin it with "
                    "`mpc bundles pin --images LOCK`" for w, img in _placeholder_images(doc)]
            if pins:
                for where, key, ref in object_refs(doc):
                    ck = cluster_ref_key(key, ref)
                    if ck in pins.holder:
                        bad.append(f"{f}: {where} still names {ck} on the cluster; "
                                   "run `make pin-bundles`")
    return bad
