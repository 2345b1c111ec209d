"""taskcheck: each rule catches what it should, and a good Task has no errors."""
from __future__ import annotations

from pathlib import Path

import yaml

from mpc.generator import taskcheck

ROOT = Path(__file__).resolve().parents[2]


def task(**spec) -> dict:
    base = {"params": [{"name": "IMAGE"}],
            "steps": [{"name": "build", "image": "x", "script": "#!/bin/bash\necho \"$IMAGE\"\n"}]}
    base.update(spec)
    return {"apiVersion": "tekton.dev/v1", "kind": "Task", "metadata": {"name": "t"}, "spec": base}


def test_reference_tasks_are_clean():
    for p in ("tasks/buildah/0.1/buildah.yaml", "tasks/buildah-remote/0.1/buildah-remote.yaml"):
        assert taskcheck.check_task(yaml.safe_load((ROOT / p).read_text())) == [], p


def test_good_task_has_no_errors():
    assert taskcheck.check_task(task()) == []


def test_step_names_dns1123_and_unique():
    errs = taskcheck.check_task(task(steps=[
        {"name": "Build_1", "image": "x", "script": "#!/bin/sh\ntrue\n"},
        {"name": "push", "image": "x", "script": "#!/bin/sh\ntrue\n"},
        {"name": "push", "image": "x", "script": "#!/bin/sh\ntrue\n"}]))
    assert "step Build_1: name 'Build_1' is not a DNS-1123 label" in errs
    assert "step push: the step name is used twice" in errs


def test_params_in_scripts_shebang_and_declarations():
    errs = taskcheck.check_task(task(steps=[
        {"name": "a", "image": "$(params.BUILDER)", "script": "echo $(params.IMAGE)\n"},
        {"name": "b", "image": "x", "args": ["$(params.ARGS[*])"], "command": ["sh"],
         "script": "#!/bin/sh\ncat $(workspaces.src.path)\n"}]))
    assert "step a: script does not start with #!" in errs
    assert "step a: script uses $(params.IMAGE); pass it through env instead" in errs
    assert "$(params.BUILDER) is used but no param BUILDER is declared" in errs
    assert "$(params.ARGS) is used but no param ARGS is declared" in errs
    assert "$(workspaces.src...) is used but no such workspace is declared" in errs
    assert "step b: script and command cannot both be set" in errs


def test_shellcheck_runs_on_shell_scripts_only():
    errs = taskcheck.check_task(task(steps=[
        {"name": "a", "image": "x", "script": "#!/bin/bash\nrm -rf $DIR/*\n"},
        {"name": "b", "image": "x", "script": "#!/usr/bin/env python3\nprint($x)\n"}]))
    assert any(e.startswith("step a: SC2086 line 2") for e in errs), errs
    assert not any(e.startswith("step b") for e in errs)
    # Tekton variables are not shell code
    assert taskcheck.shellcheck('#!/bin/sh\nset -e\ncat "$(workspaces.source.path)/x"\n', "s") == []


def test_not_a_task():
    errs = taskcheck.check_task({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "X"}})
    assert "kind 'Pod' is not Task" in errs and "spec.steps is empty" in errs
    assert any("apiVersion" in e for e in errs) and any("DNS-1123 subdomain" in e for e in errs)
