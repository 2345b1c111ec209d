"""The provisioning Tasks and Pipelines, as Python data.

Each Task runs one ``mpc-runner`` sub-command in the task-runner image, as the
step's ``command`` (no ``script``: Tekton then adds no ``place-scripts`` init
container, one container start less before provisioning begins; see
docs/performance.md "Time to build step"). Params and context reach the step
only as env values. ``documents()`` returns every file this module
emits into ``tasks/`` (YAML, READMEs, the Tasks' RBAC).
"""
from __future__ import annotations

from dataclasses import dataclass

from mpc.runner import contract

from . import admission

VERSION = "0.1"
RUNNER_IMAGE = "localhost/mpc/task-runner:0.1"

@dataclass(frozen=True)
class Param:
    name: str
    description: str
    default: str | None = None


@dataclass(frozen=True)
class Result:
    name: str
    description: str


@dataclass(frozen=True)
class TaskDef:
    name: str
    command: str
    description: str
    params: tuple[Param, ...]
    results: tuple[Result, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    readme_notes: str = ""

    def env(self) -> list[dict]:
        env = [{"name": p.name, "value": f"$(params.{p.name})"} for p in self.params]
        env.append({"name": "CONTROLLER_NAMESPACE", "value": "$(context.taskRun.namespace)"})
        env += [{"name": k, "value": v} for k, v in self.extra_env]
        env += [{"name": "RESULT_" + r.name.upper().replace("-", "_"),
                 "value": f"$(results.{r.name}.path)"} for r in self.results]
        return env

    def task(self, image: str) -> dict:
        spec: dict = {"description": self.description, "params": _param_specs(self.params)}
        if self.results:
            spec["results"] = [{"name": r.name, "type": "string", "description": r.description}
                               for r in self.results]
        spec["steps"] = [{
            "name": self.command.replace("_", "-"),
            "image": image,
            "env": self.env(),
            "computeResources": {"requests": {"cpu": "50m", "memory": "96Mi"},
                                 "limits": {"memory": "256Mi"}},
            # Pod Security "restricted", and no fixed uid: OpenShift's restricted-v2 (or
            # a podTemplate) picks one; ssh then runs through nss_wrapper (runner/identity.py)
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "command": ["mpc-runner", self.command],
        }]
        return {"apiVersion": "tekton.dev/v1", "kind": "Task",
                "metadata": {"name": self.name, "labels": {
                    "app.kubernetes.io/version": VERSION, "app.kubernetes.io/part-of": "mpc"},
                    "annotations": {"tekton.dev/pipelines.minVersion": "1.0.0",
                                    "tekton.dev/tags": "multi-platform, build-hosts"}},
                "spec": spec}


TR_PARAMS = (
    Param("TASKRUN_NAME", "Name of the build TaskRun that needs a host."),
    Param("TASKRUN_NAMESPACE", "Namespace of the build TaskRun."),
    Param("TASKRUN_UID", "UID of the build TaskRun (guards against a re-created namesake)."),
)
OWNER_PARAM = Param(contract.OWNER_PARAM, "For a build provisioned before its TaskRun exists: "
                    "the PipelineRun that will create it (TASKRUN_UID is then "
                    "contract.predicted_uid of that PipelineRun and TASKRUN_NAME). Empty "
                    "otherwise.", "")
POOL_PARAM = Param("HOST_POOL", "ConfigMap with the host pool, in the namespace this Task runs in "
                   "(falls back to Konflux's host-config).", contract.HOST_POOL_CONFIGMAP)
PLATFORM = Param("PLATFORM", "Platform the build asked for, e.g. linux/arm64.")

PROVISION = TaskDef(
    name="mpc-provision", command="provision",
    description="Allocates a slot on the least-utilised host of PLATFORM (queueing while all "
                "are busy), creates a fresh build user with a key generated in the pod, and "
                "writes the build's secret multi-platform-ssh-<TaskRun> (or its error form).",
    params=(*TR_PARAMS, PLATFORM, POOL_PARAM, OWNER_PARAM,
            Param("MAX_WAIT_SECONDS", "Override the pool's maxWaitSeconds (empty: use the pool).", "")),
    results=(Result("outcome", "served, local, error or gone (the build TaskRun is finished or gone)."),
             Result("host", "Name of the host that serves the build (localhost for local).")),
)
ERROR_SECRET = TaskDef(
    name="mpc-error-secret", command="error-secret",
    description="Writes the error form of the build's secret when provisioning failed without "
                "answering, so the build fails fast with a message instead of waiting.",
    params=(*TR_PARAMS, Param("PLATFORM", "Platform the build asked for.", ""), OWNER_PARAM,
            Param("PIPELINERUN", "The provisioning PipelineRun, named in the message.", ""),
            Param("PROVISION_STATUS", "Status of the provision task.", "Failed")),
)
DEPROVISION = TaskDef(
    name="mpc-deprovision", command="deprovision",
    description="Kills the build user's processes, deletes the user and its home, frees the "
                "slot and deletes the build's secret. Idempotent.",
    params=(*TR_PARAMS, POOL_PARAM),
    results=(Result("removed-users", "How many users were removed."),),
)
SWEEP = TaskDef(
    name="mpc-sweep", command="sweep",
    description="Removes slots whose build TaskRun is finished or gone, u-* users no slot "
                "accounts for, and stale queue entries. Safe to run at any time.",
    params=(POOL_PARAM,),
    results=(Result("removed-users", "How many users were removed."),),
)
TASKS = (PROVISION, ERROR_SECRET, DEPROVISION, SWEEP)


def _ref(name: str) -> dict:
    return {"kind": "Task", "name": name}


def _pass(*names: str) -> list[dict]:
    return [{"name": n, "value": f"$(params.{n})"} for n in names]


def _param_specs(params) -> list[dict]:
    return [{"name": p.name, "type": "string", "description": p.description}
            | ({"default": p.default} if p.default is not None else {}) for p in params]


def _pipeline(name: str, description: str, params, **spec) -> dict:
    return {"apiVersion": "tekton.dev/v1", "kind": "Pipeline",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/version": VERSION,
                                                  "app.kubernetes.io/part-of": "mpc"}},
            "spec": {"description": description, "params": _param_specs(params)} | spec}


def provision_pipeline() -> dict:
    return _pipeline(
        contract.PROVISION_PIPELINE,
        "Provisions a build host for one build TaskRun; if provisioning fails without "
        "answering, writes the error secret.",
        (*TR_PARAMS, PLATFORM, POOL_PARAM, OWNER_PARAM),
        results=[{"name": "outcome", "value": "$(tasks.provision.results.outcome)"}],
        tasks=[{"name": "provision", "taskRef": _ref(PROVISION.name),
                "params": _pass(*contract.PIPELINE_PARAMS, "HOST_POOL", OWNER_PARAM.name)}],
        **{"finally": [{
            "name": "error-secret", "taskRef": _ref(ERROR_SECRET.name),
            "when": [{"input": "$(tasks.provision.status)", "operator": "notin",
                      "values": ["Succeeded"]}],
            "params": _pass(*contract.PIPELINE_PARAMS, OWNER_PARAM.name) + [
                {"name": "PIPELINERUN", "value": "$(context.pipelineRun.name)"},
                {"name": "PROVISION_STATUS", "value": "$(tasks.provision.status)"}]}]})


def provision_failed_pipeline() -> dict:
    return _pipeline(
        contract.PROVISION_FAILED_PIPELINE,
        "Writes the build's error secret after its provisioning run ended without success "
        "and without answering (cancelled, or its finally could not run). Never overwrites "
        "an answer already written.",
        (*TR_PARAMS, PLATFORM,
         Param("PIPELINERUN", "The provisioning PipelineRun that failed."),
         Param("PROVISION_STATUS", "How it ended (its Succeeded reason, e.g. Cancelled)."),
         OWNER_PARAM),
        tasks=[{"name": "error-secret", "taskRef": _ref(ERROR_SECRET.name),
                "params": _pass(*contract.PIPELINE_PARAMS, "PIPELINERUN", "PROVISION_STATUS",
                                OWNER_PARAM.name)}])


def deprovision_pipeline() -> dict:
    return _pipeline(
        contract.DEPROVISION_PIPELINE,
        "Releases everything one build held: user, slot, secret.",
        (*TR_PARAMS, POOL_PARAM),
        tasks=[{"name": "deprovision", "taskRef": _ref(DEPROVISION.name), "retries": 2,
                "params": _pass(*contract.DEPROVISION_PARAMS, "HOST_POOL")}])


def rbac(namespace: str = "mpc") -> list[dict]:
    """What the provisioning Tasks' ServiceAccount needs, and nothing more."""
    sa = contract.TASKS_SERVICE_ACCOUNT
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": sa, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": sa},
         "rules": [
             # build secrets; no get (it would read every Secret): the runner reads one
             # of its own with a test-only JSON patch, and the Secret policy
             # (rbac/mpc-tasks-admission.yaml) confines every write to mpc's secrets
             {"apiGroups": [""], "resources": ["secrets"],
              "verbs": ["create", "update", "patch", "delete"]},
             # the liveness of a build: its TaskRun, or the PipelineRun that will create it
             {"apiGroups": ["tekton.dev"], "resources": ["taskruns", "pipelineruns"],
              "verbs": ["get"]},
             # Warning Events: a changed host key, on the build TaskRun and on the key's record
             {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": sa},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": sa, "namespace": namespace},
         "rules": [
             {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
              "verbs": ["get", "list", "create", "patch", "delete"]},
             {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},  # admin keys
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": sa, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]},
    ]


SECRET_KEYS = """\
## The build's secret

`multi-platform-ssh-<TaskRun name>` in the build's namespace, owned by the
build TaskRun and labelled `build.mpc.dev/managed-by: mpc`:

| key | content |
|---|---|
| `id_rsa` | fresh ed25519 private key (OpenSSH format), generated in the pod |
| `host` | `<user>@<address>`, or `localhost` for a local platform |
| `user-dir` | the build user's home on the host |
| `known_hosts` | the host's pinned public key line (pool `hostKey`, or recorded on first use) |
| `error` | *instead of all the above*: why no host could be provided, and what to do |
"""


HOST_KEYS = f"""\
## Host keys

Every SSH connection (provisioning, deprovisioning, the sweep) pins the host's
key. A pool entry with `hostKey` uses that key. A pool entry without it is
trusted on first use: the first connection to it reads the key the host offers
and records it once, in the controller namespace, as the Lease
`mpc-hostkey-<host>-<hash of address:port>`
(label `{contract.LABEL_ROLE}={contract.ROLE_HOST_KEY}`, annotations
`{contract.ANN_HOST_KEY}` and `{contract.ANN_FINGERPRINT}`). When two runners
record at the same time, exactly one record is kept and both use it. From then
on every connection pins the recorded key, and so does the build's secret.

A host that later offers another key is refused: provisioning tries the
platform's other hosts and, when none can serve, writes the error secret with
a message naming the host, its address, both fingerprints and what to do;
deprovisioning and the sweep keep the slot, log the refusal and exit non-zero.
A Warning Event `HostKeyChanged` is posted on the record (and, when
provisioning, on the build TaskRun). Nothing is recorded over an existing
record. After verifying the host's real key, the platform team either sets
`hostKey` for the host in the pool, or deletes the record
(`kubectl -n <controller namespace> delete lease mpc-hostkey-<host>-<hash>`) so
the next connection records the key the host offers then.
"""


def readme(t: TaskDef) -> str:
    lines = [f"# {t.name}", "", t.description, "",
             "Generated by `mpc generate` from `generator/provisioning.py`; do not edit.", "",
             "## Params", "", "| name | default | description |", "|---|---|---|"]
    for p in t.params:
        d = "(required)" if p.default is None else f"`{p.default}`"
        lines.append(f"| `{p.name}` | {d} | {p.description} |")
    if t.results:
        lines += ["", "## Results", "", "| name | description |", "|---|---|"]
        lines += [f"| `{r.name}` | {r.description} |" for r in t.results]
    lines += ["", SECRET_KEYS, HOST_KEYS, "## RBAC", "",
              f"Runs as ServiceAccount `{contract.TASKS_SERVICE_ACCOUNT}` in the controller "
              "namespace with exactly the rules in `tasks/rbac/mpc-tasks.yaml`:", "",
              "- cluster-wide: `secrets` create/update/patch/delete (build secrets; no get), "
              "`tekton.dev/taskruns` get (is the build still there?), `events` create "
              "(Warning Events about a changed host key)",
              "- controller namespace: `leases` get/list/create/patch/delete (slots, queue and "
              "host keys recorded on first use), "
              "`configmaps` get (host pool), `secrets` get (admin keys), "
              "`tekton.dev/pipelineruns` get",
              "", "The admin SSH keys are Secrets in the controller namespace named by the pool.",
              "", "`tasks/rbac/mpc-tasks-admission.yaml` makes that hold in effect "
              "(ValidatingAdmissionPolicies, Kubernetes >= 1.30): only runs of mpc's own "
              "Tasks/Pipelines (by name, or from a bundle under a registry listed in ConfigMap "
              f"`{admission.ADMISSION_CONFIGMAP}`) may run as `{contract.TASKS_SERVICE_ACCOUNT}`, "
              "and it may only write Secrets named `multi-platform-ssh-*` labelled as mpc's. "
              "See `generator/admission.py`.",
              "", "## Image", "",
              f"`{RUNNER_IMAGE}`: `podman build -f tasks/runner/Containerfile -t {RUNNER_IMAGE} .` "
              "from the repository root where its Python base image can be pulled; the e2e tier "
              "builds the same content offline (`tests/e2e/images.py`). Override the reference "
              "with `mpc generate --runner-image REF`.",
              ""]
    return "\n".join(lines)


@dataclass
class Emitted:
    path: str
    content: object          # dict / list[dict] (YAML) or str (text)
    kind: str = "yaml"


def documents(image: str = RUNNER_IMAGE, namespace: str = "mpc") -> list[Emitted]:
    out = []
    for t in TASKS:
        out.append(Emitted(f"{t.name}/{VERSION}/{t.name}.yaml", t.task(image)))
        out.append(Emitted(f"{t.name}/{VERSION}/README.md", readme(t), "text"))
    for p in (provision_pipeline(), provision_failed_pipeline(), deprovision_pipeline()):
        n = p["metadata"]["name"]
        out.append(Emitted(f"pipelines/{n}/{VERSION}/{n}.yaml", p))
    out.append(Emitted("rbac/mpc-tasks.yaml", rbac(namespace)))
    out.append(Emitted("rbac/mpc-tasks-admission.yaml", admission.policies(
        namespace, [t.name for t in TASKS], (contract.PROVISION_PIPELINE,
                                             contract.PROVISION_FAILED_PIPELINE,
                                             contract.DEPROVISION_PIPELINE))))
    # What a controller namespace installs (glue/deploy/install builds on it).
    out.append(Emitted("kustomization.yaml", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [d.path for d in out if d.kind == "yaml"]}))
    return out
