"""The objects the watcher creates, as plain dicts (pure functions, no API calls).

Names shared with the Tasks come from ``mpc.runner.contract``. Names that only
the watcher uses are defined here.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from mpc.runner import contract as c

COMPONENT = "mpc-glue"
DEFAULT_NAMESPACE = "mpc"  # the namespace the generated Tasks RBAC (tasks/rbac) uses
# On a provisioning PipelineRun: when the watcher asked Tekton to cancel it
# (RFC 3339). Bounds how long deprovisioning waits for the cancellation.
ANN_CANCEL_REQUESTED = f"{c.DOMAIN}/cancel-requested-at"

ROLE_PROVISION = "provision"
ROLE_PROVISION_FAILED = "provision-failed"
ROLE_DEPROVISION = "deprovision"
ROLE_SWEEP = "sweep"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def ref(kind: str, name: str, bundle: str | None) -> dict:
    """A pipelineRef/taskRef: by name in the cluster, or through the bundles resolver."""
    if not bundle:
        return {"name": name}
    return {"resolver": "bundles", "params": [
        {"name": "bundle", "value": bundle}, {"name": "name", "value": name},
        {"name": "kind", "value": kind}]}


# A provisioning run's time budget beyond the queue: host failover, user creation, the
# secret write (each SSH step has its own 10 s connect and 300 s command bound).
PROVISION_WORK_SECONDS = 900
# The finally (error secret) gets its own budget: Tekton runs it when timeouts.tasks
# expires, but cancels it with everything else when timeouts.pipeline does.
PROVISION_FINALLY_SECONDS = 300


def provision_timeouts(max_wait_seconds: int) -> dict:
    """Tekton timeouts that agree with the pool: the provision task may queue for
    ``maxWaitSeconds`` and then work; the error-secret finally always has time left."""
    tasks = int(max_wait_seconds) + PROVISION_WORK_SECONDS
    return {"pipeline": f"{tasks + PROVISION_FINALLY_SECONDS}s", "tasks": f"{tasks}s",
            "finally": f"{PROVISION_FINALLY_SECONDS}s"}


def _build_run(run: str, role: str, pipeline: str, controller_ns: str, sa: str,
               namespace: str, name: str, uid: str, platform: str | None,
               params: dict[str, str], bundle: str | None, attempt: int = 1,
               owner: str = "", **spec) -> dict:
    """A PipelineRun of one of mpc's Pipelines for one build, labelled with the build
    (``owner``: the PipelineRun of a build provisioned before its TaskRun exists)."""
    ann = {c.ANN_TASKRUN_NAME: name}
    if platform:
        ann[c.ANN_PLATFORM] = platform
    if owner:
        ann[c.ANN_PIPELINERUN] = owner
        params = {**params, c.OWNER_PARAM: owner}
    if attempt > 1:
        ann[c.ANN_ATTEMPT] = str(attempt)
    return {
        "apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
        "metadata": {"name": run, "namespace": controller_ns,
                     "labels": c.build_labels(role, uid, namespace), "annotations": ann},
        "spec": {"pipelineRef": ref("pipeline", pipeline, bundle),
                 "params": [{"name": k, "value": v} for k, v in params.items()],
                 "taskRunTemplate": {"serviceAccountName": sa}, **spec},
    }


def provision_run(controller_ns: str, sa: str, namespace: str, name: str, uid: str,
                  platform: str, bundle: str | None = None, max_wait_seconds: int = 3600,
                  attempt: int = 1, owner: str = "") -> dict:
    return _build_run(
        c.provision_run_name(uid), ROLE_PROVISION, c.PROVISION_PIPELINE, controller_ns, sa,
        namespace, name, uid, platform,
        dict(zip(c.PIPELINE_PARAMS, (name, namespace, uid, platform))), bundle, attempt,
        owner, timeouts=provision_timeouts(max_wait_seconds))


def provision_failed_run(controller_ns: str, sa: str, namespace: str, name: str, uid: str,
                         platform: str, failed_run: str, status: str,
                         bundle: str | None = None, attempt: int = 1, owner: str = "") -> dict:
    """Answers a build whose provisioning run ended without success: its error secret,
    unless an answer exists (a cancelled run never runs its error-secret finally)."""
    params = dict(zip(c.PIPELINE_PARAMS, (name, namespace, uid, platform)))
    params.update(PIPELINERUN=failed_run, PROVISION_STATUS=status)
    return _build_run(
        c.provision_failed_run_name(uid), ROLE_PROVISION_FAILED, c.PROVISION_FAILED_PIPELINE,
        controller_ns, sa, namespace, name, uid, platform, params, bundle, attempt, owner)


def deprovision_run(controller_ns: str, sa: str, namespace: str, name: str, uid: str,
                    platform: str | None, bundle: str | None = None) -> dict:
    return _build_run(
        c.deprovision_run_name(uid), ROLE_DEPROVISION, c.DEPROVISION_PIPELINE, controller_ns,
        sa, namespace, name, uid, platform,
        dict(zip(c.DEPROVISION_PARAMS, (name, namespace, uid))), bundle)


def sweep_run_name(bucket: int) -> str:
    """One sweep per interval bucket: restarts and extra replicas never double it."""
    return f"{c.SWEEP_TASK}-{bucket}"


def sweep_run(controller_ns: str, sa: str, bucket: int, bundle: str | None = None) -> dict:
    return {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun",
        "metadata": {
            "name": sweep_run_name(bucket), "namespace": controller_ns,
            "labels": {c.LABEL_MANAGED: c.MANAGED_VALUE, c.LABEL_ROLE: ROLE_SWEEP},
        },
        "spec": {"taskRef": ref("task", c.SWEEP_TASK, bundle), "serviceAccountName": sa},
    }


def event(namespace: str, name: str, uid: str, reason: str, message: str, warning: bool,
          instance: str, kind: str = "TaskRun", key: str = "") -> dict:
    """A core/v1 Event on the build TaskRun (or on the PipelineRun that will create it).

    The name is derived from the TaskRun uid and the reason, so a restarted
    watcher repeating a decision hits AlreadyExists instead of a duplicate.
    """
    digest = hashlib.sha256(f"{key or uid}\0{reason}".encode()).hexdigest()[:16]
    ts = now_rfc3339()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{name[:200].rstrip('-.')}.{digest}", "namespace": namespace,
                     "labels": {c.LABEL_MANAGED: c.MANAGED_VALUE}},
        "involvedObject": {"apiVersion": "tekton.dev/v1", "kind": kind,
                           "namespace": namespace, "name": name, "uid": uid},
        "reason": reason, "message": message[:1000],
        "type": "Warning" if warning else "Normal",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT, "reportingInstance": instance[:128],
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    }


def _guard(md: dict) -> dict:
    """Optimistic locking for a JSON patch: the patched object carries the version the
    patch was computed from, so the API server answers 409 Conflict if it changed since
    (a ``test`` op would fail as a bare 422, which names neither op nor field)."""
    return {"op": "replace", "path": "/metadata/resourceVersion", "value": md["resourceVersion"]}


def finalizer_add_patch(tr: dict) -> list[dict]:
    md = tr["metadata"]
    ops = [_guard(md)]
    if md.get("finalizers"):
        ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": c.FINALIZER})
    else:
        ops.append({"op": "add", "path": "/metadata/finalizers", "value": [c.FINALIZER]})
    return ops


def finalizer_remove_patch(tr: dict) -> list[dict]:
    md = tr["metadata"]
    i = md["finalizers"].index(c.FINALIZER)
    return [_guard(md),
            {"op": "test", "path": f"/metadata/finalizers/{i}", "value": c.FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{i}"}]
