"""``mpc generate``: write the provisioning Tasks, Pipelines and RBAC into tasks/."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import emit, provisioning, taskcheck

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "tasks"


def run(args: argparse.Namespace) -> int:
    docs = provisioning.documents(image=args.runner_image, namespace=args.namespace)
    problems = [p for d in docs if isinstance(d.content, dict) and d.content.get("kind") == "Task"
                for p in taskcheck.check_task(d.content)]
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    differ = emit.write_all(Path(args.out), docs, "provisioning.py", check=args.check)
    if args.check:
        for p in differ:
            print(f"out of date: {Path(args.out) / p} (run `mpc generate`)", file=sys.stderr)
        return 1 if differ else 0
    for p in differ:
        print(f"wrote {Path(args.out) / p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate the provisioning Tasks and Pipelines into tasks/",
        description="Generate mpc's own Tekton Tasks (mpc-provision, mpc-error-secret, "
                    "mpc-deprovision, mpc-sweep), the provisioning and deprovisioning "
                    "Pipelines, their READMEs and the RBAC of the account they run as.")
    p.add_argument("--out", default=str(DEFAULT_ROOT), help="tasks directory (default: %(default)s)")
    p.add_argument("--runner-image", default=provisioning.RUNNER_IMAGE,
                   help="task-runner image the steps use (default: %(default)s)")
    p.add_argument("--namespace", default="mpc",
                   help="controller namespace for the RBAC objects (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if any generated file is out of date")
    p.set_defaults(func=run)
