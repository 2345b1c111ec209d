"""Releasing a VM place is exact: the fault is two releasers of one finished build (its
deprovisioning and a sweep) at once. One lists the build's place, the other frees it,
and the next build takes the freed name; the late delete must leave that build's place,
or its VM would take a build over ``maxBuildsPerVm``."""
from __future__ import annotations

from kubernetes import client

from mpc.runner import contract, vms
from mpc.runner.kube import Kube


def _place(name: str, build_uid: str) -> client.V1Lease:
    return client.V1Lease(metadata=client.V1ObjectMeta(name=name, labels={
        contract.LABEL_MANAGED: contract.MANAGED_VALUE, contract.LABEL_ROLE: contract.ROLE_VM_BUILD,
        contract.LABEL_TASKRUN_UID: build_uid, contract.LABEL_VM: "vm-x"}))


def test_a_late_release_leaves_the_place_another_build_took_since(controller):
    ns = controller.namespace
    admin = client.CoordinationV1Api(controller.kube)
    records = vms.Records(Kube.connect(str(controller.kubeconfig)), ns)   # as mpc-tasks
    name = contract.vm_build_name("vm-x", 0)
    admin.create_namespaced_lease(ns, _place(name, "build-a"))
    [seen] = records.places_of("build-a")                 # the late releaser looked
    admin.delete_namespaced_lease(name, ns)               # the other releaser freed it
    admin.create_namespaced_lease(ns, _place(name, "build-b"))   # the next build took it
    records.drop(seen)
    [kept] = records.places_on("vm-x")
    assert kept.metadata.labels[contract.LABEL_TASKRUN_UID] == "build-b"
    records.drop(kept)                                     # dropping what it saw still works
    assert records.places_on("vm-x") == []
