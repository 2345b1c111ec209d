"""Push the declared bundles with the real ``tkn bundle push``.

Every bundle gets the OCI annotations ``org.opencontainers.image.{source,
revision,version,description}`` and a fixed creation time (``--ctime``), so
pushing the same sources again gives the same manifest digest. Bundles are
pushed in dependency order: a bundle whose objects reference another of our
bundles through ``resolver: bundles`` (the provisioning Pipelines referencing
the Task bundles) is pushed after it, with those references pinned to the
digests just pushed.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .bundles import REPO_COMPONENT, Bundle, BundleError, Spec, check_refs, push_order
from .bundles_pin import Pins, pin_text

PUSHED = re.compile(r"Pushed Tekton Bundle to (\S+)@(sha256:[0-9a-f]{64})")


def find_tkn(explicit: str | None = None) -> str:
    """``--tkn``, else ``$MPC_CACHE/bin/tekton/tkn`` (built by ``make upstream``), else PATH."""
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise FileNotFoundError(f"tkn not found at {explicit}")
        return explicit
    cache = Path(os.environ.get("MPC_CACHE") or Path.home() / ".cache" / "mpc")
    cand = cache / "bin" / "tekton" / "tkn"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    on_path = shutil.which("tkn")
    if on_path:
        return on_path
    raise FileNotFoundError(
        f"tkn not found: not at {cand} and not on PATH. Build the pinned one with "
        "`make upstream` (github.com/tektoncd/cli v0.41.0), or pass --tkn /path/to/tkn")


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _rfc3339(epoch: str, what: str) -> str:
    try:
        return dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError as e:
        raise BundleError(f"{what}={epoch!r} is not a Unix time") from e


@dataclass
class BuildInfo:
    """What goes into every bundle besides its objects.

    ``revision`` and ``created`` are either fixed for all bundles (``--revision``,
    ``--ctime`` or ``SOURCE_DATE_EPOCH``) or empty, and then each bundle gets
    the last commit that touched its files and that commit's time: a bundle
    whose sources did not change keeps its digest across unrelated commits.
    """

    version: str
    source: str
    revision: str = ""
    created: str = ""     # RFC 3339, UTC
    repo: Path = Path(".")

    @classmethod
    def detect(cls, repo: Path, version: str, source: str = "", revision: str = "",
               ctime: str = "", default_source: str = "") -> "BuildInfo":
        """source: ``source``, else git remote ``origin``, else ``default_source``."""
        source = source or _git(repo, "remote", "get-url", "origin") or default_source
        if ctime:
            try:
                dt.datetime.fromisoformat(ctime.replace("Z", "+00:00"))
            except ValueError as e:
                raise BundleError(f"--ctime {ctime!r} is not an RFC 3339 time") from e
        elif os.environ.get("SOURCE_DATE_EPOCH"):
            ctime = _rfc3339(os.environ["SOURCE_DATE_EPOCH"], "SOURCE_DATE_EPOCH")
        if not version:
            raise BundleError("a bundle VERSION is required (e.g. VERSION=0.1)")
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$", version):
            raise BundleError(f"VERSION {version!r} is not a valid OCI tag")
        return cls(version=version, source=source, revision=revision, created=ctime, repo=repo)

    def head(self) -> str:
        return self.revision or _git(self.repo, "rev-parse", "HEAD") or "unknown"

    def stamp(self, files: list[Path]) -> tuple[str, str]:
        """(revision, created) for a bundle made of ``files``."""
        rev, created = self.revision, self.created
        if rev and created:
            return rev, created
        names = [str(Path(f).resolve()) for f in files]
        last = _git(self.repo, "log", "-1", "--format=%H %ct", "--", *names)
        if last:
            sha, epoch = last.split()
        else:      # never committed (or not in this repository): HEAD, or nothing
            sha = _git(self.repo, "rev-parse", "HEAD") or "unknown"
            epoch = _git(self.repo, "log", "-1", "--format=%ct") or "0"
        if not rev:
            dirty = _git(self.repo, "status", "--porcelain", "--", *names)
            rev = sha + ("-dirty" if dirty else "")
        return rev, created or _rfc3339(epoch, "commit time")


@dataclass
class Pushed:
    bundle: str
    repository: str
    tag: str
    digest: str
    objects: list[str]
    revision: str = ""
    created: str = ""
    seconds: float = 0.0

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}@{self.digest}"


@dataclass
class PushResult:
    registry: str
    info: BuildInfo
    pushed: list[Pushed] = field(default_factory=list)

    def pins(self) -> Pins:
        pins = Pins()
        for p in self.pushed:
            pins.add(p.bundle, p.ref, p.objects)
        return pins


def describe(b: Bundle) -> str:
    if b.description:
        return b.description
    for o in b.resolved:
        d = ((o.body.get("spec") or {}).get("description") or "").strip()
        if d:
            return " ".join(d.splitlines()[0].split())
    return f"Tekton bundle {b.name}: " + ", ".join(b.objects)


def annotations(b: Bundle, info: BuildInfo, revision: str) -> dict[str, str]:
    ann = {
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.version": info.version,
        "org.opencontainers.image.description": describe(b),
        "org.opencontainers.image.title": b.name,
    }
    if info.source:
        ann["org.opencontainers.image.source"] = info.source
    return ann


def validate_registry(registry: str) -> str:
    """``host[:port]/path``: where the ``<bundle>:<version>`` repositories go."""
    registry = registry.strip().rstrip("/")
    host, _, path = registry.partition("/")
    bad = (not host or "://" in registry or "@" in registry
           or any(c.isspace() for c in registry)
           or any(not REPO_COMPONENT.match(c) for c in path.split("/") if path))
    if bad:
        raise BundleError(f"REGISTRY {registry!r} must look like host[:port]/path, e.g. "
                          "quay.io/acme/mpc (no scheme, tag or digest; lower-case path)")
    return registry


def _flag_value(s: str) -> str:
    """tkn's ``--annotate`` is a pflag string slice: each value is parsed as one CSV
    record, so a value with a comma or a quote must be a quoted CSV field."""
    if any(c in s for c in ',"\n\r'):
        return '"' + s.replace('"', '""') + '"'
    return s


def prepare_files(b: Bundle, pins: Pins, scratch: Path, seen: list | None = None) -> list[Path]:
    """The files tkn gets: the catalog files, or pinned copies where they reference our
    bundles or name mpc's images (``seen`` collects the changes)."""
    out = []
    for f in b.files():
        text = f.read_text()
        new, changes = pin_text(text, pins, f)
        if seen is not None:
            seen += changes
        if changes:
            dest = scratch / b.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(new)
            out.append(dest)
        else:
            out.append(f)
    return out


def push(spec: Spec, registry: str, info: BuildInfo, tkn: str | None = None,
         log=print, images: dict[str, str] | None = None) -> PushResult:
    """Validate everything, then push every bundle; nothing is pushed if validation fails."""
    registry = validate_registry(registry)
    problems = check_refs(spec)
    if problems:
        raise BundleError(problems)
    order = push_order(spec)
    exe = find_tkn(tkn)
    result = PushResult(registry=registry, info=info)
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)   # --ctime is explicit
    with tempfile.TemporaryDirectory(prefix="mpc-bundles-") as scratch:
        # tkn writes each layer to a temp file it never removes: keep them in our scratch
        env["TMPDIR"] = scratch
        for b in order:
            pins = result.pins()
            pins.images = dict(images or {})      # step images pinned to their digests
            changes: list = []
            files = prepare_files(b, pins, Path(scratch), changes)
            for ch in changes:
                if ch.where.endswith(".image"):
                    log(f"{b.name}: pinned step image: {ch.new}")
            repo = f"{registry}/{b.name}"
            revision, created = info.stamp(b.files())
            argv = [exe, "bundle", "push", f"{repo}:{info.version}", "--ctime", created]
            for k, v in annotations(b, info, revision).items():
                argv += ["--annotate", _flag_value(f"{k}={v}")]
            for f in files:
                argv += ["-f", str(f)]
            t0 = time.monotonic()
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
            took = time.monotonic() - t0
            m = PUSHED.search(r.stdout)
            if r.returncode != 0 or not m:
                done = ", ".join(p.bundle for p in result.pushed) or "none"
                raise BundleError(f"tkn bundle push {repo}:{info.version} failed "
                                  f"(exit {r.returncode}; already pushed: {done}):\n"
                                  f"{r.stdout.strip()}\n{r.stderr.strip()}")
            result.pushed.append(Pushed(b.name, repo, info.version, m.group(2),
                                        list(b.objects), revision, created, took))
            log(f"pushed {repo}:{info.version}@{m.group(2)}  ({took:.2f}s)")
    return result


def list_bundle(ref: str, tkn: str | None = None) -> list[str]:
    """What ``tkn bundle list`` sees in a pushed bundle: ``kind.tekton.dev/name`` lines."""
    r = subprocess.run([find_tkn(tkn), "bundle", "list", ref], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise BundleError(f"tkn bundle list {ref} failed:\n{r.stdout}\n{r.stderr}")
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


# --- the record of what was pushed ------------------------------------------------------

LOCK_HEADER = """\
# Written by `mpc bundles push` (make bundles): the Tekton bundles pushed for
# one release, by reference and manifest digest. `make pin-bundles` rewrites
# `resolver: bundles` references to these pinned refs. Do not edit by hand.
"""


def write_lock(path: Path, result: PushResult) -> None:
    data = {
        "registry": result.registry,
        "version": result.info.version,
        "revision": result.info.head(),
        "bundles": {p.bundle: {"ref": p.ref, "digest": p.digest, "objects": p.objects,
                               "revision": p.revision, "created": p.created}
                    for p in sorted(result.pushed, key=lambda p: p.bundle)},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(LOCK_HEADER + yaml.safe_dump(data, sort_keys=False, width=200))


def read_lock(path: Path) -> Pins:
    """The pinned ref of every bundle and the objects it holds."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        pins = Pins()
        for name, b in data["bundles"].items():
            pins.add(name, b["ref"], b["objects"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{path}: not a bundle lock file written by `make bundles`: {e}") from e
    return pins


def table(result: PushResult, listing: dict[str, list[str]] | None = None) -> str:
    rows = [("BUNDLE", "OBJECTS", "REFERENCE")]
    for p in result.pushed:
        objs = listing.get(p.bundle) if listing else None
        rows.append((p.bundle, ", ".join(objs or p.objects), p.ref))
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]}" for r in rows)
