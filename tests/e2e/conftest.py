"""Fixtures of the e2e tier: a real one-node Kubernetes with real Tekton (``node.py``).

``e2e_node`` (session): the node, up for the whole session. It uses the
instance ``test`` under ``$MPC_CACHE/e2e/test`` (kept between sessions, so a
second session starts warm) unless another session holds it; then a
throw-away instance ``t<pid>`` that is wiped afterwards. With
``MPC_E2E_ATTACH=NAME`` it uses a node started by ``make e2e-up`` (NAME
``dev``) and leaves it running.

Teardown proves the node left nothing behind (process, mount, cgroup,
namespace) and did not change this machine's network or global sysctls.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import warnings
from pathlib import Path
import uuid

import pytest
from kubernetes import client

from . import hostcheck
from .node import Node, other_instances_live, state_root
from .runjob import ensure_namespace


def _claim() -> tuple[Node, object | None, bool]:
    """(node, lock file kept open for the session, ephemeral?)"""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / "test.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        node = Node("test")
        if not node.running():
            return node, f, False
    except BlockingIOError:
        pass
    f.close()
    return Node(f"t{os.getpid()}"), None, True


@pytest.fixture(scope="session")
def e2e_node():
    attach = os.environ.get("MPC_E2E_ATTACH")
    if attach:
        node = Node(attach)
        assert node.running(), f"MPC_E2E_ATTACH={attach}: no such node is up (make e2e-up)"
        yield node
        return
    node, lock, ephemeral = _claim()
    before = hostcheck.HostState.capture(kubelet_sysctls=not other_instances_live(node.name),
                                           own=node.name)
    try:
        try:
            node.up()
        except Exception as e:
            if ephemeral or not (node.dir / "etcd").exists():
                raise
            # a broken warm state must not fail the suite: keep its logs, say why, go cold
            kept = node.dir.with_name(f"{node.name}-failed-logs")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(node.logs, kept)
            warnings.warn(f"warm e2e node failed ({e!r}; logs in {kept}); starting cold")
            node.down(wipe=True)
            node.up()
        print(f"\ne2e node {node.name} up: {node.timings}")
        yield node
    finally:
        secs = node.down(wipe=ephemeral)
        print(f"\ne2e node {node.name} down in {secs:.2f} s")
        if lock is not None:
            lock.close()
    left = node.leftovers()
    after = hostcheck.HostState.capture(kubelet_sysctls=not other_instances_live(node.name),
                                           own=node.name)
    changes = before.diff(after)
    assert not left, "e2e node left behind:\n" + "\n".join(left)
    assert not changes, "e2e node changed this machine:\n" + changes


@pytest.fixture(scope="session")
def e2e_kube(e2e_node) -> client.ApiClient:
    return e2e_node.api_client()


@pytest.fixture
def e2e_namespace(e2e_kube) -> str:
    """A fresh namespace on the e2e node whose ``default`` ServiceAccount exists."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    ensure_namespace(e2e_kube, name)
    yield name
    client.CoreV1Api(e2e_kube).delete_namespace(name)


@pytest.fixture
def e2e_make_host(host_farm, e2e_node):
    """Factory: an SSH test host (``tests.infra.sshhosts``) reachable from the node's pods.

    Its uplink lives in the node's netns (``hosts.move_into_node``); use
    ``hosts.ssh(host, e2e_node, cmd)`` or ``host.exec(script)`` to reach it.
    """
    from .hosts import move_into_node
    made = []

    def make(name: str | None = None):
        h = host_farm.add(name)
        made.append(h)
        return move_into_node(h, e2e_node)
    yield make
    for h in made:
        h.destroy()


@pytest.fixture(scope="session")
def mpc(e2e_node, e2e_kube, host_farm, tmp_path_factory):
    """mpc as ``make release`` builds it, installed on the node (``install.installed``):
    built and installed once per session, for the mpc e2e and the soak alike. Tests that
    change the install (pool, Deployment) put it back as they found it."""
    from .install import installed
    with installed(e2e_node, e2e_kube, host_farm, tmp_path_factory) as inst:
        yield inst


def pytest_collection_modifyitems(config, items):
    """The per-test timeout (600 s, pyproject) bounds the e2e tests' own bodies only.

    The session's setup (the node up, cold: up to ~6 min on a loaded machine; ``make
    release``: images rebuilt whenever mpc's sources changed) is paid by whichever e2e
    test runs first, in random order, and is bounded by its own waits and subprocess
    timeouts; counted into that one test's 600 s it failed every e2e test of a run.
    A test with a timeout marker of its own keeps it.
    """
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(float(config.getini("timeout") or 600),
                                              func_only=True))
