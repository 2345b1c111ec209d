"""Fixtures for the generator tests: a real build host with a build user and a step image."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra import paths
from tests.infra.sshhosts import SSHHost, add_user

STEP_IMAGE = "localhost/mpc-test-buildah:1"
BUILD_USER = "u-0123456789abcdef01234567"

# The test hosts cannot pull from the internet, so the step image is made on
# the host from its own rootfs (Debian with bash, buildah, coreutils), which
# is what the pod side runs too, and imported into the build user's own
# (rootless) image store, where a pull would have put it.
IMPORT_STEP_IMAGE = f"""
set -e
tar -C / --exclude=./proc --exclude=./sys --exclude=./dev --exclude='./run/*' --exclude='./tmp/*' \
  --exclude=./home --exclude=./var/lib/containers --exclude='./var/tmp/*' -cf - . 2>/dev/null \
  | su - {{user}} -s /bin/bash -c "podman import --change 'CMD [\\"/bin/bash\\"]' - {STEP_IMAGE}" >/dev/null
"""


@dataclass
class BuildHost:
    host: SSHHost
    user: str
    key: Path

    def secret(self, d: Path, known_hosts: bool = True) -> Path:
        """A directory with the keys of multi-platform-ssh-<taskrun>, as the pod mounts it."""
        d.mkdir(parents=True, exist_ok=True)
        (d / "id_rsa").write_bytes(self.key.read_bytes())
        (d / "host").write_text(f"{self.user}@{self.host.address}")
        (d / "user-dir").write_text(f"/home/{self.user}")
        if known_hosts:
            (d / "known_hosts").write_text(self.host.known_hosts_line + "\n")
        return d


def add_build_user(h: SSHHost, user: str, key_dir: Path, sudo_podman: bool = False) -> Path:
    """A build user as the provisioner makes one; rootless podman unless ``sudo_podman``."""
    return add_user(h, user, key_dir, "/usr/bin/podman" if sudo_podman else "")


@pytest.fixture
def build_host(make_host, tmp_path) -> BuildHost:
    h = make_host()
    key = add_build_user(h, BUILD_USER, tmp_path)
    h.exec(IMPORT_STEP_IMAGE.format(user=BUILD_USER), timeout=300)
    return BuildHost(h, BUILD_USER, key)


@pytest.fixture
def sudo_build_host(make_host, tmp_path) -> BuildHost:
    """A host where rootless podman cannot work for the build user, so the admin
    granted `sudo podman`: the wrapper's fallback path. (Rootless is broken for
    this user only, by a storage driver podman does not have in its config.)"""
    h = make_host()
    key = add_build_user(h, BUILD_USER, tmp_path, sudo_podman=True)
    h.exec(f"""set -e
d=/home/{BUILD_USER}/.config/containers
mkdir -p "$d"
printf '[storage]\\ndriver = "no-such-driver"\\n' > "$d/storage.conf"
chown -R {BUILD_USER}: /home/{BUILD_USER}/.config""")
    # root's image store: `sudo podman` pulls (here: imports) there
    h.exec(IMPORT_STEP_IMAGE.replace("| su - {user} -s /bin/bash -c", "| sh -c")
           .format(user=BUILD_USER), timeout=300)
    return BuildHost(h, BUILD_USER, key)


@pytest.fixture
def pod_rootfs(host_farm) -> Path:
    """The extracted SSH-host rootfs: the pod's root (lower dir of an overlay)."""
    host_farm._extract()
    return host_farm.base


# Python 3 in the pod's step image (Konflux's buildah images, UBI-based, have it):
# buildah-remote's registry proxy runs on it. The Debian packages the SSH-host
# rootfs lacks, unpacked into one overlay layer, cached.
PYTHON_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
               "libexpat1", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1", "media-types")


def python_layer() -> Path:
    key = hashlib.sha256(" ".join(PYTHON_DEBS).encode() + b"merged-usr").hexdigest()[:12]
    out = paths.cache_dir() / "pod-layers" / f"python3-{key}"
    if out.exists():
        return out
    debs = paths.cache_dir() / "rootfs" / "debs"
    have = {d.name.split("_")[0]: d for d in debs.glob("*_amd64.deb")}
    have.update({d.name.split("_")[0]: d for d in debs.glob("*_all.deb")})
    missing = [p for p in PYTHON_DEBS if p not in have]
    if missing:          # Debian's archive, through apt's own client
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True,
                       capture_output=True)
        have.update({d.name.split("_")[0]: d for d in debs.glob("*.deb")})
    tmp = Path(tempfile.mkdtemp(dir=out.parent.parent, prefix="pod-layer-"))
    for p in PYTHON_DEBS:
        subprocess.run(["dpkg-deb", "-x", str(have[p]), str(tmp)], check=True)
    for d in ("bin", "sbin", "lib", "lib64"):   # merged /usr: those are symlinks in the rootfs
        if (tmp / d).is_dir() and not (tmp / d).is_symlink():
            subprocess.run(["cp", "-a", f"{tmp / d}/.", str(tmp / "usr" / d)], check=True)
            shutil.rmtree(tmp / d)
    (tmp / "usr/bin/python3").symlink_to("python3.11")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:       # another session made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture
def pod_python() -> list[Path]:
    """Layers for podsim's Pod(layers=...): the step image with python3."""
    return [python_layer()]
