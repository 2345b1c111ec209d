"""Fixtures for the provisioning tier: a controller namespace with the Tasks' RBAC,
a host pool of real SSH hosts, and build TaskRuns in the real API server."""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract
from tests.infra.paths import REPO
from tests.infra.steprunner import load_task, start_task, task_path

RBAC = REPO / "tasks" / "rbac" / "mpc-tasks.yaml"


def apply_tasks_rbac(kube: client.ApiClient, namespace: str) -> None:
    """Create the shipped RBAC of the Tasks' account, scoped to ``namespace``."""
    rbac = client.RbacAuthorizationV1Api(kube)
    core = client.CoreV1Api(kube)
    suffix = f"-{namespace}"
    for d in yaml.safe_load_all(RBAC.read_text()):
        if not d:
            continue
        kind = d["kind"]
        if "namespace" in d["metadata"]:
            d["metadata"]["namespace"] = namespace
        for s in d.get("subjects", []):
            s["namespace"] = namespace
        if kind == "ServiceAccount":
            core.create_namespaced_service_account(namespace, d)
        elif kind == "Role":
            rbac.create_namespaced_role(namespace, d)
        elif kind == "RoleBinding":
            rbac.create_namespaced_role_binding(namespace, d)
        elif kind == "ClusterRole":
            d["metadata"]["name"] += suffix
            rbac.create_cluster_role(d)
        elif kind == "ClusterRoleBinding":
            d["metadata"]["name"] += suffix
            d["roleRef"]["name"] += suffix
            rbac.create_cluster_role_binding(d)
        else:
            raise AssertionError(f"unexpected kind {kind} in {RBAC}")


@dataclass
class Controller:
    """The controller namespace as the provisioning Tasks see it."""

    namespace: str
    kubeconfig: Path        # the mpc-tasks ServiceAccount's token
    kube: client.ApiClient  # admin, for test setup and evidence

    def install_pool(self, hosts, platform="linux/arm64", concurrency=2, **extra) -> dict:
        core = client.CoreV1Api(self.kube)
        entries = []
        for h in hosts:
            secret = f"admin-{h.name}"
            try:
                core.create_namespaced_secret(self.namespace, client.V1Secret(
                    metadata=client.V1ObjectMeta(name=secret),
                    data={"id_rsa": base64.b64encode(h.admin_key).decode()}))
            except client.ApiException as e:
                if e.status != 409:
                    raise
            entry = {"name": h.name, "address": h.address, "user": h.admin_user,
                     "secret": secret, "platform": platform, "concurrency": concurrency,
                     "hostKey": h.host_public_key}
            entry.update(extra.pop(f"host_{h.name}", {}))
            # an override of None drops the field (e.g. {"hostKey": None}: trust on first use)
            entries.append({k: v for k, v in entry.items() if v is not None})
        doc = {"hosts": entries} | extra
        self.set_pool_text(yaml.safe_dump(doc))
        return doc

    def set_pool_text(self, text: str, name: str = contract.HOST_POOL_CONFIGMAP,
                      data: dict | None = None) -> None:
        core = client.CoreV1Api(self.kube)
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name),
                                  data=data if data is not None else {contract.POOL_KEY: text})
        try:
            core.create_namespaced_config_map(self.namespace, body)
        except client.ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_config_map(name, self.namespace, body)

    def leases(self, role: str = "slot") -> list:
        return client.CoordinationV1Api(self.kube).list_namespaced_lease(
            self.namespace, label_selector=f"{contract.LABEL_ROLE}={role}").items

    def start(self, task: str, tr: dict | None = None, **params):
        base = {}
        if tr is not None:
            m = tr["metadata"]
            base = {"TASKRUN_NAME": m["name"], "TASKRUN_NAMESPACE": m["namespace"],
                    "TASKRUN_UID": m["uid"]}
        return start_task(load_task(task_path(task)), base | params, kubeconfig=self.kubeconfig,
                          namespace=self.namespace, taskrun_name=f"{task}-{uuid.uuid4().hex[:6]}")

    def provision(self, tr: dict, platform: str = "linux/arm64", **params):
        return self.start("mpc-provision", tr, PLATFORM=platform, **params).wait().check()

    def deprovision(self, tr: dict, **params):
        return self.start("mpc-deprovision", tr, **params).wait().check()


@pytest.fixture
def controller(cluster, kube) -> Controller:
    ns = f"mpc-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    apply_tasks_rbac(kube, ns)
    yield Controller(ns, cluster.serviceaccount_kubeconfig(ns, contract.TASKS_SERVICE_ACCOUNT), kube)
    rbac = client.RbacAuthorizationV1Api(kube)
    for name in (f"{contract.TASKS_SERVICE_ACCOUNT}-{ns}",):
        rbac.delete_cluster_role(name)
        rbac.delete_cluster_role_binding(name)
    core.delete_namespace(ns)


def make_taskrun(kube: client.ApiClient, namespace: str, name: str | None = None,
                 platform: str = "linux/arm64") -> dict:
    """A build TaskRun shaped like buildah-remote's (no Tekton controller runs in this tier)."""
    name = name or f"build-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"params": [{"name": "PLATFORM", "value": platform}],
                     "taskSpec": {
                         "params": [{"name": "PLATFORM", "type": "string"}],
                         "volumes": [{"name": "ssh", "secret": {
                             "secretName": "multi-platform-ssh-$(context.taskRun.name)"}}],
                         "steps": [{"name": "build", "image": "busybox",
                                    "script": "#!/bin/sh\ncat /ssh/host\n",
                                    "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}]}]}}}
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "tekton.dev", "v1", namespace, "taskruns", body)


def delete_taskrun(kube: client.ApiClient, tr: dict) -> None:
    client.CustomObjectsApi(kube).delete_namespaced_custom_object(
        "tekton.dev", "v1", tr["metadata"]["namespace"], "taskruns", tr["metadata"]["name"])


def read_secret(kube: client.ApiClient, tr: dict) -> dict[str, str] | None:
    try:
        s = client.CoreV1Api(kube).read_namespaced_secret(
            contract.secret_name(tr["metadata"]["name"]), tr["metadata"]["namespace"])
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}
