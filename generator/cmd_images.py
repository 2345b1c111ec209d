"""``mpc images build``: build mpc's images from their Containerfiles, push them, write a lock.

    mpc images prepare          # the inputs that need the network, cached ($MPC_CACHE/images)
    mpc images build --registry quay.io/acme/mpc --version 0.2 --lock dist/images.lock.yaml

See ``generator/images.py`` for how (offline, reproducible, nothing on this machine
changes). ``mpc bundles push/pin --images LOCK`` then point the Tasks and the
Deployment at the pushed digests.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

from . import images


def register(sub) -> None:
    p = sub.add_parser("images", help="build and push mpc's images (task runner, watcher)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    pr = s.add_parser("prepare", help="fetch what the build needs from the network (the "
                      "Debian base, the wheelhouse) into the cache; `build` then runs offline")
    pr.set_defaults(func=cmd_prepare)
    b = s.add_parser("build", help="build every image from its Containerfile and push it")
    b.add_argument("--registry", required=True, help="host[:port]/path, e.g. quay.io/acme/mpc")
    b.add_argument("--version", default="", help="tag (default: mpc's package version)")
    b.add_argument("--lock", type=Path, required=True, help="write the pushed refs here")
    b.add_argument("--base", default=None, help="base image instead of the debootstrapped "
                   "Debian bookworm (must have python3, python3-venv, openssh-client, "
                   "libnss-wrapper)")
    b.add_argument("--tls-verify", default="true", choices=["true", "false"],
                   help="verify the registry's TLS certificate (false: plain-HTTP registry)")
    b.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    t0 = time.monotonic()
    version = args.version or importlib.metadata.version("mpc")
    try:
        refs = images.build_and_push(args.registry, version, args.tls_verify == "true",
                                     base=args.base)
    except images.ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    images.write_lock(args.lock, refs)
    for name, ref in refs.items():
        print(f"{name:12} {ref}")
    print(f"wrote {args.lock} ({time.monotonic() - t0:.1f}s)")
    return 0


def cmd_prepare(_args) -> int:
    try:
        print(images.base_tarball())
        print(images.wheelhouse())
    except images.ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
