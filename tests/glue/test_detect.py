"""Which TaskRuns are builds: the pure rules, then the same matrix through the real watcher."""
from __future__ import annotations

import pytest

from mpc.glue import detect
from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun, task_spec

CASES = {
    # name: (TaskRun body, status.taskSpec written by "Tekton" or None, expected platform)
    "inline": (build_taskrun("inline"), None, "linux/arm64"),
    "resolved": (build_taskrun("resolved", inline=False), task_spec(), "linux/arm64"),
    "task-default": (build_taskrun("task-default", platform=None,
                                   spec=task_spec(platform_default="linux/s390x")),
                     None, "linux/s390x"),
    "resolved-default": (build_taskrun("resolved-default", platform=None, inline=False),
                         task_spec(platform_default="linux/ppc64le"), "linux/ppc64le"),
    "no-platform": (build_taskrun("no-platform", platform=None), None, None),
    "no-platform-param-at-all": (build_taskrun(
        "no-platform-param-at-all", platform=None,
        spec=task_spec(with_platform_param=False)), None, None),
    "other-secret": (build_taskrun("other-secret", spec=task_spec(secret_prefix="my-ssh-")),
                     None, None),
    "unresolved-ref": (build_taskrun("unresolved-ref", inline=False), None, None),
    "resolved-other-secret": (build_taskrun("resolved-other-secret", inline=False),
                              task_spec(secret_prefix="multi-platform-sshx-"), None),
    "ours": (build_taskrun("ours", labels={c.LABEL_MANAGED: c.MANAGED_VALUE}), None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_detection_rules(case):
    body, status_spec, expected = CASES[case]
    tr = dict(body, metadata=dict(body["metadata"], uid="u"))
    if status_spec is not None:
        tr["status"] = {"taskSpec": status_spec}
    assert detect.build_platform(tr) == expected


def test_status_spec_wins_over_nothing_and_param_over_default():
    tr = build_taskrun("x", platform="linux/arm64", spec=task_spec(platform_default="linux/s390x"))
    assert detect.build_platform(tr) == "linux/arm64"
    tr["spec"]["params"] = [{"name": c.PLATFORM_PARAM, "value": ["not", "a", "string"]}]
    assert detect.build_platform(tr) is None


def test_detection_matrix_through_the_watcher(tekton, watcher, namespace, ctrl_ns):
    w = watcher().start().wait_ready()
    uids = {}
    for name, (body, status_spec, _) in CASES.items():
        tr = tekton.create_tr(namespace, body)
        uids[name] = tr["metadata"]["uid"]
        if status_spec is not None:
            tekton.resolve(namespace, name, status_spec)
    builds = {n for n, (_, _, p) in CASES.items() if p}
    for name in builds:
        wait_for(f"{name} provisioned",
                 lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uids[name])) is not None,
                 timeout=30, log=w.log)
        pr = tekton.get_pr(ctrl_ns, c.provision_run_name(uids[name]))
        platform = {p["name"]: p["value"] for p in pr["spec"]["params"]}["PLATFORM"]
        assert platform == CASES[name][2]
    # A marker build created last: once it is handled, every earlier event was seen.
    marker = tekton.create_tr(namespace, build_taskrun("zz-marker"))
    wait_for("marker provisioned", lambda: tekton.get_pr(
        ctrl_ns, c.provision_run_name(marker["metadata"]["uid"])) is not None, timeout=30)
    for name in set(CASES) - builds:
        tr = tekton.get_tr(namespace, name)
        assert c.FINALIZER not in (tr["metadata"].get("finalizers") or []), name
        assert tekton.get_pr(ctrl_ns, c.provision_run_name(uids[name])) is None, name
    assert len(tekton.list_pr(ctrl_ns)) == len(builds) + 1
