"""Kubernetes access for the runner: in-cluster config in a pod, KUBECONFIG elsewhere."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from kubernetes import client, config


@dataclass
class Kube:
    api: client.ApiClient

    @classmethod
    def connect(cls) -> "Kube":
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
            return cls(client.ApiClient())
        return cls(config.new_client_from_config(os.environ.get("KUBECONFIG")))

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @cached_property
    def leases(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api)

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def taskrun(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                "tekton.dev", "v1", namespace, "taskruns", name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

