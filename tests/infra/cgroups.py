"""A cgroup subtree of the tests' own, in every hierarchy this machine mounts.

An SSH test host runs in one of these, entered with a cgroup namespace, so
whatever its podman, runc or build users create (``libpod_parent``, container
cgroups) lands *inside* the host's subtree instead of at the top of this
machine's hierarchies, as on a real machine or container with a cgroup root
of its own. ``remove()`` proves the subtree is empty of processes and deletes
it depth first, so nothing is left behind. The subtree sits under the calling
process's own cgroup in each hierarchy (the tests' memory accounting holds).

This machine is hybrid cgroup v1: one mount per v1 controller under
``/sys/fs/cgroup`` plus ``cgroup2`` at ``unified`` (see
``shared/notes/machine-infrastructure.md``).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .procs import wait_for

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Hierarchy:
    mountpoint: Path      # e.g. /sys/fs/cgroup/memory
    fstype: str           # cgroup | cgroup2
    options: str          # mount options that select it: "memory", "name=systemd", ""
    key: str              # its field in /proc/<pid>/cgroup: "memory", "name=systemd", ""


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, from /proc/self/mounts."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, fstype, opts, *_ = line.split()
        if fstype not in ("cgroup", "cgroup2") or not mnt.startswith(f"{ROOT}/"):
            continue
        if fstype == "cgroup2":
            out.append(Hierarchy(Path(mnt), fstype, "", ""))
            continue
        sel = [o for o in opts.split(",") if o not in ("rw", "ro", "relatime", "noatime",
               "nosuid", "nodev", "noexec", "xattr", "clone_children", "noprefix")
               and not o.startswith("release_agent=")]
        out.append(Hierarchy(Path(mnt), fstype, ",".join(sel), ",".join(sel)))
    return out


def _current(key: str, pid: int | str = "self") -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, k, path = line.split(":", 2)
        if k == key:
            return path
    return "/"


class Subtree:
    """``name`` under this process's own cgroup in every hierarchy."""

    def __init__(self, name: str):
        self.name = name
        self.dirs = {h: h.mountpoint / _current(h.key).lstrip("/") / name for h in hierarchies()}

    def create(self) -> "Subtree":
        for h, d in self.dirs.items():
            d.mkdir(exist_ok=True)
            if h.options == "cpuset":     # v1 cpuset children start with no CPUs or nodes
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((d.parent / f).read_text())
        return self

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the subtree."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        """Every process anywhere in the subtree, in any hierarchy."""
        found: set[int] = set()
        for d in self.dirs.values():
            if d.exists():
                for f in d.rglob("cgroup.procs"):
                    try:
                        found.update(int(p) for p in f.read_text().split())
                    except OSError:
                        pass
        return found

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 10) -> None:
        """Kill what is left, wait until the subtree is empty, delete it depth first."""
        self.kill()
        wait_for(f"cgroup {self.name} empty", lambda: (self.kill() or not self.pids()),
                 timeout=timeout)
        for d in self.dirs.values():
            if not d.exists():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            d.rmdir()

    def leftovers(self) -> list[str]:
        return [str(d) for d in self.dirs.values() if d.exists()]

    def mount_script(self, root: str) -> str:
        """Shell lines that mount, inside a cgroup namespace rooted here, every hierarchy at
        ``root``/sys/fs/cgroup as this machine has them: the host then sees its own subtree as /.
        """
        lines = [f"mount -t tmpfs -o mode=755 cgroup {root}/sys/fs/cgroup"]
        for h in self.dirs:
            at = f"{root}{h.mountpoint}"
            lines.append(f"mkdir -p {at}")
            if h.fstype == "cgroup2":
                lines.append(f"mount -t cgroup2 cgroup2 {at}")
            else:
                lines.append(f"mount -t cgroup -o {h.options} cgroup {at}")
        return "\n".join(lines)
