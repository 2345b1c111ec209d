"""Dynamic hosts on the real node (issue 15): a build served from a warm VM, the pool refilled.

mpc is installed as released (the session fixture ``mpc``); an EC2 cloud runs for
the node (``cloud.py``: moto inside the node's netns behind TLS, trusted through
the pool's ``caBundle``, and a hypervisor that boots an SSH host at each
instance's private address, reachable from the node's pods). The pool gets a
dynamic platform with ``minIdle: 2`` and the watcher a short ``--sweep-interval``,
so its own sweep runs (the released ``mpc-sweep`` Task in Tekton) boot the warm
VMs. A build TaskRun of that platform must then be served from one of them: its
secret names a VM that was warm before the build existed, the ``VMClaimed``
Event names its instance, and the build step's SSH session runs on it. After the
build the single-use VM is terminated and the sweep refills the pool: two idle,
ready VMs again, and EC2 itself lists no instance that no record holds.
"""
from __future__ import annotations

import base64
import time
import uuid

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner.kube import Kube
from mpc.runner.vms import READY, Records

from .cloud import cloud_in_node
from .install import BUILD_PREAMBLE, NS, TIMEOUT, _co, _cond, _ts, get, secret_exists, \
    step_log, wait_done, wait_for, watcher_flag
from .test_mpc_e2e import Recorder

pytestmark = pytest.mark.e2e

DYN = "linux/ppc64le"       # neither the installed pool's static platform nor the soak's
SWEEP = "30s"               # the watcher's sweep interval while the test runs (shorter piles
                            # sweep pods up on a loaded node: the watcher starts one per interval)
INSTANCE_TAG = f"mpc-e2e-{uuid.uuid4().hex[:6]}"
VM_ROLES = (c.ROLE_VM, c.ROLE_VM_BUILD, c.ROLE_VM_NAMESPACE, c.ROLE_VM_STATS)

BUILD_SCRIPT = BUILD_PREAMBLE + r"""exec ssh "${ssh_opts[@]}" "$host" \
  'echo "dyn-ok on $(cat /etc/hostname) as $(id -un)"'
"""


def _leases(inst):
    return client.CoordinationV1Api(inst.kube)


def _sweeps_running(inst) -> list[str]:
    runs = _co(inst.kube).list_namespaced_custom_object(
        "tekton.dev", "v1", NS, "taskruns", label_selector=f"{c.LABEL_ROLE}=sweep")["items"]
    return [r["metadata"]["name"] for r in runs if _cond(r).get("status") in (None, "Unknown")]


@pytest.fixture
def dynamic_cloud(mpc, e2e_node, host_farm, tmp_path):
    """The installed pool plus a dynamic platform DYN (minIdle 2) on a cloud the node's pods
    reach, the watcher sweeping every SWEEP; everything put back and terminated after.
    Yields (cloud, when the pool was set)."""
    inst = mpc
    core = client.CoreV1Api(inst.kube)
    with cloud_in_node(e2e_node, host_farm, tmp_path / "cloud") as cl:
        secrets = {"vm-admin": {"id_rsa": cl.admin_key},
                   "aws-creds": {"access-key-id": b"testing", "secret-access-key": b"testing"}}
        for name, data in secrets.items():
            core.create_namespaced_secret(NS, client.V1Secret(
                metadata=client.V1ObjectMeta(name=name),
                data={k: base64.b64encode(v).decode() for k, v in data.items()}))
        before = core.read_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS).data[c.POOL_KEY]
        pool = yaml.safe_load(before) | {"instanceTag": INSTANCE_TAG, "dynamic": [{
            "platform": DYN, "provider": "aws", "secret": "vm-admin", "sshUser": "mpcadmin",
            "maxInstances": 3, "minIdle": 2, "bootTimeoutSeconds": 60,
            "aws": {"region": "us-east-1", "endpoint": cl.endpoint, "caBundle": cl.ca_pem,
                    "ami": cl.ami, "instanceType": "t3.micro", "keyName": cl.key_name,
                    "credentialsSecret": "aws-creds", "subnet": cl.subnet}}]}
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS,
                                         {"data": {c.POOL_KEY: yaml.safe_dump(pool)}})
        t_pool = time.monotonic()
        try:
            with watcher_flag(inst, "--sweep-interval", SWEEP):
                yield cl, t_pool
        finally:
            # no sweep may launch once the platform is gone; then nothing of it may remain
            core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS,
                                             {"data": {c.POOL_KEY: before}})
            try:
                wait_for("the sweeps in flight done", lambda: not _sweeps_running(inst),
                         timeout=120)
            except TimeoutError:       # a crawling node: stop them (their pods go with them)
                for run in _sweeps_running(inst):
                    _co(inst.kube).delete_namespaced_custom_object(
                        "tekton.dev", "v1", NS, "taskruns", run)
                wait_for("the sweep pods gone", lambda: not [
                    p for p in core.list_namespaced_pod(NS).items
                    if p.metadata.name.startswith(c.SWEEP_TASK)
                    and p.status.phase in ("Pending", "Running")])
            ec2 = cl.ec2()
            ids = [i["InstanceId"] for i in cl.hv.alive()]
            if ids:
                ec2.terminate_instances(InstanceIds=ids)
            for role in VM_ROLES:
                _leases(inst).delete_collection_namespaced_lease(
                    NS, label_selector=f"{c.LABEL_ROLE}={role}")
            for name in secrets:
                core.delete_namespaced_secret(name, NS)


def _build(inst, ns: str, name: str) -> dict:
    return _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": name},
        "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": DYN}],
                 "taskSpec": {
                     "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
                     "volumes": [{"name": "ssh", "secret": {"secretName": c.secret_name(name)}}],
                     "steps": [{"name": "build", "image": inst.builder_image,
                                "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                                "script": BUILD_SCRIPT}]}}})


@pytest.mark.timeout(int(3 * TIMEOUT))
def test_a_build_is_served_from_a_warm_vm_and_the_pool_is_refilled(mpc, e2e_namespace,
                                                                   dynamic_cloud):
    inst, ns, (cl, t_pool) = mpc, e2e_namespace, dynamic_cloud
    t0 = time.monotonic()
    records = Records(Kube(inst.node.api_client()), NS)

    def idle() -> list:
        busy = {(p.metadata.labels or {}).get(c.LABEL_VM) for p in records.all_places()}
        return [v for v in records.all(DYN) if v.state == READY and v.name not in busy]

    def alive_ids() -> set[str]:
        return {i["InstanceId"] for i in cl.hv.alive()}

    # the watcher's sweeps boot the warm pool: two ready VMs, no build on them
    warm = wait_for("two warm VMs", lambda: len(v := idle()) == 2 and v)
    t_warm = time.monotonic()
    by_address = {v.address: v for v in warm}
    assert alive_ids() == {v.instance_id for v in warm}, (alive_ids(), warm)
    assert set(cl.hv.hosts) == alive_ids(), cl.hv.errors

    name = "dyn-build"
    rec = Recorder(inst, ns).start()
    try:
        tr = _build(inst, ns, name)
        t_created = time.monotonic()
        done = wait_done(inst, ns, "taskruns", name)
        t_done = time.monotonic()
        log = step_log(inst, ns, done, "build")
        assert _cond(done).get("status") == "True", (_cond(done), log)
        uid = tr["metadata"]["uid"]
        wait_for("the finalizer removed", lambda: c.FINALIZER not in (
            get(inst, ns, "taskruns", name)["metadata"].get("finalizers") or ()))
        wait_for("the deprovisioning run succeeded", lambda: any(
            _cond(s).get("status") == "True"
            for s in rec.runs("pr", "deprovision").get(c.deprovision_run_name(uid), [])))
    finally:
        rec.stop()

    # served from a VM that was warm before the build existed, and the build ran on it
    created, data = rec.secrets[c.secret_name(name)]
    user, address = data[c.KEY_HOST].split("@")
    assert address in by_address, (data, by_address)
    vm = by_address[address]
    assert f"dyn-ok on {vm.instance_id} as {user}" in log, log
    build_started = _ts(done["status"]["steps"][0]["terminated"]["startedAt"])
    assert created <= build_started
    events = client.CoreV1Api(inst.kube).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items
    reasons = {e.reason: e.message for e in events}
    assert vm.instance_id in reasons.get("VMClaimed", ""), reasons
    assert "VMLaunched" not in reasons, reasons
    prov = rec.runs("pr", "provision")[c.provision_run_name(uid)]
    assert _cond(prov[-1]).get("status") == "True", _cond(prov[-1])

    # the single-use VM is gone and the sweep refilled the pool: two idle VMs again, and
    # EC2 runs exactly the instances the records hold
    def refilled():
        vms, now_idle, alive = records.all(DYN), idle(), alive_ids()
        return (len(vms) == 2 and len(now_idle) == 2 and vm.instance_id not in alive
                and alive == {v.instance_id for v in vms} and now_idle)
    after = wait_for("the warm pool refilled", refilled)
    t_refilled = time.monotonic()
    ids = {v.instance_id for v in after}
    assert ids >= {v.instance_id for v in warm} - {vm.instance_id} and len(ids - {
        v.instance_id for v in warm}) == 1, (warm, after)
    uids = {v.uid for v in records.all()}
    for i in cl.hv.alive():
        tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
        assert tags.get(c.TAG_RECORD_UID) in uids and tags.get(c.TAG_INSTANCE) == INSTANCE_TAG, i
    assert not records.all_places()
    assert not secret_exists(inst, ns, c.secret_name(name))
    assert not cl.hv.errors, cl.hv.errors
    print(f"\nFIGURES dynamic e2e: warm pool of 2 ready {t_warm - t_pool:.1f} s after the pool "
          f"was set (the watcher rolled out with --sweep-interval={SWEEP} meanwhile: "
          f"{t0 - t_pool:.1f} s); build created -> step started "
          f"{(build_started - _ts(done['metadata']['creationTimestamp'])).total_seconds():.0f} s "
          f"(API timestamps), done {t_done - t_created:.1f} s; pool refilled "
          f"{t_refilled - t_done:.1f} s after the build finished; instances seen "
          f"{len(cl.hv.seen)}; test {time.monotonic() - t_pool:.1f} s from the pool set")
