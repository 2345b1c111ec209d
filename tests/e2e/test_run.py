"""``make run``'s result, asserted through the same code (``runjob.py``) on the session's node.

mpc as released and installed by the session fixture ``mpc``; two SSH build hosts
that really are linux/arm64 and linux/s390x (QEMU user emulation) take the pool's
place for the duration of the test; the sample PipelineRun (a matrix over PLATFORM
of ``buildah-remote`` from its bundle, then an index step) must push one image
index whose manifests say arm64 and s390x and whose binaries are of those
architectures (``file`` and the ELF header of ``/usr/bin/ls`` from each image).

Known limit (docs/emulated-hosts.md): buildah-remote runs its builder container
with podman on the host, and qemu-user (7.2 and 10.0 alike) cannot start a
container: rootless podman needs a user namespace (``unshare(CLONE_NEWUSER)`` is
EINVAL in an emulated, hence multi-threaded, process) and root's podman needs
runc/crun, whose namespace ``clone()`` / memfd re-exec qemu-user does not emulate.
So the builds fail on the hosts and the test is a strict xfail on exactly that
(``runjob.BuildBlocked``, raised only when every failed build's log shows it);
any other failure fails the test.
"""
from __future__ import annotations

import pytest
from kubernetes import client

from mpc.runner import contract as c

from . import hosts as e2e_hosts
from . import runjob
from .install import NS, PREPARE_HOST
from .node import REGISTRY

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

MACHINE = {"linux/arm64": ("aarch64", 183), "linux/s390x": ("IBM S/390", 22)}


@pytest.fixture
def emulated_pool(mpc, host_farm):
    """The installed pool replaced by one emulated host per architecture; put back after."""
    core = client.CoreV1Api(mpc.kube)
    before = core.read_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS).data
    hosts, records = [], []
    try:
        for arch in runjob.ARCHES:
            h = e2e_hosts.move_into_node(host_farm.add(name=f"emu-{arch}", arch=arch), mpc.node)
            hosts.append(h)
            h.exec(PREPARE_HOST)
            records.append(runjob.host_record(h, arch))
        runjob.install_pool(mpc.kube, records, NS)
        yield hosts
    finally:
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS, {"data": before})
        for r in records:
            try:
                core.delete_namespaced_secret(f"admin-{r['name']}", NS)
            except client.ApiException as e:
                if e.status != 404:
                    raise
        for h in hosts:
            h.destroy()


@pytest.mark.xfail(strict=True, raises=runjob.BuildBlocked, reason=(
    "qemu-user cannot start a container on the emulated hosts (rootless: no user namespace; "
    "root: runc/crun cannot clone into namespaces), and buildah-remote always runs its "
    "builder with podman on the host; see docs/emulated-hosts.md"))
def test_make_run_builds_one_index_of_arm64_and_s390x_images(mpc, emulated_pool, e2e_namespace,
                                                             tmp_path):
    node, kube, ns = mpc.node, mpc.kube, e2e_namespace
    builder = runjob.builder_index(node, log=print)
    base = runjob.base_index(node, log=print)
    image = f"{REGISTRY}/demo/hello:{ns}"
    out = runjob.run_demo(node, kube, ns, "multiarch", mpc.bundles["task-buildah-remote"],
                          builder, base, image, log=print, timeout=1800)
    try:
        if not out.index:
            pytest.fail(runjob.explain(out))     # raises BuildBlocked on the known limit
        images = runjob.inspect_index(node, out.index, tmp_path)
        assert sorted(m["platform"] for m in images) == sorted(runjob.PLATFORMS), images
        for m in images:
            word, e_machine = MACHINE[m["platform"]]
            assert m["architecture"] == m["platform"].split("/")[1], m
            assert word in m["file"], m
            assert m["elf_machine"] == e_machine, m
            assert m["hello"] == "hello from mpc\n", m
        # each build ran on the host of its platform
        for tn, tr in out.taskruns.items():
            plat = next((p["value"] for p in tr["spec"].get("params", [])
                         if p["name"] == "PLATFORM"), None)
            if plat:
                assert tr["status"]["conditions"][0]["status"] == "True", (tn, tr["status"])
    finally:
        runjob.drop_claim(node, kube, ns, "multiarch-src")
