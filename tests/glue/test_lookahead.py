"""Look-ahead (the pool's ``lookAhead``, glue/predict.py): provisioning starts when a running
PipelineRun is going to create a build TaskRun, the TaskRun that comes is that same build
(one provisioning run, keyed by ``contract.predicted_uid``), and a build that never comes
gives its host back. Tekton is played through the status subresource (test support)."""
from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner import hostpool
from tests.infra.procs import wait_for

from mpc.glue import predict

from . import support
from .support import G, V, build_taskrun, task_spec
from .test_lifecycle import has_finalizer

PLATFORM = "linux/arm64"


def _running(name: str, tasks: list[dict], listed=(), skipped=(), done=None) -> dict:
    return {"metadata": {"name": name, "uid": "u"}, "status": {
        "conditions": [{"type": "Succeeded", "status": done or "Unknown"}],
        "pipelineSpec": {"tasks": tasks},
        "childReferences": [{"name": n} for n in listed],
        "skippedTasks": [{"name": n} for n in skipped]}}


REF = {"resolver": "bundles", "params": []}


def test_which_children_are_predicted():
    build = {"name": "build", "taskRef": REF, "params": [{"name": "PLATFORM", "value": PLATFORM}]}
    remote = {PLATFORM, "linux/s390x"}
    got = predict.children(_running("pr", [build]), remote)
    assert [(x.name, x.platform, x.pipeline_task) for x in got] == [("pr-build", PLATFORM, "build")]
    # a matrix over PLATFORM alone: one child per value, named -<i> (Tekton's fan-out)
    matrix = {"name": "b", "taskRef": REF, "matrix": {"params": [
        {"name": "PLATFORM", "value": [PLATFORM, "linux/x86_64", "linux/s390x"]}]}}
    assert [(x.name, x.platform) for x in predict.children(_running("pr", [matrix]), remote)] \
        == [("pr-b-0", PLATFORM), ("pr-b-2", "linux/s390x")]
    # a matrix of one value: Tekton names its one TaskRun like a plain task's
    one = dict(matrix, matrix={"params": [{"name": "PLATFORM", "value": [PLATFORM]}]})
    assert [x.name for x in predict.children(_running("pr", [one]), remote)] == ["pr-b"]
    # not predicted: listed (exists), skipped, local or unknown platform, a matrix over more
    # than PLATFORM, an inline Task without the build secret, a name Tekton would hash,
    # a PLATFORM not substituted yet, a PipelineRun that is done or being deleted
    cases = [
        _running("pr", [build], listed=["pr-build"]),
        _running("pr", [build], skipped=["build"]),
        _running("pr", [dict(build, params=[{"name": "PLATFORM", "value": "linux/x86_64"}])]),
        _running("pr", [dict(matrix, matrix={"params": matrix["matrix"]["params"] + [
            {"name": "X", "value": ["a"]}]})]),
        _running("pr", [{"name": "build", "taskSpec": {"steps": []},
                         "params": build["params"]}]),
        _running("p" * 58, [build]),
        _running("pr", [dict(build, params=[{"name": "PLATFORM",
                                             "value": "$(tasks.a.results.p)"}])]),
        _running("pr", [build], done="False"),
        {**_running("pr", [build]), "metadata": {"name": "pr", "deletionTimestamp": "x"}},
    ]
    for pr in cases:
        assert predict.children(pr, remote) == [], pr
    inline = {"name": "build", "taskSpec": task_spec(), "params": build["params"]}
    assert [x.name for x in predict.children(_running("pr", [inline]), remote)] == ["pr-build"]


def test_a_child_tekton_made_under_another_name_is_never_created():
    """Tekton creates a pipeline task's TaskRuns at once and lists them: a predicted name
    that is not among them will not come, whatever naming rule made the prediction."""
    pr = _running("pr", [])
    assert predict.never_created(pr, "pr-b", "b") is None
    pr["status"]["childReferences"] = [{"name": "pr-b-0", "pipelineTaskName": "b"},
                                       {"name": "pr-x", "pipelineTaskName": "x"}]
    assert predict.never_created(pr, "pr-b-0", "b") is None
    assert predict.never_created(pr, "pr-b", "b") == \
        "pipeline task's TaskRuns created under other names"
    assert predict.never_created(pr, "pr-y", "y") is None      # its task not started yet


def test_the_owner_label_is_read_from_the_raw_taskrun():
    raw = b'{"metadata":{"labels":{"tekton.dev/pipelineRun":"app","x":"y"}}}'
    assert predict.pipelinerun_of(raw) == "app"
    assert predict.pipelinerun_of(b'{"metadata":{}}') is None
    assert predict.pipelinerun_of(b'{"tekton.dev/pipelineRun":"a\\"b"}') is None


def _pool(kube, ctrl_ns: str, look_ahead: bool = True, **extra) -> None:
    doc = {"hosts": [{"name": "h1", "address": "192.0.2.1", "user": "admin",
                      "secret": "admin-key", "platform": PLATFORM, "concurrency": 2}],
           "lookAhead": look_ahead, **extra}
    hostpool.parse_yaml(yaml.safe_dump(doc))
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: yaml.safe_dump(doc)}))


def _pipelinerun(kube, ns: str, name: str, build_task: dict | None = None) -> dict:
    """A user's PipelineRun as Tekton shows it once started: ``clone`` created, ``build``
    (runAfter clone) still to come."""
    build = build_task or {"name": "build", "runAfter": ["clone"],
                           "taskRef": {"resolver": "bundles", "params": [
                               {"name": "name", "value": "buildah-remote"}]},
                           "params": [{"name": "PLATFORM", "value": PLATFORM}]}
    spec = {"tasks": [{"name": "clone", "taskSpec": {"steps": [
        {"name": "s", "image": "busybox", "script": "true"}]}}, build]}
    co = client.CustomObjectsApi(kube)
    co.create_namespaced_custom_object(G, V, ns, "pipelineruns", {
        "apiVersion": f"{G}/{V}", "kind": "PipelineRun", "metadata": {"name": name},
        "spec": {"pipelineSpec": spec}})
    return co.patch_namespaced_custom_object_status(G, V, ns, "pipelineruns", name, {"status": {
        "conditions": [support._cond("Unknown", "Running")], "startTime": support._now(),
        "pipelineSpec": spec, "childReferences": [
            {"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": f"{name}-clone",
             "pipelineTaskName": "clone"}]}})


def _child(tekton, pr: dict, task: str = "build", inline: bool = True,
           platform: str = PLATFORM) -> dict:
    m = pr["metadata"]
    body = build_taskrun(f"{m['name']}-{task}", platform=platform, inline=inline,
                         labels={"tekton.dev/pipelineRun": m["name"]})
    body["metadata"]["ownerReferences"] = [{
        "apiVersion": f"{G}/{V}", "kind": "PipelineRun", "name": m["name"], "uid": m["uid"],
        "controller": True, "blockOwnerDeletion": True}]
    return tekton.create_tr(m["namespace"], body)


def _params(run: dict) -> dict:
    return {p["name"]: p["value"] for p in run["spec"]["params"]}


def _ours(tekton, ctrl_ns: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in tekton.list_pr(ctrl_ns)}


def _predicted(tekton, watcher, namespace, ctrl_ns, kube):
    """A watcher with lookAhead, a PipelineRun "app" whose build is still to come, and
    the provisioning run of its prediction: (watcher, PipelineRun, predicted key)."""
    _pool(kube, ctrl_ns)
    w = watcher().start().wait_ready()
    pr = _pipelinerun(kube, namespace, "app")
    key = c.predicted_uid(pr["metadata"]["uid"], "app-build")
    wait_for("provisioning run before the build TaskRun",
             lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(key)), timeout=30, log=w.log)
    return w, pr, key


def test_a_predicted_build_is_provisioned_before_its_taskrun_and_is_that_build(
        tekton, watcher, namespace, ctrl_ns, kube):
    w, pr, key = _predicted(tekton, watcher, namespace, ctrl_ns, kube)
    prov = tekton.get_pr(ctrl_ns, c.provision_run_name(key))
    assert _params(prov) == {"TASKRUN_NAME": "app-build", "TASKRUN_NAMESPACE": namespace,
                             "TASKRUN_UID": key, "PLATFORM": PLATFORM,
                             c.OWNER_PARAM: "app"}
    assert prov["metadata"]["annotations"][c.ANN_PIPELINERUN] == "app"
    assert tekton.get_tr(namespace, "app-build") is None
    tekton.finish_pr(ctrl_ns, c.provision_run_name(key), ok=True)

    # Tekton creates the build: the watcher holds it, and provisions nothing more
    tr = _child(tekton, pr)
    wait_for("finalizer", lambda: has_finalizer(tekton.get_tr(namespace, "app-build")),
             timeout=30, log=w.log)
    assert set(_ours(tekton, ctrl_ns)) == {c.provision_run_name(key)}
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(tr["metadata"]["uid"])) is None

    tekton.finish_tr(namespace, "app-build", ok=True)
    wait_for("finalizer removed", lambda: not has_finalizer(tekton.get_tr(namespace, "app-build")),
             timeout=30, log=w.log)
    dp = tekton.get_pr(ctrl_ns, c.deprovision_run_name(key))
    assert dp is not None and _params(dp)["TASKRUN_UID"] == key
    assert "app-build" in w.log.read_text() and "build predicted" in w.log.read_text()


@pytest.mark.parametrize("end", ["pipelinerun cancelled", "pipelinerun deleted",
                                 "task skipped", "not a build", "another platform",
                                 "created under another name"])
def test_a_predicted_build_that_never_comes_gives_its_host_back(
        tekton, watcher, namespace, ctrl_ns, kube, end):
    w, pr, key = _predicted(tekton, watcher, namespace, ctrl_ns, kube)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(key), ok=True)
    co = client.CustomObjectsApi(kube)
    if end == "pipelinerun cancelled":
        tekton.finish_pr(namespace, "app", ok=False, reason="Cancelled")
    elif end == "pipelinerun deleted":
        co.delete_namespaced_custom_object(G, V, namespace, "pipelineruns", "app")
    elif end == "task skipped":
        co.patch_namespaced_custom_object_status(G, V, namespace, "pipelineruns", "app", {
            "status": {"skippedTasks": [{"name": "build", "reason": "When Expressions "
                                         "evaluated to false"}]}})
    elif end == "created under another name":     # a naming rule the prediction missed
        co.patch_namespaced_custom_object_status(G, V, namespace, "pipelineruns", "app", {
            "status": {"childReferences": [
                {"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": "app-clone",
                 "pipelineTaskName": "clone"},
                {"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": "app-build-x",
                 "pipelineTaskName": "build"}]}})
    elif end == "not a build":      # Tekton resolves the Task: it mounts no build secret
        tr = _child(tekton, pr, inline=False)
        tekton.resolve(namespace, tr["metadata"]["name"],
                       task_spec(secret_prefix="something-else-"))
    else:       # a build of its own, provisioned for the platform it asks for
        tr = _child(tekton, pr, platform="linux/s390x")
        wait_for("its own provisioning run", lambda: tekton.get_pr(
            ctrl_ns, c.provision_run_name(tr["metadata"]["uid"])), timeout=30, log=w.log)
    wait_for("deprovisioning run", lambda: tekton.get_pr(
        ctrl_ns, c.deprovision_run_name(key)), timeout=30, log=w.log)
    assert _params(tekton.get_pr(ctrl_ns, c.deprovision_run_name(key)))["TASKRUN_UID"] == key
    assert "predicted build will not come" in w.log.read_text()
    if end == "not a build":
        assert not has_finalizer(tekton.get_tr(namespace, "app-build"))


@pytest.mark.parametrize("pool", [{"look_ahead": False}, {"allowedNamespaces": ["team-z"]}],
                         ids=["lookAhead off", "namespace not allowed"])
def test_no_look_ahead_unless_the_pool_asks_for_it(tekton, watcher, namespace, ctrl_ns, kube,
                                                  pool):
    """Without lookAhead, or for a namespace the pool refuses (its build gets the error
    secret when it comes, as always), nothing is taken ahead of the TaskRun."""
    _pool(kube, ctrl_ns, **pool)
    w = watcher().start().wait_ready()
    pr = _pipelinerun(kube, namespace, "app")
    # the watcher has seen the running PipelineRun (its create and its status): and
    # made nothing for it
    wait_for("the PipelineRun seen", lambda: w.metric(
        "mpc_glue_watch_events_total", resource="pipelinerun-ahead") >= 2, timeout=30, log=w.log)
    time.sleep(1)
    assert _ours(tekton, ctrl_ns) == {}
    tr = _child(tekton, pr)         # the build comes: provisioned as it always was
    uid = tr["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    assert set(_ours(tekton, ctrl_ns)) == {c.provision_run_name(uid)}
    assert c.OWNER_PARAM not in _params(tekton.get_pr(ctrl_ns, c.provision_run_name(uid)))


def test_a_watcher_restarted_before_the_build_came_takes_it_for_the_predicted_one(
        tekton, watcher, namespace, ctrl_ns, kube):
    """The prediction lives in the API (its run, keyed by the predicted uid), not in the
    watcher's memory: a watcher that starts after the TaskRun came provisions nothing
    twice and releases the predicted build's host when it ends."""
    w, pr, key = _predicted(tekton, watcher, namespace, ctrl_ns, kube)
    w.kill()
    tekton.finish_pr(ctrl_ns, c.provision_run_name(key), ok=True)
    co = client.CustomObjectsApi(kube)
    _child(tekton, pr)
    co.patch_namespaced_custom_object_status(G, V, namespace, "pipelineruns", "app", {
        "status": {"childReferences": [
            {"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": n, "pipelineTaskName": t}
            for n, t in (("app-clone", "clone"), ("app-build", "build"))]}})
    w.start().wait_ready()
    wait_for("finalizer", lambda: has_finalizer(tekton.get_tr(namespace, "app-build")),
             timeout=30, log=w.log)
    tekton.finish_tr(namespace, "app-build", ok=False)
    wait_for("deprovisioning run", lambda: tekton.get_pr(
        ctrl_ns, c.deprovision_run_name(key)), timeout=30, log=w.log)
    uid = tekton.get_tr(namespace, "app-build")["metadata"]["uid"]
    names = set(_ours(tekton, ctrl_ns))
    assert not {n for n in names if uid in n}, names
