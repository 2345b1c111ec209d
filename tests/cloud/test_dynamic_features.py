"""Features of dynamic platforms beyond one build per fresh VM, each on real VMs (moto's EC2,
an SSH host per instance): shared VMs (maxBuildsPerVM > 1), the per-namespace quota,
maxAgeSeconds recycling, the SSH health check of idle VMs, and VMs that die under their
builds. Afterwards no instance runs that no record holds and no record points at nothing."""
from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
import uuid
from pathlib import Path

import yaml
from kubernetes import client

from mpc.runner import contract
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.provision import provision
from tests.infra.procs import wait_for
from tests.provisioning.conftest import delete_taskrun, make_taskrun, read_secret

from .conftest import PLATFORM


def _release(cloud, tr):
    m = tr["metadata"]
    return deprovision(cloud.kube, cloud.ctl.namespace, m["namespace"], m["name"], m["uid"],
                       provisioning_grace=0)


def _serve(cloud, tr, max_wait: int | None = None):
    req = cloud.request(tr)
    req.max_wait_seconds = max_wait
    return provision(cloud.kube, req, poll=0.2)


def _where(cloud, tr) -> tuple[str, str]:
    """(user, instance id) the build's secret sends it to."""
    user, address = read_secret(cloud.ctl.kube, tr)[contract.KEY_HOST].split("@")
    (iid,) = [i for i, h in cloud.hv.hosts.items() if h.address == address]
    return user, iid


def _login(cloud, tr, tmp_path: Path) -> str:
    """Log in with the build's secret (its key, the pinned known_hosts): who am I?"""
    s = read_secret(cloud.ctl.kube, tr)
    user, iid = _where(cloud, tr)
    d = tmp_path / uuid.uuid4().hex[:6]
    d.mkdir()
    (d / "id").write_text(s[contract.KEY_PRIVATE_KEY])
    (d / "id").chmod(0o600)
    (d / "kh").write_text(s[contract.KEY_KNOWN_HOSTS])
    argv = cloud.hv.hosts[iid].ssh_argv(user=user, key=d / "id", known_hosts=d / "kh")
    r = subprocess.run([*argv, "id -un"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _record_of(cloud, iid: str):
    return next(r for r in cloud.records()
                if (r.metadata.annotations or {}).get(contract.ANN_INSTANCE_ID) == iid)


def _age(cloud, iid: str, seconds: int) -> None:
    """The VM of instance ``iid`` was launched ``seconds`` ago (as if that time had passed)."""
    rec = _record_of(cloud, iid)
    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    client.CoordinationV1Api(cloud.ctl.kube).patch_namespaced_lease(
        rec.metadata.name, cloud.ctl.namespace,
        {"metadata": {"annotations": {contract.ANN_LAUNCHED_AT: then.isoformat()}}})


def _alive(cloud) -> set[str]:
    return {i["InstanceId"] for i in cloud.hv.alive()}


def _state(cloud, iid: str) -> str:
    return {i["InstanceId"]: i["State"]["Name"] for i in cloud.hv.instances()}[iid]


def _consistent(cloud) -> None:
    """Every running instance has its record and every record its running instance."""
    recs = {r.metadata.annotations.get(contract.ANN_INSTANCE_ID) for r in cloud.records()}
    assert recs == _alive(cloud), (recs, _alive(cloud))


def _places(cloud) -> list:
    return cloud.ctl.leases(contract.ROLE_VM_BUILD)


def test_shared_vm_each_build_its_own_user_third_launches_another(cloud, namespace, tmp_path):
    """maxBuildsPerVM 2: two builds share one VM, each logged in as its own user; a third
    gets a second VM; a released build's user goes, the VM stays for the others and takes
    the next build without a launch."""
    cloud.pool(maxInstances=2, maxBuildsPerVM=2)
    a, b, c = (make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(3))
    assert _serve(cloud, a).result == "served"
    assert _serve(cloud, b).result == "served"
    (ua, va), (ub, vb) = _where(cloud, a), _where(cloud, b)
    assert va == vb and ua != ub and len(cloud.hv.seen) == 1      # shared: one launch
    assert _login(cloud, a, tmp_path) == ua and _login(cloud, b, tmp_path) == ub
    assert {ua, ub} <= set(cloud.hv.hosts[va].users())
    assert _serve(cloud, c).result == "served"
    uc, vc = _where(cloud, c)
    assert vc != va and len(cloud.hv.seen) == 2                  # the first VM is full
    assert _login(cloud, c, tmp_path) == uc
    # a leaves: its user is removed, b keeps working on the same VM
    assert _release(cloud, a).errors == []
    users = cloud.hv.hosts[va].users()
    assert ua not in users and ub in users
    assert _login(cloud, b, tmp_path) == ub
    # b leaves too: the VM stays, ready, and serves the next build without a launch
    assert _release(cloud, b).errors == []
    assert va in _alive(cloud)
    assert _record_of(cloud, va).metadata.labels[contract.LABEL_VM_STATE] == "ready"
    d = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, d).result == "served"
    ud, vd = _where(cloud, d)
    assert vd in (va, vc) and len(cloud.hv.seen) == 2 and ud not in (ua, ub, uc)
    for tr in (c, d):
        assert _release(cloud, tr).errors == []
    assert _places(cloud) == []
    _consistent(cloud)
    assert cloud.hv.errors == []


def test_namespace_quota_queues_only_that_namespace(cloud, namespace, kube):
    """maxInstancesPerNamespace 1: a second build of the same namespace waits, a build of
    another namespace is served meanwhile (the waiting one does not hold up the queue),
    and the waiting one is served when the first is released."""
    other = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        cloud.pool(maxInstances=2, maxInstancesPerNamespace=1)
        a, b = (make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(2))
        c = make_taskrun(cloud.ctl.kube, other, platform=PLATFORM)
        assert _serve(cloud, a).result == "served"
        # a build of the same namespace times out rather than take a second VM
        out = _serve(cloud, b, max_wait=2)
        assert out.result == "error" and "maxInstancesPerNamespace 1" in out.message, out
        assert len(cloud.hv.seen) == 1
        delete_taskrun(cloud.ctl.kube, b)
        # queued again, for longer: another namespace's build is served meanwhile
        b = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
        got = {}
        waiter = threading.Thread(target=lambda: got.update(out=_serve(cloud, b, max_wait=120)))
        waiter.start()
        wait_for("b queued", lambda: [w for w in cloud.ctl.leases("waiter")
                                      if w.metadata.labels[contract.LABEL_TASKRUN_UID]
                                      == b["metadata"]["uid"]], timeout=60)
        time.sleep(1.1)         # creationTimestamps have 1 s steps: c queues behind b for sure
        assert _serve(cloud, c, max_wait=30).result == "served"
        assert waiter.is_alive() and read_secret(cloud.ctl.kube, b) is None
        assert len(_alive(cloud)) == 2
        assert _release(cloud, a).errors == []
        waiter.join(timeout=120)
        assert got["out"].result == "served", got
        assert len(cloud.hv.seen) == 3 and cloud.hv.max_alive <= 2
        for tr in (b, c):
            assert _release(cloud, tr).errors == []
        assert cloud.ctl.leases(contract.ROLE_VM_NAMESPACE) == []
        assert _alive(cloud) == set() and cloud.records() == []
    finally:
        core.delete_namespace(other)


def test_max_age_recycles_idle_and_retires_busy_vms_when_done(cloud, namespace):
    """A warm VM past maxAgeSeconds is not claimed; the sweep terminates it and launches a
    fresh one for minIdle. A shared VM that ages while a build runs on it takes no new
    build and is terminated when that build is released."""
    cloud.pool(maxInstances=3, minIdle=1, maxBuildsPerVM=2, maxAgeSeconds=60)
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    (w1,) = _alive(cloud)
    _age(cloud, w1, 3600)
    a = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, a).result == "served"
    _, va = _where(cloud, a)
    assert va != w1 and len(cloud.hv.seen) == 2                  # the old VM was passed over
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    assert rep.errors == []
    assert _state(cloud, w1) == "terminated"
    alive = _alive(cloud)
    assert va in alive and len(alive) == 2                       # a's VM, a fresh warm one
    _consistent(cloud)
    # a's VM ages under it: the next build goes to the warm VM, and a's release retires it
    _age(cloud, va, 3600)
    b = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, b).result == "served"
    assert _where(cloud, b)[1] != va
    assert _release(cloud, a).errors == []
    assert _state(cloud, va) == "terminated"
    _consistent(cloud)
    assert _release(cloud, b).errors == []
    _consistent(cloud)


def test_health_check_replaces_a_dead_idle_vm(cloud, namespace, tmp_path):
    """A warm VM that stops answering SSH (EC2 still says running) is terminated by the
    sweep and replaced; a build that claims a dead warm VM before any sweep fails over."""
    cloud.pool(maxInstances=2, minIdle=1)
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    (w1,) = _alive(cloud)
    cloud.hv.hosts[w1].stop()
    assert _state(cloud, w1) == "running"
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    assert _state(cloud, w1) == "terminated", rep
    (w2,) = _alive(cloud)
    _consistent(cloud)
    # the replacement answers: a build claims it without a launch
    a = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, a).result == "served"
    assert _where(cloud, a)[1] == w2 and len(cloud.hv.seen) == 2
    assert _release(cloud, a).errors == []
    # a warm VM dies between two sweeps: the build that claims it gets another VM
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    (w3,) = _alive(cloud)
    cloud.hv.hosts[w3].stop()
    b = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, b).result == "served"
    _, vb = _where(cloud, b)
    assert vb != w3 and _state(cloud, w3) == "terminated"
    assert _login(cloud, b, tmp_path)
    assert _release(cloud, b).errors == []
    _consistent(cloud)


def test_vm_dying_mid_build_leaves_nothing(cloud, namespace):
    """A VM dies under its build: its host crashes (EC2 still says running), or EC2
    terminates it (a spot interruption). Release, or the sweep once the build is done,
    leaves no record and no instance."""
    cloud.pool(maxInstances=3)
    crashed, reclaimed, unreleased = (make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
                                      for _ in range(3))
    for tr in (crashed, reclaimed, unreleased):
        assert _serve(cloud, tr).result == "served"
    v1, v2, v3 = (_where(cloud, tr)[1] for tr in (crashed, reclaimed, unreleased))
    cloud.hv.hosts[v1].stop()
    cloud.ec2.terminate_instances(InstanceIds=[v2])
    cloud.hv.hosts[v3].stop()
    assert _release(cloud, crashed).errors == []
    assert _release(cloud, reclaimed).errors == []
    assert _state(cloud, v1) == "terminated" and _state(cloud, v2) == "terminated"
    assert read_secret(cloud.ctl.kube, crashed) is None
    # the third build ends and its deprovisioning never runs: the sweep cleans up
    delete_taskrun(cloud.ctl.kube, unreleased)
    sweep(cloud.kube, cloud.ctl.namespace)
    assert _alive(cloud) == set() and cloud.records() == [] and _places(cloud) == []
    # EC2 reclaims a VM while its build still runs: the sweep does not wait for the
    # build to end to give back the record (and the quota); the release finds nothing
    interrupted = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, interrupted).result == "served"
    (v4,) = _alive(cloud)
    cloud.ec2.terminate_instances(InstanceIds=[v4])
    sweep(cloud.kube, cloud.ctl.namespace)
    assert cloud.records() == [] and _places(cloud) == []
    assert _release(cloud, interrupted).errors == []
    assert _alive(cloud) == set() and cloud.records() == []


def test_shared_vm_dying_under_its_builds_leaves_nothing(cloud, namespace):
    """Two builds share a VM whose host crashes (EC2 still says running): their users
    cannot be removed, so their places stay for the sweep; once both builds are done the
    sweep terminates the VM (taking the users with it) and deletes its record."""
    cloud.pool(maxInstances=2, maxBuildsPerVM=2)
    a, b = (make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(2))
    for tr in (a, b):
        assert _serve(cloud, tr).result == "served"
    (vm,) = _alive(cloud)
    cloud.hv.hosts[vm].stop()
    assert _release(cloud, a).errors != []           # the user could not be removed
    sweep(cloud.kube, cloud.ctl.namespace)
    assert vm in _alive(cloud)                       # b still runs there (as far as we know)
    for tr in (a, b):
        delete_taskrun(cloud.ctl.kube, tr)
    sweep(cloud.kube, cloud.ctl.namespace)
    assert _alive(cloud) == set() and cloud.records() == [] and _places(cloud) == []


def test_spot_refused_falls_back_to_on_demand(cloud, namespace):
    """aws.spot: launches ask for spot; when EC2 has no spot capacity the same build gets
    an on-demand VM instead (one VM, not two)."""
    doc = cloud.pool(maxInstances=2)
    doc["dynamic"][0]["aws"]["spot"] = True
    cloud.ctl.set_pool_text(yaml.safe_dump(doc))
    a = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, a).result == "served"
    (ia,) = cloud.hv.alive()
    assert ia.get("InstanceLifecycle") == "spot"
    cloud.proxy.refuse_spot = 1
    b = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert _serve(cloud, b).result == "served"
    assert cloud.proxy.injected.get("spot") == 1
    _, vb = _where(cloud, b)
    ib = next(i for i in cloud.hv.alive() if i["InstanceId"] == vb)
    assert ib.get("InstanceLifecycle") != "spot" and len(cloud.hv.seen) == 2
    for tr in (a, b):
        assert _release(cloud, tr).errors == []
    assert _alive(cloud) == set() and cloud.records() == []
