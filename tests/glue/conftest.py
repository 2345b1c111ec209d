"""Fixtures for the glue tests: a controller namespace and the watcher process."""
from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from .support import Tekton, Watcher


@pytest.fixture
def ctrl_ns(kube):
    """The controller namespace (PipelineRuns land here), fresh per test."""
    core = client.CoreV1Api(kube)
    name = f"mpc-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def tekton(kube) -> Tekton:
    return Tekton(kube)


@pytest.fixture
def watcher(cluster, ctrl_ns, namespace, workdir):
    """An mpc-glue process (not started) watching ``namespace`` with admin credentials."""
    made: list[Watcher] = []

    def make(*args: str, kubeconfig=None, watch=None, env=None) -> Watcher:
        w = Watcher(kubeconfig or cluster.kubeconfig, ctrl_ns,
                    [namespace] if watch is None else watch, workdir, *args, env=env)
        made.append(w)
        return w
    yield make
    for w in made:
        w.stop()
    # Leave nothing that would keep the test namespace terminating forever.
    co = client.CustomObjectsApi(cluster.api_client())
    for tr in co.list_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns")["items"]:
        if tr["metadata"].get("finalizers"):
            co.patch_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns",
                                              tr["metadata"]["name"],
                                              {"metadata": {"finalizers": None}})
