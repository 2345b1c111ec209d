"""Provisioning one build: validate, take a slot, create the user, write the secret.

Order matters for cleanup: the slot (which names the user) exists before the
user is created on the host, and the secret is written last, so whatever
point a run is killed at, deprovisioning or the sweep finds what to remove.
A retry of the same build reuses the slot it already holds, with a fresh user
(the one an earlier attempt made is removed first).

A build that is done (finished, deleted or replaced: ``contract.build_done``)
gets nothing: the provisioner checks before it starts, while it waits, after
it takes a slot and after it creates the user, gives back whatever the build
holds when it finds the build done, and then writes no secret at all.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from . import buildsecret, contract, hostkeys, log
from .hostpool import Host, Pool, PoolError
from .kube import Kube
from .poolsource import load_pool
from .release import Report, release_slots, remove_users
from .remote import HostError, parse_output, script
from .slots import Gone, Holder, Slot, Slots

PLATFORM_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}/[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass
class Request:
    taskrun_name: str
    taskrun_namespace: str
    taskrun_uid: str
    platform: str
    controller_namespace: str
    pool_configmap: str = contract.HOST_POOL_CONFIGMAP
    max_wait_seconds: int | None = None
    owner: str = ""                  # a predicted build: the PipelineRun that will create it


@dataclass
class Outcome:
    result: str                      # served | local | error | gone
    host: str = ""
    message: str = ""
    round_trips: int = 0
    failed_hosts: dict[str, str] = field(default_factory=dict)


def _fail(kube: Kube, taskrun: dict, message: str, **extra) -> Outcome:
    m = taskrun["metadata"]
    _, why = build_state(kube, m["namespace"], m["name"], m["uid"], owner_of(taskrun))
    if why:
        log.event("build done; no error secret written", why=why, reason=message, **_ids(taskrun))
        return Outcome("gone", message=message, **extra)
    buildsecret.write_error(kube, taskrun, message)
    log.event("error secret written", level="warning", reason=message, **_ids(taskrun))
    return Outcome("error", message=message, **extra)


def _ids(taskrun: dict) -> dict:
    m = taskrun["metadata"]
    return {"namespace": m["namespace"], "name": m["name"], "uid": m["uid"]}


INVALID_REFERENCE = "invalid reference"


def build_state(kube: Kube, namespace: str, name: str, uid: str, owner: str = ""
                ) -> tuple[dict | None, str | None]:
    """(the build, None) while it may use a host; (None, why) once it is done.

    The one liveness check of the runner: every release decision (the sweep,
    a provisioner giving up) rests on it, never on the object merely existing.
    The build is its TaskRun; a predicted build (``owner``: the PipelineRun that
    will create the TaskRun) is ``predicted_view`` of it, before and after the
    TaskRun exists (``contract.predicted_build_done``).
    """
    problem = contract.taskrun_ref_problem(namespace, name, uid, owner)
    if problem:
        log.event("not a TaskRun reference; ignored", level="warning", problem=problem)
        return None, INVALID_REFERENCE
    tr = kube.taskrun(namespace, name)
    if not owner:
        why = contract.build_done(tr, uid)
        return (None, why) if why else (tr, None)
    pr = None
    if tr is None:
        pr = kube.pipelinerun(namespace, owner)
        if pr is not None and contract.lists_child(pr, name):
            tr = kube.taskrun(namespace, name)      # created since the first read?
    why = contract.predicted_build_done(tr, pr, name, uid, owner)
    return (None, why) if why else (predicted_view(namespace, name, uid, owner, tr, pr), None)


def predicted_view(namespace: str, name: str, uid: str, owner: str, taskrun: dict | None,
                   pipelinerun: dict | None) -> dict:
    """A predicted build as the rest of the runner sees a build TaskRun: its name and key
    (``uid``), its secret owned by the PipelineRun (the TaskRun may not exist yet; the
    PipelineRun owns it when it does), its Events on the TaskRun once it exists."""
    if taskrun is not None:
        ref = next(r for r in taskrun["metadata"].get("ownerReferences") or ()
                   if r.get("kind") == "PipelineRun" and r.get("name") == owner)
        pr_uid = ref["uid"]
        involved = {"apiVersion": taskrun.get("apiVersion", "tekton.dev/v1"),
                    "kind": "TaskRun", "name": name, "uid": taskrun["metadata"]["uid"]}
    else:
        pr_uid = pipelinerun["metadata"]["uid"]
        involved = None
    owner_ref = {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun", "name": owner,
                 "uid": pr_uid}
    return {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "ownerReference": owner_ref, "involvedObject": involved or owner_ref}


def owner_of(build: dict) -> str:
    """The PipelineRun a predicted build (``predicted_view``) comes from; "" for a TaskRun."""
    return (build.get("ownerReference") or {}).get("name", "")


def live_taskrun(kube: Kube, req: Request) -> dict | None:
    """The build while it may use a host: the same TaskRun (or predicted build), neither
    finished nor (being) deleted."""
    return build_state(kube, req.taskrun_namespace, req.taskrun_name, req.taskrun_uid,
                       req.owner)[0]


def sudo_rule(host: Host) -> str:
    commands = list(host.sudo_commands)
    if host.builder == contract.BUILDER_HOST and contract.HOST_BUILDER_COMMAND not in commands:
        commands.append(contract.HOST_BUILDER_COMMAND)     # the pool's opt-in to root
    return ", ".join(commands)


def limit_lines(host: Host, user: str) -> str:
    return "\n".join(f"{user} {kind} {name} {value}" for name, value in host.limits
                     for kind in ("soft", "hard"))


def create_user(kube: Kube, req: Request, host: Host, user: str, public_key: str,
                layer_cache: bool = False) -> tuple[str, str, int, str]:
    """Create the build user on ``host``: returns (user dir, pinned known_hosts line, round
    trips, the namespace's layer cache directory the user got or "")."""
    key = contract.cache_key(req.taskrun_namespace) if layer_cache else ""
    with hostkeys.session(kube, req.controller_namespace, host) as s:
        out = s.run(script("provision-user.sh", BUILD_USER=user, PUBLIC_KEY=public_key,
                           SUDO_RULE=sudo_rule(host), LIMIT_LINES=limit_lines(host, user),
                           REGISTRY_PORT=str(contract.registry_port(user)),
                           CACHE_KEY=key, CACHE_NAMESPACE=req.taskrun_namespace,
                           CACHE_ROOT=contract.CACHE_ROOT))
        dirs = parse_output(out, "MPC_USER_DIR")
        if not dirs:
            raise HostError(host.name, "provisioning script did not report the user's home")
        cache = (parse_output(out, "MPC_CACHE_DIR") or [""])[-1]
        if key:
            log.event("layer cache handed over", host=host.name, user=user,
                      cache=(parse_output(out, "MPC_CACHE") or ["?"])[-1])
        return dirs[-1], s.pinned_line(), s.round_trips, cache


def provision(kube: Kube, req: Request, poll: float = 0.5) -> Outcome:
    taskrun, why = build_state(kube, req.taskrun_namespace, req.taskrun_name, req.taskrun_uid,
                               req.owner)
    if taskrun is None:
        trips = 0 if why == INVALID_REFERENCE else _give_back(kube, req)
        log.event("build done; nothing to provision", why=why, namespace=req.taskrun_namespace,
                  name=req.taskrun_name, uid=req.taskrun_uid)
        return Outcome("gone", round_trips=trips)
    ids = _ids(taskrun)
    try:
        pool = load_pool(kube, req.controller_namespace, req.pool_configmap)
    except PoolError as e:
        return _fail(kube, taskrun, "mpc cannot allocate a build host because the host pool is "
                     "invalid: " + "; ".join(e.errors) + ". The platform team must fix the pool "
                     "(check it with `mpc hostpool validate FILE`).")
    if not pool.namespace_allowed(req.taskrun_namespace):
        return _fail(kube, taskrun, f"namespace {req.taskrun_namespace} is not allowed to use "
                     f"mpc build hosts; allowed namespaces: {', '.join(pool.allowed_namespaces) or 'none'}. "
                     "Ask the platform team to add it to allowedNamespaces in the host pool.")
    # local platforms first: Konflux pools list bare `local`/`localhost`, which builds pass
    if req.platform not in pool.local_platforms and not PLATFORM_RE.match(req.platform):
        return _fail(kube, taskrun, f"invalid PLATFORM {req.platform!r}: expected <os>/<arch> "
                     "such as linux/arm64. Fix the PLATFORM param of the build.")
    if req.platform in pool.local_platforms:
        buildsecret.write(kube, taskrun, {contract.KEY_HOST: contract.LOCALHOST})
        log.event("local platform: secret written", platform=req.platform, **ids)
        return Outcome("local", host="localhost")
    dyn = pool.dynamic_for(req.platform)
    if dyn is not None:     # cloud VMs launched on demand (issue 15)
        from . import dynamic
        return dynamic.provision(kube, req, pool, dyn, taskrun, poll)
    hosts = pool.hosts_for(req.platform)
    if not hosts:
        return _fail(kube, taskrun, f"no host configured for platform {req.platform}; configured "
                     f"platforms: {', '.join(pool.platforms) or 'none'}. Use one of these or ask "
                     "the platform team to add a host for it to the host pool.")
    return _serve(kube, req, pool, hosts, taskrun, poll)


def _serve(kube: Kube, req: Request, pool: Pool, hosts: list[Host], taskrun: dict,
           poll: float) -> Outcome:
    ids = _ids(taskrun)
    slots = Slots(kube, req.controller_namespace)
    holder = Holder(req.taskrun_namespace, req.taskrun_name, req.taskrun_uid, req.platform,
                    req.owner)
    user = holder.user
    failed: dict[str, str] = {}
    trips = 0
    max_wait = pool.max_wait_seconds if req.max_wait_seconds is None else req.max_wait_seconds
    deadline = time.monotonic() + max_wait
    held = [s for s in slots.held_by(req.taskrun_uid)]
    while True:
        candidates = [h for h in hosts if h.name not in failed]
        if not candidates:
            detail = "; ".join(f"{k}: {v}" for k, v in failed.items())
            return _fail(kube, taskrun, f"provisioning failed on every host of platform "
                         f"{req.platform}: {detail}. The platform team should check these hosts "
                         "and their admin keys.", failed_hosts=failed, round_trips=trips)
        slot = next((s for s in held if s.host in {h.name for h in candidates}), None)
        reused = slot is not None
        if slot is None:
            try:
                slot = slots.acquire(
                    hosts, holder, deadline, poll=poll, excluded=failed,
                    alive=lambda: live_taskrun(kube, req) is not None,
                    on_wait=lambda pos: log.event("platform full: waiting for a slot",
                                                  platform=req.platform, position=pos, **ids))
            except Gone:
                log.event("build done while waiting; left the queue", **ids)
                return Outcome("gone", round_trips=trips)
        if slot is None:
            return _fail(kube, taskrun, f"no host of platform {req.platform} became free within "
                         f"{max_wait}s ({len(candidates)} hosts, "
                         f"{sum(h.concurrency for h in candidates)} slots, all busy). Retry the build "
                         "later or ask the platform team for more capacity.",
                         failed_hosts=failed, round_trips=trips)
        host = pool.host(slot.host)
        log.event("slot taken", host=host.name, slot=slot.index, user=user, **ids)
        if live_taskrun(kube, req) is None:
            if reused:      # an earlier attempt may have created the user
                trips += _undo(kube, req, slots, slot, host, user)[1]
            else:
                slots.release(slot)
            log.event("build done after allocation; slot released", **ids)
            return Outcome("gone", round_trips=trips)
        priv, pub = buildsecret.new_keypair()
        try:
            if reused:
                # An earlier attempt of this build may have made the user; provisioning
                # refuses an existing user (it never writes into a home a build user
                # had), so that one goes first, with whatever it runs.
                trips += remove_users(kube, req.controller_namespace, host, [user])
            user_dir, known_hosts, n, cache_dir = create_user(
                kube, req, host, user, pub, layer_cache=pool.layer_cache_for(req.taskrun_namespace)
                and host.builder == contract.BUILDER_CONTAINER)
            trips += n
        except HostError as e:
            failed[host.name] = str(e).split(": ", 1)[-1]
            log.event("host failed; trying the next", level="warning", host=host.name,
                      error=failed[host.name], **ids)
            if isinstance(e, hostkeys.HostKeyChanged):
                hostkeys.warn_build(kube, taskrun, e)
                if not reused:      # refused before anything ran there: no user to remove
                    slots.release(slot)
                    held = []
                    continue
            trips += _undo(kube, req, slots, slot, host, user)[1]
            held = []
            continue
        # The build may have been deleted while we worked: never leave a user behind.
        taskrun = live_taskrun(kube, req)
        if taskrun is None:
            trips += _undo(kube, req, slots, slot, host, user)[1]
            log.event("build done during provisioning; user removed", **ids)
            return Outcome("gone", round_trips=trips)
        buildsecret.write(kube, taskrun, {
            contract.KEY_PRIVATE_KEY: priv, contract.KEY_HOST: f"{user}@{host.address}",
            contract.KEY_USER_DIR: user_dir, contract.KEY_KNOWN_HOSTS: known_hosts + "\n",
            **({contract.KEY_BUILDER: host.builder}
               if host.builder != contract.BUILDER_CONTAINER else {}),
            **({contract.KEY_CACHE_DIR: cache_dir} if cache_dir else {})})
        log.event("provisioned", host=host.name, slot=slot.index, user=user, **ids)
        return Outcome("served", host=host.name, round_trips=trips, failed_hosts=failed)


def _undo(kube: Kube, req: Request, slots: Slots, slot: Slot, host: Host, user: str
          ) -> tuple[bool, int]:
    """Remove the user, then free the slot: (done, SSH round trips)."""
    try:
        trips = remove_users(kube, req.controller_namespace, host, [user])
    except (HostError, ValueError) as e:
        # The slot stays so the sweep retries removing the user later.
        log.event("could not remove user; slot kept for the sweep", level="warning",
                  host=host.name, user=user, error=str(e))
        return False, 0
    slots.release(slot)
    return True, trips


def _give_back(kube: Kube, req: Request) -> int:
    """Free the slots (and their users) a done build still holds from an earlier attempt.

    What cannot be removed now (host down, pool unreadable) stays for the sweep;
    a host removed from the pool is reached as its slot recorded it (``release``).
    """
    slots = Slots(kube, req.controller_namespace)
    slots.dequeue(req.taskrun_uid)
    held = slots.held_by(req.taskrun_uid)
    if not held:
        return 0
    try:
        pool = load_pool(kube, req.controller_namespace, req.pool_configmap)
    except PoolError as e:
        log.event("host pool unreadable; using the hosts the slots recorded", level="warning",
                  error=str(e), uid=req.taskrun_uid)
        pool = None
    report = Report()
    release_slots(kube, req.controller_namespace, pool, slots, held, report)
    if report.released_slots:
        log.event("build done: users removed, slots released", slots=report.released_slots,
                  users=report.removed_users, uid=req.taskrun_uid)
    if report.errors:
        log.event("some slots kept for the sweep", level="warning", errors=report.errors,
                  uid=req.taskrun_uid)
    return report.round_trips
