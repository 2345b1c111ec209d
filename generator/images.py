"""mpc's two images (task runner, watcher), built from their Containerfiles and pushed.

``mpc images build`` makes each image with buildah from ``tasks/runner/Containerfile``
and ``glue/Containerfile``, offline from three inputs it prepares and caches under
``$MPC_CACHE/images`` (keyed by what goes into them):

- **the base**: Debian bookworm made with debootstrap from Debian's own mirror
  (``BASE_PACKAGES``), imported as ``localhost/mpc/debian-base:bookworm``; any other
  Debian-based image with those packages can replace it (``--base``);
- **the wheelhouse**: mpc's wheel, its dependencies at the versions installed here (the
  ones the tests ran with), and pip itself; the Containerfiles install from it with
  ``--no-index``, so the image build never reaches a package index;
- **the build context**: the Containerfile plus ``wheels/``.

Builds use buildah's chroot isolation (no runtime, no cgroups: nothing on this machine
changes) in a private storage that is removed afterwards, and ``--timestamp`` plus
no bytecode, so the same inputs give the same digest. Each built image is kept as an
OCI archive keyed by its inputs, so an unchanged image is only pushed again
(``skopeo copy``). ``build_and_push`` writes each image to
``REGISTRY/<name>:VERSION`` and returns ``name -> REGISTRY/<name>:VERSION@sha256:...``:
what the Tasks and the Deployment are pinned to (``bundles_pin.Pins.images``).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = os.environ.get("MPC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "openssh-client", "libnss-wrapper",
                 "ca-certificates")
BASE_REF = f"localhost/mpc/debian-base:{SUITE}"
PIP_VERSION = "24.0"
# image name -> (Containerfile, the reference the checked-in sources name it by)
IMAGES = {
    "task-runner": ("tasks/runner/Containerfile", "localhost/mpc/task-runner"),
    "glue": ("glue/Containerfile", "localhost/mpc/glue"),
}
RECIPE = "1"    # bump when the way an input is made changes
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MPC_CACHE") or Path.home() / ".cache" / "mpc") / "images"


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ImageError(f"{what} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def _cached(out: Path, make: Callable[[], None]) -> Path:
    """Cache entry ``out``, made by ``make`` (which renames it into place) if absent. One
    maker at a time: a second ``mpc images`` run wanting it (a test worker beside another,
    ``make run`` beside ``make test``) waits for the first and finds it made, instead of
    making the same thing beside it."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.exists():
                make()
    return out


def _key(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- inputs ---------------------------------------------------------------------------------
def base_tarball(log=print) -> Path:
    """The debootstrapped base rootfs as a tarball, built once per package list."""
    out = cache_dir() / f"debian-base-{SUITE}-{_key(RECIPE, SUITE, MIRROR, *BASE_PACKAGES)}.tar"
    return _cached(out, lambda: _make_base(out, log))


def _make_base(out: Path, log) -> None:
    log(f"building the Debian {SUITE} base with debootstrap (once; cached in {out.parent})")
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="mpc-base-") as tmp:
        root = Path(tmp) / "root"
        _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
              "--include=" + ",".join(BASE_PACKAGES), SUITE, str(root), MIRROR], "debootstrap")
        for junk in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                     "usr/share/info", "var/log"):
            d = root / junk
            if d.is_dir():
                for child in d.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() \
                        else child.unlink()
        part = out.with_name(f".{out.name}.{os.getpid()}")
        _run(["tar", "-C", str(root), "--numeric-owner", "--sort=name", "--mtime=@0",
              "-cf", str(part), "."], "tar of the base")
        os.replace(part, out)


def runtime_constraints() -> list[str]:
    """``name==version`` of every distribution mpc needs at run time, as installed here."""
    seen: dict[str, str] = {}
    todo = [r for r in metadata.requires("mpc") or [] if "extra ==" not in r]
    while todo:
        req = todo.pop()
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        k = re.sub(r"[-_.]+", "-", name).lower()
        if k in seen:
            continue
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:       # excluded by a marker here
            continue
        seen[k] = d.version
        todo += [r for r in d.requires or [] if "extra ==" not in r]
    return sorted(f"{k}=={v}" for k, v in seen.items())


def _sources() -> list[Path]:
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    for d in ("generator", "glue", "tasks/runner"):
        files += sorted(p for p in (REPO / d).rglob("*") if p.is_file()
                        and "__pycache__" not in p.parts and p.name != "Containerfile")
    return files


def wheelhouse(log=print) -> Path:
    """mpc's wheel + its pinned dependencies + pip, keyed by sources and versions."""
    constraints = runtime_constraints()
    key = _key(RECIPE, PIP_VERSION, *constraints,
               *(hashlib.sha256(p.read_bytes()).hexdigest() for p in _sources()))
    out = cache_dir() / f"wheels-{key}"
    return _cached(out, lambda: _make_wheelhouse(out, constraints, log))


def _make_wheelhouse(out: Path, constraints: list[str], log) -> None:
    log("building the wheelhouse (mpc + pinned dependencies)")
    part = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="mpc-wheels-") as tmp:
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("\n".join(constraints) + "\n")
        src = Path(tmp) / "src"             # a clean copy: no build/ or egg-info leftovers
        for f in _sources():
            dest = src / f.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(part),
              "--constraint", str(cfile), str(src)], "pip wheel", env=env, cwd=tmp)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest",
              str(part), f"pip=={PIP_VERSION}"], "pip download pip", env=env)
    os.replace(part, out)


# --- buildah ------------------------------------------------------------------------------
@dataclass
class Store:
    """A private buildah storage (vfs, chroot isolation), removed by ``close``."""

    dir: Path

    @classmethod
    def create(cls) -> "Store":
        return cls(Path(tempfile.mkdtemp(prefix="mpc-images-", dir="/var/tmp")))

    def buildah(self, *args: str, what: str | None = None) -> str:
        argv = ["buildah", "--root", str(self.dir / "root"), "--runroot", str(self.dir / "run"),
                "--storage-driver", "vfs", *args]
        return _run(argv, what or f"buildah {args[0]}").stdout.strip()

    def import_base(self, tarball: Path) -> str:
        ctr = self.buildah("from", "--quiet", "scratch")
        mnt = self.buildah("mount", ctr)
        _run(["tar", "-C", mnt, "--numeric-owner", "-xf", str(tarball)], "unpack the base")
        self.buildah("commit", "--quiet", "--timestamp", "0", "--rm", ctr, BASE_REF)
        return BASE_REF

    def build(self, name: str, base: str, timestamp: int = 0) -> str:
        containerfile, placeholder = IMAGES[name]
        with tempfile.TemporaryDirectory(prefix=f"mpc-ctx-{name}-") as ctx:
            shutil.copy2(REPO / containerfile, Path(ctx) / "Containerfile")
            shutil.copytree(wheelhouse(), Path(ctx) / "wheels")
            tag = f"{placeholder}:build"
            self.buildah("bud", "--quiet", "--isolation", "chroot", "--timestamp",
                         str(timestamp), "--build-arg", f"BASE={base}", "--pull-never"
                         if base.startswith("localhost/") else "--pull", "-t", tag,
                         "-f", str(Path(ctx) / "Containerfile"), ctx, what=f"building {name}")
        return tag

    def close(self) -> None:
        # vfs layers may hold files only root can remove; buildah's own cleanup first
        subprocess.run(["buildah", "--root", str(self.dir / "root"), "--runroot",
                        str(self.dir / "run"), "--storage-driver", "vfs", "rm", "--all"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def image_key(name: str, base: str) -> str:
    """What one image is made of: its Containerfile, the base, the wheelhouse, the recipe."""
    containerfile = (REPO / IMAGES[name][0]).read_bytes()
    return _key(RECIPE, name, containerfile, base, wheelhouse().name)


def built_archive(name: str, base: str | None = None, log=print) -> Path:
    """The image as an OCI archive, built once per ``image_key`` (cached)."""
    base_tar = None if base else base_tarball(log)
    out = cache_dir() / "built" / f"{name}-{image_key(name, base or base_tar.name)}.tar"
    return _cached(out, lambda: _make_archive(name, base, base_tar, out, log))


def _make_archive(name: str, base: str | None, base_tar: Path | None, out: Path, log) -> None:
    log(f"building image {name} from {IMAGES[name][0]}")
    store = Store.create()
    try:
        base_ref = base or store.import_base(base_tar)
        tag = store.build(name, base_ref)
        part = out.with_name(f".{out.name}.{os.getpid()}")
        store.buildah("push", "--quiet", tag, f"oci-archive:{part}:{IMAGES[name][1]}:build",
                      what=f"saving {name}")
        os.replace(part, out)
    finally:
        store.close()


def push_archive(archive: Path, dest: str, tls_verify: bool = True) -> str:
    """Copy an image archive to ``dest``; its manifest digest."""
    with tempfile.TemporaryDirectory(prefix="mpc-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        _run(["skopeo", "copy", "--quiet", f"--dest-tls-verify={str(tls_verify).lower()}",
              "--digestfile", str(digestfile), f"oci-archive:{archive}", f"docker://{dest}"],
             f"pushing {dest}")
        digest = digestfile.read_text().strip()
    if not DIGEST_RE.match(digest):
        raise ImageError(f"pushing {dest}: unexpected digest {digest!r}")
    return digest


def build_and_push(registry: str, version: str, tls_verify: bool = True, base: str | None = None,
                   names: tuple[str, ...] = tuple(IMAGES), log=print) -> dict[str, str]:
    """Build (or reuse) every image and push it: ``name -> registry/name:version@sha256:...``."""
    registry = registry.rstrip("/")
    out = {}
    for name in names:
        archive = built_archive(name, base, log)
        dest = f"{registry}/{name}:{version}"
        out[name] = f"{dest}@{push_archive(archive, dest, tls_verify)}"
        log(f"pushed {out[name]}  ({archive.stat().st_size / 1e6:.0f} MB archive)")
    return out


LOCK_HEADER = """\
# Written by `mpc images build`: mpc's images as pushed for one release, by digest.
# `mpc bundles push/pin --images FILE` points every Task step and the Deployment at them.
"""


def write_lock(path: Path, refs: dict[str, str]) -> None:
    data = {"images": {n: {"ref": r, "placeholder": IMAGES[n][1]} for n, r in sorted(refs.items())}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(LOCK_HEADER + yaml.safe_dump(data, sort_keys=False, width=200))


def read_lock(path: Path) -> dict[str, str]:
    """``placeholder repository -> pinned ref`` from a lock ``write_lock`` wrote."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        return {v["placeholder"]: v["ref"] for v in data["images"].values()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ImageError(f"{path}: not an image lock written by `mpc images build`: {e}") from e
