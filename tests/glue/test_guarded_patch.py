"""A resourceVersion-guarded JSON patch on a changed object is a conflict, not an error."""
from __future__ import annotations

import pytest
from kubernetes import client

from mpc.glue import objects
from mpc.runner import kube as k


def test_stale_finalizer_patch_is_a_conflict_and_a_bad_patch_is_not(kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="tr")))
    glue = k.Kube(kube)
    p = k.configmap(namespace, "tr")
    stale = glue.get(p)
    # someone else (Tekton) writes the object after we read it
    core.patch_namespaced_config_map("tr", namespace, {"metadata": {"labels": {"x": "y"}}})
    with pytest.raises(k.ApiError) as e:
        glue.json_patch(p, objects.finalizer_add_patch(stale))
    assert e.value.status == 409 and e.value.conflict
    # with the current version the same patch applies
    fresh = glue.get(p)
    done = glue.json_patch(p, objects.finalizer_add_patch(fresh))
    assert done["metadata"]["finalizers"]
    # a patch that is invalid for another reason stays an error, not a retryable conflict
    current = glue.get(p)
    bad = [{"op": "replace", "path": "/metadata/resourceVersion",
            "value": current["metadata"]["resourceVersion"]},
           {"op": "add", "path": "/metadata/labels/bad key!", "value": "v"}]
    with pytest.raises(k.ApiError) as e:
        glue.json_patch(p, bad)
    assert e.value.status == 422 and not e.value.conflict
