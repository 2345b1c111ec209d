"""OCI images for the e2e node, built locally from binaries (nothing is pulled).

Each image is ``buildah from scratch`` + copied files + an entrypoint,
committed to an oci-archive that containerd imports. Archives are cached in
``$MPC_CACHE/e2e/images`` keyed by the hash of their inputs, so a warm run
only imports them. buildah runs inside the node's namespaces (``nsx``) with
its own storage under the node's state dir and ``--network none``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tests.infra import paths

TAG = "e2e"
RECIPE_VERSION = "1"   # bump when the way images are assembled changes
ASSETS = Path(__file__).parent / "assets"


def image_cache() -> Path:
    return paths.cache_dir() / "e2e" / "images"


@dataclass
class ImageSpec:
    """name -> localhost/<name>:e2e; files: (source on this machine, path in the image)."""

    name: str
    entrypoint: Sequence[str]
    files: Callable[[Path], list[tuple[Path, str]]]   # gets a scratch dir, returns the files
    key_inputs: Callable[[], list[Path]]                # whose content identifies the image
    env: dict[str, str] = field(default_factory=lambda: {"PATH": "/bin:/usr/bin:/ko-app"})
    tag: str = TAG
    user: str = ""
    base: Callable[[], Path] | None = None   # a rootfs tar added (unpacked) first

    @property
    def ref(self) -> str:
        return f"localhost/{self.name}:{self.tag}"

    def key(self) -> str:
        h = hashlib.sha256(f"{RECIPE_VERSION}|{self.ref}|{list(self.entrypoint)}|{self.env}|"
                           f"{self.user}".encode())
        for p in self.key_inputs():
            h.update(hashlib.sha256(Path(p).read_bytes()).digest())
        return h.hexdigest()[:16]

    def archive(self) -> Path:
        return image_cache() / f"{self.name.replace('/', '-')}-{self.key()}.tar"


def _pause_files(scratch: Path) -> list[tuple[Path, str]]:
    out = scratch / "pause"
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    subprocess.run(["go", "build", "-ldflags", "-s -w", "-o", str(out), str(ASSETS / "pause.go")],
                   check=True, capture_output=True, env=env, cwd=scratch)
    return [(out, "/pause")]


def _busybox_files(scratch: Path) -> list[tuple[Path, str]]:
    """Debian's busybox-static with applet links, a passwd/group and a sticky /tmp."""
    root = scratch / "bbroot"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nonroot:x:65532:65532::/home/nonroot:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nnonroot:x:65532:\n")
    return [(root, "/")]


def _tekton(binary: str) -> ImageSpec:
    src = paths.tekton_bin() / binary
    # user 65532, as Tekton's released (ko, distroless) images: with set-security-context
    # Tekton marks its init containers runAsNonRoot, which a root image would fail
    return ImageSpec(f"tekton-{binary}", [f"/ko-app/{binary}"],
                     lambda _s: [(src, f"/ko-app/{binary}")], lambda: [src], user="65532:65532")


PAUSE = ImageSpec("pause", ["/pause"], _pause_files, lambda: [ASSETS / "pause.go"], env={})
BUSYBOX = ImageSpec("busybox", ["/bin/sh"], _busybox_files, lambda: [Path("/bin/busybox")])
# Tekton's -shell-image (place-scripts): non-root like the released default, which
# set-security-context's runAsNonRoot on init containers requires
SHELL = ImageSpec("tekton-shell", ["/bin/sh"], _busybox_files, lambda: [Path("/bin/busybox")],
                  user="65532:65532")
TEKTON = {b: _tekton(b) for b in ("entrypoint", "nop", "workingdirinit", "sidecarlogresults")}
NODE_IMAGES = [PAUSE, BUSYBOX, SHELL, *TEKTON.values()]


def build(spec: ImageSpec, nsx: Sequence[str], workdir: Path) -> Path:
    """Build ``spec`` into its cached oci-archive unless it is there; returns the archive."""
    out = spec.archive()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = workdir / f"scratch-{spec.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    store = workdir / "buildah"
    b = [*nsx, "buildah", "--root", str(store / "root"), "--runroot", str(store / "runroot"),
         "--storage-driver", "vfs"]

    def run(*args: str) -> str:
        p = subprocess.run([*b, *args], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"buildah {' '.join(args)} failed: {p.stderr.strip()}")
        return p.stdout.strip()

    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        files = spec.files(scratch)
        base = spec.base() if spec.base else None
        c = run("from", "--pull=never", "--network", "none", "scratch")
        try:
            if base:
                run("add", c, str(base), "/")
            for src, dst in files:
                run("copy", c, str(src) + ("/" if src.is_dir() else ""), dst)
            run("config", "--entrypoint", json.dumps(list(spec.entrypoint)), "--cmd", "",
                "--workingdir", "/", *[a for k, v in spec.env.items() for a in ("--env", f"{k}={v}")],
                *(["--user", spec.user] if spec.user else []), c)
            run("commit", "-q", "--format", "oci", c, f"oci-archive:{tmp}:{spec.ref}")
        finally:
            subprocess.run([*b, "rm", c], capture_output=True)
        os.replace(tmp, out)          # atomic: concurrent sessions share the cache
        for old in out.parent.glob(out.name.rsplit("-", 1)[0] + "-" + "?" * 16 + ".tar"):
            if old != out:            # older builds of this image
                old.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return out


# --- the builder image of buildah-remote, offline -----------------------------------------
# buildah-remote runs BUILDER_IMAGE twice: in the pod (the wrapper needs bash, ssh, rsync and
# buildah to load the image the host built; the push step needs buildah) and on the build
# host, where the build user's rootless podman runs it (bash + buildah). The SSH-host rootfs
# (tests/infra/rootfs.py: Debian bookworm with openssh, rsync, buildah, podman) has all of
# it, so the image is that rootfs, unpacked once from its .tar.zst.
def builder_rootfs() -> Path:
    from tests.infra import rootfs
    src = rootfs.ensure_rootfs()
    out = image_cache() / f"builder-rootfs-{rootfs.cache_key()}.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        subprocess.run(["zstd", "-d", "-q", "-f", "-o", str(part), str(src)], check=True)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _builder_key_inputs() -> list[Path]:
    from tests.infra import rootfs
    return [Path(rootfs.__file__)]   # the rootfs tarball is keyed by rootfs.py's recipe


BUILDER = ImageSpec("mpc/e2e-builder", ["/bin/bash"], lambda _s: [], _builder_key_inputs,
                    env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                    base=builder_rootfs)
