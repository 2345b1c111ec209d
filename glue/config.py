"""Command-line flags, each with an environment-variable fallback."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from mpc.runner import contract as c

from .objects import DEFAULT_NAMESPACE

DESCRIPTION = """\
mpc-glue: the small controller that connects Tekton build TaskRuns to mpc's
provisioning Pipelines.

It watches every TaskRun in the cluster. A TaskRun is a *build* when it has a
PLATFORM param (or its Task has a default for it) and mounts a secret whose
name starts with "multi-platform-ssh-". For each build it:

  1. adds the finalizer build.mpc.dev/provisioner,
  2. starts PipelineRun mpc-provision-<taskrun uid> (Pipeline "mpc-provision")
     in the controller namespace; that run allocates a host and writes the
     build's secret (or a secret with an "error" key),
  3. when the build finishes or is deleted: cancels a provisioning run still
     in flight, starts mpc-deprovision-<uid>, then removes the finalizer.

It also deletes its finished runs (successful ones at once, failed ones after
--retention), starts the "mpc-sweep" Task every --sweep-interval, and serves
Prometheus metrics, /healthz and /readyz on --metrics-port.

The watcher never reads or writes Secrets: the Pipelines run as the
ServiceAccount "mpc-tasks", which may. Every decision is recomputed from the
API objects, so it is safe to restart at any time.

Durations accept plain seconds or a unit: 90s, 30m, 1h.
Every flag can also be set through the environment variable shown.
"""


def duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 10m, 1h)")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


@dataclass
class Config:
    namespace: str = DEFAULT_NAMESPACE
    kubeconfig: str | None = None
    watch_namespaces: list[str] = field(default_factory=list)
    workers: int = 4
    retention: float = 3600.0
    gc_interval: float = 60.0
    sweep_interval: float = 1800.0
    cancel_grace: float = 60.0
    unresolved_pause: float = 5.0
    resync_period: float = 3600.0
    watch_timeout: int = 300
    page_size: int = 100
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8080
    log_level: str = "info"
    tasks_service_account: str = c.TASKS_SERVICE_ACCOUNT
    pool_configmap: str = c.HOST_POOL_CONFIGMAP
    instance: str = "mpc-glue"
    pipeline_bundle: str | None = None
    sweep_bundle: str | None = None
    leader_elect: bool = False
    leader_lease: str = "mpc-glue-leader"
    lease_duration: float = 10.0
    renew_deadline: float = 7.0
    retry_period: float = 2.0
    crash_after: str | None = None  # test hook, see main.py


def _env(name: str, default):
    return os.environ.get(name, default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpc-glue", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()

    def add(flag, env, help, **kw):
        default = kw.pop("default")
        p.add_argument(flag, default=_env(env, default),
                       help=f"{help} [env {env}; default: %(default)s]", **kw)

    add("--namespace", "MPC_GLUE_NAMESPACE",
        "controller namespace: where the Pipelines, PipelineRuns and host pool live "
        "(falls back to $POD_NAMESPACE)",
        default=os.environ.get("POD_NAMESPACE", d.namespace))
    add("--kubeconfig", "KUBECONFIG",
        "kubeconfig file; unset inside a pod to use its ServiceAccount", default=None)
    p.add_argument("--watch-namespace", action="append", dest="watch_namespaces",
                   default=[n for n in _env("MPC_GLUE_WATCH_NAMESPACES", "").split(",") if n],
                   help="watch only this namespace for build TaskRuns (repeatable); default: "
                        "all namespaces [env MPC_GLUE_WATCH_NAMESPACES, comma-separated]")
    add("--workers", "MPC_GLUE_WORKERS", "builds handled in parallel (one at a time per build)",
        default=d.workers, type=int)
    add("--retention", "MPC_GLUE_RETENTION",
        "keep failed provisioning/deprovisioning/sweep runs this long so their logs can be read",
        default="1h", type=duration)
    add("--gc-interval", "MPC_GLUE_GC_INTERVAL", "how often to look for finished runs to delete",
        default="60s", type=duration)
    add("--sweep-interval", "MPC_GLUE_SWEEP_INTERVAL",
        "how often to start the mpc-sweep Task (0 disables it)", default="30m", type=duration)
    add("--cancel-grace", "MPC_GLUE_CANCEL_GRACE",
        "after cancelling a provisioning run, wait at most this long for it to stop before "
        "deprovisioning anyway", default="60s", type=duration)
    add("--unresolved-pause", "MPC_GLUE_UNRESOLVED_PAUSE",
        "a run Tekton could not resolve (bundle registry or API server unreachable) is made "
        "again after this pause, then 3x and 9x it (4 attempts in all)",
        default="5s", type=duration)
    add("--resync-period", "MPC_GLUE_RESYNC_PERIOD",
        "re-list all TaskRuns this often as a safety net (0: only when a watch expires)",
        default="1h", type=duration)
    add("--watch-timeout", "MPC_GLUE_WATCH_TIMEOUT",
        "seconds before a watch is closed and resumed", default=d.watch_timeout, type=int)
    add("--page-size", "MPC_GLUE_PAGE_SIZE", "objects per LIST page (memory vs. round trips)",
        default=d.page_size, type=int)
    add("--metrics-address", "MPC_GLUE_METRICS_ADDRESS", "address for /metrics, /healthz, /readyz",
        default=d.metrics_address)
    add("--metrics-port", "MPC_GLUE_METRICS_PORT", "port for /metrics, /healthz, /readyz "
        "(0: pick a free port and log it)", default=d.metrics_port, type=int)
    add("--log-level", "MPC_GLUE_LOG_LEVEL", "debug, info, warning or error",
        default=d.log_level, choices=["debug", "info", "warning", "error"])
    add("--tasks-service-account", "MPC_GLUE_TASKS_SERVICE_ACCOUNT",
        "ServiceAccount the provisioning runs use (it writes the secrets)",
        default=d.tasks_service_account)
    add("--pool-configmap", "MPC_GLUE_POOL_CONFIGMAP",
        f"host pool ConfigMap (key {c.POOL_KEY}); Konflux's flat '{c.KONFLUX_CONFIGMAP}' "
        "is read when it is absent", default=d.pool_configmap)
    add("--instance", "POD_NAME", "name of this instance in Events", default=d.instance)
    add("--pipeline-bundle", "MPC_GLUE_PIPELINE_BUNDLE",
        "Tekton bundle holding the mpc-provision and mpc-deprovision Pipelines (a pinned "
        "ref, e.g. quay.io/acme/mpc/pipeline-mpc-provisioning:0.1@sha256:...); unset: use "
        "the Pipelines installed in the controller namespace", default=d.pipeline_bundle)
    add("--sweep-bundle", "MPC_GLUE_SWEEP_BUNDLE",
        "Tekton bundle holding the mpc-sweep Task; unset: the Task installed in the "
        "controller namespace", default=d.sweep_bundle)
    add("--leader-elect", "MPC_GLUE_LEADER_ELECT",
        "run as one of several replicas: only the holder of the Lease --leader-lease in the "
        "controller namespace works (the official client's leader election, glue/leader.py)", default=d.leader_elect,
        type=lambda v: str(v).lower() in ("1", "true", "yes"), nargs="?", const=True)
    add("--leader-lease", "MPC_GLUE_LEADER_LEASE", "name of the leader election Lease",
        default=d.leader_lease)
    add("--lease-duration", "MPC_GLUE_LEASE_DURATION",
        "a standby takes over this long after the leader last renewed", default="10s",
        type=duration)
    add("--renew-deadline", "MPC_GLUE_RENEW_DEADLINE",
        "the leader stops (and exits) when it could not renew for this long", default="7s",
        type=duration)
    add("--retry-period", "MPC_GLUE_RETRY_PERIOD",
        "how often the leader renews and a standby tries", default="2s", type=duration)
    p.add_argument("--crash-after", default=_env("MPC_GLUE_CRASH_AFTER", None),
                   help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> Config:
    a = parser().parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(a).items()})
    if isinstance(cfg.leader_elect, str):
        cfg.leader_elect = cfg.leader_elect.lower() in ("1", "true", "yes")
    for k in ("retention", "gc_interval", "sweep_interval", "cancel_grace", "unresolved_pause",
              "resync_period",
              "lease_duration", "renew_deadline", "retry_period"):
        v = getattr(cfg, k)
        if isinstance(v, str):  # came from the environment: argparse does not convert defaults
            setattr(cfg, k, duration(v))
    for k in ("workers", "watch_timeout", "page_size", "metrics_port"):
        setattr(cfg, k, int(getattr(cfg, k)))
    if cfg.workers < 1:
        raise SystemExit("mpc-glue: --workers must be at least 1")
    if cfg.leader_elect and not (1 <= cfg.retry_period and 1.2 * cfg.retry_period
                                 < cfg.renew_deadline < cfg.lease_duration):
        raise SystemExit("mpc-glue: need 1s <= --retry-period, 1.2 x --retry-period < "
                         "--renew-deadline < --lease-duration (whole seconds)")
    return cfg
