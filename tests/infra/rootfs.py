"""The Debian rootfs the SSH test hosts boot from, cached as a tarball.

Built with debootstrap from Debian's own mirror; rebuilt only when the
package list or the setup below changes (the cache key is their hash).
Run ``python -m tests.infra.rootfs`` to build it ahead of the tests.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import paths

SUITE = "bookworm"
MIRROR = os.environ.get("MPC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    "openssh-server", "sudo", "rsync", "procps", "psmisc",
    # podman on the host, with the pieces this VM needs (runc, not crun)
    "podman", "netavark", "runc", "crun", "iptables", "fuse-overlayfs", "uidmap",
    "buildah",
)
ADMIN_USER = "mpcadmin"
ADMIN_UID = 990

CONTAINERS_CONF = """\
[containers]
netns = "none"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

SETUP = f"""\
set -eu
groupadd -g {ADMIN_UID} {ADMIN_USER}
useradd -m -u {ADMIN_UID} -g {ADMIN_UID} -s /bin/bash {ADMIN_USER}
echo '{ADMIN_USER} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/00-{ADMIN_USER}
chmod 0440 /etc/sudoers.d/00-{ADMIN_USER}
rm -f /etc/ssh/ssh_host_*
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""


def cache_key() -> str:
    h = hashlib.sha256()
    for part in (SUITE, MIRROR, " ".join(PACKAGES), CONTAINERS_CONF, SETUP):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def tarball() -> Path:
    return paths.cache_dir() / "rootfs" / f"sshhost-{SUITE}-{cache_key()}.tar.zst"


def ensure_rootfs() -> Path:
    """Return the cached rootfs tarball, building it first if needed (~40 s)."""
    out = tarball()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="mpc-rootfs-") as tmp:
        root = Path(tmp) / "root"
        debs = paths.cache_dir() / "rootfs" / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
                        "--include=" + ",".join(PACKAGES), SUITE, str(root), MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
        (root / "etc/containers").mkdir(parents=True, exist_ok=True)
        (root / "etc/containers/containers.conf").write_text(CONTAINERS_CONF)
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", SETUP], check=True)
        pack(root, out, "the rootfs")
    return out


def pack(root: Path, out: Path, what: str) -> None:
    """``root`` as a zstd tarball at ``out``, written aside and renamed (never half there)."""
    part = out.with_suffix(".part")
    with open(part, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-3", "-T0", "-q"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {what} failed")
    part.rename(out)


if __name__ == "__main__":
    print(ensure_rootfs())
    sys.exit(0)
