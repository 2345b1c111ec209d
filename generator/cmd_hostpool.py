"""``mpc hostpool validate``: check a host pool file and print every error with its path."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mpc.runner import hostpool


def validate(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text()
    except OSError as e:
        print(f"{args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        print(f"{args.file}: $: not valid YAML: {e}", file=sys.stderr)
        return 1
    # A ConfigMap manifest: validate its data (pool.yaml, or Konflux flat keys).
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        try:
            pool = hostpool.from_configmap_data(args.file, doc.get("data"))
        except hostpool.PoolError as e:
            for m in e.errors:
                print(f"{args.file}: {m}", file=sys.stderr)
            return 1
    else:
        errors = hostpool.validate(doc)
        if errors:
            for m in errors:
                print(f"{args.file}: {m}", file=sys.stderr)
            return 1
        pool = hostpool.from_document(doc)
    # Read but ignored (Konflux keys mpc has no use for): said, but not an error.
    for m in pool.warnings:
        print(f"{args.file}: warning: {m}", file=sys.stderr)
    slots = sum(h.concurrency for h in pool.hosts)
    vms = sum(d.max_instances for d in pool.dynamic)
    dynamic = f", {len(pool.dynamic)} dynamic platforms (up to {vms} VMs)" if pool.dynamic else ""
    print(f"{args.file}: valid: {len(pool.hosts)} hosts, {slots} slots{dynamic}, platforms: "
          f"{', '.join(pool.platforms) or 'none'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("hostpool", help="work with host pool files")
    hs = p.add_subparsers(dest="hostpool_command", metavar="ACTION", required=True)
    v = hs.add_parser("validate", help="validate a host pool (YAML or ConfigMap manifest)",
                      description="Validate a host pool against mpc's JSON Schema. FILE is "
                                  "either the pool YAML or a ConfigMap manifest holding it "
                                  "(key pool.yaml, or Konflux's flat host.<name>.* keys). "
                                  "Every error is printed with its path; exit 1 if any. "
                                  "Konflux keys for dynamic (cloud) hosts are ignored: "
                                  "they are printed as warnings and do not fail.")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=validate)
