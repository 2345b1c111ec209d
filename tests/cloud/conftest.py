"""Fixtures of the cloud tier: moto's EC2 API on loopback, a fault proxy in front of it,
a hypervisor that boots an SSH test host for every instance, and a dynamic pool."""
from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass

import pytest
import yaml
from kubernetes import client, config

from mpc.runner import contract
from mpc.runner.kube import Kube
from mpc.runner.provision import Request
from tests.infra.ec2 import CREDS, REGION, Ec2Proxy, Hypervisor, MotoServer, moto_world
from tests.infra.ec2 import client as ec2_client
from tests.infra.sshhosts import HostFarm
from tests.provisioning.conftest import controller, make_taskrun  # noqa: F401 - fixtures

PLATFORM = "linux/arm64"


@pytest.fixture(scope="session")
def moto(workdir):
    m = MotoServer(workdir / "moto.log").start()
    yield m
    m.stop()


@pytest.fixture(scope="package")
def cloud_farm(host_farm):
    # package scope: the farm and its unreachable route go when tests/cloud is done,
    # before later tiers check that farms leave no route behind
    host_farm._extract()
    farm = HostFarm(session=f"{os.getpid() % 10000:04d}c", base=host_farm.base)
    # instances that have not booted (or never will) are unreachable at once: their
    # addresses must never leave this machine by its default route
    net = f"{farm.SUBNET}.0/24"
    subprocess.run(["ip", "route", "add", "unreachable", net], check=True, capture_output=True)
    try:
        yield farm
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", net], capture_output=True)
        farm.close()


@dataclass
class Cloud:
    moto: MotoServer
    proxy: Ec2Proxy
    hv: Hypervisor
    ctl: object                  # tests.provisioning.conftest.Controller
    subnet: str
    ami: str
    key_name: str
    admin_key: bytes

    @property
    def ec2(self):
        return ec2_client(self.moto.url)

    @property
    def kube(self) -> Kube:
        """As the provisioning Tasks' ServiceAccount (its real RBAC)."""
        return Kube(config.new_client_from_config(str(self.ctl.kubeconfig)))

    def pool(self, tag: str = "mpc-test", **dyn) -> dict:
        entry = {"platform": PLATFORM, "provider": "aws", "secret": "vm-admin",
                 "sshUser": "mpcadmin", "maxInstances": 2, "bootTimeoutSeconds": 30,
                 "aws": {"region": REGION, "endpoint": self.proxy.url, "ami": self.ami,
                         "instanceType": "t3.micro", "keyName": self.key_name,
                         "credentialsSecret": "aws-creds", "subnet": self.subnet}} | dyn
        doc = {"hosts": [], "instanceTag": tag, "dynamic": [entry]}
        self.ctl.set_pool_text(yaml.safe_dump(doc))
        return doc

    def request(self, tr: dict) -> Request:
        m = tr["metadata"]
        return Request(taskrun_name=m["name"], taskrun_namespace=m["namespace"],
                       taskrun_uid=m["uid"], platform=PLATFORM,
                       controller_namespace=self.ctl.namespace)

    def records(self) -> list:
        return client.CoordinationV1Api(self.ctl.kube).list_namespaced_lease(
            self.ctl.namespace, label_selector=f"{contract.LABEL_ROLE}={contract.ROLE_VM}").items


@pytest.fixture
def cloud(moto, cloud_farm, controller):
    moto.reset()
    subnet, ami, admin_priv = moto_world(ec2_client(moto.url), cloud_farm.SUBNET, "mpc-test")
    core = client.CoreV1Api(controller.kube)
    for name, data in (("vm-admin", {"id_rsa": admin_priv}), ("aws-creds", CREDS)):
        core.create_namespaced_secret(controller.namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            data={k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
                  for k, v in data.items()}))
    proxy = Ec2Proxy(moto.port).start()
    hv = Hypervisor(moto.url, cloud_farm).start()
    try:
        yield Cloud(moto, proxy, hv, controller, subnet, ami, "mpc-test", admin_priv)
    finally:
        hv.stop()
        proxy.stop()
