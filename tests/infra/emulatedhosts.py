"""SSH test hosts that really are linux/arm64 or linux/s390x (QEMU user emulation).

Everything an ``SSHHost`` is (overlay root on tmpfs, pivot_root, own mount/PID/UTS
namespaces, own cgroup subtree and cgroup namespace, a veth with a private /30,
fresh host key, admin user), booted from the foreign rootfs (``foreignroot.py``)
and, in addition, inside a user namespace of its own with the identity id map,
which owns:

- a private binfmt_misc, mounted on the host's /proc/sys/fs/binfmt_misc, with the
  architecture's qemu registered (flags FP): every binary in the host, sshd
  included, runs emulated, and ``uname -m`` says ``aarch64`` / ``s390x``;
- the host's network namespace (made with it at each boot, so the host may bind
  port 22 and mount its sysfs; named like an x86 host's, ``ip netns attach``);
- its mount, PID, UTS and cgroup namespaces, and its own /dev/shm.

This machine's binfmt_misc stays unmounted: outside a host, its binaries still
fail with "Exec format error".

Works: sshd, login, sudo, useradd, shells and tools, root's ``podman build`` of a
Containerfile without RUN (the image is of the host's architecture). Does not work,
because qemu-user cannot emulate namespace creation (see ``emulation.py``): rootless
podman or buildah, ``podman run`` and RUN steps (runc, conmon), hence the
buildah-remote Task, which runs its builder image with ``podman run``.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import emulation
from .procs import wait_for
from .sshhosts import SSHHost


@dataclass
class EmulatedHost(SSHHost):
    arch: str = "arm64"

    _enter_flags = ("-U", "-m", "-u", "-p", "-n", "-C")

    @property
    def emulated(self) -> emulation.Arch:
        return emulation.arch(self.arch)

    def _network_up(self) -> None:
        """Nothing at create(): the netns is made with each boot, by the host's user namespace."""

    def _after_proc(self, root: str) -> str:
        return emulation.register_script(self.emulated, f"{root}/proc")

    def _drop_netns(self) -> None:
        """The previous boot's netns (and with it both veth ends and the route) goes."""
        if Path(f"/run/netns/{self.netns}").exists():
            subprocess.run(["ip", "netns", "del", self.netns], check=True, capture_output=True)
        wait_for(f"veth {self.veth} of the previous boot gone", lambda: subprocess.run(
            ["ip", "link", "show", self.veth], capture_output=True).returncode != 0, timeout=10)

    def _launch(self, inner: str, log: Path) -> subprocess.Popen:
        self._drop_netns()

        def network(pid: int) -> None:
            subprocess.run(["ip", "netns", "attach", self.netns, str(pid)], check=True,
                           capture_output=True)
            self._veth_up()

        return emulation.spawn_in_userns(
            ["bash", "-c", inner], ["--net", "--mount", "--uts", "--cgroup"],
            join=self.cgroup.procs_files(), setup=network,
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
