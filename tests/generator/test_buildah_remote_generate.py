"""`mpc buildah-remote` over several input shapes: structure, preservation, errors, golden."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpc.generator import buildah_remote as br
from mpc.generator import taskcheck
from mpc.generator.cli import main
from mpc.runner import contract

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tasks/buildah/0.1/buildah.yaml"
OUT = ROOT / "tasks/buildah-remote/0.1/buildah-remote.yaml"

V1BETA1_SEVERAL_WORKSPACES = """\
# a v1beta1 task with two workspaces and steps before and after the build
apiVersion: tekton.dev/v1beta1
kind: Task
metadata:
  name: buildah-custom   # keep me
  annotations:
    zz.example.com/last: "1"
    aa.example.com/first: "2"
spec:
  params:
    - name: IMAGE
    - name: DOCKERFILE
      default: Dockerfile
  workspaces:
    - name: source
    - name: dockerconfig
      readOnly: true
      optional: true
  stepTemplate:
    env:
      - name: IMAGE
        value: $(params.IMAGE)
      - name: DOCKERFILE
        value: $(params.DOCKERFILE)
  steps:
    - name: prefetch
      image: registry.example.com/prefetch:1
      script: |
        #!/bin/sh
        echo prefetching into "$(workspaces.source.path)"
    - name: build
      image: registry.example.com/buildah:1
      workingDir: $(workspaces.source.path)
      script: |
        #!/bin/bash
        set -e
        buildah bud -f "$DOCKERFILE" -t "$IMAGE" .
    - name: push
      image: registry.example.com/buildah:1
      script: |
        #!/bin/bash
        set -e
        buildah push "$IMAGE"
    - name: sbom
      image: registry.example.com/syft:1
      script: |
        #!/usr/bin/env python3
        import os; print(os.environ["IMAGE"])
"""

TRUSTED_ARTIFACTS_NO_WORKSPACE = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: buildah-oci-ta
spec:
  params:
    - name: IMAGE
      type: string
    - name: SOURCE_ARTIFACT
      type: string
  stepTemplate:
    env:
      - name: IMAGE
        value: $(params.IMAGE)
    volumeMounts:
      - name: workdir
        mountPath: /var/workdir
  steps:
    - name: use-trusted-artifact
      image: registry.example.com/ta:1
      args: [use, $(params.SOURCE_ARTIFACT)=/var/workdir/source]
    - name: build
      image: registry.example.com/buildah:1
      workingDir: /var/workdir/source
      script: |
        #!/bin/bash
        set -e
        buildah bud -t "$IMAGE" .
  volumes:
    - name: workdir
      emptyDir: {}
"""

ARRAY_ARGS_OPTIONAL_VOLUMES = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: buildah
spec:
  params:
    - name: IMAGE
    - name: BUILD_ARGS
      type: array
      default: []
    - name: ENTITLEMENT_SECRET
      default: etc-pki-entitlement
  workspaces:
    - name: source
  stepTemplate:
    env:
      - name: IMAGE
        value: $(params.IMAGE)
  steps:
    - name: build
      image: registry.example.com/buildah:1
      args:
        - --build-args
        - $(params.BUILD_ARGS[*])
      env:
        - name: TOKEN
          valueFrom:
            secretKeyRef:
              name: build-token
              key: token
              optional: true
      volumeMounts:
        - name: varlibcontainers
          mountPath: /var/lib/containers
        - name: etc-pki-entitlement
          mountPath: /entitlement
        - name: trusted-ca
          mountPath: /mnt/trusted-ca
          readOnly: true
      securityContext:
        privileged: true
      script: |
        #!/bin/bash
        set -euo pipefail
        buildah bud "$@" -t "$IMAGE" .
  volumes:
    - name: varlibcontainers
      emptyDir: {}
    - name: etc-pki-entitlement
      secret:
        secretName: $(params.ENTITLEMENT_SECRET)
        optional: true
    - name: trusted-ca
      configMap:
        name: trusted-ca
        items:
          - key: ca-bundle.crt
            path: ca-bundle.crt
        optional: true
"""

SHAPES = {"v1beta1": V1BETA1_SEVERAL_WORKSPACES, "no-workspace": TRUSTED_ARTIFACTS_NO_WORKSPACE,
          "array-args-volumes": ARRAY_ARGS_OPTIONAL_VOLUMES, "reference": SRC.read_text()}


def gen(text: str, **kw) -> tuple[dict, br.Result]:
    r = br.generate(text, br.Options(**kw))
    return yaml.safe_load(r.text), r


def step(task: dict, name: str) -> dict:
    return next(s for s in task["spec"]["steps"] if s["name"] == name)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_common_transformation(shape):
    src = yaml.safe_load(SHAPES[shape])
    out, res = gen(SHAPES[shape])
    assert out["apiVersion"] == src["apiVersion"]
    assert "buildah-remote" in out["metadata"]["name"]
    params = {p["name"]: p for p in out["spec"]["params"]}
    assert "default" not in params[contract.PLATFORM_PARAM]          # required
    assert params["IMAGE_APPEND_PLATFORM"]["default"] == "false"
    ssh_vol = [v for v in out["spec"]["volumes"] if v["name"] == br.SSH_VOLUME]
    assert ssh_vol == [{"name": br.SSH_VOLUME, "secret": {
        "secretName": "multi-platform-ssh-$(context.taskRun.name)", "optional": False}}]
    # the secret is mounted read-only into the build step only
    for s in out["spec"]["steps"]:
        mounts = [m for m in s.get("volumeMounts") or [] if m["name"] == br.SSH_VOLUME]
        assert mounts == ([{"name": br.SSH_VOLUME, "mountPath": "/ssh", "readOnly": True}]
                          if s["name"] == "build" else [])
    assert br.SSH_VOLUME not in str(out["spec"].get("stepTemplate", {}).get("volumeMounts"))
    b, sb = step(out, "build"), step(src, "build")
    # the original script is embedded unchanged; image, args, workingDir, securityContext kept
    assert sb["script"].rstrip("\n") in b["script"]
    for k in ("image", "args", "workingDir", "securityContext"):
        assert b.get(k) == sb.get(k)
    env = {e["name"]: e.get("value") for e in b["env"]}
    assert env[br.BUILDER_IMAGE_ENV] == sb["image"]
    # the output passes every rule, ShellCheck included
    assert taskcheck.check_task(out) == []


def test_steps_other_than_build_stay_as_they_were():
    src = yaml.safe_load(V1BETA1_SEVERAL_WORKSPACES)
    out, res = gen(V1BETA1_SEVERAL_WORKSPACES)
    assert [s["name"] for s in out["spec"]["steps"]] == ["prefetch", "build", "push", "sbom"]
    assert step(out, "prefetch") == step(src, "prefetch")       # does not use IMAGE
    assert step(out, "sbom") == step(src, "sbom")               # python: left alone
    assert any("step sbom: not a shell script" in w for w in res.warnings)
    push = step(out, "push")["script"]
    snippet = br.append_platform_snippet("IMAGE")
    assert push.startswith("#!/bin/bash\n" + snippet)
    assert push.replace(snippet, "", 1) == step(src, "push")["script"]


def test_workspaces_volumes_and_env_reach_the_wrapper():
    out, _ = gen(V1BETA1_SEVERAL_WORKSPACES)
    b = step(out, "build")
    env = {e["name"]: e.get("value") for e in b["env"]}
    assert env["MPC_WORKSPACE_0"] == "$(workspaces.source.path)"
    assert env["MPC_WORKSPACE_1"] == "$(workspaces.dockerconfig.path)"
    s = b["script"]
    assert 'dirs+=("${MPC_WORKSPACE_0}" workspaces/source rw yes)' in s
    assert 'dirs+=("${MPC_WORKSPACE_1}" workspaces/dockerconfig ro no)' in s   # readOnly: not back
    assert 'env_add IMAGE "$IMAGE"' in s and 'env_add DOCKERFILE "$DOCKERFILE"' in s

    out, _ = gen(TRUSTED_ARTIFACTS_NO_WORKSPACE)
    s = step(out, "build")["script"]
    assert "MPC_WORKSPACE" not in s
    assert "dirs+=(/var/workdir volumes/0-workdir rw yes)" in s      # stepTemplate mount, both ways
    assert step(out, "use-trusted-artifact") == step(yaml.safe_load(
        TRUSTED_ARTIFACTS_NO_WORKSPACE), "use-trusted-artifact")

    out, _ = gen(ARRAY_ARGS_OPTIONAL_VOLUMES)
    s = step(out, "build")["script"]
    assert "/var/lib/containers volumes" not in s                    # container storage: not copied
    assert "dirs+=(/entitlement volumes/1-etc-pki-entitlement rw no)" in s   # secret: never back
    assert "dirs+=(/mnt/trusted-ca volumes/2-trusted-ca ro no)" in s
    assert 'env_add TOKEN "$TOKEN"' in s                                # valueFrom env too
    assert "run_opts+=(--privileged)" in s
    assert step(out, "build")["args"] == ["--build-args", "$(params.BUILD_ARGS[*])"]


def test_comments_and_key_order_survive():
    r = br.generate(V1BETA1_SEVERAL_WORKSPACES)
    assert r.text.startswith("# a v1beta1 task with two workspaces")
    assert "  name: buildah-remote-custom   # keep me\n" in r.text
    assert r.text.index("zz.example.com/last") < r.text.index("aa.example.com/first")
    assert "\n  - name: IMAGE\n" not in r.text          # sequences stay indented under their key
    ref = br.generate(SRC.read_text()).text
    assert "# buildah needs SYS_ADMIN (or a user namespace) to build as root" in ref
    assert "# vfs works nested" in ref


def test_no_image_var_warns_and_skips_the_image_copy():
    text = TRUSTED_ARTIFACTS_NO_WORKSPACE.replace("IMAGE", "OUTPUT_IMAGE")
    out, res = gen(text)
    assert any("no env IMAGE" in w for w in res.warnings)
    assert "IMAGE_APPEND_PLATFORM" not in str(out)
    assert "MPC_EXPORT_IMAGE=" not in step(out, "build")["script"]
    assert "oci-archive:$work" not in step(out, "build")["script"]
    out, res = gen(text, image_var="OUTPUT_IMAGE")
    assert 'buildah "${storage[@]}" tag "$id" "$OUTPUT_IMAGE"' in step(out, "build")["script"]


def test_input_rule_violations_are_warnings_unless_strict():
    catalog_like = ARRAY_ARGS_OPTIONAL_VOLUMES.replace(
        'buildah bud "$@"', 'echo "$(params.ENTITLEMENT_SECRET)"\n        buildah bud "$@"')
    out, res = gen(catalog_like)
    assert any("input already breaks a rule" in w and "$(params.ENTITLEMENT_SECRET)" in w
               for w in res.warnings)
    with pytest.raises(br.GeneratorError, match=r"params.ENTITLEMENT_SECRET"):
        gen(catalog_like, strict=True)


@pytest.mark.parametrize("text,needle", [
    (TRUSTED_ARTIFACTS_NO_WORKSPACE.replace("name: build\n", "name: compile\n"),
     "no build step: the Task has no step named 'build' (its steps: use-trusted-artifact, compile)"),
    (TRUSTED_ARTIFACTS_NO_WORKSPACE.replace("name: build\n", "name: build\n      command: [buildah]\n")
     .replace("      script: |\n        #!/bin/bash\n        set -e\n        buildah bud -t \"$IMAGE\" .\n", ""),
     "build step 'build' has no script"),
    ("apiVersion: tekton.dev/v1\nkind: Pipeline\nmetadata: {name: p}\nspec: {}\n", "not a Task"),
    (SRC.read_text() + "---\n" + SRC.read_text(), "exactly one Task"),
    (TRUSTED_ARTIFACTS_NO_WORKSPACE.replace("  stepTemplate:\n", "  stepTemplate:\n    envFrom:\n"
                                            "      - configMapRef: {name: x}\n"), "envFrom"),
])
def test_invalid_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, text, needle):
    src, out = tmp_path / "in.yaml", tmp_path / "out.yaml"
    src.write_text(text)
    assert main(["buildah-remote", "--from", str(src), "--out", str(out)]) == 1
    assert needle in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    out.write_text("previous\n")                       # an existing output is left alone
    assert main(["buildah-remote", "--from", str(src), "--out", str(out)]) == 1
    assert out.read_text() == "previous\n"


def test_checked_in_remote_task_is_what_the_generator_writes(tmp_path):
    assert br.generate(SRC.read_text()).text == OUT.read_text()
    assert main(["buildah-remote", "--from", str(SRC), "--out", str(OUT), "--check"]) == 0
    stale = tmp_path / "stale.yaml"
    stale.write_text(OUT.read_text().replace("optional: false", "optional: true"))
    assert main(["buildah-remote", "--from", str(SRC), "--out", str(stale), "--check"]) == 1


def test_cli_writes_the_file_and_help_explains():
    out = subprocess.run([sys.executable, "-m", "mpc.generator.cli", "buildah-remote", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for words in ("--from", "--out", "PLATFORM", "IMAGE_APPEND_PLATFORM", "multi-platform-ssh-",
                  "localhost", "ORIGINAL script unchanged", "OCI layout", "exit code is 1"):
        assert words in out, words


def test_generation_is_deterministic_and_idempotent_on_its_input():
    a = br.generate(ARRAY_ARGS_OPTIONAL_VOLUMES).text
    b = br.generate(ARRAY_ARGS_OPTIONAL_VOLUMES).text
    assert a == b
    with pytest.raises(br.GeneratorError, match="already looks like a remote task"):
        br.generate(a)
