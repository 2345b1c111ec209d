"""Deprovisioning one build and sweeping leftovers.

``deprovision``: for every slot the build's TaskRun uid holds, kill the
user's processes and delete the user (a missing user is success), delete
the slot, drop a queue entry, delete the build's secret. Safe to repeat.

``sweep``: slots whose build is done (``contract.build_done``: finished
with Succeeded True or False, deleted, being deleted, or replaced by a
namesake), waiter entries of builds that are done, and ``u-*`` users on
pool hosts that no slot accounts for (by user name: a build's user is unique
to it, so a renamed host's users are never taken for strays), and the layer
caches of namespaces the pool's ``layerCache`` no longer lists. Users are
listed *before* slots, so a build being provisioned right now (slot first,
then user) is never mistaken for an orphan. Waiters whose provisioner died
while its build lives are removed by the live waiters that observe them
(``slots``: judged on the observer's own clock), not here: a one-shot sweep
cannot observe for a lease duration.

A finished TaskRun that still exists is done: clusters keep them for days,
and the watcher drops its finalizer as soon as the deprovisioning run exists,
so when that run fails (its host was down) only the sweep frees the slot. It
keeps a slot whose host cannot be reached and tries again on its next run,
so a finished build's slot is free at most one sweep interval (the watcher's
``--sweep-interval``) after its host is back. A host removed from the pool is
reached as the slot recorded it; one that stays unreachable has its slots
released after ``release.REMOVED_HOST_GRACE_SECONDS`` (see ``release``).
"""
from __future__ import annotations

import time

from kubernetes import client

from . import buildsecret, contract, hostkeys, log
from .hostpool import Pool, PoolError
from .kube import Kube
from .poolsource import load_pool
from .provision import build_state
from .release import REMOVED_HOST_GRACE_SECONDS, Report, release_slots, remove_users
from .remote import HostError, parse_output, script
from .slots import Slots


def _pool(kube: Kube, namespace: str, name: str) -> Pool | None:
    try:
        return load_pool(kube, namespace, name)
    except PoolError as e:
        log.event("host pool unreadable; using the hosts the slots recorded", level="warning",
                  error=str(e))
        return None


def wait_for_provisioning(kube: Kube, namespace: str, uid: str, timeout: float) -> None:
    """Let a cancelled provisioning run stop before cleaning up behind it."""
    deadline = time.monotonic() + timeout
    name = contract.provision_run_name(uid)
    while True:
        try:
            pr = kube.custom.get_namespaced_custom_object("tekton.dev", "v1", namespace,
                                                          "pipelineruns", name)
        except client.ApiException as e:
            if e.status in (403, 404):
                return
            raise
        if contract.succeeded(pr) is not None:
            return
        if time.monotonic() >= deadline:
            log.event("provisioning run still running; deprovisioning anyway", level="warning",
                      uid=uid, pipelinerun=name)
            return
        time.sleep(1)


def deprovision(kube: Kube, controller_namespace: str, namespace: str, name: str, uid: str,
                pool_configmap: str = contract.HOST_POOL_CONFIGMAP,
                provisioning_grace: float = 120) -> Report:
    report = Report()
    problem = contract.taskrun_ref_problem(namespace, name, uid)
    if problem:
        report.errors.append(problem)
        log.event("not a TaskRun reference; nothing deprovisioned", level="warning",
                  problem=problem)
        return report
    wait_for_provisioning(kube, controller_namespace, uid, provisioning_grace)
    slots = Slots(kube, controller_namespace)
    slots.dequeue(uid)
    held = slots.held_by(uid)
    if held:
        release_slots(kube, controller_namespace, _pool(kube, controller_namespace, pool_configmap),
                      slots, held, report)
    from . import dynamic   # places on cloud VMs (issue 15)
    report.errors += dynamic.deprovision(
        kube, controller_namespace, uid, lambda: _pool(kube, controller_namespace, pool_configmap))
    report.secret_deleted = buildsecret.delete(kube, namespace, name, uid)
    log.event("deprovisioned" if not report.errors else "deprovisioning incomplete",
              level="info" if not report.errors else "warning", namespace=namespace, name=name,
              uid=uid, users=report.removed_users, slots=report.released_slots,
              errors=report.errors, secret_deleted=report.secret_deleted)
    return report


def list_users(kube: Kube, namespace: str, host) -> tuple[list[str], dict[str, str]]:
    """The build users on ``host`` and its namespaces' layer caches at rest (key -> namespace)."""
    with hostkeys.session(kube, namespace, host) as s:
        out = s.run(script("list-users.sh", CACHE_ROOT=contract.CACHE_ROOT))
    caches = dict((line.split(" ", 1) + [""])[:2] for line in parse_output(out, "MPC_CACHE"))
    return ([u for u in out.splitlines() if contract.USER_RE.match(u)],
            {k: ns for k, ns in caches.items() if contract.CACHE_KEY_RE.match(k)})


def drop_caches(kube: Kube, namespace: str, pool: Pool, host, caches: dict[str, str]) -> list[str]:
    """Remove the layer caches on ``host`` of namespaces the pool no longer gives one."""
    stale = sorted(k for k, ns in caches.items() if not pool.layer_cache_for(ns))
    if stale:
        with hostkeys.session(kube, namespace, host) as s:
            s.run(script("drop-caches.sh", CACHE_ROOT=contract.CACHE_ROOT, CACHE_KEYS=" ".join(stale)))
        log.event("layer caches removed (no longer in the pool's layerCache)", host=host.name,
                  caches=stale, namespaces=sorted({caches[k] for k in stale}))
    return stale


def sweep(kube: Kube, controller_namespace: str,
          pool_configmap: str = contract.HOST_POOL_CONFIGMAP,
          removed_host_grace: float = REMOVED_HOST_GRACE_SECONDS) -> Report:
    report = Report()
    pool = _pool(kube, controller_namespace, pool_configmap)
    slots = Slots(kube, controller_namespace)
    # 1. users on hosts, listed before the slots (see module docstring)
    users_on: dict[str, list[str]] = {}
    for host in (pool.hosts if pool else ()):
        try:
            users_on[host.name], caches = list_users(kube, controller_namespace, host)
            report.round_trips += 1
            report.round_trips += bool(drop_caches(kube, controller_namespace, pool, host, caches))
        except HostError as e:
            report.errors.append(str(e))
    # 2. slots whose build is done (finished, deleted or replaced), never "still exists"
    all_slots = slots.all()
    why_done: dict[tuple[str, str, str, str], str | None] = {}
    for s in all_slots:
        h = s.holder.build
        if h not in why_done:
            why_done[h] = build_state(kube, *h)[1]
            if why_done[h]:
                log.event("build done; freeing its slots", why=why_done[h], namespace=h[0],
                          name=h[1], uid=h[2])
    done = [s for s in all_slots if why_done[s.holder.build]]
    if done:
        release_slots(kube, controller_namespace, pool, slots, done, report,
                      grace=removed_host_grace)
        for h in dict.fromkeys(s.holder.build for s in done):
            if buildsecret.delete(kube, *h[:3]):
                report.secret_deleted = True
    # 3. users no slot accounts for
    accounted = {s.holder.user for s in all_slots if s not in done}
    for host_name, users in users_on.items():
        strays = sorted(u for u in users if u not in accounted
                        and u not in report.removed_users)
        if not strays:
            continue
        try:
            report.round_trips += remove_users(kube, controller_namespace, pool.host(host_name), strays)
            report.removed_users += strays
        except HostError as e:
            report.errors.append(str(e))
    # 4. queue entries of builds that are done (clock-free: never judged by a renewTime)
    for w in slots.waiters():
        why = why_done.get(w.holder.build) or build_state(kube, *w.holder.build)[1]
        if why:
            slots.delete_waiter(w.name)
            log.event("build done; queue entry removed", why=why, uid=w.holder.uid)
    # dynamic hosts: orphaned VMs, records, places of done builds, warm pools (issue 15)
    if pool is not None and pool.dynamic:
        from . import dynamic
        report.errors += dynamic.sweep(kube, controller_namespace, pool, build_state).errors
    log.event("sweep done", users=report.removed_users, slots=report.released_slots,
              errors=report.errors)
    return report
