"""Which TaskRuns are builds, and where they are in their life. Pure functions on dicts."""
from __future__ import annotations

from typing import Any

from mpc.runner import contract as c


def _task_spec(tr: dict) -> dict:
    """The resolved task spec: ``status.taskSpec`` (bundles, cluster resolver,
    taskRef) if Tekton has written it, else the inline ``spec.taskSpec``."""
    status = tr.get("status") or {}
    spec = status.get("taskSpec") or (tr.get("spec") or {}).get("taskSpec")
    return spec if isinstance(spec, dict) else {}


def platform_of(tr: dict) -> str | None:
    """The PLATFORM the build asks for: its param, else the Task's default."""
    for p in (tr.get("spec") or {}).get("params") or ():
        if isinstance(p, dict) and p.get("name") == c.PLATFORM_PARAM:
            v = p.get("value")
            return v if isinstance(v, str) and v else None
    for p in _task_spec(tr).get("params") or ():
        if isinstance(p, dict) and p.get("name") == c.PLATFORM_PARAM:
            v = p.get("default")
            return v if isinstance(v, str) and v else None
    return None


def resolved(tr: dict) -> bool:
    """Whether the TaskRun's Task is known: inline, or resolved by Tekton into its status."""
    return bool(_task_spec(tr))


def mounts_build_secret(tr: dict) -> bool:
    for v in _task_spec(tr).get("volumes") or ():
        if not isinstance(v, dict):
            continue
        secret = v.get("secret")
        if isinstance(secret, dict) and str(secret.get("secretName", "")).startswith(c.SECRET_PREFIX):
            return True
    return False


_SECRET_PREFIX = c.SECRET_PREFIX.encode()
_FINALIZER = c.FINALIZER.encode()


def may_be_build(raw: bytes) -> bool:
    """Whether a TaskRun's raw JSON can matter to the watcher, before it is decoded.

    A build mounts a secret named ``multi-platform-ssh-...`` (``mounts_build_secret``):
    that name is in its spec or its resolved ``status.taskSpec`` in every version from
    the one detection accepts on; a TaskRun the watcher holds has its finalizer. JSON
    writes both as they are (no escapes in them). Every other TaskRun of the cluster
    is passed over undecoded (issue 14, goal 3)."""
    return _SECRET_PREFIX in raw or _FINALIZER in raw


def build_platform(tr: dict) -> str | None:
    """The platform if ``tr`` is a multi-platform build TaskRun, else None.

    Runs mpc itself created (the provisioning pipelines' own TaskRuns, the
    sweep) are never builds, whatever their params say.
    """
    labels = (tr.get("metadata") or {}).get("labels") or {}
    if labels.get(c.LABEL_MANAGED) == c.MANAGED_VALUE:
        return None
    platform = platform_of(tr)
    if platform is None or not mounts_build_secret(tr):
        return None
    return platform


def is_done(obj: dict) -> bool:
    """Finished, successfully or not (``contract.succeeded``: the one condition parser)."""
    return c.succeeded(obj) is not None


def deleting(obj: dict) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def has_finalizer(obj: dict) -> bool:
    return c.FINALIZER in ((obj.get("metadata") or {}).get("finalizers") or ())


def meta(obj: dict, key: str, default: Any = None) -> Any:
    return (obj.get("metadata") or {}).get(key, default)
