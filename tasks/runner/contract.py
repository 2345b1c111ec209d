"""Names shared by the watcher, the generated Tasks and the runner.

Everything that two parts of mpc must compute identically lives here, and
only here (a user-name mismatch between provision and cleanup leaked users
for months in the Go controller). Label *values* must be valid label values
(<= 63 chars, [A-Za-z0-9_.-]); anything longer or with '/' goes in an
annotation.
"""
from __future__ import annotations

import hashlib
import re
import uuid

DOMAIN = "build.mpc.dev"

# --- on build TaskRuns ----------------------------------------------------------
FINALIZER = f"{DOMAIN}/provisioner"
PLATFORM_PARAM = "PLATFORM"
SECRET_PREFIX = "multi-platform-ssh-"
# keys of the build's secret (Konflux buildah-remote's contract + known_hosts)
KEY_PRIVATE_KEY = "id_rsa"
KEY_HOST = "host"              # <user>@<address>, or "localhost"
KEY_USER_DIR = "user-dir"
KEY_KNOWN_HOSTS = "known_hosts"
KEY_ERROR = "error"            # alone: why no host could be provided
KEY_REGISTRY_PORT = "registry-port"   # the one port the build key may listen on (ssh -R)
# How buildah-remote runs the build script on the host: absent (or BUILDER_CONTAINER) in its
# builder container (podman run); BUILDER_HOST: as root on the host itself, in a private
# mount and PID namespace (`sudo HOST_BUILDER_COMMAND -m --pid ...`), for hosts that cannot run containers
# (the pool's per-host `builder: host`; provisioning then grants that sudo command)
KEY_BUILDER = "builder"
BUILDER_CONTAINER = "container"
BUILDER_HOST = "host"
HOST_BUILDER_COMMAND = "/usr/bin/unshare"
LOCALHOST = "localhost"
# The build's share of its namespace's layer cache on the host (the pool's layerCache):
# a directory only this build user can enter, holding the builder's container storage
# and the last build's copy of the workspaces (docs/layer-cache.md). Absent: no cache.
KEY_CACHE_DIR = "cache-dir"

# --- labels/annotations on everything mpc creates ---------------------------------
LABEL_MANAGED = f"{DOMAIN}/managed-by"          # value: MANAGED_VALUE
MANAGED_VALUE = "mpc"
LABEL_TASKRUN_UID = f"{DOMAIN}/taskrun-uid"     # uid of the build TaskRun (36 chars)
LABEL_TASKRUN_NAMESPACE = f"{DOMAIN}/taskrun-namespace"
LABEL_ROLE = f"{DOMAIN}/role"                   # provision | deprovision | sweep | slot | waiter
LABEL_HOST = f"{DOMAIN}/host"                   # host name from the pool (validated as a label value)
ANN_TASKRUN_NAME = f"{DOMAIN}/taskrun-name"     # names can exceed 63 chars: annotation
ANN_PLATFORM = f"{DOMAIN}/platform"             # contains '/': annotation
# a build provisioned before its TaskRun exists (predicted): the PipelineRun that will
# create it (on its slots, queue entries and places; absent for every other build)
ANN_PIPELINERUN = f"{DOMAIN}/pipelinerun"
ANN_USER = f"{DOMAIN}/user"
ANN_ADDRESS = f"{DOMAIN}/address"
ANN_ALLOCATED_AT = f"{DOMAIN}/allocated-at"
ANN_PORT = f"{DOMAIN}/port"
ANN_HOST_KEY = f"{DOMAIN}/host-key"             # 'ssh-ed25519 AAAA...' recorded on first use
ANN_FINGERPRINT = f"{DOMAIN}/fingerprint"       # SHA256:... of ANN_HOST_KEY
ROLE_HOST_KEY = "host-key"                      # LABEL_ROLE of a host key recorded on first use
# on a slot Lease: how to reach its host even after the host left the pool
ANN_ADMIN_USER = f"{DOMAIN}/admin-user"
ANN_ADMIN_SECRET = f"{DOMAIN}/admin-secret"     # Secret (controller namespace) with the admin key
ANN_UNREACHABLE_SINCE = f"{DOMAIN}/unreachable-since"   # first failed release of a removed host
# on a waiter Lease: hosts of its platform the build cannot use (they failed for it)
ANN_EXCLUDED_HOSTS = f"{DOMAIN}/excluded-hosts"
ANN_ATTEMPT = f"{DOMAIN}/attempt"               # 2, 3, ...: a run made again (``unresolved``)

# --- on build hosts ----------------------------------------------------------------
# buildah-remote labels the containers it runs with the build user (value: the user
# name); deprovisioning removes root's containers (the sudo podman path) by it.
LABEL_BUILD_USER = f"{DOMAIN}/build-user"

# Where the layer caches live on a host (root's, outside every build user's home):
# ns/<cache key>/cache at rest, held/<build user> while a build of that namespace has it.
CACHE_ROOT = "/var/lib/mpc-cache"
CACHE_KEY_RE = re.compile(r"^n-[0-9a-f]{24}$")

# --- the host pool ---------------------------------------------------------------
HOST_POOL_CONFIGMAP = "mpc-host-pool"           # key POOL_KEY holds the YAML pool
POOL_KEY = "pool.yaml"
KONFLUX_CONFIGMAP = "host-config"               # flat Konflux MPC keys are accepted too

# --- Pipelines the watcher instantiates (params agreed with the generator) -------
PROVISION_PIPELINE = "mpc-provision"
DEPROVISION_PIPELINE = "mpc-deprovision"
# started by the watcher when a provisioning run ended without success and the build still
# waits: writes the error secret if nothing did (a cancelled run skips its finally)
PROVISION_FAILED_PIPELINE = "mpc-provision-failed"
SWEEP_TASK = "mpc-sweep"
# PROVISION_STATUS of an mpc-provision-failed run the watcher starts for a build that
# waited longer than the pool's maxWaitSeconds for a free host (no provisioning run ran)
PROVISION_STATUS_QUEUE_TIMEOUT = "QueueTimeout"
PIPELINE_PARAMS = ("TASKRUN_NAME", "TASKRUN_NAMESPACE", "TASKRUN_UID", "PLATFORM")
DEPROVISION_PARAMS = ("TASKRUN_NAME", "TASKRUN_NAMESPACE", "TASKRUN_UID")
OWNER_PARAM = "BUILD_PIPELINERUN"   # a predicted build's PipelineRun (provision, error secret)
TASKS_SERVICE_ACCOUNT = "mpc-tasks"             # runs the provisioning Tasks (writes secrets)
WATCHER_SERVICE_ACCOUNT = "mpc-watcher"         # cannot read secrets


def secret_name(taskrun_name: str) -> str:
    return SECRET_PREFIX + taskrun_name


def _short(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def provision_run_name(taskrun_uid: str) -> str:
    """One provisioning PipelineRun per build TaskRun (failover happens inside it)."""
    return f"mpc-provision-{taskrun_uid}"


def deprovision_run_name(taskrun_uid: str) -> str:
    return f"mpc-deprovision-{taskrun_uid}"


def provision_failed_run_name(taskrun_uid: str) -> str:
    return f"mpc-provision-failed-{taskrun_uid}"


def build_user(namespace: str, taskrun_name: str, taskrun_uid: str) -> str:
    """The Unix user for one build on a host: ``u-`` + 24 hex chars (26 < 32 chars).

    The uid makes a re-created TaskRun with the same name a different user.
    """
    return "u-" + _short(namespace, taskrun_name, taskrun_uid, length=24)


USER_RE = re.compile(r"^u-[0-9a-f]{24}$")


def cache_key(namespace: str) -> str:
    """The name of ``namespace``'s layer cache on a host: ``n-`` + 24 hex chars."""
    return "n-" + _short("layer-cache", namespace, length=24)

# The build key may listen on exactly one port of the host's loopback (authorized_keys
# permitlisten): buildah-remote forwards its in-pod registry proxy there, so that registry
# credentials never reach the host. Below Linux's ephemeral range (32768-60999).
REGISTRY_PORT_BASE, REGISTRY_PORT_COUNT = 10240, 22528


def registry_port(user: str) -> int:
    """The loopback port build user ``user`` may listen on (a function of the name only:
    provisioning writes it into authorized_keys, the secret hands it to the build)."""
    h = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16)
    return REGISTRY_PORT_BASE + h % REGISTRY_PORT_COUNT


def slot_name(host: str, index: int) -> str:
    """The Lease that is slot ``index`` of ``host``: creating it is taking the slot."""
    return f"mpc-slot-{host}-{index}"


def host_key_name(host: str, address: str, port: int) -> str:
    """The Lease that records the key of a pool host without ``hostKey`` (trust on first use).

    Keyed by host name and address:port: a host that moves gets a new record.
    """
    return f"mpc-hostkey-{host}-{_short(f'{address}:{port}', length=10)}"


def waiter_name(taskrun_uid: str) -> str:
    """The Lease that queues a build for a full platform (FIFO by creation time)."""
    return f"mpc-wait-{taskrun_uid}"


# --- where a build is in its life ------------------------------------------------
# The watcher and the runner must agree on when a build stops needing its host:
# this is the one parser of Tekton's Succeeded condition.
def build_labels(role: str, uid: str, namespace: str) -> dict[str, str]:
    """The labels every object mpc keeps for one build carries (runs, slot Leases)."""
    return {LABEL_MANAGED: MANAGED_VALUE, LABEL_ROLE: role,
            LABEL_TASKRUN_UID: uid, LABEL_TASKRUN_NAMESPACE: namespace}


def succeeded_condition(obj: dict | None) -> dict | None:
    """A Tekton run's ``Succeeded`` condition, or None if it has none yet."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if isinstance(cond, dict) and cond.get("type") == "Succeeded":
            return cond
    return None


def succeeded(obj: dict | None) -> bool | None:
    """A Tekton run's ``Succeeded`` condition: True or False once it has finished,
    None while it runs (status Unknown, or no condition yet)."""
    s = (succeeded_condition(obj) or {}).get("status")
    return True if s == "True" else False if s == "False" else None


def condition_reason(obj: dict | None) -> str:
    """The reason of the ``Succeeded`` condition ("" while there is none)."""
    return str((succeeded_condition(obj) or {}).get("reason") or "")


# Tekton could not fetch the Pipeline or one of its Tasks (bundle registry or API server
# unreachable for a moment: Tekton 1.0 ends the run instead of retrying)
RESOLUTION_FAILURES = ("CouldntGetPipeline", "CouldntGetTask")


def unresolved(obj: dict | None) -> bool:
    """The run failed because Tekton could not resolve its Pipeline or Tasks, before it
    started any of them: nothing of it ran, so making it again cannot duplicate work."""
    return (succeeded(obj) is False and condition_reason(obj) in RESOLUTION_FAILURES
            and not ((obj or {}).get("status") or {}).get("childReferences"))


def build_done(taskrun: dict | None, uid: str) -> str | None:
    """Why the build TaskRun ``uid`` needs no host any more, or None while it may use one.

    ``taskrun`` is what the API returns for the build's namespace/name (None
    for 404). Done means deleted, replaced by a namesake (another uid), being
    deleted, or finished (Succeeded True or False). That the object exists
    says nothing: clusters keep finished TaskRuns for hours or days.
    """
    if taskrun is None:
        return "deleted"
    if (taskrun.get("metadata") or {}).get("uid") != uid:
        return "replaced"
    return _ended(taskrun)


def _ended(obj: dict) -> str | None:
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return "deleting"
    ok = succeeded(obj)
    if ok is None:
        return None
    return "succeeded" if ok else "failed"


# --- builds provisioned before their TaskRun exists (predicted) ---------------------
# The runner sees any build as a TaskRun dict (``provision.build_state``): its metadata
# name/namespace/uid are the build's TaskRun name, namespace and key. A predicted build's
# dict also says what owns its secret and what its Events are about.
def involved_object(build: dict) -> dict:
    """What an Event about ``build`` is about: the TaskRun (or, before a predicted
    build's TaskRun exists, its PipelineRun)."""
    m = build["metadata"]
    return build.get("involvedObject") or {
        "apiVersion": build.get("apiVersion", "tekton.dev/v1"), "kind": "TaskRun",
        "name": m["name"], "uid": m["uid"]}


def owner_reference(build: dict) -> dict:
    """The owner of ``build``'s secret, so that it dies with it: the TaskRun, or a
    predicted build's PipelineRun."""
    return build.get("ownerReference") or involved_object(build)


_PREDICTED = uuid.UUID("8f0b6a57-3c1e-4f7e-9a51-6d2f3b1c0e42")


def predicted_uid(pipelinerun_uid: str, taskrun_name: str) -> str:
    """The key of the build TaskRun ``taskrun_name`` that PipelineRun ``pipelinerun_uid``
    will create: known before the TaskRun exists, the same for whoever computes it, and
    a uid-shaped value (user names, slots and runs are keyed by it as by a TaskRun uid)."""
    return str(uuid.uuid5(_PREDICTED, f"{pipelinerun_uid}/{taskrun_name}"))


def made_by(taskrun: dict, owner: str, uid: str) -> bool:
    """Whether ``taskrun`` is the predicted build ``uid``: a child of PipelineRun
    ``owner`` whose uid and the TaskRun's name give ``uid``."""
    name = (taskrun.get("metadata") or {}).get("name", "")
    return any(r.get("kind") == "PipelineRun" and r.get("name") == owner
               and predicted_uid(str(r.get("uid", "")), name) == uid
               for r in (taskrun.get("metadata") or {}).get("ownerReferences") or ())


def lists_child(pipelinerun: dict, taskrun_name: str) -> bool:
    """Whether the PipelineRun has recorded a child TaskRun of that name (it made it)."""
    return any(r.get("name") == taskrun_name
               for r in (pipelinerun.get("status") or {}).get("childReferences") or ())


def predicted_build_done(taskrun: dict | None, pipelinerun: dict | None, name: str, uid: str,
                         owner: str) -> str | None:
    """``build_done`` for a predicted build: ``owner`` is the PipelineRun that will create
    TaskRun ``name``, ``uid`` its ``predicted_uid``, ``taskrun``/``pipelinerun`` what the
    API returns for the two (None for 404).

    Once the TaskRun exists, the build is that TaskRun (if ``made_by`` the owner; any
    other namesake means "replaced") and ends as any build does. Before, it lives while
    its PipelineRun runs: a PipelineRun that is gone, replaced, being deleted or
    finished will never create it, and one that lists the child while the TaskRun is
    404 had it deleted. The caller reads the TaskRun first and, if the PipelineRun
    lists the child, the TaskRun again: one created between the reads is never taken
    for a deleted one.
    """
    if taskrun is not None:
        return _ended(taskrun) if made_by(taskrun, owner, uid) else "replaced"
    if pipelinerun is None:
        return "pipelinerun deleted"
    md = pipelinerun.get("metadata") or {}
    if predicted_uid(str(md.get("uid", "")), name) != uid:
        return "pipelinerun replaced"
    ended = _ended(pipelinerun)
    if ended:
        return f"never created (pipelinerun {ended})"
    if lists_child(pipelinerun, name):
        return "deleted"
    return None


# --- validating references that arrive as params --------------------------------
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_UID = re.compile(r"^[0-9a-fA-F][0-9a-fA-F-]{7,63}$")


def taskrun_ref_problem(namespace: str, name: str, uid: str, owner: str = "") -> str | None:
    """Why (namespace, name, uid) cannot name a real TaskRun (or ``owner`` a PipelineRun),
    or None if they can.

    Checked before any value is put into an API path or a label selector.
    """
    if not (len(namespace) <= 63 and _DNS_LABEL.match(namespace)):
        return f"invalid namespace {namespace!r}"
    if not (len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        return f"invalid TaskRun name {name!r}"
    if not _UID.match(uid):
        return f"invalid TaskRun uid {uid!r}"
    if owner and not (len(owner) <= 253 and _DNS_SUBDOMAIN.match(owner)):
        return f"invalid PipelineRun name {owner!r}"
    return None


# --- dynamic (cloud) hosts: VM records, quotas and cloud tags (issue 15) ----------
ROLE_VM = "vm"                                  # a VM record: one Lease per VM, its quota slot
ROLE_VM_BUILD = "vm-build"                      # a build on a VM (one of maxBuildsPerVM)
ROLE_VM_NAMESPACE = "vm-namespace"              # a namespace's share of maxInstancesPerNamespace
LABEL_VM_STATE = f"{DOMAIN}/vm-state"           # launching | booting | ready | terminating
LABEL_VM = f"{DOMAIN}/vm"                       # the VM record a vm-build Lease belongs to
ANN_INSTANCE_ID = f"{DOMAIN}/instance-id"
ANN_PROVIDER = f"{DOMAIN}/provider"
ANN_LAUNCHED_AT = f"{DOMAIN}/launched-at"
ANN_READY_AT = f"{DOMAIN}/ready-at"
ANN_BUILDS_SERVED = f"{DOMAIN}/builds-served"
# tags on every VM mpc launches: the sweep trusts only these
TAG_MANAGED = f"{DOMAIN}/managed-by"            # value MANAGED_VALUE
TAG_INSTANCE = f"{DOMAIN}/instance-tag"         # the pool's instanceTag (this installation)
TAG_RECORD = f"{DOMAIN}/record"                 # namespace/name of the VM record
TAG_RECORD_UID = f"{DOMAIN}/record-uid"         # uid of that record (a re-created one differs)
TAG_PLATFORM = f"{DOMAIN}/platform"


def vm_record_name(platform: str, index: int) -> str:
    """The Lease that is VM ``index`` (< maxInstances) of ``platform``: creating it is taking
    one of the platform's instances from its quota, before anything is launched."""
    return f"mpc-vm-{_short(platform, length=12)}-{index}"


def vm_build_name(record: str, index: int) -> str:
    """The Lease that is build place ``index`` (< maxBuildsPerVM) on the VM ``record``."""
    return f"{record}-b{index}"


def vm_namespace_name(platform: str, namespace: str, index: int) -> str:
    """The Lease that is place ``index`` of ``namespace`` in maxInstancesPerNamespace."""
    return f"mpc-vmns-{_short(platform, namespace, length=16)}-{index}"


ROLE_VM_STATS = "vm-stats"                      # counters of a dynamic platform (vms.summary)
ANN_VM_STATS = f"{DOMAIN}/stats"                # their JSON


def vm_stats_name(platform: str, shard: int) -> str:
    """One of the Leases holding ``platform``'s counters (launches, boot times, orphans)."""
    return f"mpc-vmstats-{_short(platform, length=12)}-{shard}"


def vm_client_token(record_uid: str) -> str:
    """The idempotency token of the one launch a VM record stands for (<= 64 chars)."""
    return f"mpc-{record_uid}"
