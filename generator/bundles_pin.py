"""Rewrite ``resolver: bundles`` references to pinned ``repo:tag@sha256:`` refs.

Edits are made in the text, at the exact position of each ``bundle`` param
value, so everything else in a file (comments, quoting, order) stays
byte-for-byte as it was.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ruamel.yaml import YAML

from .bundles import bundle_name_of, bundle_refs, is_pinned, ref_params

PLAIN_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")


@dataclass(frozen=True)
class Change:
    path: Path | None
    line: int           # 1-based
    old: str
    new: str


def _scalar_end(line: str, col: int) -> int:
    """Where the YAML scalar starting at ``col`` ends (quoted, or plain in block/flow)."""
    if line[col] in "\"'":
        q = line[col]
        i = col + 1
        while i < len(line):
            if line[i] == q:
                if q == "'" and i + 1 < len(line) and line[i + 1] == "'":
                    i += 2
                    continue
                return i + 1
            if q == '"' and line[i] == "\\":
                i += 1
            i += 1
        raise ValueError("multi-line quoted scalar")
    m = re.compile(r"\s+#|,|\}|\]|\s*$").search(line, col)
    return m.start() if m else len(line)


def _render(value: str) -> str:
    return value if PLAIN_SAFE.match(value) else json.dumps(value)


def pin_text(text: str, pins: dict[str, str], path: Path | None = None) -> tuple[str, list[Change]]:
    """Replace the ``bundle`` param of every reference to a bundle named in ``pins``.

    ``pins`` maps a bundle name (last repository component) to its pinned
    reference. References to other bundles are left alone.
    """
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, int, str, str]] = []
    for doc in YAML().load_all(text):
        for ref in bundle_refs(doc):
            for p in ref["params"]:
                if not isinstance(p, dict) or p.get("name") != "bundle":
                    continue
                old = p.get("value")
                if not isinstance(old, str) or bundle_name_of(old) not in pins:
                    continue
                new = pins[bundle_name_of(old)]
                if old == new:
                    continue
                line, col = p.lc.value("value")
                end = _scalar_end(lines[line].rstrip("\r\n"), col)
                edits.append((line, col, end, old, new))
    changes = []
    for line, col, end, old, new in sorted(edits, reverse=True):
        s = lines[line]
        lines[line] = s[:col] + _render(new) + s[end:]
        changes.append(Change(path, line + 1, old, new))
    return "".join(lines), sorted(changes, key=lambda c: c.line)


def files_with_refs(roots: Iterable[Path]) -> list[Path]:
    out = []
    for root in roots:
        root = Path(root)
        cands = [root] if root.is_file() else sorted(
            p for pat in ("*.yaml", "*.yml") for p in root.rglob(pat) if p.is_file())
        for f in cands:
            if "bundles" in f.read_text(errors="replace"):
                out.append(f)
    return out


def unpinned(roots: Iterable[Path]) -> list[str]:
    """Every ``resolver: bundles`` reference that is not ``repo:tag@sha256:<digest>``."""
    bad = []
    for f in files_with_refs(roots):
        for doc in YAML(typ="safe").load_all(f.read_text()):
            for ref in bundle_refs(doc):
                v = ref_params(ref).get("bundle")
                if not isinstance(v, str) or not is_pinned(v):
                    bad.append(f"{f}: bundle reference {v!r} is not pinned (repo:tag@sha256:...)")
    return bad


def all_refs(roots: Iterable[Path]) -> list[tuple[Path, str]]:
    found = []
    for f in files_with_refs(roots):
        for doc in YAML(typ="safe").load_all(f.read_text()):
            for ref in bundle_refs(doc):
                found.append((f, ref_params(ref).get("bundle")))
    return found


def pin_files(roots: Iterable[Path], pins: dict[str, str], base: Path,
              out: Path | None) -> list[Change]:
    """Pin every file under ``roots``; write into ``out`` (same relative paths) or in place."""
    changes: list[Change] = []
    for f in files_with_refs(roots):
        text = f.read_text()
        new, ch = pin_text(text, pins, f)
        if out is None:
            if new != text:
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
