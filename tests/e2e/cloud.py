"""An EC2 cloud for the e2e node: moto inside the node's netns behind TLS, VMs pods reach.

The runner's pods live in the node's network namespace, and a pod's loopback is
its own: moto cannot stay on this machine's loopback as in ``tests/cloud``. It
runs inside the node's netns bound to the node IP (like the registry), so the
endpoint the pool names is ``https://10.200.0.1:<port>``. The pool schema
accepts plain http only on loopback (the launch request carries the VM's SSH
host key in its user data), so moto serves TLS with a certificate of a
throw-away CA and the pool trusts that CA through ``aws.caBundle``: the product
path a private EC2-compatible endpoint takes, no schema exception for tests.
This machine reaches moto only through a loopback relay (``fwd.py``), for the
hypervisor and the test's own EC2 calls.

The hypervisor (``tests.infra.ec2.Hypervisor``) boots an SSH host for every
instance at its private address, in a host farm of its own whose /24 is the
moto VPC, and moves the host's uplink into the node's netns
(``hosts.move_into_node``): pods reach the VMs' private addresses exactly as
they reach the e2e hosts, and nothing else does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.infra.ec2 import Hypervisor, MotoServer, client, moto_world
from tests.infra.paths import REPO
from tests.infra.pki import PKI
from tests.infra.procs import free_port, wait_for
from tests.infra.sshhosts import HostFarm

from .hosts import move_into_node
from .node import NODE_IP, Node


@dataclass
class NodeCloud:
    moto: MotoServer
    hv: Hypervisor
    farm: HostFarm
    endpoint: str          # as the node's pods name it
    ca_pem: str            # the pool's caBundle
    subnet: str
    ami: str
    key_name: str
    admin_key: bytes       # the key pair's private key (the pool's ``secret``)

    def ec2(self):
        """An EC2 client of this machine (through the relay)."""
        return client(self.moto.url, self.moto.ca)


def _relay(node: Node, port: int, log: Path) -> tuple[subprocess.Popen, int]:
    local = free_port()
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "tests.e2e.fwd", str(node.holder_pid),
                              f"{local}:{NODE_IP}:{port}"], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for("the moto relay", lambda: b"forwarding" in log.read_bytes(), timeout=30, log=log)
    return p, local


@contextmanager
def cloud_in_node(node: Node, host_farm: HostFarm, work: Path) -> Iterator[NodeCloud]:
    """moto (TLS) inside ``node``'s netns, its VPC, AMI and key pair, and a running hypervisor."""
    work.mkdir(parents=True, exist_ok=True)
    pki = PKI(work / "pki").create([NODE_IP], [])
    crt, key = pki.serving("moto", "moto", [NODE_IP, "127.0.0.1"], [])
    moto = MotoServer(work / "moto.log", argv_prefix=("nsenter", f"--net=/run/netns/{node.netns}"),
                      bind=NODE_IP, tls=(crt, key, pki.ca_crt))
    relay, moto.local_port = _relay(node, moto.port, work / "relay.log")
    host_farm._extract()
    farm = HostFarm(session=f"{os.getpid() % 10000:04d}e", base=host_farm.base)
    hv = None
    try:
        moto.start()
        subnet, ami, admin_priv = moto_world(client(moto.url, moto.ca), farm.SUBNET, "mpc-e2e")
        hv = Hypervisor(moto.url, farm, ca=moto.ca, place=lambda h: move_into_node(h, node)).start()
        yield NodeCloud(moto, hv, farm, f"https://{NODE_IP}:{moto.port}",
                        pki.ca_crt.read_text(), subnet, ami, "mpc-e2e", admin_priv)
    finally:
        if hv is not None:
            hv.stop()
        moto.stop()
        relay.terminate()
        relay.wait(timeout=10)
        farm.close()
