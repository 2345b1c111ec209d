"""``make run``'s result, asserted through the same code (``runjob.py``) on the session's node.

mpc as released and installed by the session fixture ``mpc``; two SSH build hosts
that really are linux/arm64 and linux/s390x (QEMU user emulation) take the pool's
place for the duration of the test; the sample PipelineRun (a matrix over PLATFORM
of ``buildah-remote`` from its bundle, then an index step) must push one image
index whose manifests say arm64 and s390x and whose binaries are of those
architectures (``file`` and the ELF header of ``/usr/bin/ls`` from each image).

qemu-user cannot start a container (docs/emulated-hosts.md), so the pool gives
these hosts ``builder: host``: buildah-remote runs the build script as root on
the host itself (``sudo unshare`` into a mount and PID namespace of its own, the pod's paths bind-mounted), with the
host's buildah. A failure of any kind fails the test (``runjob.explain``).

Bounded: the test function ends within ``LIMIT`` seconds (pytest-timeout; the
session's ``mpc`` fixture is not charged to it, the emulated hosts' setup has its
own bounded waits), and the PipelineRun's own Tekton timeout is shorter, so a
stuck build never holds ``make test`` for long.
"""
from __future__ import annotations

import pytest
from kubernetes import client

from mpc.runner import contract as c

from . import hosts as e2e_hosts
from . import runjob
from .install import NS, PREPARE_HOST, wait_for
from .node import REGISTRY

LIMIT = 600                 # the test function: images pushed, builds, index checked
BUILD_LIMIT = 420           # the PipelineRun (Tekton times it out too): ~100 s when it works
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(LIMIT, func_only=True)]

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
        # the builds' deprovisioning needs these hosts: a host gone first keeps its slot for
        # the removed-host grace (24 h), and the next test of the session finds it
        try:
            wait_for("the builds' slots released", lambda: not mpc.slots(), timeout=300)
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


def test_make_run_builds_one_index_of_arm64_and_s390x_images(mpc, emulated_pool, e2e_namespace,
                                                             tmp_path):
    node, kube, ns = mpc.node, mpc.kube, e2e_namespace
    builder = runjob.builder_index(node, log=print)
    base = runjob.base_index(node, log=print)
    image = f"{REGISTRY}/demo/hello:{ns}"
    out = runjob.run_demo(node, kube, ns, "multiarch", mpc.bundles["task-buildah-remote"],
                          builder, base, image, log=print, timeout=BUILD_LIMIT)
    try:
        if not out.index:
            pytest.fail(runjob.explain(out))
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
        # and each was deprovisioned: no slot, no build user left on the emulated hosts
        wait_for("the builds' slots released", lambda: not mpc.slots(), timeout=300)
        assert {h.name: [u for u in h.users() if c.USER_RE.match(u)] for h in emulated_pool} \
            == {h.name: [] for h in emulated_pool}
    finally:
        runjob.drop_claim(node, kube, ns, "multiarch-src")
