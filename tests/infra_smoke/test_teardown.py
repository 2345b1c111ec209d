"""Tear-down leaves nothing: no process of the control plane, no netns, route or cgroup of a host."""
from __future__ import annotations

import subprocess

from tests.infra.cgroups import ROOT as CGROUP_ROOT
from tests.infra.controlplane import ControlPlane
from tests.infra.procs import alive, wait_for
from tests.infra.sshhosts import HostFarm


def test_control_plane_stop_leaves_no_process(tmp_path):
    cp = ControlPlane(workdir=tmp_path / "cp").start()
    pids = [d.proc.pid for d in cp.daemons]
    assert len(pids) == 3 and all(alive(p) for p in pids)
    cp.stop()
    assert not any(alive(p) for p in pids)


def test_host_farm_close_leaves_no_namespace_or_route():
    farm = HostFarm()
    hosts = [farm.add(), farm.add()]
    netns = {h.netns for h in hosts}
    pids = [h.sshd_pid() for h in hosts]
    subnet = farm.SUBNET
    farm.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in netns)
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert subnet + "." not in routes
    assert not any(alive(p) for p in pids)
    assert not [c for h in hosts for c in h.cgroup.leftovers()]


def test_cgroups_a_host_creates_stay_in_its_own_subtree_and_go_with_it():
    """What root podman does on first use (mkdir ``libpod_parent`` in every hierarchy, put a
    process in it) must not reach this machine's top-level cgroups, and closing the farm
    removes it with the process. Before hosts had a cgroup root of their own, this created
    ``/sys/fs/cgroup/*/libpod_parent`` for good (a fresh machine's e2e host check failed)."""
    farm = HostFarm()
    h = farm.add()
    name = "libpod_parent"
    assert not any((d / name).exists() for d in CGROUP_ROOT.iterdir())
    h.exec(f"""
for d in /sys/fs/cgroup/*/; do mkdir -p "${{d}}{name}"; done
# as podman does: a v1 cpuset child starts with no CPUs or memory nodes
cat /sys/fs/cgroup/cpuset/cpuset.cpus > /sys/fs/cgroup/cpuset/{name}/cpuset.cpus
cat /sys/fs/cgroup/cpuset/cpuset.mems > /sys/fs/cgroup/cpuset/{name}/cpuset.mems
setsid sh -c 'for d in /sys/fs/cgroup/*/; do echo $$ > "${{d}}{name}/cgroup.procs"; done
              exec sleep 600' </dev/null >/dev/null 2>&1 &
""")
    inside = [d / name for d in h.cgroup.dirs.values()]
    try:
        assert all(d.is_dir() for d in inside)
        wait_for("the detached process in libpod_parent", lambda: all(
            (d / "cgroup.procs").read_text().split() for d in inside), timeout=10)
        assert not [str(d / name) for d in CGROUP_ROOT.iterdir() if (d / name).exists()]
        pids = h.cgroup.pids()
        assert pids
    finally:
        farm.close()
    assert not any(alive(p) for p in pids)
    assert h.cgroup.leftovers() == []


def test_a_destroyed_hosts_address_and_names_are_reused():
    """A session may create more hosts than its /24 holds at once (the suite outgrew 63):
    a destroyed host gives its /30, netns and cgroup names back, and the next host works."""
    farm = HostFarm()
    try:
        a = farm.add()
        a.destroy()
        b = farm.add()
        assert (b.index, b.address, b.netns) == (a.index, a.address, a.netns)
        assert b.ssh("hostname").stdout.strip() == b.name
        assert farm.add().index != b.index            # a live host keeps its own
    finally:
        farm.close()
