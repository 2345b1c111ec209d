"""Session fixtures: the real control plane, SSH hosts and registry every tier uses."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from tests.infra.controlplane import start_cluster
from tests.infra.registry import Registry
from tests.infra.sshhosts import HostFarm, SSHHost


@pytest.fixture(scope="session")
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="mpc-test-"))
    yield d
    if not os.environ.get("MPC_KEEP_TEST_STATE"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(workdir):
    """Real kube-apiserver + etcd + kube-controller-manager with the Tekton CRDs."""
    c = start_cluster(workdir / "cluster")
    try:
        c.install_tekton_crds()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def kube(cluster) -> client.ApiClient:
    return cluster.api_client()


@pytest.fixture
def namespace(kube) -> str:
    """A fresh namespace per test, deleted (and really terminated by the kcm) afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture(scope="session")
def host_farm():
    farm = HostFarm()
    try:
        yield farm
    finally:
        farm.close()


@pytest.fixture
def make_host(host_farm):
    """Factory: ``make_host()`` boots a fresh SSH host, destroyed after the test;
    ``make_host(arch="arm64")`` (or ``"s390x"``) one that really runs that architecture."""
    made: list[SSHHost] = []

    def make(name: str | None = None, arch: str | None = None) -> SSHHost:
        h = host_farm.add(name, arch=arch)
        made.append(h)
        return h
    yield make
    for h in made:
        h.destroy()


# `make test` runs the suite on two pytest-xdist workers (``--dist loadgroup``). Tests
# that need the e2e node, or build mpc's images as `make release` does, form one group:
# one worker runs them in turn on one node (and builds the images once, not twice at the
# same time), the other worker takes the rest. xdist's own grouping reads `xdist_group`
# marks through ``item._nodeid``, which pytest 9.2 no longer has; the group is therefore
# drawn from the test's path here. xdist starts the biggest group first: the long pole.
NODE_GROUP = "e2e-node"
_NODE_PATHS = ("tests/e2e/", "tests/bundles/test_release.py::")


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class NodeGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return NODE_GROUP if nodeid.startswith(_NODE_PATHS) else nodeid

    return NodeGroupScheduling(config, log)


@pytest.fixture(scope="session")
def registry(workdir):
    r = Registry(workdir / "registry").start()
    try:
        yield r
    finally:
        r.stop()
