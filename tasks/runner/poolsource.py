"""Reading the host pool and the admin keys from the controller namespace."""
from __future__ import annotations

import base64
import functools

from kubernetes import client

from . import contract
from .hostpool import Host, Pool, PoolError, from_configmap_data
from .kube import Kube, call, configmap
from .remote import HostError


def load_pool(kube: Kube, namespace: str, name: str = contract.HOST_POOL_CONFIGMAP,
              retry: bool = True) -> Pool:
    """The pool from ConfigMap ``name``, falling back to Konflux's ``host-config``: the one
    reader of the Tasks and the watcher (``retry=False``: its caller retries)."""
    get = functools.partial(call, kube.get) if retry else kube.get
    for candidate in dict.fromkeys([name, contract.KONFLUX_CONFIGMAP]):
        cm = get(configmap(namespace, candidate))
        if cm is None:
            continue
        try:
            return from_configmap_data(f"{namespace}/{candidate}", cm.get("data"))
        except PoolError as e:
            raise PoolError([f"ConfigMap {namespace}/{candidate}: {m}" for m in e.errors]) from None
    raise PoolError([f"no host pool: ConfigMap {namespace}/{name} not found"])


def admin_key(kube: Kube, namespace: str, host: Host) -> bytes:
    try:
        s = kube.core.read_namespaced_secret(host.secret, namespace)
    except client.ApiException as e:
        if e.status in (403, 404):
            raise HostError(host.name, f"admin key secret {namespace}/{host.secret} "
                            f"is not readable ({e.status} {e.reason})") from None
        raise
    data = s.data or {}
    if "id_rsa" not in data:
        raise HostError(host.name, f"admin key secret {namespace}/{host.secret} has no key id_rsa")
    return base64.b64decode(data["id_rsa"])
