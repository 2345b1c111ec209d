"""The e2e node tier: real kubelet + containerd + Tekton doing what mpc relies on."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from kubernetes import client

from pathlib import Path

from tests.infra import paths

from . import images
from .node import NODE_NAME, REGISTRY

pytestmark = pytest.mark.e2e

STEP_IMAGE = images.BUSYBOX.ref
RUN_TIMEOUT = 300   # the machine is shared: generous, never asserted as a duration


def _custom(kube) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def create_taskrun(kube, ns: str, spec: dict, name: str) -> dict:
    body = {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}
    return _custom(kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", body)


def get_taskrun(kube, ns: str, name: str) -> dict:
    return _custom(kube).get_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", name)


def succeeded(tr: dict) -> dict | None:
    for c in tr.get("status", {}).get("conditions", []):
        if c["type"] == "Succeeded":
            return c
    return None


def wait_taskrun_done(kube, ns: str, name: str, timeout: float = RUN_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tr = get_taskrun(kube, ns, name)
        c = succeeded(tr)
        if c and c["status"] in ("True", "False"):
            return tr
        time.sleep(0.3)
    raise TimeoutError(f"TaskRun {ns}/{name} not done after {timeout}s: {tr.get('status')}")


def results(tr: dict) -> dict[str, str]:
    return {r["name"]: r["value"] for r in tr["status"].get("results", [])}


def test_node_is_ready_and_runs_pods_under_its_own_cgroup_root(e2e_node, e2e_kube):
    node = client.CoreV1Api(e2e_kube).read_node(NODE_NAME)
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True"
    assert node.status.node_info.kubelet_version == "v1.32.4"
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    # all of the kubelet's cgroups live under the node's own root
    assert (Path("/sys/fs/cgroup/memory") / e2e_node.cgroup_root / "kubepods").is_dir()


def test_two_step_taskrun_with_result(e2e_kube, e2e_namespace):
    spec = {"taskSpec": {
        "results": [{"name": "greeting"}],
        "steps": [
            {"name": "echo", "image": STEP_IMAGE,
             "script": "#!/bin/sh\necho hello-from-step-one > /workspace/shared\n"},
            {"name": "write-result", "image": STEP_IMAGE,
             "script": "#!/bin/sh\nprintf '%s+two' \"$(cat /workspace/shared)\""
                       " > $(results.greeting.path)\n"},
        ]}}
    create_taskrun(e2e_kube, e2e_namespace, spec, "two-steps")
    tr = wait_taskrun_done(e2e_kube, e2e_namespace, "two-steps")
    assert succeeded(tr)["status"] == "True", tr["status"]
    assert results(tr) == {"greeting": "hello-from-step-one+two"}
    assert [s["name"] for s in tr["status"]["steps"]] == ["echo", "write-result"]


def test_taskrun_waits_for_a_secret_that_appears_late(e2e_kube, e2e_namespace):
    """How mpc's build TaskRuns wait for the provisioner's SSH secret."""
    core = client.CoreV1Api(e2e_kube)
    spec = {"taskSpec": {
        "results": [{"name": "token"}],
        "volumes": [{"name": "creds", "secret": {"secretName": "late-secret"}}],
        "steps": [{"name": "read", "image": STEP_IMAGE,
                   "volumeMounts": [{"name": "creds", "mountPath": "/creds"}],
                   "script": "#!/bin/sh\ncat /creds/token > $(results.token.path)\n"}]}}
    create_taskrun(e2e_kube, e2e_namespace, spec, "late")
    # the pod exists and the kubelet reports it cannot mount the missing secret
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        ev = core.list_namespaced_event(e2e_namespace, field_selector="reason=FailedMount").items
        if any("late-secret" in (e.message or "") for e in ev):
            break
        assert time.monotonic() < deadline, "no FailedMount event for the missing secret"
        time.sleep(0.3)
    tr = get_taskrun(e2e_kube, e2e_namespace, "late")
    assert succeeded(tr) is None or succeeded(tr)["status"] == "Unknown", tr["status"]
    core.create_namespaced_secret(e2e_namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="late-secret"), string_data={"token": "s3cr3t"}))
    tr = wait_taskrun_done(e2e_kube, e2e_namespace, "late")
    assert succeeded(tr)["status"] == "True", tr["status"]
    assert results(tr) == {"token": "s3cr3t"}


def test_tekton_webhook_validates_and_defaults(e2e_kube, e2e_namespace):
    api = _custom(e2e_kube)
    bad = {"apiVersion": "tekton.dev/v1", "kind": "Task",
           "metadata": {"name": "invalid", "namespace": e2e_namespace},
           "spec": {"steps": [{"name": "Bad_Step_Name", "image": STEP_IMAGE,
                               "script": "echo hi", "command": ["echo"]}]}}
    with pytest.raises(client.ApiException) as exc:
        api.create_namespaced_custom_object("tekton.dev", "v1", e2e_namespace, "tasks", bad)
    assert exc.value.status == 400
    assert "validation.webhook.pipeline.tekton.dev" in exc.value.body
    good = {"apiVersion": "tekton.dev/v1", "kind": "Task",
            "metadata": {"name": "valid", "namespace": e2e_namespace},
            "spec": {"params": [{"name": "p"}],
                     "steps": [{"name": "ok", "image": STEP_IMAGE, "script": "true"}]}}
    made = api.create_namespaced_custom_object("tekton.dev", "v1", e2e_namespace, "tasks", good)
    assert made["spec"]["params"][0]["type"] == "string"   # set by the defaulting webhook


def test_taskrun_resolves_its_task_from_a_bundle(e2e_node, e2e_kube, e2e_namespace, tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(f"""\
apiVersion: tekton.dev/v1
kind: Task
metadata: {{name: greet}}
spec:
  params: [{{name: who, type: string}}]
  results: [{{name: out}}]
  steps:
  - name: greet
    image: {STEP_IMAGE}
    env: [{{name: WHO, value: $(params.who)}}]
    script: |
      #!/bin/sh
      printf 'hello %s' "$WHO" > $(results.out.path)
""")
    repo = f"bundles/{e2e_namespace}/greet:v1"
    # tkn leaves a temp file per layer: keep it in the test's own dir
    subprocess.run([paths.tool("tkn"), "bundle", "push", f"{e2e_node.registry_host}/{repo}",
                    "-f", str(task)], check=True, capture_output=True, timeout=120,
                   env=dict(os.environ, TMPDIR=str(task.parent)))
    create_taskrun(e2e_kube, e2e_namespace, {
        "params": [{"name": "who", "value": "bundle"}],
        "taskRef": {"resolver": "bundles", "params": [
            {"name": "bundle", "value": f"{REGISTRY}/{repo}"},
            {"name": "name", "value": "greet"}, {"name": "kind", "value": "task"}]}},
        "from-bundle")
    tr = wait_taskrun_done(e2e_kube, e2e_namespace, "from-bundle")
    assert succeeded(tr)["status"] == "True", tr["status"]
    assert results(tr) == {"out": "hello bundle"}


def test_build_pods_reach_ssh_hosts_inside_the_node_netns(e2e_node, e2e_kube, e2e_namespace,
                                                           e2e_make_host):
    from . import hosts
    host = e2e_make_host()
    assert hosts.ssh(host, e2e_node, "hostname").stdout.strip() == host.name
    # and the host reaches the node's registry (where remote builds push their images)
    reg_ip, reg_port = REGISTRY.split(":")
    status = host.exec(f"exec bash -c 'exec 3<>/dev/tcp/{reg_ip}/{reg_port};"
                       " printf \"GET /v2/ HTTP/1.0\\r\\n\\r\\n\" >&3; head -1 <&3'")
    assert status.stdout.split()[1:2] == ["200"], status
    create_taskrun(e2e_kube, e2e_namespace, {"taskSpec": {
        "results": [{"name": "banner"}],
        "steps": [{"name": "dial", "image": STEP_IMAGE, "env": [{"name": "ADDR", "value": host.address}],
                   "script": "#!/bin/sh\nset -e\nbanner=$(nc -w 10 \"$ADDR\" 22 </dev/null | head -1)\n"
                             "printf '%s' \"${banner%%-*}\" > $(results.banner.path)\n"}]}}, "dial")
    tr = wait_taskrun_done(e2e_kube, e2e_namespace, "dial")
    assert succeeded(tr)["status"] == "True", tr["status"]
    assert results(tr) == {"banner": "SSH"}


def test_steps_reach_the_apiserver_through_the_kubernetes_service(e2e_kube, e2e_namespace):
    """In-cluster clients (mpc's task-runner) use kubernetes.default's ClusterIP (kube-proxy)."""
    create_taskrun(e2e_kube, e2e_namespace, {"taskSpec": {
        "results": [{"name": "version"}],
        "steps": [{"name": "ask", "image": STEP_IMAGE, "script": (
            "#!/bin/sh\nset -e\n"
            "sa=/var/run/secrets/kubernetes.io/serviceaccount\n"
            "wget -qO- --no-check-certificate --header \"Authorization: Bearer $(cat $sa/token)\""
            " \"https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/version\" > /tmp/v\n"
            "grep -o '\"gitVersion\": *\"[^\"]*\"' /tmp/v | cut -d'\"' -f4 | tr -d '\\n'"
            " > $(results.version.path)\n")}]}}, "in-cluster")
    tr = wait_taskrun_done(e2e_kube, e2e_namespace, "in-cluster")
    assert succeeded(tr)["status"] == "True", tr["status"]
    assert results(tr) == {"version": "v1.32.4"}


def test_serviceaccount_kubeconfig_is_bound_by_rbac(e2e_node, e2e_namespace):
    from kubernetes import config
    sa = config.new_client_from_config(str(e2e_node.serviceaccount_kubeconfig(e2e_namespace, "default")))
    with pytest.raises(client.ApiException) as exc:
        client.CoreV1Api(sa).list_namespaced_secret(e2e_namespace)
    assert exc.value.status == 403
