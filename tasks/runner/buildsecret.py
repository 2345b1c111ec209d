"""The secret a build TaskRun mounts: credentials for its host, or an error.

``multi-platform-ssh-<taskrun>`` in the build's namespace, owned by the
TaskRun (so it dies with it; a predicted build's by its PipelineRun, which
owns the TaskRun too) and labelled as mpc's. Keys, as Konflux's
buildah-remote expects: ``id_rsa``, ``host``, ``user-dir`` (+ ``known_hosts``, and
``registry-port`` for an mpc build user: the port its key may forward; ``builder``
= ``host`` for a pool host with ``builder: host``: the build runs as root on the
host, no builder container), or only ``error``.

The Tasks' account may not ``get`` Secrets outside the controller namespace
(that would read every Secret in the cluster). It reads one of mpc's own with
a JSON patch made only of ``test`` ops (``_read_own``): the API server
answers with the object only when every test holds, and writes nothing. The
Secret policy in ``tasks/rbac/mpc-tasks-admission.yaml`` confines every
create/update/patch/delete of that account to Secrets named
``multi-platform-ssh-*`` labelled as mpc's.
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
    m, owner = taskrun["metadata"], contract.owner_reference(taskrun)
    return client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=contract.secret_name(m["name"]), namespace=m["namespace"],
            labels={contract.LABEL_MANAGED: contract.MANAGED_VALUE,
                    contract.LABEL_TASKRUN_UID: m["uid"]},
            annotations={contract.ANN_TASKRUN_NAME: m["name"]},
            owner_references=[client.V1OwnerReference(
                api_version=owner["apiVersion"], kind=owner["kind"], name=owner["name"],
                uid=owner["uid"])]),
        type="Opaque", data={k: _b64(v) for k, v in data.items()})


JSON_PATCH = "application/json-patch+json"


class NotOurs(Exception):
    """The Secret exists but is not mpc's (or not that TaskRun's)."""


def _label_test(key: str, value: str) -> dict:
    path = "/metadata/labels/" + key.replace("~", "~0").replace("/", "~1")   # RFC 6901
    return {"op": "test", "path": path, "value": value}


def _read_own(kube: Kube, namespace: str, name: str, uid: str | None = None) -> client.V1Secret | None:
    """mpc's secret ``namespace/name`` (of TaskRun ``uid`` if given); None if there is none.

    A JSON patch of ``test`` ops only: no write, and the object comes back only
    when it is labelled as mpc's (a failed test is a bare 422: ``NotOurs``).
    """
    ops = [_label_test(contract.LABEL_MANAGED, contract.MANAGED_VALUE)]
    if uid:
        ops.append(_label_test(contract.LABEL_TASKRUN_UID, uid))
    try:
        return kube.core.patch_namespaced_secret(name, namespace, ops, _content_type=JSON_PATCH)
    except client.ApiException as e:
        if e.status == 404:
            return None
        if e.status == 422:
            raise NotOurs(f"secret {namespace}/{name} is not mpc's") from None
        raise


def write(kube: Kube, taskrun: dict, data: dict[str, str | bytes], overwrite: bool = True) -> bool:
    """Create the build's secret; replace an mpc secret of the same TaskRun if ``overwrite``.

    A secret of the same name that belongs to an older TaskRun (another uid)
    is replaced; a foreign secret (not labelled as mpc's) is never touched.
    Returns False when a secret was present and left as it was.
    """
    m = taskrun["metadata"]
    user = str(data.get(contract.KEY_HOST, "")).partition("@")[0]
    if contract.USER_RE.match(user) and contract.KEY_REGISTRY_PORT not in data:
        data = {**data, contract.KEY_REGISTRY_PORT: str(contract.registry_port(user))}
    body = _body(taskrun, data)
    for _ in range(3):
        try:
            kube.core.create_namespaced_secret(m["namespace"], body)
            return True
        except client.ApiException as e:
            if e.status != 409:
                raise
        try:
            cur = _read_own(kube, m["namespace"], body.metadata.name)
        except NotOurs:
            raise RuntimeError(f"secret {m['namespace']}/{body.metadata.name} exists and is not "
                               "managed by mpc; refusing to overwrite it") from None
        if cur is None:
            continue                       # deleted since the create: create it again
        labels = cur.metadata.labels or {}
        if labels.get(contract.LABEL_TASKRUN_UID) == m["uid"] and not overwrite:
            return False
        body.metadata.resource_version = cur.metadata.resource_version
        try:
            kube.core.replace_namespaced_secret(body.metadata.name, m["namespace"], body)
        except client.ApiException as e:
            # changed since we read it (or our own replace, retried after a lost answer):
            # read it again
            if e.status != 409:
                raise
            body.metadata.resource_version = None
            continue
        return True
    raise RuntimeError(f"secret {m['namespace']}/{body.metadata.name} keeps appearing and "
                       "vanishing; not written")


def write_error(kube: Kube, taskrun: dict, message: str, overwrite: bool = True) -> bool:
    return write(kube, taskrun, {contract.KEY_ERROR: message}, overwrite=overwrite)


def delete(kube: Kube, namespace: str, taskrun_name: str, uid: str | None) -> bool:
    """Delete the build's secret if it is mpc's (and, with ``uid``, that TaskRun's)."""
    name = contract.secret_name(taskrun_name)
    try:
        cur = _read_own(kube, namespace, name, uid)
    except NotOurs:
        return False
    if cur is None:
        return False
    try:
        kube.core.delete_namespaced_secret(name, namespace, body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=cur.metadata.uid)))
    except client.ApiException as e:
        if e.status not in (404, 409):
            raise
    return True
