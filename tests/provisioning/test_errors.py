"""When no host can serve, the build gets the error secret with a message that says why."""
from __future__ import annotations

import pytest
import yaml

from mpc.runner import contract

from .conftest import make_taskrun, read_secret


def error_of(controller, kube, tr, platform="linux/arm64", **params) -> str:
    r = controller.provision(tr, platform=platform, **params)
    assert r.results["outcome"] == "error"
    s = read_secret(kube, tr)
    assert set(s) == {"error"}, s
    return s["error"]


def test_unknown_platform_names_configured_ones(controller, kube, namespace, make_host):
    controller.install_pool([make_host()], localPlatforms=["linux/amd64"])
    tr = make_taskrun(kube, namespace, platform="linux/s390x")
    msg = error_of(controller, kube, tr, platform="linux/s390x")
    assert "no host configured for platform linux/s390x" in msg
    assert "configured platforms: linux/amd64, linux/arm64" in msg
    assert controller.leases("slot") == []


@pytest.mark.parametrize("platform", ["linux", "", "linux/arm64; rm -rf /", "LINUX/ARM64",
                                      "linux/arm64\nx"])
def test_invalid_platform(controller, kube, namespace, make_host, platform):
    controller.install_pool([make_host()])
    tr = make_taskrun(kube, namespace)
    msg = error_of(controller, kube, tr, platform=platform)
    assert "invalid PLATFORM" in msg and "linux/arm64" in msg


def test_malformed_pool_reports_every_problem(controller, kube, namespace):
    controller.set_pool_text(yaml.safe_dump({"hosts": [
        {"name": "Bad_Name", "address": "10.0.0.1", "user": "root", "secret": "k",
         "platform": "linux/arm64", "concurrency": "two"}]}))
    tr = make_taskrun(kube, namespace)
    msg = error_of(controller, kube, tr)
    assert "host pool is invalid" in msg
    assert "$.hosts[0].concurrency" in msg and "$.hosts[0].name" in msg


def test_missing_pool(controller, kube, namespace):
    tr = make_taskrun(kube, namespace)
    assert "no host pool" in error_of(controller, kube, tr)


def test_namespace_not_allowed(controller, kube, namespace, make_host):
    controller.install_pool([make_host()], allowedNamespaces=["team-a", "team-b"])
    tr = make_taskrun(kube, namespace)
    msg = error_of(controller, kube, tr)
    assert f"namespace {namespace} is not allowed" in msg and "team-a, team-b" in msg
    assert controller.leases("slot") == []


def test_queue_bound_gives_error_secret(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1, maxWaitSeconds=2)
    first, second = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    assert controller.provision(first).results["outcome"] == "served"
    msg = error_of(controller, kube, second)
    assert "became free within 2s" in msg
    assert controller.leases("waiter") == []


def test_konflux_host_config_is_accepted(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h])        # creates the admin key secret
    controller.set_pool_text("", name=contract.KONFLUX_CONFIGMAP, data={
        f"host.{h.name}.address": h.address, f"host.{h.name}.user": h.admin_user,
        f"host.{h.name}.platform": "linux/ppc64le", f"host.{h.name}.secret": f"admin-{h.name}",
        f"host.{h.name}.concurrency": "1", "local-platforms": "linux/amd64,",
        "allowed-namespaces": namespace})
    tr = make_taskrun(kube, namespace, platform="linux/ppc64le")
    r = controller.provision(tr, platform="linux/ppc64le", HOST_POOL=contract.KONFLUX_CONFIGMAP)
    assert r.results["outcome"] == "served"
    s = read_secret(kube, tr)
    # no pinned key in a Konflux pool: trusted on first use, then pinned for the build
    assert s["known_hosts"].split()[1:3] == h.host_public_key.split()[:2]
