"""Push bundles with the real tkn to the real registry and read them back byte by byte."""
from __future__ import annotations

import json

import yaml

from tests.bundles import oci
from tests.bundles.conftest import CTIME, mpc, task, tkn_list

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def push(catalog, prefix, *extra):
    lock = catalog.root / "lock.yaml"
    r = mpc("bundles", "push", *catalog.args(), "--registry", prefix, "--version", "0.1",
            "--ctime", CTIME, "--revision", "abc123", "--lock", str(lock), *extra,
            cwd=catalog.root)
    assert r.rc == 0, r.out + r.err
    return yaml.safe_load(lock.read_text()), r


def test_push_list_and_read_back_every_layer(small_catalog, prefix):
    lock, r = push(small_catalog, prefix)
    bundles = lock["bundles"]
    assert set(bundles) == {"task-hello", "task-world", "pipeline-demo"}
    for name, b in bundles.items():
        assert b["ref"] == f"{prefix}/{name}:0.1@{b['digest']}"
        assert b["ref"] in r.out                      # the printed table

    assert tkn_list(bundles["task-hello"]["ref"]) == ["task.tekton.dev/hello"]
    assert tkn_list(bundles["pipeline-demo"]["ref"]) == ["pipeline.tekton.dev/demo"]

    for name, source in (("task-hello", "hello/0.1/hello.yaml"), ("task-world", "world/0.1/world.yaml")):
        ref = bundles[name]["ref"]
        m, _ = oci.manifest(ref)
        assert m["mediaType"] == DOCKER_MANIFEST and m["schemaVersion"] == 2
        assert len(m["layers"]) == 1
        layer = m["layers"][0]
        assert layer["mediaType"] == DOCKER_LAYER
        obj_name = name.removeprefix("task-")
        assert layer["annotations"] == {"dev.tekton.image.apiVersion": "v1",
                                        "dev.tekton.image.kind": "task",
                                        "dev.tekton.image.name": obj_name}
        entry, content = oci.single_entry(oci.blob(ref, layer["digest"]))
        assert entry.name == obj_name and entry.mode == 0o600
        assert json.loads(content) == yaml.safe_load((small_catalog.tasks / source).read_text())
        ann = m["annotations"]
        assert ann["org.opencontainers.image.version"] == "0.1"
        assert ann["org.opencontainers.image.revision"] == "abc123"
        assert ann["org.opencontainers.image.source"] == "https://example.invalid/mpc"
        config = json.loads(oci.blob(ref, m["config"]["digest"]))
        assert config["created"] == CTIME
    # the declared description, commas and all; else the Task's first description line
    m, _ = oci.manifest(bundles["task-hello"]["ref"])
    assert m["annotations"]["org.opencontainers.image.description"] == "Says hello, to everyone."
    m, _ = oci.manifest(bundles["task-world"]["ref"])
    assert m["annotations"]["org.opencontainers.image.description"] == "The world task."


def test_pipeline_bundle_references_the_pushed_task_bundles(small_catalog, prefix):
    lock, _ = push(small_catalog, prefix)
    ref = lock["bundles"]["pipeline-demo"]["ref"]
    m, _ = oci.manifest(ref)
    (layer,) = m["layers"]
    assert layer["annotations"]["dev.tekton.image.kind"] == "pipeline"
    _, content = oci.single_entry(oci.blob(ref, layer["digest"]))
    got = json.loads(content)
    want = yaml.safe_load((small_catalog.tasks / "pipelines/demo/0.1/demo.yaml").read_text())
    # everything but the references is the checked-in Pipeline
    refs = [got["spec"]["tasks"][0].pop("taskRef"), got["spec"]["finally"][0].pop("taskRef")]
    del want["spec"]["tasks"][0]["taskRef"], want["spec"]["finally"][0]["taskRef"]
    assert got == want
    for r, task_name in zip(refs, ("hello", "world")):
        pinned = lock["bundles"][f"task-{task_name}"]["ref"]
        assert r == {"resolver": "bundles", "params": [
            {"name": "bundle", "value": pinned}, {"name": "name", "value": task_name},
            {"name": "kind", "value": "task"}]}
        assert oci.exists(pinned)


def test_same_sources_same_digests(small_catalog, prefix):
    first, _ = push(small_catalog, prefix)
    again, _ = push(small_catalog, prefix)
    assert {k: v["digest"] for k, v in first["bundles"].items()} == \
        {k: v["digest"] for k, v in again["bundles"].items()}
    # and the creation time really is an input: another one changes every digest
    lock = small_catalog.root / "lock2.yaml"
    r = mpc("bundles", "push", *small_catalog.args(), "--registry", prefix, "--version", "0.1",
            "--ctime", "2024-05-02T12:00:00Z", "--revision", "abc123", "--lock", str(lock),
            cwd=small_catalog.root)
    assert r.rc == 0, r.err
    other = yaml.safe_load(lock.read_text())["bundles"]
    assert all(other[k]["digest"] != v["digest"] for k, v in first["bundles"].items())


def test_source_date_epoch_sets_creation_time(small_catalog, prefix):
    import os
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    lock = small_catalog.root / "lock.yaml"
    r = mpc("bundles", "push", *small_catalog.args(), "--registry", prefix, "--version", "0.1",
            "--lock", str(lock), cwd=small_catalog.root, env=env)
    assert r.rc == 0, r.err
    ref = yaml.safe_load(lock.read_text())["bundles"]["task-hello"]["ref"]
    m, _ = oci.manifest(ref)
    assert json.loads(oci.blob(ref, m["config"]["digest"]))["created"] == "2023-11-14T22:13:20Z"


def _refused(catalog, registry, prefix, *needles):
    before = oci.catalog(registry.address)
    r = mpc("bundles", "push", *catalog.args(), "--registry", prefix, "--version", "0.1",
            "--ctime", CTIME, cwd=catalog.root)
    assert r.rc != 0
    for n in needles:
        assert n in r.err, r.err
    after = oci.catalog(registry.address)
    assert after == before, "something was pushed"
    assert not any(repo.startswith(prefix.split("/", 1)[1]) for repo in after)


def test_21_objects_refused_before_any_push(small_catalog, registry, prefix):
    names = [f"t{i:02d}" for i in range(21)]
    for n in names:
        small_catalog.write(f"{n}/0.1/{n}.yaml", task(n))
    spec = yaml.safe_load(small_catalog.spec.read_text())
    # listed last: the good bundles before it must not be pushed either
    spec["bundles"].append({"name": "task-many", "objects": [f"Task/{n}" for n in names]})
    small_catalog.spec.write_text(yaml.safe_dump(spec))
    _refused(small_catalog, registry, prefix, "task-many: 21 objects", "at most 20")


def test_20_objects_accepted(small_catalog, prefix):
    names = [f"t{i:02d}" for i in range(20)]
    for n in names:
        small_catalog.write(f"{n}/0.1/{n}.yaml", task(n))
    spec = yaml.safe_load(small_catalog.spec.read_text())
    spec["bundles"].append({"name": "task-many", "objects": [f"Task/{n}" for n in names]})
    small_catalog.spec.write_text(yaml.safe_dump(spec))
    lock, _ = push(small_catalog, prefix)
    assert len(tkn_list(lock["bundles"]["task-many"]["ref"])) == 20


def test_duplicate_name_refused_before_any_push(small_catalog, registry, prefix):
    small_catalog.write("hello/0.2/hello.yaml", task("hello", "#!/bin/sh\necho v2\n"))
    _refused(small_catalog, registry, prefix, "Task/hello", "hello/0.1/hello.yaml",
             "hello/0.2/hello.yaml")


def test_object_listed_twice_refused(small_catalog, registry, prefix):
    spec = yaml.safe_load(small_catalog.spec.read_text())
    spec["bundles"][0]["objects"] = ["Task/hello", "Task/hello"]
    small_catalog.spec.write_text(yaml.safe_dump(spec))
    _refused(small_catalog, registry, prefix, "Task/hello twice", "unique")


def test_plural_kind_refused(small_catalog, registry, prefix):
    bad = task("plural")
    bad["kind"] = "Tasks"
    small_catalog.write("plural/0.1/plural.yaml", bad)
    spec = yaml.safe_load(small_catalog.spec.read_text())
    spec["bundles"].append({"name": "task-plural", "objects": ["Tasks/plural"]})
    small_catalog.spec.write_text(yaml.safe_dump(spec))
    _refused(small_catalog, registry, prefix, "'Tasks'", "singular")


def test_unlisted_task_refused(small_catalog, registry, prefix):
    small_catalog.write("forgotten/0.1/forgotten.yaml", task("forgotten"))
    _refused(small_catalog, registry, prefix, "Task/forgotten", "in no bundle")


def test_missing_declared_object_refused(small_catalog, registry, prefix):
    (small_catalog.tasks / "world/0.1/world.yaml").unlink()
    _refused(small_catalog, registry, prefix, "Task/world is declared")


def test_missing_tkn_is_a_clear_error(small_catalog, registry, prefix, tmp_path):
    import os
    env = dict(os.environ, MPC_CACHE=str(tmp_path / "empty-cache"), PATH="/usr/bin:/bin")
    before = oci.catalog(registry.address)
    r = mpc("bundles", "push", *small_catalog.args(), "--registry", prefix, "--version", "0.1",
            cwd=small_catalog.root, env=env)
    assert r.rc == 1
    assert "tkn not found" in r.err and "make upstream" in r.err
    assert oci.catalog(registry.address) == before


def test_unchanged_bundles_keep_their_digest_across_commits(small_catalog, prefix):
    """Stamped from git: only a bundle whose files changed gets a new digest."""
    import os
    import subprocess
    root = small_catalog.root
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")

    def git(*args, when="2024-01-01T00:00:00Z"):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                       env=dict(env, GIT_AUTHOR_DATE=when, GIT_COMMITTER_DATE=when))

    def digests():
        lock = root / "lock.yaml"
        r = mpc("bundles", "push", *small_catalog.args(), "--registry", prefix, "--version", "0.1",
                "--lock", str(lock), cwd=root, env=env)
        assert r.rc == 0, r.err
        return yaml.safe_load(lock.read_text())["bundles"]

    git("init", "-q")
    git("remote", "add", "origin", "https://example.invalid/fork/mpc.git")
    git("add", "tasks", "bundles.yaml")
    git("commit", "-q", "-m", "one")
    first = digests()
    m, _ = oci.manifest(first["task-hello"]["ref"])     # a fork's pushes point at the fork
    assert m["annotations"]["org.opencontainers.image.source"] == "https://example.invalid/fork/mpc.git"
    assert first["task-hello"]["created"] == "2024-01-01T00:00:00Z"
    assert not first["task-hello"]["revision"].endswith("-dirty")

    (root / "unrelated.txt").write_text("x\n")
    git("add", "unrelated.txt")
    git("commit", "-q", "-m", "two", when="2024-02-01T00:00:00Z")
    assert {k: v["digest"] for k, v in digests().items()} == {k: v["digest"] for k, v in first.items()}

    small_catalog.write("hello/0.1/hello.yaml", task("hello", "#!/bin/sh\necho changed\n"))
    dirty = digests()
    assert dirty["task-hello"]["revision"].endswith("-dirty")
    git("add", "tasks")
    git("commit", "-q", "-m", "three", when="2024-03-01T00:00:00Z")
    third = digests()
    assert third["task-hello"]["created"] == "2024-03-01T00:00:00Z"
    assert third["task-hello"]["digest"] != first["task-hello"]["digest"]
    assert third["task-world"]["digest"] == first["task-world"]["digest"]
    # the Pipeline bundle pins task-hello's new digest, so it changes with it
    assert third["pipeline-demo"]["digest"] != first["pipeline-demo"]["digest"]
