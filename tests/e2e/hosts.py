"""SSH test hosts wired into the e2e node's network namespace, so build pods reach them.

``tests.infra.sshhosts.HostFarm`` joins each host to this machine's namespace
by a veth (``host.veth``, address ``host.host_ip``/30). For the e2e tier that
end moves into the node's netns instead: pods then reach ``host.address``
through the CNI bridge and the node's own routing (forwarding is on inside
the node's netns only; no NAT: the host answers pod IPs over its default
route, which points at ``host.host_ip``). This machine's network no longer
reaches the host: talk to it with ``ssh_argv``/``ssh`` below (ssh run inside
the node's netns) or ``host.exec`` (nsenter, no network).
"""
from __future__ import annotations

import subprocess

from tests.infra.sshhosts import SSHHost

from .node import Node


def move_into_node(host: SSHHost, node: Node) -> SSHHost:
    """Move ``host``'s uplink veth end into the node's netns (the address moves with it)."""
    def ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True, capture_output=True)
    ip("link", "set", host.veth, "netns", node.netns)       # drops its address, state, routes
    if host.point_to_point:     # a cloud VM's address (tests.infra.ec2): /32 and a host route
        ip("-n", node.netns, "addr", "add", f"{host.host_ip}/32", "dev", host.veth)
        ip("-n", node.netns, "link", "set", host.veth, "up")
        ip("-n", node.netns, "route", "add", f"{host.address}/32", "dev", host.veth,
           "src", host.host_ip)
        return host
    ip("-n", node.netns, "addr", "add", f"{host.host_ip}/30", "dev", host.veth)
    ip("-n", node.netns, "link", "set", host.veth, "up")
    return host


def ssh_argv(host: SSHHost, node: Node, user: str | None = None, key=None) -> list[str]:
    """ssh to ``host`` from inside the node's netns (the only place that reaches it now)."""
    return ["nsenter", f"--net=/run/netns/{node.netns}", *host.ssh_argv(user, key)]


def ssh(host: SSHHost, node: Node, command: str, user: str | None = None, key=None,
        check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*ssh_argv(host, node, user, key), command], check=check,
                          capture_output=True, text=True, timeout=timeout)
