"""Foreign-architecture rootfs for the emulated SSH test hosts (arm64, s390x), cached.

The same Debian suite, package list, containers.conf and setup as ``rootfs.py``,
for another architecture: ``debootstrap --foreign`` unpacks it here, the second
stage (every maintainer script) and the setup run *inside* it under QEMU user
emulation in a user namespace of their own (``emulation.py``), never touching
this machine's binfmt_misc. Minutes per architecture cold, so the result is a
tarball in ``$MPC_CACHE/rootfs`` keyed by architecture, package list and recipe.

``python -m tests.infra.foreignroot [ARCH ...]`` builds them ahead of the tests
(``make rootfs`` does, for every architecture).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import emulation, paths, rootfs

# Inside the emulated namespace: the second stage wants container=lxc there (no mknod
# in a user namespace) and this machine's /dev bind-mounted (in that private mount
# namespace only); then rootfs.py's setup, as root of the new system.
SECOND_STAGE = """\
mount --rbind /dev "$R/dev"
container=lxc chroot "$R" /debootstrap/debootstrap --second-stage
chroot "$R" /bin/sh -c "$MPC_SETUP"
"""


# bookworm builds no netavark for s390x: podman there uses the CNI plugins (the other
# provider of its container-network-stack)
SUBSTITUTES = {"s390x": {"netavark": "containernetworking-plugins"}}


def packages(arch: str) -> tuple[str, ...]:
    sub = SUBSTITUTES.get(arch, {})
    return tuple(sub.get(p, p) for p in rootfs.PACKAGES)


def cache_key(arch: str) -> str:
    a = emulation.arch(arch)
    h = hashlib.sha256()
    for part in (a.name, rootfs.SUITE, rootfs.MIRROR, " ".join(packages(arch)),
                 rootfs.CONTAINERS_CONF, rootfs.SETUP, SECOND_STAGE):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def tarball(arch: str) -> Path:
    return paths.cache_dir() / "rootfs" / f"sshhost-{rootfs.SUITE}-{arch}-{cache_key(arch)}.tar.zst"


# debootstrap's first stages share the deb cache (arch: all packages): one at a time
_FIRST_STAGE = threading.Lock()


def ensure_rootfs(arch: str, log=None) -> Path:
    """The cached rootfs tarball of ``arch``, built first if needed (minutes, emulated)."""
    a = emulation.arch(arch)
    out = tarball(arch)
    if out.exists():
        return out
    emulation.check_machine_binfmt_untouched()
    out.parent.mkdir(parents=True, exist_ok=True)
    debs = paths.cache_dir() / "rootfs" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix=f"mpc-rootfs-{arch}-") as tmp:
        root = Path(tmp) / "root"
        blog = Path(tmp) / "build.log"
        t0 = time.monotonic()
        with _FIRST_STAGE:
            subprocess.run(["debootstrap", "--foreign", f"--arch={a.name}", "--variant=minbase",
                            f"--cache-dir={debs}", "--include=" + ",".join(packages(arch)),
                            rootfs.SUITE, str(root), rootfs.MIRROR],
                           check=True, stdout=subprocess.DEVNULL)
        t1 = time.monotonic()
        try:
            emulation.run_emulated(SECOND_STAGE, a, root, log=blog,
                                   env={"MPC_SETUP": rootfs.SETUP})
        except RuntimeError:
            debootstrap_log = root / "debootstrap/debootstrap.log"
            if debootstrap_log.exists():
                sys.stderr.write(debootstrap_log.read_text(errors="replace")[-6000:])
            raise
        (root / "etc/containers").mkdir(parents=True, exist_ok=True)
        (root / "etc/containers/containers.conf").write_text(rootfs.CONTAINERS_CONF)
        t2 = time.monotonic()
        rootfs.pack(root, out, f"the {arch} rootfs")
        emulation.check_machine_binfmt_untouched()
        print(f"{arch} rootfs: first stage {t1 - t0:.0f}s, second stage + setup (emulated) "
              f"{t2 - t1:.0f}s, tarball {time.monotonic() - t2:.0f}s", file=log or sys.stderr)
    return out


if __name__ == "__main__":
    # cold, the emulated second stages are CPU-bound and single-threaded: build the
    # architectures side by side (their first stages still take turns)
    names = sys.argv[1:] or sorted(emulation.ARCHES)
    with ThreadPoolExecutor(len(names)) as pool:
        for out in pool.map(ensure_rootfs, names):
            print(out)
    sys.exit(0)
