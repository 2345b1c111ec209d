"""The ``mpc`` command line: one sub-command per ``cmd_*`` module.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which
adds its sub-parser and sets ``func`` to a callable taking the parsed
arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "cmd_generate",
    "cmd_hostpool",
    "cmd_bundles",
    "cmd_images",
    "cmd_buildah_remote",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpc",
        description="mpc: hand remote build hosts of other platforms to Tekton TaskRuns. "
                    "These sub-commands generate and check the Tasks mpc ships.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mpc.generator.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
