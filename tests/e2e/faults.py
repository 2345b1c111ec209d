"""Faults the soak injects into the e2e node, and what it reads from the node's API server.

- ``restart_apiserver``: stop the node's kube-apiserver (TERM, as ``node.down`` does)
  and start it again with the very argv it ran with (read from /proc), then wait for
  /readyz. Everything talking to it (kubelet, Tekton, the watcher, the Tasks' pods, the
  test) sees connection errors for a few seconds.
- ``sigkill_pod``: SIGKILL the main process of every container of a pod (its PID from
  containerd), as the kernel's OOM killer or a crashed runtime would; the kubelet
  restarts it (Deployments) or the TaskRun's step fails (exit 137).
- ``host_off`` / ``host_on``: an SSH host loses power (every process in it dies, its
  link goes down so connections time out instead of being refused) and boots again
  with the same disk.
- ``registry_down``: the node's registry (it serves mpc's bundles and images) is stopped
  for the block and started again with the same storage.
- ``apiserver_requests``: the sum of the API server's own ``apiserver_request_total``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from kubernetes import client

from tests.infra.sshhosts import SSHHost

from .node import Node


def restart_apiserver(node: Node, down_for: float = 0.0) -> float:
    """Restart the node's kube-apiserver; returns the seconds it was unavailable."""
    pid = node._pid("kube-apiserver")
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    t0 = time.monotonic()
    node._stop([("kube-apiserver", 10)])
    time.sleep(down_for)
    node._start("kube-apiserver", argv)
    node._wait("kube-apiserver /readyz", lambda: node.http_inside(
        "https://127.0.0.1:6443/readyz") == "ok", 180, "kube-apiserver")
    return time.monotonic() - t0


@contextlib.contextmanager
def registry_down(node: Node) -> Iterator[None]:
    """The node's registry is down inside the block, and back (same storage) after it."""
    node._stop([("registry", 3)])
    try:
        yield
    finally:
        node._registry_up()


def apiserver_requests(node: Node) -> float:
    """Sum of ``apiserver_request_total`` over every label set (resets when it restarts),
    read as the node's admin (client certificate) through the forwarded port."""
    ctx = ssl.create_default_context(cafile=str(node.pki.ca_crt))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(node.pki.dir / "admin.crt"), str(node.pki.dir / "admin.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{node.api_port}/metrics", timeout=30,
                                context=ctx) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("apiserver_request_total{"))


def container_pids(node: Node, pod: client.V1Pod) -> list[int]:
    """Host PIDs of the running containers of ``pod`` (containerd's task list)."""
    ids = {s.container_id.split("://", 1)[1] for s in (pod.status.container_statuses or [])
           if s.container_id and s.state and s.state.running}
    out = []
    for line in node.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ids and parts[2] == "RUNNING":
            out.append(int(parts[1]))
    return out


def sigkill_pod(node: Node, pod: client.V1Pod) -> list[int]:
    """SIGKILL the main process of each running container of ``pod``; the PIDs killed."""
    pids = container_pids(node, pod)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def host_off(host: SSHHost, node: Node) -> None:
    """Power off: every process of the host dies, and its uplink goes down (inside the
    node's netns), so new connections time out rather than being refused."""
    subprocess.run(["ip", "-n", node.netns, "link", "set", host.veth, "down"], check=True,
                   capture_output=True)
    host.stop()


def host_on(host: SSHHost, node: Node) -> None:
    """Boot again from the same disk (users and homes made before are still there)."""
    host.start()
    subprocess.run(["ip", "-n", node.netns, "link", "set", host.veth, "up"], check=True,
                   capture_output=True)

