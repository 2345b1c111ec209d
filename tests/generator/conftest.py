"""Fixtures for the generator tests: a real build host with a build user and a step image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

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
