"""The secret a build TaskRun mounts: credentials for its host, or an error.

``multi-platform-ssh-<taskrun>`` in the build's namespace, owned by the
TaskRun (so it dies with it) and labelled as mpc's. Keys, as Konflux's
buildah-remote expects: ``id_rsa``, ``host``, ``user-dir`` (+ ``known_hosts``),
or only ``error``.
"""
from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from kubernetes import client

from . import contract
from .kube import Kube


def new_keypair() -> tuple[bytes, str]:
    """A fresh ed25519 key made in the pod: (OpenSSH private key, public key line)."""
    k = ed25519.Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                      serialization.PublicFormat.OpenSSH).decode()
    return priv, pub + " mpc-build"


def _b64(v: str | bytes) -> str:
    return base64.b64encode(v.encode() if isinstance(v, str) else v).decode()


def _body(taskrun: dict, data: dict[str, str | bytes]) -> client.V1Secret:
    m = taskrun["metadata"]
    return client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=contract.secret_name(m["name"]), namespace=m["namespace"],
            labels={contract.LABEL_MANAGED: contract.MANAGED_VALUE,
                    contract.LABEL_TASKRUN_UID: m["uid"]},
            annotations={contract.ANN_TASKRUN_NAME: m["name"]},
            owner_references=[client.V1OwnerReference(
                api_version=taskrun.get("apiVersion", "tekton.dev/v1"), kind="TaskRun",
                name=m["name"], uid=m["uid"])]),
        type="Opaque", data={k: _b64(v) for k, v in data.items()})


def write(kube: Kube, taskrun: dict, data: dict[str, str | bytes], overwrite: bool = True) -> bool:
    """Create the build's secret; replace an mpc secret of the same TaskRun if ``overwrite``.

    A secret of the same name that belongs to an older TaskRun (another uid)
    is replaced; a foreign secret (not labelled as mpc's) is never touched.
    Returns False when a secret was present and left as it was.
    """
    m = taskrun["metadata"]
    body = _body(taskrun, data)
    try:
        kube.core.create_namespaced_secret(m["namespace"], body)
        return True
    except client.ApiException as e:
        if e.status != 409:
            raise
    cur = kube.core.read_namespaced_secret(body.metadata.name, m["namespace"])
    labels = cur.metadata.labels or {}
    if labels.get(contract.LABEL_MANAGED) != contract.MANAGED_VALUE:
        raise RuntimeError(f"secret {m['namespace']}/{body.metadata.name} exists and is not "
                           "managed by mpc; refusing to overwrite it")
    if labels.get(contract.LABEL_TASKRUN_UID) == m["uid"] and not overwrite:
        return False
    body.metadata.resource_version = cur.metadata.resource_version
    kube.core.replace_namespaced_secret(body.metadata.name, m["namespace"], body)
    return True


def write_error(kube: Kube, taskrun: dict, message: str, overwrite: bool = True) -> bool:
    return write(kube, taskrun, {contract.KEY_ERROR: message}, overwrite=overwrite)


def delete(kube: Kube, namespace: str, taskrun_name: str, uid: str | None) -> bool:
    """Delete the build's secret if it is mpc's (and, with ``uid``, that TaskRun's)."""
    name = contract.secret_name(taskrun_name)
    try:
        cur = kube.core.read_namespaced_secret(name, namespace)
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise
    labels = cur.metadata.labels or {}
    if labels.get(contract.LABEL_MANAGED) != contract.MANAGED_VALUE:
        return False
    if uid and labels.get(contract.LABEL_TASKRUN_UID) != uid:
        return False
    try:
        kube.core.delete_namespaced_secret(name, namespace, body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=cur.metadata.uid)))
    except client.ApiException as e:
        if e.status not in (404, 409):
            raise
    return True
