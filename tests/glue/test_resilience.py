"""Watch expiry (410 Gone after etcd compaction and an API server restart), allowed
namespaces, garbage collection and the periodic sweep."""
from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner.kube import Kube as RunnerKube
from mpc.runner.slots import Holder, Slots
from tests.infra.procs import wait_for

from .support import build_taskrun
from .test_lifecycle import events_for, has_finalizer, prs_for
from .test_queue import PLATFORM, _builds, _pool, _queued


def test_watch_expired_relists_and_recovers(cluster, kube, tekton, watcher, namespace, ctrl_ns):
    _api_server(cluster)
    w = watcher().start().wait_ready()
    a = tekton.create_tr(namespace, build_taskrun("before"))["metadata"]["uid"]
    wait_for("first build", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(a)), timeout=30)
    # Move the store on without the watcher seeing it, compact the history away and
    # restart the API server: its watch cache starts after the watcher's resourceVersion.
    core = client.CoreV1Api(kube)
    for i in range(5):
        core.create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"filler-{i}")))
    _restart_api_server(cluster, tekton, namespace)
    wait_for("watch expired seen", lambda: "watch expired, re-listing" in w.log_text(),
             timeout=120, log=w.log)
    b = tekton.create_tr(namespace, build_taskrun("after"))["metadata"]["uid"]
    wait_for("build after the 410", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(b)),
             timeout=60, log=w.log)
    assert has_finalizer(tekton.get_tr(namespace, "after"))
    assert w.metric("mpc_glue_errors_total", kind="watch_expired") >= 1
    assert w.get("/healthz")[0] == 200 and w.get("/readyz")[0] == 200
    # the first build is unaffected and was not provisioned twice
    assert len(prs_for(tekton, ctrl_ns, a)) == 1


def _api_server(cluster):
    api = next((d for d in getattr(cluster, "daemons", []) if d.name == "kube-apiserver"), None)
    if api is None:
        pytest.skip("external cluster: cannot compact etcd or restart its API server")
    return api


def _restart_api_server(cluster, tekton, namespace: str, behind_its_back=()) -> None:
    """Stop the API server, delete ``behind_its_back`` (etcd key suffixes) in etcd itself,
    so that no watch ever shows those deletions, compact the history away and start it
    again: every watch of the watcher gets 410 Gone and must LIST again."""
    api = _api_server(cluster)
    api.stop()
    etcdctl = ["etcdctl", f"--endpoints={cluster.etcd_url}"]
    keys = subprocess.run([*etcdctl, "get", "--prefix", "--keys-only", "/registry/"],
                          check=True, capture_output=True, text=True).stdout.split()
    for suffix in behind_its_back:
        found = [k for k in keys if k.endswith(suffix)]
        assert len(found) == 1, (suffix, found)
        subprocess.run([*etcdctl, "del", found[0]], check=True, capture_output=True)
    cluster.compact_etcd()
    api.start()
    # Tekton's paths come back after the core ones (503 "before all known HTTP paths
    # have been installed" until then)
    wait_for("API server back", lambda: tekton.co.list_namespaced_custom_object(
        "tekton.dev", "v1", namespace, "taskruns", limit=1) is not None, timeout=120)


def test_a_slot_freed_while_the_watch_was_gone_is_seen_by_the_relist(
        cluster, kube, tekton, watcher, namespace, ctrl_ns):
    """What a LIST after 410 Gone does not show is gone: a slot Lease deleted while the
    watcher could not watch frees its slot for the waiting build, though no watch event
    ever said so."""
    _api_server(cluster)
    pool = _pool(kube, ctrl_ns, [{"name": "h1"}])
    slot = Slots(RunnerKube(kube), ctrl_ns).try_take(
        pool.host("h1"), 0, Holder(namespace, "earlier", str(uuid.uuid4()), PLATFORM))
    assert slot is not None
    w = watcher().start().wait_ready()
    uid = _builds(tekton, namespace, ["b1"])["b1"]
    wait_for("b1 queued", lambda: _queued(kube, namespace, "b1"), timeout=30, log=w.log)
    _restart_api_server(cluster, tekton, namespace,
                        behind_its_back=[f"/{ctrl_ns}/{slot.lease_name}"])
    wait_for("watch expired seen", lambda: "watch expired, re-listing" in w.log_text(),
             timeout=120, log=w.log)
    wait_for("b1 provisioning", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=60, log=w.log)


@pytest.mark.parametrize("flavour", ["pool", "konflux"])
def test_namespace_not_allowed(kube, tekton, watcher, namespace, ctrl_ns, flavour):
    core = client.CoreV1Api(kube)
    if flavour == "pool":
        cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP), data={
            c.POOL_KEY: yaml.safe_dump({"hosts": [], "localPlatforms": ["linux/arm64"],
                                        "allowedNamespaces": ["team-a"]})})
    else:
        cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=c.KONFLUX_CONFIGMAP), data={
            "local-platforms": "linux/arm64", "allowed-namespaces": "team-a,team-b"})
    core.create_namespaced_config_map(ctrl_ns, cm)
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("nope"))["metadata"]["uid"]
    # the provisioning run still starts: it writes the error secret (the watcher cannot)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    wait_for("warning", lambda: ("Warning", "NamespaceNotAllowed") in
             events_for(kube, namespace, "nope"), timeout=30, log=w.log)
    assert w.metric("mpc_glue_namespace_not_allowed_total", platform="linux/arm64") == 1
    assert has_finalizer(tekton.get_tr(namespace, "nope"))
    # and the same release path as any build
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid), ok=False)
    tekton.finish_tr(namespace, "nope", ok=False)
    wait_for("released", lambda: not has_finalizer(tekton.get_tr(namespace, "nope")),
             timeout=30, log=w.log)


def test_allowed_namespace_gets_no_warning(kube, tekton, watcher, namespace, ctrl_ns):
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP), data={
            c.POOL_KEY: yaml.safe_dump({"hosts": [], "allowedNamespaces": [namespace]})}))
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("yes"))["metadata"]["uid"]
    wait_for("started event", lambda: ("Normal", "ProvisioningStarted") in
             events_for(kube, namespace, "yes"), timeout=30, log=w.log)
    assert ("Warning", "NamespaceNotAllowed") not in events_for(kube, namespace, "yes")
    assert w.metric("mpc_glue_namespace_not_allowed_total") == 0
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(uid))


def _sweep_runs(kube, ns):
    return client.CustomObjectsApi(kube).list_namespaced_custom_object(
        "tekton.dev", "v1", ns, "taskruns",
        label_selector=f"{c.LABEL_ROLE}=sweep")["items"]


def test_no_sweep_is_started_while_one_runs(kube, watcher, ctrl_ns):
    """A sweep slower than the interval (a loaded node) must not pile up sweep pods: the
    next run starts only once the last one finished."""
    w = watcher("--sweep-interval", "1s").start().wait_ready()
    wait_for("a sweep run", lambda: _sweep_runs(kube, ctrl_ns), timeout=30, log=w.log)
    first = _sweep_runs(kube, ctrl_ns)[0]["metadata"]["name"]
    wait_for("the watcher declining to start another", lambda: "sweep still running" in
             w.log.read_text(), timeout=30, log=w.log)
    time.sleep(3)                                    # three more intervals
    assert [r["metadata"]["name"] for r in _sweep_runs(kube, ctrl_ns)] == [first]
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        "tekton.dev", "v1", ctrl_ns, "taskruns", first, {"status": {"podName": "p", "conditions": [
            {"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}})
    wait_for("the next sweep", lambda: [r for r in _sweep_runs(kube, ctrl_ns)
                                        if r["metadata"]["name"] != first], timeout=30, log=w.log)


def test_garbage_collection_and_sweep(kube, tekton, watcher, namespace, ctrl_ns):
    """Successful runs go at once, failed ones after the retention, and never a run whose
    build still holds the finalizer; the sweep Task is started periodically."""
    w = watcher("--sweep-interval", "3s").start().wait_ready()
    wait_for("a sweep run", lambda: _sweep_runs(kube, ctrl_ns), timeout=30, log=w.log)
    sweep = _sweep_runs(kube, ctrl_ns)[0]
    assert sweep["spec"]["taskRef"] == {"name": c.SWEEP_TASK}
    assert sweep["spec"]["serviceAccountName"] == c.TASKS_SERVICE_ACCOUNT
    co = client.CustomObjectsApi(kube)
    name = sweep["metadata"]["name"]
    co.patch_namespaced_custom_object_status("tekton.dev", "v1", ctrl_ns, "taskruns", name, {
        "status": {"podName": "p", "conditions": [{"type": "Succeeded", "status": "True",
                                                   "reason": "Succeeded"}]}})
    gone = lambda: all(t["metadata"]["name"] != name for t in _sweep_runs(kube, ctrl_ns))
    wait_for("successful sweep deleted", gone, timeout=30, log=w.log)

    # a failed provisioning run of a live build stays, whatever the retention
    live = tekton.create_tr(namespace, build_taskrun("live"))["metadata"]["uid"]
    wait_for("live provisioned", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(live)),
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(live), ok=False)
    # a finished build whose provisioning failed and whose deprovisioning succeeded
    done = tekton.create_tr(namespace, build_taskrun("done"))["metadata"]["uid"]
    wait_for("done provisioned", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(done)),
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(done), ok=False)
    tekton.finish_tr(namespace, "done", ok=False)
    wait_for("deprovisioning", lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(done)),
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.deprovision_run_name(done), ok=True)
    wait_for("successful deprovisioning deleted",
             lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(done)) is None, timeout=30)
    # several GC passes later (retention 1h), the failed runs are still there to read
    n = w.metric("mpc_glue_runs_garbage_collected_total")
    co.create_namespaced_custom_object("tekton.dev", "v1", ctrl_ns, "taskruns", {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {
            "name": "gc-probe", "labels": {c.LABEL_MANAGED: c.MANAGED_VALUE,
                                           c.LABEL_ROLE: "sweep"}},
        "spec": {"taskRef": {"name": c.SWEEP_TASK}}})
    co.patch_namespaced_custom_object_status("tekton.dev", "v1", ctrl_ns, "taskruns", "gc-probe", {
        "status": {"podName": "p", "conditions": [{"type": "Succeeded", "status": "True",
                                                   "reason": "Succeeded"}]}})
    wait_for("a later GC pass", lambda: w.metric("mpc_glue_runs_garbage_collected_total") > n,
             timeout=30)
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(done)) is not None
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(live)) is not None
    # with a short retention the failed run of the finished build goes, the live one stays
    w.stop()
    w2 = watcher("--retention", "1s").start().wait_ready()
    wait_for("failed run deleted after retention",
             lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(done)) is None,
             timeout=30, log=w2.log)
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(live)) is not None
    assert has_finalizer(tekton.get_tr(namespace, "live"))
