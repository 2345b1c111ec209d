"""The control-plane fixture is real: storage, schema validation, RBAC, tokens, GC."""
from __future__ import annotations

import time

import pytest
from kubernetes import client

from tests.infra.procs import wait_for


def test_configmap_roundtrip(kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="hello"), data={"k": "v"}))
    assert core.read_namespaced_config_map("hello", namespace).data == {"k": "v"}


def test_tekton_task_stored_and_schema_enforced(kube, namespace):
    custom = client.CustomObjectsApi(kube)
    task = {"apiVersion": "tekton.dev/v1", "kind": "Task", "metadata": {"name": "echo"},
            "spec": {"steps": [{"name": "s", "image": "busybox", "script": "#!/bin/sh\necho hi\n"}]}}
    custom.create_namespaced_custom_object("tekton.dev", "v1", namespace, "tasks", task)
    got = custom.get_namespaced_custom_object("tekton.dev", "v1", namespace, "tasks", "echo")
    assert got["spec"]["steps"][0]["name"] == "s"

    bad = {"apiVersion": "tekton.dev/v1", "kind": "Task", "metadata": {"name": "bad"},
           "spec": {"steps": "not-a-list"}}
    with pytest.raises(client.ApiException) as e:
        custom.create_namespaced_custom_object("tekton.dev", "v1", namespace, "tasks", bad)
    assert e.value.status == 422


def test_serviceaccount_token_is_subject_to_rbac(cluster, kube, namespace):
    core = client.CoreV1Api(kube)
    rbac = client.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="reader")))
    sa = client.CoreV1Api(cluster.api_client(cluster.serviceaccount_kubeconfig(namespace, "reader")))
    with pytest.raises(client.ApiException) as e:
        sa.list_namespaced_config_map(namespace)
    assert e.value.status == 403

    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="cm-read"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="cm-read"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-read"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)]))
    wait_for("RBAC grant visible", lambda: sa.list_namespaced_config_map(namespace) is not None,
             timeout=10)
    with pytest.raises(client.ApiException) as e:
        sa.list_namespaced_secret(namespace)
    assert e.value.status == 403


def test_garbage_collector_deletes_dependents(kube, namespace):
    core = client.CoreV1Api(kube)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner")))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(
        name="dependent", owner_references=[client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)])))
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
            return False
        except client.ApiException as e:
            return e.status == 404
    wait_for("dependent garbage-collected", gone, timeout=60)


def test_namespace_really_terminates(kube):
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="smoke-term")))
    core.create_namespaced_config_map("smoke-term", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="x")))
    core.delete_namespace("smoke-term")

    def gone() -> bool:
        try:
            core.read_namespace("smoke-term")
            return False
        except client.ApiException as e:
            return e.status == 404
    wait_for("namespace terminated", gone, timeout=60)


def test_compacted_watch_gets_410(cluster, kube, namespace):
    if not hasattr(cluster, "etcd_url"):
        pytest.skip("external cluster: etcd not reachable")
    core = client.CoreV1Api(kube)
    rv = core.list_namespaced_config_map(namespace).metadata.resource_version
    for i in range(3):
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"c{i}")))
    cluster.compact_etcd()
    time.sleep(0.5)
    with pytest.raises(client.ApiException) as e:
        core.list_namespaced_config_map(namespace, resource_version=rv,
                                        resource_version_match="Exact")
    assert e.value.status == 410
