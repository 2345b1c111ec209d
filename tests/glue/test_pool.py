"""The watcher reads the host pool with mpc.runner.hostpool, the one reader (issue 14):
Konflux's regex allowed-namespaces and production host-config shapes, and an
invalid or missing pool never meaning "every namespace allowed"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun

KONFLUX_CM = Path(__file__).parents[1] / "provisioning" / "konflux-host-config.yaml"


def _events(kube, namespace: str, name: str) -> dict[str, tuple[str, str]]:
    evs = client.CoreV1Api(kube).list_namespaced_event(namespace).items
    return {e.reason: (e.type, e.message) for e in evs if e.involved_object.name == name}


def _install(kube, ctrl_ns: str, flavour: str, pool: dict | None = None,
             konflux: dict | None = None) -> None:
    if flavour == "pool":
        cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
                                data={c.POOL_KEY: yaml.safe_dump(pool)})
    else:
        cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=c.KONFLUX_CONFIGMAP),
                                data=konflux)
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, cm)


def _konflux_production(allowed: str) -> dict:
    data = yaml.safe_load(KONFLUX_CM.read_text())["data"]
    data["allowed-namespaces"] = allowed
    return data


def _start_build(tekton, watcher, namespace, ctrl_ns, name: str):
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun(name))["metadata"]["uid"]
    # the provisioning run starts either way: it writes the error secret (the watcher cannot)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    return w, uid


def _decisions(w, msg: str) -> list[dict]:
    return [d for d in (json.loads(ln) for ln in w.log_text().splitlines()
                        if ln.startswith("{")) if d.get("msg") == msg]


@pytest.mark.parametrize("flavour", ["pool", "konflux"])
def test_regex_allowed_namespaces_allow(kube, tekton, watcher, namespace, ctrl_ns, flavour):
    # t-<hex>: matched by a regex only, never listed by name
    _install(kube, ctrl_ns, flavour,
             pool={"hosts": [], "localPlatforms": ["local", "localhost"],
                   "allowedNamespaces": ["default", "t-[0-9a-f]+"]},
             konflux=_konflux_production("default,system-.*,t-[0-9a-f]+,.*-tenant,"))
    w, uid = _start_build(tekton, watcher, namespace, ctrl_ns, "yes")
    wait_for("started event", lambda: "ProvisioningStarted" in _events(kube, namespace, "yes"),
             timeout=30, log=w.log)
    assert "NamespaceNotAllowed" not in _events(kube, namespace, "yes")
    assert w.metric("mpc_glue_namespace_not_allowed_total") == 0
    assert 'kind="pool_invalid"' not in w.metrics()


@pytest.mark.parametrize("flavour", ["pool", "konflux"])
def test_regex_allowed_namespaces_match_the_whole_name(kube, tekton, watcher, namespace,
                                                       ctrl_ns, flavour):
    prefix = namespace[:-1]   # matches a prefix of the name only: not allowed
    _install(kube, ctrl_ns, flavour, pool={"hosts": [], "allowedNamespaces": [prefix]},
             konflux=_konflux_production(f"{prefix},.*-tenant"))
    w, uid = _start_build(tekton, watcher, namespace, ctrl_ns, "nope")
    wait_for("warning", lambda: "NamespaceNotAllowed" in _events(kube, namespace, "nope"),
             timeout=30, log=w.log)
    kind, message = _events(kube, namespace, "nope")["NamespaceNotAllowed"]
    assert kind == "Warning" and f"Namespace {namespace} is not in allowedNamespaces" in message
    assert w.metric("mpc_glue_namespace_not_allowed_total", platform="linux/arm64") == 1


@pytest.mark.parametrize("flavour", ["pool", "konflux"])
def test_invalid_pool_allows_no_namespace(kube, tekton, watcher, namespace, ctrl_ns, flavour):
    # The namespace is even listed, but the pool as a whole is invalid.
    _install(kube, ctrl_ns, flavour,
             pool={"hosts": [{"name": "arm1", "platform": "linux/arm64"}],
                   "allowedNamespaces": [namespace]},
             konflux={"host.arm1.platform": "linux/arm64", "allowed-namespaces": namespace})
    where = (f"ConfigMap {ctrl_ns}/"
             f"{c.HOST_POOL_CONFIGMAP if flavour == 'pool' else c.KONFLUX_CONFIGMAP}")
    error = f"{where}: $.hosts[0]: 'address' is a required property"
    w, uid = _start_build(tekton, watcher, namespace, ctrl_ns, "bad")
    wait_for("warning", lambda: "NamespaceNotAllowed" in _events(kube, namespace, "bad"),
             timeout=30, log=w.log)
    kind, message = _events(kube, namespace, "bad")["NamespaceNotAllowed"]
    assert kind == "Warning", message
    assert "No namespace may use the host pool while it is invalid" in message
    assert error in message and "error secret" in message
    assert w.metric("mpc_glue_namespace_not_allowed_total", platform="linux/arm64") == 1
    assert w.metric("mpc_glue_errors_total", kind="pool_invalid") >= 1
    # the pool errors are logged, and the decision names them
    (invalid, *_) = _decisions(w, "host pool invalid: no namespace is allowed, builds get an "
                                  "error secret")
    assert invalid["level"] == "warning" and error in invalid["errors"]
    (decision,) = _decisions(w, "namespace not allowed")
    assert decision["uid"] == uid and error in decision["poolErrors"]


def test_unparsable_pool_yaml_allows_no_namespace(kube, tekton, watcher, namespace, ctrl_ns):
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: "- just\n- a list\n"}))
    w, uid = _start_build(tekton, watcher, namespace, ctrl_ns, "list")
    wait_for("warning", lambda: "NamespaceNotAllowed" in _events(kube, namespace, "list"),
             timeout=30, log=w.log)
    _, message = _events(kube, namespace, "list")["NamespaceNotAllowed"]
    assert f"ConfigMap {ctrl_ns}/{c.HOST_POOL_CONFIGMAP}: $: ['just', 'a list'] is not of " \
           "type 'object'" in message


def test_missing_pool_allows_no_namespace(kube, tekton, watcher, namespace, ctrl_ns):
    w, uid = _start_build(tekton, watcher, namespace, ctrl_ns, "nopool")
    wait_for("warning", lambda: "NamespaceNotAllowed" in _events(kube, namespace, "nopool"),
             timeout=30, log=w.log)
    _, message = _events(kube, namespace, "nopool")["NamespaceNotAllowed"]
    assert f"no host pool: ConfigMap {ctrl_ns}/{c.HOST_POOL_CONFIGMAP} not found" in message
