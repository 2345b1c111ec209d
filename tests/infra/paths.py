"""Where cached upstream binaries, rootfs tarballs and scratch state live."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Cache shared between runs and clones (binaries, rootfs); never in git."""
    return Path(os.environ.get("MPC_CACHE", Path.home() / ".cache" / "mpc"))


def kubernetes_bin() -> Path:
    return cache_dir() / "bin" / "kubernetes"


def tekton_bin() -> Path:
    return cache_dir() / "bin" / "tekton"


def tekton_config() -> Path:
    """Tekton's release config (CRDs, RBAC, webhooks) copied out of the pinned module."""
    return tekton_bin() / "config"


def tool(name: str) -> str:
    """Absolute path of a cached upstream binary, with a hint when missing."""
    for d in (kubernetes_bin(), tekton_bin()):
        p = d / name
        if p.exists():
            return str(p)
    raise FileNotFoundError(
        f"{name} is not built; run `make upstream` (cache: {cache_dir()})")
