"""``mpc buildah-remote``: generate the remote variant of a buildah Task."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import buildah_remote as br

HELP = "turn a buildah Task into buildah-remote (the build runs on a host of PLATFORM)"

DESCRIPTION = f"""\
Read a Tekton Task that builds an image (tekton.dev/v1 or v1beta1: your own,
the Tekton catalog's or Konflux's buildah) and write a Task that runs the same
build on a remote host of another platform, which mpc provisions per TaskRun.

What changes (everything else is kept as the input writes it: a diff between
input and output shows only these changes; new items take the input's
indentation):
  * name: buildah -> buildah-remote (buildah-oci-ta -> buildah-remote-oci-ta)
  * new params: PLATFORM (required) and IMAGE_APPEND_PLATFORM (default "false":
    "true" turns the image tag into <tag>-<platform>)
  * new volume {br.SSH_VOLUME}: secret {br.contract.SECRET_PREFIX}$(context.taskRun.name),
    not optional (the pod waits for mpc), mounted read-only at {br.SSH_MOUNT} in the build
    step only. Keys: id_rsa, host (user@address or "localhost"), user-dir,
    known_hosts; or only error.
  * $(params.IMAGE) in a shell script is read from env IMAGE instead (added to
    stepTemplate when missing), quoted to be the same word; in a here-document
    with a quoted delimiter it is an error (use $IMAGE there).
  * the build step's script becomes a wrapper. It fails at once with the
    secret's error; for host "localhost" it runs the original script in the pod;
    otherwise it copies the workspaces, the step's volumes, Tekton's /workspace
    directory and /tekton/results to the host with rsync over SSH (host key
    pinned when known_hosts is given; registry credentials never: the host
    pulls through a pull-only proxy in the pod, forwarded over SSH), runs the
    ORIGINAL script unchanged in `podman run` of the step's image there (same
    env, each value quoted; same mount paths, args, user, working directory,
    capabilities), copies back the workspaces, writable volumes, /workspace
    and results, and loads the built image (env IMAGE) as an OCI layout into
    the pod's container storage (a Docker-format image as a docker archive,
    so it stays Docker-format), so later steps (push, SBOM) run unchanged in
    the pod. An image the build saved itself as an OCI layout in a directory
    that comes back is loaded from there (it crosses the network once).
  * a Task with a PRIVILEGED_NESTED param (Konflux's buildah 0.2 on): when the
    TaskRun sets it to "true", the builder container on the host runs
    --privileged (all capabilities and devices, /dev/fuse, no SELinux label)
    with /var/tmp bind-mounted from the build's directory on the host.
  * a proxy env (BUILDAH_HTTP_PROXY, HTTP(S)_PROXY, ALL_PROXY, ...) naming a
    host only the cluster resolves (*.svc, *.cluster.local, a name the build
    host cannot resolve) is not passed to the build host, nor the NO_PROXY
    that goes with it; the step log says so.
The output is checked (step names, params, no $(params.*) in scripts, #!,
ShellCheck). On an error nothing is written and the exit code is 1; with
--strict every warning is an error too.

example:
  mpc buildah-remote --from tasks/buildah/0.1/buildah.yaml \\
      --out tasks/buildah-remote/0.1/buildah-remote.yaml
"""


def register(sub) -> None:
    p = sub.add_parser("buildah-remote", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, metavar="FILE",
                   help="the buildah Task to read ('-' for stdin)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="where to write the remote Task ('-' for stdout); written only on success")
    p.add_argument("--build-step", default="build", metavar="NAME",
                   help="the step that builds and runs remotely (default: build)")
    p.add_argument("--image-var", default="IMAGE", metavar="VAR",
                   help="the env variable naming the built image (default: IMAGE)")
    p.add_argument("--name", help="the new Task's name (default: buildah -> buildah-remote)")
    p.add_argument("--strict", action="store_true",
                   help="every warning is an error (rule violations the input already has, "
                        "no image to bring back, ...): exit 1 and write nothing")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if FILE differs from what would be generated")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        text = sys.stdin.read() if args.src == "-" else Path(args.src).read_text()
    except OSError as e:
        print(f"mpc buildah-remote: cannot read {args.src}: {e.strerror}", file=sys.stderr)
        return 1
    opts = br.Options(build_step=args.build_step, image_var=args.image_var, name=args.name,
                      strict=args.strict)
    try:
        result = br.generate(text, opts)
    except br.GeneratorError as e:
        print(f"mpc buildah-remote: {args.src}: {e}", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(f"mpc buildah-remote: warning: {w}", file=sys.stderr)
    if args.out == "-":
        sys.stdout.write(result.text)
        return 0
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != result.text:
            print(f"mpc buildah-remote: {out} is not what {args.src} generates; regenerate it",
                  file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(result.text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 0
