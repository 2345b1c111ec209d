"""Look-ahead: the builds a running PipelineRun will create, before it creates them.

A remote build's pod cannot start before its secret exists, and provisioning
needs a pod of its own: started when the build TaskRun appears, it lands
seconds after the kubelet's first tries of the mount (docs/performance.md,
"Time to build step"). With the host pool's ``lookAhead``, the watcher starts
provisioning for a build TaskRun that a PipelineRun is going to create, so the
secret is there when it does. Pure functions on dicts.

Tekton writes the pipeline, params substituted, into ``status.pipelineSpec``
when it starts the run, and names each child TaskRun ``<pipelinerun>-<task>``
(``-<i>`` for the i-th of a matrix of two or more) when that fits in 63
characters (longer names are hashed: not predicted). A pipeline task is
predicted to be a build when its ``PLATFORM`` param (or a matrix over
``PLATFORM`` alone) names a remote platform of the pool and its Task mounts the
build secret (an inline ``taskSpec``) or is a reference, which Tekton resolves
only as it creates the TaskRun: for those the look-ahead bets on the
``PLATFORM`` param, and the watcher gives the host back as soon as the TaskRun
shows it is not a build. Children the PipelineRun already lists exist: the
TaskRun watch has them. A prediction Tekton did not make under the predicted
name (its pipeline task's TaskRuns are listed, this one is not) gives its host
back at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from mpc.runner import contract as c

from . import detect

MAX_NAME = 63
_PLATFORM = f'"{c.PLATFORM_PARAM}"'.encode()
_PIPELINERUN_LABEL = b'"tekton.dev/pipelineRun":"'


def may_predict(raw: bytes) -> bool:
    """Whether a PipelineRun's raw JSON can hold a build to predict, before it is decoded."""
    return _PLATFORM in raw


def pipelinerun_of(raw: bytes) -> str | None:
    """The ``tekton.dev/pipelineRun`` label of a TaskRun's raw JSON (the run that made it),
    without decoding it; None if it has none (or it is written with escapes)."""
    i = raw.find(_PIPELINERUN_LABEL)
    if i < 0:
        return None
    i += len(_PIPELINERUN_LABEL)
    j = raw.find(b'"', i)
    value = raw[i:j] if j > 0 else b""
    return value.decode() if value and b"\\" not in value else None


@dataclass(frozen=True)
class Child:
    """A TaskRun the PipelineRun will create, predicted to be a build."""

    name: str
    platform: str
    pipeline_task: str


def _platforms(task: dict) -> list[tuple[str, str]] | None:
    """(child name suffix, PLATFORM) of each TaskRun the pipeline task fans out to; None if
    the PLATFORM of its TaskRuns is not known in advance."""
    name = task.get("name")
    matrix = task.get("matrix")
    if matrix:
        params = matrix.get("params") if isinstance(matrix, dict) else None
        if (not isinstance(params, list) or len(params) != 1 or matrix.get("include")
                or not isinstance(params[0], dict) or params[0].get("name") != c.PLATFORM_PARAM
                or not isinstance(params[0].get("value"), list)):
            return None
        values = params[0]["value"]
        if len(values) == 1:            # Tekton names a fan-out of one like a plain task
            return [(f"-{name}", values[0])]
        return [(f"-{name}-{i}", v) for i, v in enumerate(values)]
    for p in task.get("params") or ():
        if isinstance(p, dict) and p.get("name") == c.PLATFORM_PARAM:
            return [(f"-{name}", p.get("value"))]
    return None


def _maybe_build(task: dict) -> bool:
    if isinstance(task.get("taskSpec"), dict):
        return detect.mounts_build_secret({"spec": {"taskSpec": task["taskSpec"]}})
    return isinstance(task.get("taskRef"), dict)


def children(pr: dict, platforms: Collection[str]) -> list[Child]:
    """The builds of ``platforms`` (the pool's remote ones) that running PipelineRun ``pr``
    has not created yet. None for a PipelineRun that is done or being deleted."""
    if detect.is_done(pr) or detect.deleting(pr):
        return []
    status = pr.get("status") or {}
    spec = status.get("pipelineSpec")
    if not isinstance(spec, dict):
        return []
    listed = {r.get("name") for r in status.get("childReferences") or () if isinstance(r, dict)}
    skipped = {s.get("name") for s in status.get("skippedTasks") or () if isinstance(s, dict)}
    prefix = detect.meta(pr, "name", "")
    out = []
    for task in spec.get("tasks") or ():
        if not isinstance(task, dict) or task.get("name") in skipped or not _maybe_build(task):
            continue
        for suffix, platform in _platforms(task) or ():
            name = prefix + suffix
            if (isinstance(platform, str) and platform in platforms
                    and len(name) <= MAX_NAME and name not in listed):
                out.append(Child(name, platform, task["name"]))
    return out


def never_created(pr: dict | None, child: str, pipeline_task: str) -> str | None:
    """Why PipelineRun ``pr`` (None: deleted) will not create the predicted ``child`` any
    more, or None while it may."""
    if pr is None:
        return "pipelinerun deleted"
    if detect.deleting(pr):
        return "pipelinerun deleting"
    if detect.is_done(pr):
        return "pipelinerun finished"
    status = pr.get("status") or {}
    if any(isinstance(s, dict) and s.get("name") == pipeline_task
           for s in status.get("skippedTasks") or ()):
        return "pipeline task skipped"
    made = [r.get("name") for r in status.get("childReferences") or ()
            if isinstance(r, dict) and r.get("pipelineTaskName") == pipeline_task]
    if made and child not in made:      # Tekton creates a task's TaskRuns all at once
        return "pipeline task's TaskRuns created under other names"
    return None
