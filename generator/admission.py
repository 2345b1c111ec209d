"""The admission policies that make mpc-tasks' least privilege hold in effect.

RBAC alone cannot say who may *use* the ``mpc-tasks`` ServiceAccount, nor
which Secrets it may write: anyone who can create a TaskRun in the
controller namespace could run any script as ``mpc-tasks``, and RBAC cannot
filter Secrets by name prefix or label. Two ValidatingAdmissionPolicies
(``admissionregistration.k8s.io/v1``, Kubernetes >= 1.30) close that:

- ``mpc-tasks-runs``: a TaskRun or PipelineRun in the controller namespace
  that runs as ``mpc-tasks`` (``spec.serviceAccountName``;
  ``spec.taskRunTemplate.serviceAccountName`` or any
  ``spec.taskRunSpecs[*].serviceAccountName``) must reference one of mpc's
  own Tasks/Pipelines: by name in the cluster, or through the bundles
  resolver with a bundle under a registry listed in the ConfigMap
  ``mpc-admission`` (key ``bundleRegistries``, one registry per line, the
  ``REGISTRY`` given to ``make bundles``; ``mpc bundles pin`` adds the one it
  pins to). No inline ``taskSpec`` /
  ``pipelineSpec``, no workspaces, and a podTemplate may only place the pod
  (``POD_TEMPLATE_KEYS``): no env, volumes, host network or DNS changes.
  Checked on CREATE and on every UPDATE that changes ``spec``.
- ``mpc-tasks-secrets``: requests by ``mpc-tasks`` itself may only create,
  update, patch or delete Secrets named ``multi-platform-ssh-*`` of type
  Opaque labelled ``build.mpc.dev/managed-by=mpc`` (the old object too, for
  UPDATE and DELETE).

Names come from ``mpc.runner.contract`` and the generator; the namespace is
the one ``mpc generate --namespace`` writes the RBAC for.
"""
from __future__ import annotations

from typing import Iterable

from mpc.runner import contract

ADMISSION_CONFIGMAP = "mpc-admission"       # params of mpc-tasks-runs, in the controller namespace
BUNDLE_REGISTRIES_KEY = "bundleRegistries"  # one registry per line; empty: no bundle is trusted
RUNS_POLICY = "mpc-tasks-runs"
SECRETS_POLICY = "mpc-tasks-secrets"
# What a podTemplate of a run as mpc-tasks may set: where and as whom the pod runs (the
# namespace's Pod Security "restricted" still applies), never what it runs or mounts.
POD_TEMPLATE_KEYS = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                     "priorityClassName", "schedulerName", "securityContext", "imagePullSecrets")
BUNDLE_PARAMS = ("bundle", "name", "kind", "cache")


def _q(s: str) -> str:
    if "'" in s or "\\" in s:
        raise ValueError(f"not a plain CEL string: {s!r}")
    return f"'{s}'"


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def _has(*path: str) -> str:
    """``has()`` for every prefix of a field path, so a missing parent is false, not an error."""
    return " && ".join(f"has({'.'.join(path[:i])})" for i in range(2, len(path) + 1))


def _var(name: str, expression: str) -> dict:
    return {"name": name, "expression": expression}


def _label_is(obj: str) -> str:
    return (f"{obj}.metadata.name.startsWith({_q(contract.SECRET_PREFIX)})"
            f" && has({obj}.type) && {obj}.type == 'Opaque'"
            f" && has({obj}.metadata.labels) && {_q(contract.LABEL_MANAGED)} in {obj}.metadata.labels"
            f" && {obj}.metadata.labels[{_q(contract.LABEL_MANAGED)}] == {_q(contract.MANAGED_VALUE)}")


def secrets_policy(namespace: str) -> list[dict]:
    user = f"system:serviceaccount:{namespace}:{contract.TASKS_SERVICE_ACCOUNT}"
    what = (f"Secrets named {contract.SECRET_PREFIX}* of type Opaque labelled "
            f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE}")
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": SECRETS_POLICY},
         "spec": {
             "failurePolicy": "Fail",
             "matchConstraints": {"resourceRules": [{
                 "apiGroups": [""], "apiVersions": ["v1"], "resources": ["secrets"],
                 "operations": ["CREATE", "UPDATE", "DELETE"]}]},
             "matchConditions": [{"name": "by-mpc-tasks",
                                  "expression": f"request.userInfo.username == {_q(user)}"}],
             "validations": [
                 {"expression": f"request.operation == 'DELETE' || ({_label_is('object')})",
                  "reason": "Forbidden",
                  "message": f"{contract.TASKS_SERVICE_ACCOUNT} may only write {what}"},
                 {"expression": f"request.operation == 'CREATE' || ({_label_is('oldObject')})",
                  "reason": "Forbidden",
                  "message": f"{contract.TASKS_SERVICE_ACCOUNT} may only change or delete {what}"},
             ]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": SECRETS_POLICY},
         "spec": {"policyName": SECRETS_POLICY, "validationActions": ["Deny"]}},
    ]


def runs_policy(namespace: str, task_names: Iterable[str],
                pipeline_names: Iterable[str]) -> list[dict]:
    sa = _q(contract.TASKS_SERVICE_ACCOUNT)
    tasks, pipelines = list(task_names), list(pipeline_names)
    uses_sa = (
        "has(object.spec) && (request.resource.resource == 'taskruns'"
        f" ? ({_has('object', 'spec', 'serviceAccountName')}"
        f" && object.spec.serviceAccountName == {sa})"
        f" : (({_has('object', 'spec', 'taskRunTemplate', 'serviceAccountName')}"
        f" && object.spec.taskRunTemplate.serviceAccountName == {sa})"
        f" || ({_has('object', 'spec', 'taskRunSpecs')} && object.spec.taskRunSpecs.exists(s,"
        f" has(s.serviceAccountName) && s.serviceAccountName == {sa}))))")
    ref = "variables.ref"
    variables = [
        _var("isTaskRun", "request.resource.resource == 'taskruns'"),
        _var("spec", "object.spec"),
        _var("names", f"variables.isTaskRun ? {_list(tasks)} : {_list(pipelines)}"),
        _var("kind", "variables.isTaskRun ? 'task' : 'pipeline'"),
        _var("refKind", "variables.isTaskRun ? 'Task' : 'Pipeline'"),
        _var("ref", "variables.isTaskRun"
                    " ? (has(variables.spec.taskRef) ? variables.spec.taskRef : {})"
                    " : (has(variables.spec.pipelineRef) ? variables.spec.pipelineRef : {})"),
        _var("registries",
             f"has(params.data) && {_q(BUNDLE_REGISTRIES_KEY)} in params.data"
             f" ? params.data[{_q(BUNDLE_REGISTRIES_KEY)}].split('\\n')"
             ".map(r, r.trim()).filter(r, r != '').map(r, r.endsWith('/') ? r : r + '/')"
             " : []"),
        _var("inline", "variables.isTaskRun ? has(variables.spec.taskSpec)"
                       " : has(variables.spec.pipelineSpec)"),
        _var("byName",
             f"!has({ref}.resolver) && has({ref}.name) && {ref}.name in variables.names"
             f" && !has({ref}.params) && !has({ref}.apiVersion)"
             f" && (!has({ref}.kind) || {ref}.kind == variables.refKind)"),
        _var("byBundle",
             f"has({ref}.resolver) && {ref}.resolver == 'bundles' && !has({ref}.name)"
             f" && !has({ref}.apiVersion) && (!has({ref}.kind) || {ref}.kind == variables.refKind)"
             f" && has({ref}.params)"
             f" && {ref}.params.all(p, has(p.name) && p.name in {_list(BUNDLE_PARAMS)})"
             f" && {ref}.params.exists(p, p.name == 'name')"
             f" && {ref}.params.exists(p, p.name == 'bundle')"
             f" && {ref}.params.all(p, p.name != 'name'"
             " || (has(p.value) && p.value in variables.names))"
             f" && {ref}.params.all(p, p.name != 'kind'"
             " || (has(p.value) && p.value == variables.kind))"
             f" && {ref}.params.all(p, p.name != 'bundle' || (has(p.value)"
             " && type(p.value) == string"
             " && variables.registries.exists(r, p.value.startsWith(r))))"),
        _var("podTemplates",
             "variables.isTaskRun"
             " ? (has(variables.spec.podTemplate) ? [variables.spec.podTemplate] : [])"
             " : ((has(variables.spec.taskRunTemplate)"
             " && has(variables.spec.taskRunTemplate.podTemplate)"
             " ? [variables.spec.taskRunTemplate.podTemplate] : [])"
             " + (has(variables.spec.taskRunSpecs)"
             " ? variables.spec.taskRunSpecs.filter(s, has(s.podTemplate)).map(s, s.podTemplate)"
             " : []))"),
        _var("workspaces", "has(variables.spec.workspaces) && size(variables.spec.workspaces) > 0"),
    ]
    run = (f"a TaskRun or PipelineRun in namespace {namespace} that runs as "
           f"{contract.TASKS_SERVICE_ACCOUNT}")
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": RUNS_POLICY},
         "spec": {
             "failurePolicy": "Fail",
             "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
             # v1 only: with matchPolicy Equivalent (the default) a v1beta1 request is
             # converted to v1 before these expressions see it.
             "matchConstraints": {"matchPolicy": "Equivalent", "resourceRules": [{
                 "apiGroups": ["tekton.dev"], "apiVersions": ["v1"],
                 "resources": ["taskruns", "pipelineruns"],
                 "operations": ["CREATE", "UPDATE"]}]},
             "matchConditions": [
                 # an update that leaves spec alone (labels, finalizers, annotations)
                 # cannot change what runs: existing runs stay manageable
                 {"name": "spec-set-or-changed",
                  "expression": "request.operation == 'CREATE' || !has(oldObject.spec)"
                                " || !has(object.spec) || object.spec != oldObject.spec"},
                 {"name": "runs-as-mpc-tasks", "expression": uses_sa},
             ],
             "variables": variables,
             "validations": [
                 {"expression": "!variables.inline", "reason": "Forbidden",
                  "message": f"{run} must reference one of mpc's Tasks/Pipelines, "
                             "not carry an inline taskSpec/pipelineSpec"},
                 {"expression": "variables.byName || variables.byBundle", "reason": "Forbidden",
                  "messageExpression":
                      f"'{run} must reference one of ' + variables.names.join(', ')"
                      " + ' by name, or through the bundles resolver (params bundle, name, kind)"
                      " with a bundle under a registry listed in ConfigMap"
                      f" {namespace}/{ADMISSION_CONFIGMAP} key {BUNDLE_REGISTRIES_KEY} (now: '"
                      " + (size(variables.registries) == 0 ? 'none'"
                      " : variables.registries.join(', ')) + ')'"},
                 {"expression": "variables.podTemplates.all(t, t == null || t.all(k, k in "
                                f"{_list(POD_TEMPLATE_KEYS)}))",
                  "reason": "Forbidden",
                  "message": f"{run} may only set these podTemplate fields: "
                             + ", ".join(POD_TEMPLATE_KEYS)},
                 {"expression": "!variables.workspaces", "reason": "Forbidden",
                  "message": f"{run} binds no workspaces"},
             ]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": RUNS_POLICY},
         "spec": {
             "policyName": RUNS_POLICY, "validationActions": ["Deny"],
             # no ConfigMap: every run as mpc-tasks is refused (fails closed)
             "paramRef": {"name": ADMISSION_CONFIGMAP, "namespace": namespace,
                          "parameterNotFoundAction": "Deny"},
             "matchResources": {"namespaceSelector": {"matchLabels": {
                 "kubernetes.io/metadata.name": namespace}}}}},
    ]


def policies(namespace: str, task_names: Iterable[str],
             pipeline_names: Iterable[str]) -> list[dict]:
    return runs_policy(namespace, task_names, pipeline_names) + secrets_policy(namespace)
