"""Turn a buildah Task into buildah-remote: the same build, on a host mpc assigns.

The input Task is read with ruamel.yaml's round-trip loader and the changes
are written into the input's own text (``yamlsplice``): a diff between input
and output shows only what the conversion changed; comments, key order,
quoting, indentation, wrapped lines and block scalars of the rest stay as
they were, and new items take the indentation of the collection they join.
What the transformation touches:

* ``metadata.name``: ``buildah`` becomes ``buildah-remote`` (``buildah-oci-ta``
  → ``buildah-remote-oci-ta``); a name without ``buildah`` gets ``-remote``.
* params ``PLATFORM`` (required: no default) and ``IMAGE_APPEND_PLATFORM``
  (default ``"false"``), and the same two in ``stepTemplate.env``.
* volume ``mpc-ssh``: secret ``multi-platform-ssh-$(context.taskRun.name)``,
  ``optional: false`` (the pod waits until the provisioner wrote it), mounted
  read-only at ``/ssh`` into the build step only.
* the build step's script becomes a wrapper (templates/buildah-remote-wrapper.sh)
  that embeds the original script; the step's image, env, args,
  workingDir, securityContext and mounts stay as they were, plus the env
  ``MPC_BUILDER_IMAGE`` holding the step image (Tekton resolves params in it).
* ``$(params.IMAGE)`` in shell scripts (the catalog's way) is read from env
  ``IMAGE`` instead, quoted to give the same word where it stands (env
  ``IMAGE: $(params.IMAGE)`` is added to ``stepTemplate`` if missing): the
  wrapper must know the image, and IMAGE_APPEND_PLATFORM changes it. Inside a
  here-document with a quoted delimiter (never expanded) it is an error.
* a Task with Konflux's ``PRIVILEGED_NESTED`` param (buildah 0.2 on: "true"
  builds privileged, nested, "only with remote VMs") gets env
  ``MPC_PRIVILEGED_NESTED: $(params.PRIVILEGED_NESTED)`` in the build step; when
  it is "true" the builder runs ``podman run --privileged`` (every capability and
  device, /dev/fuse among them, no SELinux label) with /var/tmp bind-mounted
  from the build's directory on the host (``builder: host``: the same bind).
* other steps keep running in the pod; those whose shell script uses the
  image variable get the IMAGE_APPEND_PLATFORM snippet after their ``#!`` line.

What the wrapper needs in the pod: bash, ssh, rsync (and buildah, to load the
image; python3 for the registry proxy that keeps registry credentials in the
pod: templates/registry-proxy.py); on the host: rsync and podman, rootless or
granted through ``sudo -n podman``; or, when the build's secret says ``builder: host``
(a pool host that cannot run containers), no podman: buildah and the build's tools
on the host, run as root through ``sudo -n /usr/bin/unshare`` in a mount and PID
namespace of their own (host.sh).
"""
from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, LiteralScalarString

from mpc.runner import contract

from . import shellquote, taskcheck
from .yamlsplice import SpliceError, Splicer

SSH_VOLUME = "mpc-ssh"
SSH_MOUNT = "/ssh"
APPEND_PARAM = "IMAGE_APPEND_PLATFORM"
BUILDER_IMAGE_ENV = "MPC_BUILDER_IMAGE"
# Konflux's buildah (0.2 on): "true" builds privileged, nested (only on remote VMs)
NESTED_PARAM = "PRIVILEGED_NESTED"
NESTED_ENV = "MPC_PRIVILEGED_NESTED"
# rsync for the workspace copies: compressed (rsync negotiates the best codec both ends
# have: zstd, lz4, zlib; already-compressed suffixes are skipped), and rsync's delta
# transfer, which pays off when the host keeps the last build's copy (the namespace's
# layer cache, docs/layer-cache.md): unchanged files are not sent at all. Level 1: the
# cheapest CPU when the data does not compress (make bench, docs/performance.md)
RSYNC_OPTS = ("-rlpt", "--compress", "--compress-level=1", "--timeout=300")
CONTAINER_STORAGE = "/var/lib/containers"
# volume sources that are read-only by nature: copied to the host, never back
READONLY_SOURCES = ("secret", "configMap", "projected", "downwardAPI")
SHELL_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TEKTON_DEFAULT_SHEBANG = "#!/bin/sh\nset -e\n"   # what Tekton prepends to a script without #!


class GeneratorError(Exception):
    """The input cannot be turned into a remote Task; the message says why."""


@dataclass
class Options:
    build_step: str = "build"
    image_var: str = "IMAGE"
    name: str | None = None
    strict: bool = False           # input's own rule violations are errors, not warnings


@dataclass
class Result:
    text: str
    warnings: list[str] = field(default_factory=list)


def _yaml() -> YAML:
    y = YAML()                      # round-trip: comments, key order, quotes
    y.preserve_quotes = True
    y.width = 4096                  # never re-wrap long lines
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text()


def remote_name(name: str) -> str:
    if "buildah-remote" in name:
        raise GeneratorError(f"task {name!r} already looks like a remote task")
    if "buildah" in name:
        return name.replace("buildah", "buildah-remote", 1)
    return name + "-remote"


def _env_names(env) -> list[str]:
    return [e["name"] for e in env or [] if "name" in e]


def _env_value(env, name: str):
    return next((e.get("value") for e in env or [] if e.get("name") == name), None)


def _mount_kind(volumes: dict, name: str) -> str:
    v = volumes.get(name)
    if v is None:
        return "unknown"
    for k in v:
        if k != "name":
            return k
    return "unknown"


def _shell_words(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _heredoc_mark(script: str) -> str:
    lines = set(script.splitlines())
    mark = "MPC_ORIGINAL_SCRIPT_" + hashlib.sha256(script.encode()).hexdigest()[:8].upper()
    while mark in lines:
        mark += "_"
    return mark


def append_platform_snippet(image_var: str) -> str:
    return _template("append-platform.sh").replace("@IMAGE_VAR@", image_var)


def _insert_after_shebang(script: str, snippet: str) -> str:
    if script.startswith("#!"):
        first, _, rest = script.partition("\n")
        return f"{first}\n{snippet}{rest}"
    return snippet + script


def _uses_var(script: str, var: str) -> bool:
    return re.search(r"\$\{?" + re.escape(var) + r"\b", script) is not None


def _block(text: str, mark: str, keep: bool) -> str:
    """``text`` with the lines between ``# @mark@ begin`` and ``end`` kept or dropped."""
    if not keep:
        text = re.sub(rf"# @{mark}@ begin\n.*?# @{mark}@ end\n", "", text, flags=re.S)
    return re.sub(rf"# @{mark}@ (begin|end)\n", "", text)


def wrapper_script(*, original: str, image_var: str | None, dirs: list[tuple[str, str, str, str]],
                   forward_env: list[str], podman_opts: list[str], append_platform: bool,
                   privileged_nested: bool = False) -> str:
    """The build step's new script. ``dirs``: (pod path or "$VAR", host name, rw|ro, yes|no);
    ``privileged_nested``: the Task has PRIVILEGED_NESTED (its value comes in env
    MPC_PRIVILEGED_NESTED)."""
    if not original.startswith("#!"):
        original = TEKTON_DEFAULT_SHEBANG + original
    original = original.rstrip("\n")
    dir_lines = []
    for path, host_name, mode, back in dirs:
        pod = f'"${{{path[1:]}}}"' if path.startswith("$") else shlex.quote(path)
        line = f"dirs+=({pod} {_shell_words(host_name, mode, back)})"
        if path.startswith("$"):       # a workspace: skip it when it is not bound
            line = f'if [ -n {pod} ] && [ -d {pod} ]; then {line}; fi'
        dir_lines.append(line)
    env_lines = [f'if [ -n "${{{n}+set}}" ]; then env_add {n} "${n}"; fi' for n in forward_env]
    opt_lines = [f"run_opts+=({_shell_words(*podman_opts)})"] if podman_opts else []
    text = _template("buildah-remote-wrapper.sh")
    subs = {
        "@SSH_DIR@": SSH_MOUNT,
        "@RSYNC_OPTS@": _shell_words(*RSYNC_OPTS),
        "@APPEND_PLATFORM@\n": append_platform_snippet(image_var) if append_platform and image_var else "",
        "@DIRS@": "\n".join(dir_lines) or ":",
        "@FORWARD_ENV@": "\n".join(env_lines) or ":",
        "@PODMAN_OPTS@\n": "".join(x + "\n" for x in opt_lines),
        "@RUNNER@": _template("buildah-remote-runner.sh").rstrip("\n"),
        "@HOST_SCRIPT@": _template("buildah-remote-host.sh").rstrip("\n"),
        "@REGISTRY_PROXY@": _template("registry-proxy.py").rstrip("\n"),
        "@USER_LABEL@": contract.LABEL_BUILD_USER,
        "@UNSHARE@": contract.HOST_BUILDER_COMMAND,
        "@EOF_MARK@": _heredoc_mark(original),
    }
    if image_var:
        subs["@IMAGE_VAR@"] = image_var
    else:   # no image to bring back: drop the lines that load it
        text = _block(text, "IMAGE_LOAD", False)
        text = "\n".join(ln for ln in text.splitlines() if "@IMAGE_VAR@" not in ln) + "\n"
    text = _block(text, "IMAGE_LOAD", True)
    text = _block(text, "PRIVILEGED_NESTED", privileged_nested)
    for k, v in subs.items():
        text = text.replace(k, v)
    # last: the original script must not be scanned for placeholders
    return text.replace("@ORIGINAL_SCRIPT@", original)


def _podman_opts(step: dict) -> list[str]:
    """The build step's securityContext, as podman run options on the host."""
    sc = step.get("securityContext") or {}
    opts = []
    if sc.get("privileged"):
        opts.append("--privileged")
    caps = sc.get("capabilities") or {}
    for c in caps.get("add") or []:
        opts += ["--cap-add", str(c)]
    for c in caps.get("drop") or []:
        opts += ["--cap-drop", str(c)]
    return opts


class _Edits:
    """Changes to the tree, recorded for a Splicer when there is one."""

    def __init__(self, doc: Splicer | None):
        self.doc = doc

    def set(self, mapping, key, value) -> None:
        if self.doc is not None:
            self.doc.set(mapping, key, value)
        else:
            mapping[key] = value

    def append(self, seq, item) -> None:
        if self.doc is not None:
            self.doc.append(seq, item)
        else:
            seq.append(item)


def _param_ref(name: str) -> re.Pattern:
    """``$(params.NAME)`` as a whole string value (Tekton's dot and bracket forms)."""
    n = re.escape(name)
    return re.compile(r"""\$\(params(?:\.""" + n + r"""|\[['"]""" + n + r"""['"]\])\)""")


# how $(params.X) becomes the env variable in each shell context (same word, same value)
_ENV_IN_CONTEXT = {
    "plain": '"${{{v}}}"', "double": "${{{v}}}", "heredoc": "${{{v}}}", "comment": "${{{v}}}",
    "single": "'\"${{{v}}}\"'", "ansi": "'\"${{{v}}}\"$'",
}


def _is_shell(script: str) -> bool:
    return not script.startswith("#!") or taskcheck.SHELLS.match(script) is not None


def env_for_param(script: str, param: str, var: str, where: str) -> str:
    """``script`` with each ``$(params.<param>)`` read from env ``var`` instead.

    Tekton pastes the value into the script text; the env variable, quoted to
    fit where it stands, gives the shell the same word. A here-document with a
    quoted delimiter expands nothing, so there it cannot be done."""
    spans = [(m.start(), m.end()) for m in _param_ref(param).finditer(script)]
    out, last = [], 0
    for (start, end), ctx in zip(spans, shellquote.contexts(script, spans)):
        if ctx == "heredoc-quoted":
            line = script.count("\n", 0, start) + 1
            raise GeneratorError(
                f"{where}: line {line} has $(params.{param}) in a here-document with a quoted "
                f"delimiter, which the shell does not expand; the remote Task reads the image "
                f"from env {var} (IMAGE_APPEND_PLATFORM changes it): use ${var} in the script "
                f"(e.g. an unquoted delimiter or an exported variable) and generate again")
        out += [script[last:start], _ENV_IN_CONTEXT[ctx].format(v=var)]
        last = end
    return "".join(out) + script[last:]


def transform(task: CommentedMap, opts: Options, doc: Splicer | None = None,
              info: dict | None = None) -> list[str]:
    """Change ``task`` in place into its remote variant; returns warnings.

    Changes go through ``doc`` when given (to be written into the input's text);
    ``info["embedded"]`` gets the build script the wrapper embeds."""
    warnings: list[str] = []
    ed = _Edits(doc)
    if not isinstance(task, dict):
        raise GeneratorError("the input is not a YAML mapping")
    if task.get("kind") != "Task":
        raise GeneratorError(f"the input is a {task.get('kind')!r}, not a Task")
    if task.get("apiVersion") not in taskcheck.API_VERSIONS:
        raise GeneratorError(f"apiVersion {task.get('apiVersion')!r} is not supported "
                             f"(use one of {', '.join(taskcheck.API_VERSIONS)})")
    meta = task.get("metadata")
    if not meta or not meta.get("name"):
        raise GeneratorError("the Task has no metadata.name")
    spec = task.get("spec")
    if not isinstance(spec, dict):
        raise GeneratorError("the Task has no spec")
    steps = spec.get("steps") or []
    build = next((s for s in steps if s.get("name") == opts.build_step), None)
    if build is None:
        names = ", ".join(str(s.get("name")) for s in steps) or "none"
        raise GeneratorError(f"no build step: the Task has no step named {opts.build_step!r} "
                             f"(its steps: {names}); name it with --build-step")
    if build.get("script") is None:
        raise GeneratorError(f"build step {opts.build_step!r} has no script (it runs "
                             f"command/args); only a script can be run on the remote host")
    if build.get("envFrom") or (spec.get("stepTemplate") or {}).get("envFrom"):
        raise GeneratorError(f"build step {opts.build_step!r} uses envFrom: the variables it "
                             "brings cannot be known when generating; list them under env")
    if build.get("volumeDevices"):
        raise GeneratorError(f"build step {opts.build_step!r} uses volumeDevices, which "
                             "cannot be copied to a remote host")

    ed.set(meta, "name", opts.name or remote_name(str(meta["name"])))

    # --- params -----------------------------------------------------------------
    params = spec.get("params")
    if params is None:
        ed.set(spec, "params", params := CommentedSeq())
    declared = {p.get("name") for p in params}
    if contract.PLATFORM_PARAM in declared:
        warnings.append(f"the input already declares {contract.PLATFORM_PARAM}; it is kept as is")
    else:
        ed.append(params, CommentedMap([
            ("name", contract.PLATFORM_PARAM),
            ("type", "string"),
            ("description", "The platform to build on (e.g. linux/arm64); mpc provisions a host "
                            "of this platform for the build step."),
        ]))
    template = spec.get("stepTemplate")
    if template is None:
        ed.set(spec, "stepTemplate", template := CommentedMap())
    tenv = template.get("env")
    if tenv is None:
        ed.set(template, "env", tenv := CommentedSeq())
    tenv_names = _env_names(tenv)
    benv_names = _env_names(build.get("env"))

    # --- $(params.IMAGE) in scripts: read from env IMAGE instead ---------------------
    # Tekton pastes the param's value into the script text, so the script would
    # build and push the name the TaskRun gave, whatever IMAGE_APPEND_PLATFORM
    # made of $IMAGE, and the wrapper could not tell which image to bring back.
    var = opts.image_var
    scripts: dict[int, str] = {}
    env_value = _env_value(build.get("env"), var) if var in benv_names \
        else _env_value(tenv, var) if var in tenv_names else None
    if env_value is not None:
        m = re.fullmatch(r"\$\(params\.([A-Za-z0-9_-]+)\)", str(env_value))
        image_param = m.group(1) if m else None
    else:
        image_param = var if var in declared else None
    users = [s for s in steps if image_param and s.get("script") is not None
             and _param_ref(image_param).search(str(s["script"]))]
    for s in users:
        where = f"step {s.get('name')}"
        own = _env_value(s.get("env"), var) if var in _env_names(s.get("env")) else None
        if own is not None and own != f"$(params.{image_param})":
            raise GeneratorError(f"{where}: its script uses $(params.{image_param}) and its env "
                                 f"{var} is {own!r}: rename one of them and generate again")
        if not _is_shell(str(s["script"])):
            if s is build:
                raise GeneratorError(
                    f"{where}: its script is not a shell script and uses $(params.{image_param}); "
                    f"the remote Task needs the image name in env {var}: read it from there "
                    f"and generate again")
            continue          # left as it is: the input's rule violation is reported
        scripts[id(s)] = env_for_param(str(s["script"]), image_param, var, where)
    if env_value is None and image_param and any(id(s) in scripts for s in steps):
        ed.append(tenv, CommentedMap([("name", var), ("value", f"$(params.{image_param})")]))
        tenv_names.append(var)

    image_var = opts.image_var if opts.image_var in tenv_names + benv_names else None
    if image_var is None:
        warnings.append(f"no env {opts.image_var} in the build step: the built image is not "
                        "brought back and no IMAGE_APPEND_PLATFORM param is added "
                        "(--image-var names the variable)")
    elif APPEND_PARAM not in declared:
        ed.append(params, CommentedMap([
            ("name", APPEND_PARAM),
            ("type", "string"),
            ("default", DoubleQuotedScalarString("false")),
            ("description", f"Set to true to append the platform to the tag of {image_var} "
                            "(repo:tag becomes repo:tag-linux-arm64)."),
        ]))
    added_env = [contract.PLATFORM_PARAM] + ([APPEND_PARAM] if image_var else [])
    for n in added_env:
        if n not in tenv_names:
            ed.append(tenv, CommentedMap([("name", n), ("value", f"$(params.{n})")]))

    # --- the secret volume --------------------------------------------------------
    volumes = spec.get("volumes")
    if volumes is None:
        ed.set(spec, "volumes", volumes := CommentedSeq())
    vols = {v.get("name"): v for v in volumes}
    if SSH_VOLUME in vols:
        raise GeneratorError(f"the input already has a volume named {SSH_VOLUME}")
    ed.append(volumes, CommentedMap([
        ("name", SSH_VOLUME),
        ("secret", CommentedMap([
            ("secretName", contract.SECRET_PREFIX + "$(context.taskRun.name)"),
            ("optional", False),
        ])),
    ]))

    # --- what the build sees, copied to the host ---------------------------------
    dirs: list[tuple[str, str, str, str]] = []
    build_env = build.get("env")
    if build_env is None:
        ed.set(build, "env", build_env := CommentedSeq())
    ws_env: list[tuple[str, str]] = []
    for i, ws in enumerate(spec.get("workspaces") or []):
        var = f"MPC_WORKSPACE_{i}"
        ws_env.append((var, f"$(workspaces.{ws['name']}.path)"))
        ro = bool(ws.get("readOnly"))
        dirs.append(("$" + var, f"workspaces/{ws['name']}", "ro" if ro else "rw", "no" if ro else "yes"))
    mounts = list(template.get("volumeMounts") or []) + list(build.get("volumeMounts") or [])
    paths = {str(m.get("mountPath")) for m in mounts}
    if SSH_MOUNT in paths:
        raise GeneratorError(f"the build step already mounts something at {SSH_MOUNT}")
    for i, m in enumerate(mounts):
        mp = str(m.get("mountPath"))
        if mp == CONTAINER_STORAGE or mp.startswith(CONTAINER_STORAGE + "/"):
            continue   # container storage: the host container gets its own, empty
        kind = _mount_kind(vols, m.get("name"))
        ro = bool(m.get("readOnly")) or kind in READONLY_SOURCES
        dirs.append((mp, f"volumes/{i}-{m.get('name')}", "ro" if m.get("readOnly") else "rw",
                     "no" if ro else "yes"))

    forward = []
    for n in dict.fromkeys(tenv_names + benv_names):
        if not SHELL_ID.match(n):
            raise GeneratorError(f"env {n!r} of the build step is not a shell variable name; "
                                 "it cannot be passed to the remote build")
        forward.append(n)

    original = scripts.get(id(build), str(build["script"]))
    if info is not None:
        info["embedded"] = original
    # PRIVILEGED_NESTED: its value reaches the wrapper (not the build: it has its own env)
    nested = NESTED_PARAM in declared
    if nested and NESTED_ENV in tenv_names + benv_names:
        raise GeneratorError(f"the input already has an env {NESTED_ENV}")
    wrapper = wrapper_script(original=original, image_var=image_var, dirs=dirs,
                             forward_env=forward, podman_opts=_podman_opts(build),
                             append_platform=image_var is not None, privileged_nested=nested)
    if any(line != line.rstrip() for line in wrapper.splitlines()):
        # YAML block scalars keep them, but they make diffs unreadable
        warnings.append("the wrapper has lines ending in blanks (from the original script)")
    ed.set(build, "script", LiteralScalarString(wrapper))
    nested_env = [(NESTED_ENV, f"$(params.{NESTED_PARAM})")] if nested else []
    for var, value in [(BUILDER_IMAGE_ENV, build.get("image") or template.get("image")), *ws_env,
                       *nested_env]:
        if value is None:
            raise GeneratorError(f"build step {opts.build_step!r} has no image")
        ed.append(build_env, CommentedMap([("name", var), ("value", value)]))
    bmounts = build.get("volumeMounts")
    if bmounts is None:
        ed.set(build, "volumeMounts", bmounts := CommentedSeq())
    ed.append(bmounts, CommentedMap([("name", SSH_VOLUME), ("mountPath", SSH_MOUNT), ("readOnly", True)]))

    # --- the other steps: same as before, tagged per platform if asked ------------
    if image_var:
        snippet = append_platform_snippet(image_var)
        for s in steps:
            sc = scripts.get(id(s), s.get("script"))
            if s is build or sc is None:
                continue
            if str(sc).startswith("#!") and not taskcheck.SHELLS.match(str(sc)):
                if re.search(r"\b" + re.escape(image_var) + r"\b", str(sc)):
                    warnings.append(f"step {s.get('name')}: not a shell script; "
                                    f"{APPEND_PARAM} does not apply to it")
                continue
            if _uses_var(str(sc), image_var):
                sc = _insert_after_shebang(str(sc), snippet)
            if sc != s.get("script"):
                ed.set(s, "script", LiteralScalarString(sc))
    else:
        for s in steps:
            if id(s) in scripts and s is not build:
                ed.set(s, "script", LiteralScalarString(scripts[id(s)]))
    return warnings


def generate(text: str, opts: Options | None = None) -> Result:
    """The remote Task as YAML text, or GeneratorError naming what is wrong."""
    opts = opts or Options()
    y = _yaml()
    try:
        docs = [d for d in y.load_all(text) if d is not None]
    except Exception as e:  # ruamel raises many kinds
        raise GeneratorError(f"the input is not valid YAML: {e}") from None
    if len(docs) != 1:
        raise GeneratorError(f"the input must hold exactly one Task, it holds {len(docs)} documents")
    task = docs[0]
    # Rule violations the input brings along are reported, not blamed on the generator.
    before = set(taskcheck.check_task(task)) if isinstance(task, dict) else set()
    doc = Splicer(text, task) if isinstance(task, CommentedMap) else None
    info: dict = {}
    warnings = transform(task, opts, doc, info)
    try:
        text_out = doc.text()
    except SpliceError as e:
        raise GeneratorError(f"cannot write the changes into the input's text: {e}") from None
    # the original script as it runs on the host (with $(params.IMAGE) read from env)
    inherited = taskcheck.shellcheck(info["embedded"], f"step {opts.build_step} (original script)")
    after = taskcheck.check_task(_yaml().load(text_out))
    after += taskcheck.shellcheck(_template("buildah-remote-host.sh"), "host script")
    after += taskcheck.shellcheck(_template("buildah-remote-runner.sh"), "runner script")
    new = [e for e in after if e not in before]
    old = [e for e in after if e in before] + inherited
    if new or (opts.strict and old):
        raise GeneratorError("the generated Task breaks these rules:\n  "
                             + "\n  ".join(new + (old if opts.strict else [])))
    warnings += [f"the input already breaks a rule: {e}" for e in old]
    if opts.strict and warnings:
        raise GeneratorError("--strict: every warning is an error:\n  " + "\n  ".join(warnings))
    return Result(text_out, warnings)
