"""The shipped kustomize base: it applies (server-side dry run), and its RBAC is enough
for the watcher to work and too little to read a Secret."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun
from .test_lifecycle import events_for, has_finalizer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "glue" / "deploy" / "base"
INSTALL = ROOT / "glue" / "deploy" / "install"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


def kubectl(cluster, *args: str, input: str | None = None) -> str:
    r = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args],
                       input=input, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def render(cluster, path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(kubectl(cluster, "kustomize", str(path))) if d]


@pytest.fixture(scope="module")
def mpc_namespace(kube):
    core = client.CoreV1Api(kube)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="mpc")))
    except client.ApiException as e:
        if e.status != 409:
            raise
    return "mpc"


def test_base_applies_server_side(cluster, mpc_namespace):
    out = kubectl(cluster, "apply", "-k", str(DEPLOY), "--dry-run=server")
    for kind in ("deployment.apps/mpc-glue", "clusterrole.rbac.authorization.k8s.io/mpc-watcher",
                 "service/mpc-glue-metrics"):
        assert kind in out
    # the pool is the cluster's own: a (re-)applied release never carries one
    assert "configmap/mpc-host-pool" not in out


def test_install_overlay_with_the_generated_tasks_applies(cluster, mpc_namespace):
    """glue/deploy/install = the watcher + tasks/kustomization.yaml (generated)."""
    docs = render(cluster, INSTALL)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Pipeline", c.PROVISION_PIPELINE) in kinds
    assert ("Pipeline", c.DEPROVISION_PIPELINE) in kinds
    assert ("Task", c.SWEEP_TASK) in kinds
    assert ("ServiceAccount", c.TASKS_SERVICE_ACCOUNT) in kinds
    assert ("Deployment", "mpc-glue") in kinds
    out = kubectl(cluster, "apply", "-k", str(INSTALL), "--dry-run=server")
    assert "pipeline.tekton.dev/mpc-provision" in out and "task.tekton.dev/mpc-provision" in out


def test_deployment_is_locked_down(cluster):
    dep = next(d for d in render(cluster, DEPLOY) if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert pod["serviceAccountName"] == c.WATCHER_SERVICE_ACCOUNT
    # Service mpc-glue-metrics would inject MPC_GLUE_METRICS_PORT=tcp://...: the watcher's
    # own env setting (found when the e2e ran the released Deployment: CrashLoopBackOff)
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["resources"]["limits"]["memory"] and ctr["resources"]["requests"]["cpu"]
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for d in render(cluster, DEPLOY):
        for rule in d.get("rules") or ():
            assert "secrets" not in rule.get("resources", []), d["metadata"]["name"]
            assert "*" not in rule.get("verbs", []) and "*" not in rule.get("resources", [])


def _install_rbac(cluster, kube, ns: str, suffix: str) -> None:
    """The shipped watcher RBAC, moved to the test's controller namespace."""
    docs = []
    for d in render(cluster, DEPLOY):
        if d["kind"] not in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                             "RoleBinding"):
            continue
        if d["kind"].startswith("Cluster"):
            d["metadata"]["name"] += suffix
        else:
            d["metadata"]["namespace"] = ns
        if d["kind"] == "ClusterRoleBinding":
            d["roleRef"]["name"] += suffix
        for s in d.get("subjects") or ():
            s["namespace"] = ns
        docs.append(d)
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all(docs))


def test_watcher_works_with_its_shipped_rbac_and_cannot_read_secrets(
        cluster, kube, tekton, watcher, namespace, ctrl_ns):
    suffix = "-" + uuid.uuid4().hex[:6]
    _install_rbac(cluster, kube, ctrl_ns, suffix)
    core = client.CoreV1Api(kube)
    core.create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: yaml.safe_dump({"hosts": [], "allowedNamespaces": ["team-a"]})}))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="someone-elses"), string_data={"k": "v"}))
    kc = cluster.serviceaccount_kubeconfig(ctrl_ns, c.WATCHER_SERVICE_ACCOUNT)

    as_watcher = client.CoreV1Api(cluster.api_client(kc))
    for call in (lambda: as_watcher.read_namespaced_secret("someone-elses", namespace),
                 lambda: as_watcher.list_secret_for_all_namespaces(),
                 lambda: as_watcher.list_namespaced_secret(ctrl_ns)):
        with pytest.raises(client.ApiException) as e:
            call()
        assert e.value.status == 403

    w = watcher(kubeconfig=kc, watch=[]).start().wait_ready()  # cluster-wide, as deployed
    uid = tekton.create_tr(namespace, build_taskrun("rbac"))["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    wait_for("events posted", lambda: ("Warning", "NamespaceNotAllowed") in
             events_for(kube, namespace, "rbac"), timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid), ok=True)
    tekton.finish_tr(namespace, "rbac", ok=True)
    wait_for("released", lambda: not has_finalizer(tekton.get_tr(namespace, "rbac")),
             timeout=30, log=w.log)
    wait_for("successful provisioning run deleted",
             lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)) is None, timeout=30)
    assert tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)) is not None
    text = w.metrics()
    assert 'kind="api_403"' not in text and 'kind="pool_read"' not in text, text
    # no request was forbidden by RBAC (the cluster-wide watcher may also see builds other
    # tests left in namespaces being deleted: Events there are refused for that reason alone)
    denied = [ln for ln in w.log_text().splitlines() if ('"403' in ln or "Forbidden" in ln)
              and "because it is being terminated" not in ln]
    assert not denied, denied
