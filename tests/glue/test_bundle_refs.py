"""With bundle refs configured, the watcher's runs resolve through `resolver: bundles`."""
from __future__ import annotations

from kubernetes import client

from mpc.glue import objects
from mpc.runner import contract as c

BUNDLE = "registry.example/mpc/pipeline-mpc-provisioning:0.1@sha256:" + "a" * 64


def test_runs_reference_the_pinned_bundle_and_the_apiserver_accepts_them(kube, namespace):
    custom = client.CustomObjectsApi(kube)
    uid = "0b0b0b0b-1111-2222-3333-444455556666"
    pr = objects.provision_run(namespace, c.TASKS_SERVICE_ACCOUNT, "team", "build-1", uid,
                               "linux/arm64", bundle=BUNDLE, max_wait_seconds=1800)
    ref = pr["spec"]["pipelineRef"]
    assert ref["resolver"] == "bundles"
    assert {p["name"]: p["value"] for p in ref["params"]} == {
        "bundle": BUNDLE, "name": c.PROVISION_PIPELINE, "kind": "pipeline"}
    assert pr["spec"]["timeouts"] == objects.provision_timeouts(1800)
    dp = objects.deprovision_run(namespace, c.TASKS_SERVICE_ACCOUNT, "team", "build-1", uid,
                                 None, bundle=BUNDLE)
    pf = objects.provision_failed_run(namespace, c.TASKS_SERVICE_ACCOUNT, "team", "build-1",
                                      uid, "linux/arm64", pr["metadata"]["name"], "Cancelled",
                                      bundle=BUNDLE)
    sw = objects.sweep_run(namespace, c.TASKS_SERVICE_ACCOUNT, 7, bundle=BUNDLE)
    assert sw["spec"]["taskRef"]["params"][2] == {"name": "kind", "value": "task"}
    for plural, body in (("pipelineruns", pr), ("pipelineruns", dp), ("pipelineruns", pf),
                         ("taskruns", sw)):
        custom.create_namespaced_custom_object("tekton.dev", "v1", namespace, plural, body,
                                               dry_run="All")
    # without a bundle: the Pipeline installed in the controller namespace, by name
    plain = objects.provision_run(namespace, "sa", "team", "b", uid, "linux/arm64")
    assert plain["spec"]["pipelineRef"] == {"name": c.PROVISION_PIPELINE}
