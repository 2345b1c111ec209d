"""``mpc-runner``: the entry point the generated Tasks run in the task-runner image.

Inputs come from the environment (the Task maps its params and context into
env vars; nothing reaches a shell as code). Results are written to the files
named by ``RESULT_<NAME>`` env vars when set (Tekton's ``$(results.x.path)``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubernetes import client

from . import buildsecret, contract, log
from .deprovision import deprovision, sweep
from .hostpool import PoolError, parse_yaml
from .kube import Kube
from .provision import Request, live_taskrun, provision
from .release import REMOVED_HOST_GRACE_SECONDS


def env(name: str, default: str | None = None) -> str:
    v = os.environ.get(name, default)
    if v is None:
        raise SystemExit(f"mpc-runner: environment variable {name} is required")
    return v


def result(name: str, value: str) -> None:
    path = os.environ.get(f"RESULT_{name.upper().replace('-', '_')}")
    if path:
        Path(path).write_text(value)


def cmd_provision(_: argparse.Namespace) -> int:
    max_wait = env("MAX_WAIT_SECONDS", "")
    req = Request(taskrun_name=env("TASKRUN_NAME"), taskrun_namespace=env("TASKRUN_NAMESPACE"),
                  taskrun_uid=env("TASKRUN_UID"), platform=env("PLATFORM"),
                  controller_namespace=env("CONTROLLER_NAMESPACE"),
                  pool_configmap=env("HOST_POOL", contract.HOST_POOL_CONFIGMAP),
                  max_wait_seconds=int(max_wait) if max_wait else None,
                  owner=env(contract.OWNER_PARAM, ""))
    out = provision(Kube.connect(), req)
    result("outcome", out.result)
    result("host", out.host)
    return 0


def failure_cause(kube: Kube, namespace: str, run: str) -> str:
    """Why a provisioning PipelineRun failed, in Tekton's words: the message of each failed
    child TaskRun (e.g. a step killed with exit code 137, a pod deleted), else of the run."""
    try:
        pr = kube.custom.get_namespaced_custom_object("tekton.dev", "v1", namespace,
                                                      "pipelineruns", run)
    except client.ApiException as e:
        log.event("cannot read the failed run", level="warning", run=run, status=e.status)
        return ""
    causes = []
    for ref in (pr.get("status") or {}).get("childReferences") or ():
        if ref.get("kind") != "TaskRun" or not ref.get("name"):
            continue
        child = kube.taskrun(namespace, ref["name"])
        if contract.succeeded(child) is False:
            message = (contract.succeeded_condition(child) or {}).get("message", "")
            causes.append(f"{ref.get('pipelineTaskName') or ref['name']}: "
                          f"{contract.condition_reason(child)} ({message.strip()})")
    if not causes:
        message = (contract.succeeded_condition(pr) or {}).get("message", "")
        causes = [message.strip()] if message.strip() else []
    return "; ".join(causes)[:600]


def cmd_error_secret(_: argparse.Namespace) -> int:
    """Finally of the provisioning Pipeline: the provision task failed without an answer."""
    kube = Kube.connect()
    req = Request(taskrun_name=env("TASKRUN_NAME"), taskrun_namespace=env("TASKRUN_NAMESPACE"),
                  taskrun_uid=env("TASKRUN_UID"), platform=env("PLATFORM", ""),
                  controller_namespace=env("CONTROLLER_NAMESPACE"),
                  owner=env(contract.OWNER_PARAM, ""))
    tr = live_taskrun(kube, req)
    if tr is None:
        log.event("build TaskRun gone; no error secret needed", name=req.taskrun_name,
                  namespace=req.taskrun_namespace, uid=req.taskrun_uid)
        return 0
    run = env("PIPELINERUN", "")
    status = env("PROVISION_STATUS", "Failed")
    if status == contract.PROVISION_STATUS_QUEUE_TIMEOUT:
        msg = (f"no host of platform {req.platform or '(unset)'} became free within the host "
               "pool's maxWaitSeconds: every slot stayed busy. Retry the build later or ask "
               "the platform team for more capacity.")
    else:
        cause = failure_cause(kube, req.controller_namespace, run) if run else ""
        msg = (f"mpc could not provision a build host for platform {req.platform or '(unset)'}: "
               f"the provisioning run {req.controller_namespace}/{run} ended with status "
               f"{status}{': ' + cause if cause else ''}. The platform team can read its logs; "
               "retry the build once the cause is fixed.")
    if buildsecret.write_error(kube, tr, msg, overwrite=False):
        log.event("error secret written", level="warning", reason=msg, name=req.taskrun_name,
                  namespace=req.taskrun_namespace, uid=req.taskrun_uid)
    return 0


def cmd_deprovision(_: argparse.Namespace) -> int:
    rep = deprovision(Kube.connect(), env("CONTROLLER_NAMESPACE"), env("TASKRUN_NAMESPACE"),
                      env("TASKRUN_NAME"), env("TASKRUN_UID"),
                      pool_configmap=env("HOST_POOL", contract.HOST_POOL_CONFIGMAP),
                      provisioning_grace=float(env("PROVISIONING_GRACE_SECONDS", "120")))
    result("removed-users", str(len(rep.removed_users)))
    return 1 if rep.errors else 0


def cmd_sweep(_: argparse.Namespace) -> int:
    grace = env("REMOVED_HOST_GRACE_SECONDS", "")
    rep = sweep(Kube.connect(), env("CONTROLLER_NAMESPACE"),
                pool_configmap=env("HOST_POOL", contract.HOST_POOL_CONFIGMAP),
                removed_host_grace=float(grace) if grace else REMOVED_HOST_GRACE_SECONDS)
    result("removed-users", str(len(rep.removed_users)))
    return 1 if rep.errors else 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        parse_yaml(Path(args.file).read_text())
    except PoolError as e:
        for m in e.errors:
            print(m, file=sys.stderr)
        return 1
    print(f"{args.file}: valid host pool")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpc-runner", description=(
        "Runs inside mpc's provisioning Tasks. Inputs come from env: TASKRUN_NAME, "
        "TASKRUN_NAMESPACE, TASKRUN_UID, PLATFORM, CONTROLLER_NAMESPACE, HOST_POOL, "
        "BUILD_PIPELINERUN."))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("provision", help="allocate a slot, create the build user, write the secret"
                   ).set_defaults(func=cmd_provision)
    sub.add_parser("error-secret", help="write the error secret after a failed provisioning"
                   ).set_defaults(func=cmd_error_secret)
    sub.add_parser("deprovision", help="remove the build's users, slots and secret"
                   ).set_defaults(func=cmd_deprovision)
    sub.add_parser("sweep", help="remove orphaned slots, users and queue entries"
                   ).set_defaults(func=cmd_sweep)
    v = sub.add_parser("validate-pool", help="validate a host pool YAML file")
    v.add_argument("file")
    v.set_defaults(func=cmd_validate)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
