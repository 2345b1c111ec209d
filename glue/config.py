"""Command-line flags, each with an environment-variable fallback."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields

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


def boolean(text) -> bool:
    return str(text).lower() in ("1", "true", "yes")


def opt(env: str, help: str, default=None, type=str, **argparse_kw):
    """A flag: its environment variable, help, default and type, declared once."""
    value = type(default) if isinstance(default, str) and type is not str else default
    return field(default=value, metadata=dict(env=env, help=help, type=type, kw=argparse_kw,
                                              shown=default))


@dataclass
class Config:
    namespace: str = opt("MPC_GLUE_NAMESPACE", "controller namespace: where the Pipelines, "
                         "PipelineRuns and host pool live (falls back to $POD_NAMESPACE)",
                         DEFAULT_NAMESPACE)
    kubeconfig: str | None = opt("KUBECONFIG", "kubeconfig file; unset inside a pod to use "
                                 "its ServiceAccount")
    watch_namespaces: list = opt("MPC_GLUE_WATCH_NAMESPACES", "watch only this namespace "
                                 "for build TaskRuns (repeatable; env: comma-separated); "
                                 "default: all namespaces", (), flag="--watch-namespace")
    workers: int = opt("MPC_GLUE_WORKERS", "builds handled in parallel (one at a time per "
                       "build)", 4, int)
    retention: float = opt("MPC_GLUE_RETENTION", "keep failed provisioning/deprovisioning/"
                           "sweep runs this long so their logs can be read", "1h", duration)
    gc_interval: float = opt("MPC_GLUE_GC_INTERVAL", "how often to look for finished runs "
                             "to delete", "60s", duration)
    sweep_interval: float = opt("MPC_GLUE_SWEEP_INTERVAL", "how often to start the mpc-sweep "
                                "Task (0 disables it)", "30m", duration)
    cancel_grace: float = opt("MPC_GLUE_CANCEL_GRACE", "after cancelling a provisioning run, "
                              "wait at most this long for it to stop before deprovisioning "
                              "anyway", "60s", duration)
    unresolved_pause: float = opt("MPC_GLUE_UNRESOLVED_PAUSE", "a run Tekton could not "
                                  "resolve (bundle registry or API server unreachable) is "
                                  "made again after this pause, then 3x and 9x it (4 attempts "
                                  "in all)", "5s", duration)
    resync_period: float = opt("MPC_GLUE_RESYNC_PERIOD", "re-list all TaskRuns this often as "
                               "a safety net (0: only when a watch expires)", "1h", duration)
    watch_timeout: int = opt("MPC_GLUE_WATCH_TIMEOUT", "seconds before a watch is closed and "
                             "resumed", 300, int)
    page_size: int = opt("MPC_GLUE_PAGE_SIZE", "objects per LIST page (memory vs. round "
                         "trips)", 100, int)
    metrics_address: str = opt("MPC_GLUE_METRICS_ADDRESS", "address for /metrics, /healthz, "
                               "/readyz", "0.0.0.0")
    metrics_port: int = opt("MPC_GLUE_METRICS_PORT", "port for /metrics, /healthz, /readyz "
                            "(0: pick a free port and log it)", 8080, int)
    log_level: str = opt("MPC_GLUE_LOG_LEVEL", "debug, info, warning or error", "info",
                         choices=["debug", "info", "warning", "error"])
    tasks_service_account: str = opt("MPC_GLUE_TASKS_SERVICE_ACCOUNT", "ServiceAccount the "
                                     "provisioning runs use (it writes the secrets)",
                                     c.TASKS_SERVICE_ACCOUNT)
    pool_configmap: str = opt("MPC_GLUE_POOL_CONFIGMAP", f"host pool ConfigMap (key "
                              f"{c.POOL_KEY}); Konflux's flat '{c.KONFLUX_CONFIGMAP}' is read "
                              "when it is absent", c.HOST_POOL_CONFIGMAP)
    instance: str = opt("POD_NAME", "name of this instance in Events", "mpc-glue")
    pipeline_bundle: str | None = opt(
        "MPC_GLUE_PIPELINE_BUNDLE", "Tekton bundle holding the mpc-provision and "
        "mpc-deprovision Pipelines (a pinned ref, e.g. quay.io/acme/mpc/pipeline-mpc-"
        "provisioning:0.1@sha256:...); unset: use the Pipelines installed in the controller "
        "namespace")
    sweep_bundle: str | None = opt("MPC_GLUE_SWEEP_BUNDLE", "Tekton bundle holding the "
                                   "mpc-sweep Task; unset: the Task installed in the "
                                   "controller namespace")
    leader_elect: bool = opt("MPC_GLUE_LEADER_ELECT", "run as one of several replicas: only "
                             "the holder of the Lease --leader-lease in the controller "
                             "namespace works (the official client's leader election, "
                             "glue/leader.py)", False, boolean, nargs="?", const=True)
    leader_lease: str = opt("MPC_GLUE_LEADER_LEASE", "name of the leader election Lease",
                            "mpc-glue-leader")
    lease_duration: float = opt("MPC_GLUE_LEASE_DURATION", "a standby takes over this long "
                                "after the leader last renewed", "10s", duration)
    renew_deadline: float = opt("MPC_GLUE_RENEW_DEADLINE", "the leader stops (and exits) "
                                "when it could not renew for this long", "7s", duration)
    retry_period: float = opt("MPC_GLUE_RETRY_PERIOD", "how often the leader renews and a "
                              "standby tries", "2s", duration)
    crash_after: str | None = opt("MPC_GLUE_CRASH_AFTER", argparse.SUPPRESS)  # test hook,
                                                                             # see reconcile.py


def parser(environ=os.environ) -> argparse.ArgumentParser:
    """Each flag's default is its environment variable's value, if set, else its own."""
    p = argparse.ArgumentParser(prog="mpc-glue", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        md, kw = f.metadata, dict(f.metadata["kw"])
        env = environ.get(md["env"])
        if f.name == "namespace":
            env = env or environ.get("POD_NAMESPACE")
        if f.name == "watch_namespaces":
            kw.update(action="append", default=[n for n in (env or "").split(",") if n])
        else:
            try:            # argparse converts a default itself, but would blame the flag
                md["type"](env) if env is not None else None
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"mpc-glue: {md['env']}={env!r}: {e}") from None
            kw.update(type=md["type"], default=env if env is not None else f.default)
        help = md["help"] if md["help"] == argparse.SUPPRESS else \
            f"{md['help']} [env {md['env']}; default: {md['shown']}]"
        p.add_argument(kw.pop("flag", "--" + f.name.replace("_", "-")), dest=f.name,
                       help=help, **kw)
    return p


def parse(argv: list[str] | None = None, environ=os.environ) -> Config:
    """Flags win over their environment variables, which win over the defaults."""
    cfg = Config(**vars(parser(environ).parse_args(argv)))
    if cfg.workers < 1:
        raise SystemExit("mpc-glue: --workers must be at least 1")
    if cfg.leader_elect and not (1 <= cfg.retry_period and 1.2 * cfg.retry_period
                                 < cfg.renew_deadline < cfg.lease_duration):
        raise SystemExit("mpc-glue: need 1s <= --retry-period, 1.2 x --retry-period < "
                         "--renew-deadline < --lease-duration (whole seconds)")
    return cfg
