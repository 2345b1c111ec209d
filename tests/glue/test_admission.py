"""mpc-tasks' least privilege holds in effect: the shipped ValidatingAdmissionPolicies
(tasks/rbac/mpc-tasks-admission.yaml, params in glue/deploy/base/admission.yaml) are
installed as shipped, in namespace ``mpc``, and enforced by the real API server against
real ServiceAccount tokens.

- Runs as ``mpc-tasks`` in ``mpc`` only for mpc's own Tasks/Pipelines: the watcher's
  token (and even the cluster admin) cannot run its own code, a foreign Task/Pipeline or
  a foreign bundle as ``mpc-tasks``; the watcher's real runs are admitted.
- ``mpc-tasks`` itself reads no Secret outside ``mpc`` and writes only mpc's build
  secrets; the runner's real writes and deletes go through.
"""
from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from mpc.glue import objects as o
from mpc.runner import buildsecret
from mpc.runner import contract as c
from mpc.runner.hostpool import Host
from mpc.runner.kube import Kube
from mpc.runner.poolsource import admin_key
from tests.infra.procs import wait_for
from tests.infra.steprunner import load_task, start_task, task_path

from .support import build_taskrun

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "glue" / "deploy" / "install"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
NS = "mpc"                                 # what the shipped manifests name
G, V = "tekton.dev", "v1"
REGISTRY = "registry.mpc.test:5000/mpc"    # a name only: no Tekton runs here, nothing is pulled
DIGEST = "@sha256:" + "0" * 64
PIPELINE_BUNDLE = f"{REGISTRY}/pipeline-mpc-provisioning:0.1{DIGEST}"
SWEEP_BUNDLE = f"{REGISTRY}/task-mpc-sweep:0.1{DIGEST}"
SA = c.TASKS_SERVICE_ACCOUNT


def kubectl(cluster, *args: str, input: str | None = None) -> str:
    r = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args],
                       input=input, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _co(api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _create(api, plural: str, body: dict, dry_run: bool = False) -> dict:
    return _co(api).create_namespaced_custom_object(G, V, NS, plural, body,
                                                    dry_run="All" if dry_run else None)


def _denied(call) -> str:
    with pytest.raises(client.ApiException) as e:
        call()
    assert e.value.status == 403, e.value.body
    return e.value.body


def _set_registries(kube, value: str) -> None:
    client.CoreV1Api(kube).patch_namespaced_config_map(
        "mpc-admission", NS, {"data": {"bundleRegistries": value}})


def _inline_tr(name: str) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "TaskRun", "metadata": {"name": name},
            "spec": {"serviceAccountName": SA, "taskSpec": {"steps": [{
                "name": "steal", "image": "busybox",
                "script": "#!/bin/sh\ncat /var/run/secrets/kubernetes.io/serviceaccount/token\n"}]}}}


@pytest.fixture(scope="module")
def installed(cluster, kube):
    """glue/deploy/install as shipped (minus the Deployment: no kubelet here) in ``mpc``."""
    core = client.CoreV1Api(kube)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    except client.ApiException as e:
        if e.status != 409:
            raise
    docs = [d for d in yaml.safe_load_all(kubectl(cluster, "kustomize", str(INSTALL)))
            if d and d["kind"] != "Deployment"]
    kinds = {d["kind"] for d in docs}
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    # policies and RBAC reach the API server's caches a moment after they are stored
    wait_for("mpc-tasks-runs enforced", lambda: _probe(
        lambda: _create(kube, "taskruns", _inline_tr("probe"), dry_run=True)), timeout=30)
    tasks_kc = cluster.serviceaccount_kubeconfig(NS, SA)
    as_tasks = client.CoreV1Api(cluster.api_client(tasks_kc))
    wait_for("mpc-tasks-secrets enforced", lambda: _probe(
        lambda: as_tasks.create_namespaced_secret(NS, client.V1Secret(
            metadata=client.V1ObjectMeta(name="probe")), dry_run="All")), timeout=30)
    yield tasks_kc
    for plural in ("taskruns", "pipelineruns"):
        _co(kube).delete_collection_namespaced_custom_object(G, V, NS, plural)
    kubectl(cluster, "delete", "--ignore-not-found", "--wait=false", "-f", "-",
            input=yaml.safe_dump_all([d for d in docs if d["kind"] != "Namespace"]))


def _probe(call) -> bool:
    try:
        call()
    except client.ApiException as e:
        return e.status == 403 and "ValidatingAdmissionPolicy" in e.body
    return False


@pytest.fixture
def as_watcher(cluster, installed):
    return cluster.api_client(cluster.serviceaccount_kubeconfig(NS, c.WATCHER_SERVICE_ACCOUNT))


@pytest.fixture
def registries(kube, installed):
    """mpc's bundle registry listed in the shipped params ConfigMap (empty as shipped)."""
    _set_registries(kube, f"{REGISTRY}\n")
    yield REGISTRY
    _set_registries(kube, "")


# --- runs as mpc-tasks ----------------------------------------------------------------------

def _bundle_ref(bundle: str, name: str, kind: str) -> dict:
    return {"resolver": "bundles", "params": [{"name": "bundle", "value": bundle},
                                              {"name": "name", "value": name},
                                              {"name": "kind", "value": kind}]}


def _sweep(name: str, **spec) -> dict:
    body = o.sweep_run(NS, SA, 1)
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


def _provision(name: str, **spec) -> dict:
    body = o.provision_run(NS, SA, "team-a", "build", str(uuid.uuid4()), "linux/arm64")
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


FOREIGN = {
    "inline TaskRun": ("taskruns", lambda n: _inline_tr(n)),
    "inline PipelineRun": ("pipelineruns", lambda n: _provision(n, pipelineRef=None, pipelineSpec={
        "tasks": [{"name": "steal", "taskSpec": {"steps": [
            {"name": "s", "image": "busybox", "script": "#!/bin/sh\nenv\n"}]}}]})),
    "inline PipelineRun, mpc-tasks only in taskRunSpecs": ("pipelineruns", lambda n: {
        "apiVersion": f"{G}/{V}", "kind": "PipelineRun", "metadata": {"name": n},
        "spec": {"pipelineSpec": {"tasks": [{"name": "steal", "taskSpec": {"steps": [
            {"name": "s", "image": "busybox", "script": "#!/bin/sh\nenv\n"}]}}]},
            "taskRunSpecs": [{"pipelineTaskName": "steal", "serviceAccountName": SA}]}}),
    "foreign Task by name": ("taskruns", lambda n: _sweep(n, taskRef={"name": "steal-secrets"})),
    "foreign Pipeline by name": ("pipelineruns",
                                 lambda n: _provision(n, pipelineRef={"name": "steal-secrets"})),
    "mpc's name in a foreign bundle": ("taskruns", lambda n: _sweep(n, taskRef=_bundle_ref(
        f"evil.example/mpc/task-mpc-sweep:0.1{DIGEST}", c.SWEEP_TASK, "task"))),
    "registry as a mere prefix": ("taskruns", lambda n: _sweep(n, taskRef=_bundle_ref(
        f"{REGISTRY}-evil/task-mpc-sweep:0.1", c.SWEEP_TASK, "task"))),
    "foreign name in mpc's bundle registry": ("pipelineruns", lambda n: _provision(
        n, pipelineRef=_bundle_ref(PIPELINE_BUNDLE, "steal-secrets", "pipeline"))),
    "another resolver": ("pipelineruns", lambda n: _provision(n, pipelineRef={
        "resolver": "git", "params": [{"name": "url", "value": "https://evil.example/p.git"},
                                      {"name": "pathInRepo", "value": "mpc-provision.yaml"}]})),
    "custom task": ("taskruns", lambda n: _sweep(n, taskRef={
        "apiVersion": "example.dev/v1", "kind": "Steal", "name": c.SWEEP_TASK})),
    "podTemplate with env": ("taskruns", lambda n: _sweep(n, podTemplate={
        "env": [{"name": "BASH_ENV", "value": "/proc/self/environ"}]})),
    "podTemplate with volumes": ("pipelineruns", lambda n: _provision(n, taskRunTemplate={
        "serviceAccountName": SA, "podTemplate": {"volumes": [
            {"name": "x", "secret": {"secretName": "arm1-admin-key"}}]}})),
    "podTemplate in taskRunSpecs": ("pipelineruns", lambda n: _provision(n, taskRunSpecs=[{
        "pipelineTaskName": "provision", "podTemplate": {"hostNetwork": True}}])),
    "workspaces": ("taskruns", lambda n: _sweep(n, workspaces=[
        {"name": "w", "secret": {"secretName": "arm1-admin-key"}}])),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_the_watcher_cannot_run_foreign_code_as_mpc_tasks(installed, as_watcher, registries,
                                                          case):
    plural, make = FOREIGN[case]
    body = make(f"foreign-{uuid.uuid4().hex[:6]}")
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    msg = _denied(lambda: _create(as_watcher, plural, body))
    assert "ValidatingAdmissionPolicy 'mpc-tasks-runs'" in msg, msg


def test_the_policy_binds_everyone_and_only_runs_as_mpc_tasks(kube, installed, as_watcher):
    """The cluster admin is refused too; a run under another account is not the policy's
    business (it holds none of mpc-tasks' rights)."""
    _denied(lambda: _create(kube, "taskruns", _inline_tr(f"admin-{uuid.uuid4().hex[:6]}")))
    other = _inline_tr(f"other-{uuid.uuid4().hex[:6]}")
    other["spec"]["serviceAccountName"] = "default"
    _create(as_watcher, "taskruns", other, dry_run=True)


def test_a_bundle_needs_its_registry_listed(kube, installed, as_watcher):
    """As shipped (bundleRegistries empty) no bundle runs as mpc-tasks; listed, it does."""
    body = o.sweep_run(NS, SA, 2, bundle=SWEEP_BUNDLE)
    msg = _denied(lambda: _create(as_watcher, "taskruns", body, dry_run=True))
    assert "(now: none)" in msg, msg
    _set_registries(kube, f"  other.example/x\n{REGISTRY}/\n")
    try:
        wait_for("registry listed", lambda: _create(as_watcher, "taskruns", body, dry_run=True))
    finally:
        _set_registries(kube, "")


@pytest.mark.parametrize("bundled", [False, True], ids=["cluster-refs", "bundles"])
def test_the_watchers_real_runs_are_admitted(installed, as_watcher, registries, bundled):
    uid = str(uuid.uuid4())
    pipes = PIPELINE_BUNDLE if bundled else None
    runs = [
        ("pipelineruns", o.provision_run(NS, SA, "team-a", "build", uid, "linux/arm64",
                                         bundle=pipes, max_wait_seconds=60)),
        ("pipelineruns", o.provision_failed_run(NS, SA, "team-a", "build", uid, "linux/arm64",
                                                c.provision_run_name(uid), "Cancelled",
                                                bundle=pipes)),
        ("pipelineruns", o.deprovision_run(NS, SA, "team-a", "build", uid, "linux/arm64",
                                           bundle=pipes)),
        ("taskruns", o.sweep_run(NS, SA, int(uid[:6], 16),
                                 bundle=SWEEP_BUNDLE if bundled else None)),
    ]
    for plural, body in runs:
        _create(as_watcher, plural, body)
    co = _co(as_watcher)
    # the watcher's own updates of a run it started: cancelling, annotating
    name = c.provision_run_name(uid)
    co.patch_namespaced_custom_object(G, V, NS, "pipelineruns", name, {
        "metadata": {"annotations": {o.ANN_CANCEL_REQUESTED: o.now_rfc3339()}},
        "spec": {"status": "Cancelled"}})
    for plural, body in runs:
        co.delete_namespaced_custom_object(G, V, NS, plural, body["metadata"]["name"])


def test_an_admitted_run_cannot_be_turned_into_foreign_code(kube, installed, as_watcher):
    """UPDATE is checked too (a pending run's spec can still change); updates that leave
    spec alone (labels, finalizers) pass even on a run older than the policy would allow."""
    uid = str(uuid.uuid4())
    body = o.deprovision_run(NS, SA, "team-a", "build", uid, None)
    _create(as_watcher, "pipelineruns", body)
    name = body["metadata"]["name"]
    co = _co(kube)
    for spec in ({"pipelineRef": {"name": "steal-secrets"}},
                 {"taskRunTemplate": {"podTemplate": {"env": [{"name": "A", "value": "b"}]}}}):
        _denied(lambda: co.patch_namespaced_custom_object(G, V, NS, "pipelineruns", name,
                                                          {"spec": spec}))
    co.patch_namespaced_custom_object(G, V, NS, "pipelineruns", name, {"metadata": {
        "labels": {"x": "y"}, "finalizers": ["example.dev/keep"]}})
    co.patch_namespaced_custom_object(G, V, NS, "pipelineruns", name,
                                      {"metadata": {"finalizers": None}})
    co.delete_namespaced_custom_object(G, V, NS, "pipelineruns", name)


# --- Secrets as mpc-tasks -------------------------------------------------------------------

def _secret(name: str, labels: dict | None = None, type_: str = "Opaque") -> client.V1Secret:
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=labels),
                           type=type_, string_data={"k": "v"})


OURS = {c.LABEL_MANAGED: c.MANAGED_VALUE}


def test_mpc_tasks_cannot_read_or_write_other_secrets(kube, cluster, installed, namespace):
    admin = client.CoreV1Api(kube)
    for s in (_secret("someone-elses"), _secret("labelled-elsewhere", OURS),
              _secret(c.secret_name("not-labelled"))):
        admin.create_namespaced_secret(namespace, s)
    me = client.CoreV1Api(cluster.api_client(installed))
    json_patch, merge = "application/json-patch+json", "application/merge-patch+json"
    read = [{"op": "test", "path": "/metadata/name", "value": "someone-elses"}]
    for call in (
        lambda: me.read_namespaced_secret("someone-elses", namespace),         # RBAC: no get
        lambda: me.list_namespaced_secret(namespace),
        # a no-op patch answers with the object: the policy refuses it
        lambda: me.patch_namespaced_secret("someone-elses", namespace, read,
                                           _content_type=json_patch),
        lambda: me.patch_namespaced_secret("someone-elses", namespace, {},
                                           _content_type=merge),
        lambda: me.patch_namespaced_secret("someone-elses", namespace,
                                           {"metadata": {"labels": OURS}}, _content_type=merge),
        lambda: me.replace_namespaced_secret("labelled-elsewhere", namespace,
                                             _secret("labelled-elsewhere", OURS)),
        lambda: me.delete_namespaced_secret("someone-elses", namespace),
        lambda: me.delete_namespaced_secret("labelled-elsewhere", namespace),
        lambda: me.delete_namespaced_secret(c.secret_name("not-labelled"), namespace),
        lambda: me.create_namespaced_secret(namespace, _secret("wrong-name", OURS)),
        lambda: me.create_namespaced_secret(namespace, _secret(c.secret_name("x"))),
        # a token Secret the token controller would fill in, readable by a no-op patch
        lambda: me.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=c.secret_name("token"), labels=OURS, annotations={
                "kubernetes.io/service-account.name": "default"}),
            type="kubernetes.io/service-account-token")),
    ):
        _denied(call)
    mine = me.create_namespaced_secret(namespace, _secret(c.secret_name("mine"), OURS))
    _denied(lambda: me.patch_namespaced_secret(mine.metadata.name, namespace,
                                               {"metadata": {"labels": None}},
                                               _content_type=merge))
    _denied(lambda: me.patch_namespaced_secret(mine.metadata.name, namespace, {"metadata": {
        "labels": {c.LABEL_MANAGED: "someone-else"}}}, _content_type=merge))
    for s in ("someone-elses", "labelled-elsewhere", c.secret_name("not-labelled")):
        assert admin.read_namespaced_secret(s, namespace).data == {
            "k": base64.b64encode(b"v").decode()}


def _build(kube, namespace: str, name: str) -> dict:
    return _co(kube).create_namespaced_custom_object(G, V, namespace, "taskruns",
                                                     build_taskrun(name))


def _data(kube, namespace: str, name: str) -> dict | None:
    try:
        s = client.CoreV1Api(kube).read_namespaced_secret(c.secret_name(name), namespace)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}


def test_the_runners_secret_writes_are_admitted(kube, cluster, installed, namespace):
    k = Kube(cluster.api_client(installed))        # the mpc-tasks token, as in the Task's pod
    tr = _build(kube, namespace, "b1")
    assert buildsecret.write(k, tr, {c.KEY_HOST: "u@h", c.KEY_USER_DIR: "/home/u"})
    assert _data(kube, namespace, "b1")[c.KEY_HOST] == "u@h"
    # the error-secret finally never overwrites an answer of the same build
    assert buildsecret.write_error(k, tr, "late", overwrite=False) is False
    assert c.KEY_ERROR not in _data(kube, namespace, "b1")
    assert buildsecret.write_error(k, tr, "no host")
    assert _data(kube, namespace, "b1") == {c.KEY_ERROR: "no host"}
    # a namesake's (older uid) secret is replaced even with overwrite=False (the label
    # is changed by hand: a real namesake's secret would be garbage-collected meanwhile)
    client.CoreV1Api(kube).patch_namespaced_secret(
        c.secret_name("b1"), namespace, {"metadata": {"labels": {
            c.LABEL_TASKRUN_UID: str(uuid.uuid4())}}},
        _content_type="application/merge-patch+json")
    assert buildsecret.write_error(k, tr, "fresh", overwrite=False)
    assert _data(kube, namespace, "b1") == {c.KEY_ERROR: "fresh"}
    # delete: only that TaskRun's
    assert buildsecret.delete(k, namespace, "b1", str(uuid.uuid4())) is False
    assert buildsecret.delete(k, namespace, "b1", tr["metadata"]["uid"]) is True
    assert _data(kube, namespace, "b1") is None
    assert buildsecret.delete(k, namespace, "b1", tr["metadata"]["uid"]) is False


def test_the_runner_leaves_a_foreign_secret_of_that_name_alone(kube, cluster, installed,
                                                               namespace):
    k = Kube(cluster.api_client(installed))
    tr = _build(kube, namespace, "b2")
    client.CoreV1Api(kube).create_namespaced_secret(namespace, _secret(c.secret_name("b2")))
    with pytest.raises(RuntimeError, match="not managed by mpc"):
        buildsecret.write_error(k, tr, "no host")
    assert buildsecret.delete(k, namespace, "b2", None) is False
    assert buildsecret.delete(k, namespace, "b2", tr["metadata"]["uid"]) is False
    assert _data(kube, namespace, "b2") == {"k": "v"}


def test_the_error_secret_task_runs_as_shipped(kube, cluster, installed, namespace):
    """The real mpc-error-secret step with the mpc-tasks token writes the build's answer;
    the runner reads an admin key in mpc (Role: get secrets there)."""
    tr = _build(kube, namespace, "b3")
    m = tr["metadata"]
    run = start_task(load_task(task_path("mpc-error-secret")), {
        "TASKRUN_NAME": m["name"], "TASKRUN_NAMESPACE": namespace, "TASKRUN_UID": m["uid"],
        "PLATFORM": "linux/arm64", "PIPELINERUN": "mpc-provision-x"},
        kubeconfig=installed, namespace=NS, taskrun_name=f"err-{uuid.uuid4().hex[:6]}")
    run.wait().check()
    assert "mpc-provision-x" in _data(kube, namespace, "b3")[c.KEY_ERROR]
    key = f"admin-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespaced_secret(NS, client.V1Secret(
        metadata=client.V1ObjectMeta(name=key), data={"id_rsa": base64.b64encode(b"K").decode()}))
    try:
        host = Host(name="h", address="192.0.2.1", user="a", secret=key, platform="linux/arm64",
                    concurrency=1)
        assert admin_key(Kube(cluster.api_client(installed)), NS, host) == b"K"
    finally:
        client.CoreV1Api(kube).delete_namespaced_secret(key, NS)
