"""Tear-down leaves nothing: no process of the control plane, no netns or route of a host."""
from __future__ import annotations

import subprocess

from tests.infra.controlplane import ControlPlane
from tests.infra.procs import alive
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
