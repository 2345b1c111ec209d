"""``mpc bundles``: check, push, pin and show the Tekton bundles mpc ships.

    mpc bundles check                       declaration vs catalog, resolver rules
    mpc bundles push --registry R --version V [--lock FILE]
    mpc bundles run [--registry R]          the whole product in one go (make run)
    mpc bundles pin --lock FILE [--out DIR | --in-place] PATH...
    mpc bundles check-pinned PATH...
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

from . import images
from .bundles import BundleError, check_refs, load
from .bundles_pin import pin_files, unpinned
from .bundles_push import BuildInfo, find_tkn, list_bundle, push, read_lock, table, write_lock
from .bundles_registry import LocalRegistry, read_layers

# The generators of the checked-in Tasks, as `mpc` sub-commands; `{tasks}` is
# the catalog directory. `mpc bundles run` runs each one that is registered
# with `--check`: the generator runs in full and a checked-in file that
# differs from its output is an error.
GENERATORS = (
    ("generate", "--out", "{tasks}"),
    ("buildah-remote", "--from", "{tasks}/buildah/0.1/buildah.yaml",
     "--out", "{tasks}/buildah-remote/0.1/buildah-remote.yaml"),
)

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=Path("bundles/bundles.yaml"),
                   help="bundle declaration (default: %(default)s)")
    p.add_argument("--tasks", type=Path, default=Path("tasks"),
                   help="catalog scanned for Tekton objects (default: %(default)s)")


def _push_opts(p: argparse.ArgumentParser, registry_required: bool) -> None:
    p.add_argument("--registry", required=registry_required, default="",
                   help="host[:port]/path the bundles go under, e.g. quay.io/acme/mpc")
    p.add_argument("--version", default="", help="tag for every bundle (e.g. 0.1)")
    p.add_argument("--lock", type=Path, help="write the pushed refs and digests here")
    p.add_argument("--ctime", default="", help="creation time (RFC 3339); default "
                   "SOURCE_DATE_EPOCH, else the time of the last commit of each bundle's files")
    p.add_argument("--source", default="", help="org.opencontainers.image.source "
                   "(default: git remote origin, else the declaration's `source`)")
    p.add_argument("--revision", default="", help="org.opencontainers.image.revision "
                   "(default: the last commit of each bundle's files, -dirty if they changed since)")
    p.add_argument("--tkn", default=None, help="tkn binary (default: $MPC_CACHE/bin/tekton/tkn, "
                   "else PATH)")
    p.add_argument("--images", type=Path, default=None,
                   help="image lock written by `mpc images build`: Task steps naming mpc's "
                        "images are pinned to the pushed digests")


def register(sub) -> None:
    p = sub.add_parser("bundles", help="check, push and pin the Tekton bundles",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="bundles_command", metavar="ACTION", required=True)

    c = s.add_parser("check", help="check the declaration against the catalog and the resolver rules")
    _common(c)
    c.set_defaults(func=cmd_check)

    c = s.add_parser("push", help="push every bundle with tkn and print refs with digests")
    _common(c)
    _push_opts(c, registry_required=True)
    c.set_defaults(func=cmd_push)

    c = s.add_parser("run", help="generate and validate the Tasks, push every bundle "
                     "(to an embedded loopback registry unless --registry) and list it")
    _common(c)
    _push_opts(c, registry_required=False)
    c.add_argument("--no-generate", action="store_true", help="skip the Task generator")
    c.add_argument("--no-images", action="store_true",
                   help="do not build and push mpc's images (Task steps keep their placeholder)")
    c.set_defaults(func=cmd_run)

    c = s.add_parser("pin", help="rewrite `resolver: bundles` references to pinned digests")
    c.add_argument("--lock", type=Path, required=True, help="lock file written by `push`")
    c.add_argument("--base", type=Path, default=Path("."), help="paths in --out are relative to this")
    c.add_argument("--images", type=Path, default=None,
                   help="image lock written by `mpc images build`: pin mpc's images too")
    c.add_argument("--complete", action="store_true",
                   help="with --out: copy unchanged YAML files too (a tree kustomize can build)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write pinned copies here (same relative paths)")
    g.add_argument("--in-place", action="store_true", help="rewrite the files themselves")
    c.add_argument("paths", nargs="+", type=Path)
    c.set_defaults(func=cmd_pin)

    c = s.add_parser("check-pinned", help="fail unless every `resolver: bundles` reference "
                     "is repo:tag@sha256:... (and, with --lock, nothing we ship is named on the cluster)")
    c.add_argument("--lock", type=Path, help="lock file: refs must be exactly these")
    c.add_argument("paths", nargs="+", type=Path)
    c.set_defaults(func=cmd_check_pinned)


def _err(e: Exception) -> int:
    msg = e.problems if isinstance(e, BundleError) else [str(e)]
    print("error:", file=sys.stderr)
    for m in msg:
        print(f"  - {m}", file=sys.stderr)
    return 1


def _load(args):
    spec = load(args.spec, args.tasks)
    problems = check_refs(spec)
    if problems:
        raise BundleError(problems)
    return spec


def cmd_check(args) -> int:
    try:
        spec = _load(args)
    except BundleError as e:
        return _err(e)
    for b in spec.bundles:
        print(f"{b.name}: " + ", ".join(f"{o.key} ({o.path})" for o in b.resolved))
    print(f"ok: {len(spec.bundles)} bundles, "
          f"{sum(len(b.resolved) for b in spec.bundles)} objects")
    return 0


def _info(args, spec) -> BuildInfo:
    version = args.version or importlib.metadata.version("mpc")
    return BuildInfo.detect(Path("."), version, source=args.source, revision=args.revision,
                            ctime=args.ctime, default_source=spec.source)


def cmd_push(args) -> int:
    try:
        spec = _load(args)
        info = _info(args, spec)
        imgs = images.read_lock(args.images) if args.images else None
        result = push(spec, args.registry, info, tkn=args.tkn, images=imgs)
    except (BundleError, FileNotFoundError, images.ImageError) as e:
        return _err(e)
    if args.lock:
        write_lock(args.lock, result)
        print(f"wrote {args.lock}")
    print(table(result))
    return 0


def _generate(tasks: Path) -> None:
    """Run every registered Task generator in --check mode (stale checked-in YAML fails)."""
    from . import cli
    parser = cli.parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ran = 0
    for gen in GENERATORS:
        name, rest = gen[0], [a.format(tasks=tasks) for a in gen[1:]]
        if name not in sub.choices:
            continue
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}
        argv = [name, *rest] + (["--check"] if "--check" in flags else [])
        print(f"== mpc {' '.join(argv)}")
        rc = cli.main(argv)
        if rc:
            raise BundleError(f"`mpc {' '.join(argv)}` failed (exit {rc}): regenerate and commit")
        ran += 1
    if not ran:
        print("== no Task generator registered in mpc's CLI: validating the checked-in Tasks")


def _validate(spec) -> None:
    """The project's Task rules (taskcheck: scripts, params via env, ShellCheck) on every Task."""
    try:
        from .taskcheck import check_task
    except ImportError:          # the checker is optional; tkn still decodes everything
        return
    problems = []
    for b in spec.bundles:
        for o in b.resolved:
            if o.kind == "Task":
                problems += [f"{o.path}: {e}" for e in check_task(o.body)]
    if problems:
        raise BundleError(problems)


def cmd_run(args) -> int:
    t0 = time.monotonic()
    try:
        find_tkn(args.tkn)
        if not args.no_generate:
            _generate(args.tasks)
        print(f"== validating {args.tasks}/ against {args.spec}")
        spec = _load(args)
        _validate(spec)
        n = sum(len(b.resolved) for b in spec.bundles)
        print(f"   {len(spec.bundles)} bundles, {n} Tekton objects: every object listed once, "
              "resolver rules and Task rules (taskcheck) hold")
        info = _info(args, spec)
        if args.registry:
            return _run_push(args, spec, info, args.registry, t0, local=False)
        with LocalRegistry() as reg:
            print(f"== embedded registry on {reg.address} (stopped when done)")
            return _run_push(args, spec, info, f"{reg.address}/mpc", t0, local=True)
    except (BundleError, OSError, RuntimeError, ValueError) as e:   # ImageError is a RuntimeError
        return _err(e)


def _run_push(args, spec, info, registry, t0, local: bool) -> int:
    when = info.created or "last commit of its files"
    print(f"== tkn bundle push -> {registry}  (version {info.version}, HEAD {info.head()[:12]}, "
          f"created: {when})")
    t_push = time.monotonic()
    imgs = images.read_lock(args.images) if args.images else None
    if imgs is None and not args.no_images:
        print(f"== mpc images build -> {registry}  (from tasks/runner/Containerfile, "
              "glue/Containerfile; offline, reproducible)")
        t_img = time.monotonic()
        built = images.build_and_push(registry, info.version, tls_verify=not local,
                                      log=lambda m: print("   " + m))
        imgs = {images.IMAGES[n][1]: ref for n, ref in built.items()}
        print(f"   {len(built)} images in {time.monotonic() - t_img:.1f}s")
    result = push(spec, registry, info, tkn=args.tkn, log=lambda m: print("   " + m),
                  images=imgs)
    pushed_s = time.monotonic() - t_push
    listing = {}
    for p in result.pushed:
        listing[p.bundle] = list_bundle(p.ref, args.tkn)
        if local:   # read every layer back over the registry API: what the resolver would get
            manifest, layers = read_layers(p.ref)
            names = [lay.annotations.get("dev.tekton.image.name") for lay in layers]
            if len(layers) != len(p.objects) or sorted(names) != sorted(o.split("/")[1] for o in p.objects):
                raise BundleError(f"{p.ref}: registry holds {names}, expected {p.objects}")
    if args.lock:
        write_lock(args.lock, result)
        print(f"wrote {args.lock}")
    print("== pushed (tkn bundle list):")
    print(table(result, listing))
    print(f"== {len(result.pushed)} bundles pushed in {pushed_s:.1f}s; whole run {time.monotonic() - t0:.1f}s")
    return 0


def cmd_pin(args) -> int:
    try:
        pins = read_lock(args.lock)
        if args.images:
            pins.images = images.read_lock(args.images)
        changes = pin_files(args.paths, pins, args.base, None if args.in_place else args.out,
                            copy_unchanged=args.complete)
    except (BundleError, images.ImageError) as e:
        return _err(e)
    for ch in changes:
        print(f"{ch.path}: {ch.where}: {ch.old} -> {ch.new}")
    where = "in place" if args.in_place else f"into {args.out}"
    print(f"pinned {len(changes)} references {where}")
    return 0


def cmd_check_pinned(args) -> int:
    try:
        pins = read_lock(args.lock) if args.lock else None
    except BundleError as e:
        return _err(e)
    bad = unpinned(args.paths, pins)
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        return 1
    print("ok: every `resolver: bundles` reference is pinned")
    return 0
