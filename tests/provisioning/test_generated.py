"""The checked-in Tasks are what the generator emits, and follow Tekton's rules."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from mpc.generator import provisioning, taskcheck
from tests.infra.paths import REPO

DOCS = provisioning.documents()
TASK_FILES = [REPO / "tasks" / d.path for d in DOCS
              if isinstance(d.content, dict) and d.content.get("kind") in ("Task", "Pipeline")]
ONLY_TASKS = [REPO / "tasks" / d.path for d in DOCS
              if isinstance(d.content, dict) and d.content.get("kind") == "Task"]
REMOTE_SCRIPTS = sorted((REPO / "tasks" / "runner" / "scripts").glob("*.sh"))


def test_checked_in_files_match_the_generator():
    r = subprocess.run([str(Path(REPO / ".venv/bin/mpc")), "generate", "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", ONLY_TASKS, ids=lambda p: p.parent.parent.name)
def test_tasks_follow_tektons_rules(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert taskcheck.check_task(doc) == []
    for step in doc["spec"].get("steps", []):
        # the runner itself, no script (no place-scripts init container); inputs only via env
        assert "script" not in step and step["command"][0] == "mpc-runner", step
        assert "$(" not in " ".join(step["command"] + step.get("args", []))


@pytest.mark.parametrize("path", ONLY_TASKS, ids=lambda p: p.parent.parent.name)
def test_steps_meet_pod_security_restricted_without_a_fixed_uid(path: Path):
    """Pod Security "restricted" (checked per container, as the admission plugin does), and
    no runAsUser: OpenShift's restricted-v2 rejects a fixed uid outside its range."""
    for step in yaml.safe_load(path.read_text())["spec"]["steps"]:
        sc = step.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True
        assert sc.get("allowPrivilegeEscalation") is False
        assert sc.get("capabilities", {}).get("drop") == ["ALL"]
        assert not sc.get("capabilities", {}).get("add")
        assert sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        assert "runAsUser" not in sc and "privileged" not in sc


def test_a_broken_task_is_caught():
    """The check above can fail: a script with $(params.*) and an unquoted var is rejected."""
    doc = provisioning.PROVISION.task(provisioning.RUNNER_IMAGE)
    doc["spec"]["steps"][0].pop("command")
    doc["spec"]["steps"][0]["script"] = "#!/bin/bash\necho $(params.PLATFORM) $X\n"
    errors = "\n".join(taskcheck.check_task(doc))
    assert "$(params." in errors and "SC2086" in errors


@pytest.mark.parametrize("path", REMOTE_SCRIPTS, ids=lambda p: p.name)
def test_remote_scripts_pass_shellcheck(path: Path):
    r = subprocess.run([taskcheck.shellcheck_binary(), "--shell=bash", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.parent.parent.name)
def test_api_server_accepts_them(kube, namespace, path: Path):
    doc = yaml.safe_load(path.read_text())
    plural = {"Task": "tasks", "Pipeline": "pipelines"}[doc["kind"]]
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "tekton.dev", "v1", namespace, plural, doc, dry_run="All")
