"""The fault-injection soak of issue 11: many builds on the real node while things break.

mpc is installed as released (the session fixture ``mpc``: ``make release``, the
watcher Deployment as shipped, the Pipelines from their bundles). Three SSH hosts
of their own (concurrency 2, 2, 1) are added to the pool under platform
``linux/amd64``. N builds (``MPC_SOAK_BUILDS``: 12 in ``make test``, about three
minutes on 2 cores; ``make soak`` runs 500) are started in waves of ``MPC_SOAK_WAVE``. A build is a TaskRun of a
tiny Task the watcher recognises as a build (a PLATFORM param, the secret
``multi-platform-ssh-<name>`` mounted): it ssh-es to the host its secret names,
leaves a detached process behind (some builds also a rootless podman container
whose process runs under a subordinate uid), sleeps a few seconds and says
``soak-ok``; with an error secret it prints the message and fails.

A schedule drawn from the seed (``MPC_SOAK_SEED``, printed; set it to replay the
same choices) injects, each when the given number of builds has been started:
deleting builds mid-provision and mid-build, killing provisioning pods (SIGKILL of
the step's process, or the pod deleted), SIGKILL of the watcher leader (its
process, or its pod force-deleted), one host powered off for ``MPC_SOAK_HOST_DOWN``
seconds (every process in it dies, its link goes down) and back, one API server
restart, one host's concurrency lowered (2 -> 1) and another host drained
(``drain: true``; only once the pool schema has that field) and later undrained.

Observed throughout: TaskRuns, build secrets and slot Leases by watch streams (a
slot is checked against its host's limit at the moment it is taken: taking a
slot while the host already runs ``limit`` builds is an over-allocation, builds
admitted under an older, higher limit may finish), and per host, every second,
the build users in its /etc/passwd and the processes of build uids (read from
its /proc). At the end it waits (bounded by a few sweep intervals: the watcher's
``--sweep-interval`` is set to ``MPC_SOAK_SWEEP`` for the soak, 60 s) and asserts:
every build not deleted on purpose ended served, or with an error secret whose
message names the real cause, or failed on a host that went down under it; no
build user, slot, waiter, stray process or container on the hosts; no build
secret; no finalizer; no over-allocation. It prints builds, faults by kind,
leaks, over-allocations, p50/p99 time to secret and from secret to build step
(docs/queue.md: a build that waited gets its pod started only at the kubelet's
next mount retry), and API requests per build (the API server's own
``apiserver_request_total`` before and after, across its restart; what the
soak's own observers asked is counted and shown apart).
"""
from __future__ import annotations

import base64
import copy
import json
import os
import random
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime

import pytest
import yaml
from kubernetes import client, watch

from mpc.runner import contract as c
from mpc.runner import hostpool

from . import faults
from . import hosts as e2e_hosts
from .install import BUILD_PREAMBLE, NS, PREPARE_HOST, Install, wait_for, watcher_flag

pytestmark = pytest.mark.e2e

BUILDS = int(os.environ.get("MPC_SOAK_BUILDS", "12"))
SEED = int(os.environ.get("MPC_SOAK_SEED") or random.SystemRandom().randrange(1 << 31))
WAVE = int(os.environ.get("MPC_SOAK_WAVE", "6"))
# make test: 20 s (a few minutes in all); the 30-60 s in make soak
HOST_DOWN = os.environ.get("MPC_SOAK_HOST_DOWN", "20" if BUILDS < 100 else "")
SWEEP = os.environ.get("MPC_SOAK_SWEEP", "60s")
SOAK_PLATFORM = "linux/amd64"
CONCURRENCY = (2, 2, 1)
TIMEOUT = float(os.environ.get("MPC_SOAK_TIMEOUT", str(900 + 30 * BUILDS)))  # never asserted
BUILD_USER_MIN_UID = 1000      # build users and their subordinate uids (the admin is 990)

SLEEPER = """podman() { command podman --root "$HOME/sleeper" --runroot "/tmp/sleeper-$(id -u)" \\
  --storage-driver vfs "$@"; }
tar -C / -chf - usr/bin/sleep lib/x86_64-linux-gnu/libc.so.6 lib64/ld-linux-x86-64.so.2 2>/dev/null \\
  | podman import --change 'USER 1000' - localhost/sleeper:1 >/dev/null
podman run -d --network none localhost/sleeper:1 /usr/bin/sleep 3603 >/dev/null
"""

BUILD_SCRIPT = BUILD_PREAMBLE + r"""printf 'soak: building on %s\n' "$host"
remote="set -e
cd $(cat /ssh/user-dir)
echo $BUILD > mpc-soak
setsid sleep 3601 </dev/null >/dev/null 2>&1 &
if [ $CONTAINER = 1 ]; then $(cat /soak/sleeper); fi
sleep $SLEEP
echo soak-ok $BUILD"
ssh "${ssh_opts[@]}" -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "$host" "$remote" \
  | tee "$RESULT_OK"
"""


# --- the soak's own API client: counts its requests ----------------------------------------

class CountingClient:
    def __init__(self, inst: Install):
        self.api = inst.node.api_client()
        self.requests = 0
        self._lock = threading.Lock()
        orig = self.api.rest_client.request

        def counted(*a, **kw):
            with self._lock:
                self.requests += 1
            return orig(*a, **kw)
        self.api.rest_client.request = counted


# --- list + watch of one resource, surviving API server restarts ----------------------------

class Mirror:
    """Keeps ``items`` (name -> latest object dict) and calls ``on_event(type, obj)``
    for every change, including those a relist after a broken watch reveals."""

    def __init__(self, name: str, list_fn, args: tuple, on_event, label_selector: str = ""):
        self.name, self.list_fn, self.args = name, list_fn, args
        self.on_event, self.selector = on_event, label_selector
        self.items: dict[str, dict] = {}
        self.relists = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._w: watch.Watch | None = None
        self.synced = threading.Event()
        self._t = threading.Thread(target=self._run, name=f"mirror-{name}", daemon=True)

    def start(self) -> "Mirror":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._w:
            self._w.stop()

    def _list(self) -> str:
        resp = self.list_fn(*self.args, label_selector=self.selector, _preload_content=False,
                            _request_timeout=60)
        doc = json.loads(resp.data)
        fresh = {o["metadata"]["name"]: o for o in doc.get("items", [])}
        for n, o in fresh.items():
            old = self.items.get(n)
            if old is None or old["metadata"].get("resourceVersion") != o["metadata"].get("resourceVersion"):
                self.items[n] = o
                self.on_event("ADDED" if old is None else "MODIFIED", o)
        for n in [n for n in self.items if n not in fresh]:
            gone = self.items.pop(n)
            self.on_event("DELETED", gone)
        self.relists += 1
        self.synced.set()
        return doc["metadata"]["resourceVersion"]

    def _run(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                self._w = watch.Watch()
                for ev in self._w.stream(self.list_fn, *self.args, label_selector=self.selector,
                                         resource_version=rv, timeout_seconds=60,
                                         allow_watch_bookmarks=True):
                    typ, obj = ev["type"], ev["raw_object"]
                    if typ == "ERROR":
                        rv = None
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if typ == "BOOKMARK":
                        continue
                    n = obj["metadata"]["name"]
                    if typ == "DELETED":
                        self.items.pop(n, None)
                    else:
                        self.items[n] = obj
                    self.on_event(typ, obj)
                    if self._stop.is_set():
                        return
            except Exception as e:   # noqa: BLE001 - API server away, 410: list again
                self.errors.append(repr(e)[:200])
                rv = None
                self._stop.wait(1)


# --- what the soak remembers -------------------------------------------------------------

@dataclass
class Build:
    idx: int
    name: str
    sleep: float
    container: bool
    created: float = 0.0                 # wall clock, after the create returned
    uid: str = ""
    deleted: str = ""                    # the fault that deleted it
    gone: bool = False                   # the TaskRun no longer exists
    status: bool | None = None           # Succeeded condition
    done_at: float = 0.0
    finalizer_seen: bool = False
    finalizers: list = field(default_factory=list)
    step_running: bool = False
    step_at: float = 0.0                 # wall clock, when a step was first seen started
    secret_at: float = 0.0
    served_host: str = ""                # pool host name from the secret
    error: str = ""                      # the error secret's message
    reason: str = ""                     # reason: message of its Succeeded condition
    touched: list[str] = field(default_factory=list)   # faults aimed at this build
    outcome: str = ""
    log: str = ""
    result: str = ""                     # its "ok" result: the remote side's last words
    pruned: bool = False


@dataclass
class Fault:
    kind: str
    at: int                              # after this many builds were started
    arg: object = None
    result: str = ""
    due_since: float = 0.0


class Soak:
    def __init__(self, inst: Install, ns: str, hosts: list, rng: random.Random,
                 pool_doc: dict, drain_supported: bool):
        self.inst, self.ns, self.hosts, self.rng = inst, ns, hosts, rng
        self.cc = CountingClient(inst)
        self.api = self.cc.api
        self.core = client.CoreV1Api(self.api)
        self.co = client.CustomObjectsApi(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.lock = threading.RLock()
        self.builds: dict[str, Build] = {}
        self.by_address = {h.address: h.name for h in hosts}
        self.names = {h.name for h in hosts}
        self.pool_doc = pool_doc
        self.drain_supported = drain_supported
        # host -> [(wall time, limit)]: what the pool said from then on
        self.limits: dict[str, list[tuple[float, int]]] = {
            h.name: [(0.0, conc)] for h, conc in zip(hosts, CONCURRENCY)}
        self.slots: dict[str, dict[str, float]] = {h.name: {} for h in hosts}  # lease -> taken at
        self.over: list[str] = []
        self.max_slots = {h.name: 0 for h in hosts}
        self.max_users = {h.name: 0 for h in hosts}
        self.max_procs = {h.name: 0 for h in hosts}
        self.samples = 0
        self.down: dict[str, list[list[float]]] = {h.name: [] for h in hosts}   # [off, on]
        self.faults_done: dict[str, int] = {}
        self.fault_log: list[str] = []
        self.errors: list[str] = []
        self.api_before = 0.0
        self.api_segments = 0.0
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.mirrors: list[Mirror] = []

    # --- clock and limits ------------------------------------------------------------
    def limit(self, host: str, at: float) -> int:
        lim = self.limits[host][0][1]
        for t, v in self.limits[host]:
            if t <= at:
                lim = v
        return lim

    def log(self, msg: str) -> None:
        line = f"[soak {time.strftime('%H:%M:%S')}] {msg}"
        self.fault_log.append(line)
        print(line, flush=True)

    # --- watch callbacks ---------------------------------------------------------------
    def on_taskrun(self, typ: str, tr: dict) -> None:
        b = self.builds.get(tr["metadata"]["name"])
        if b is None or (b.uid and tr["metadata"].get("uid") != b.uid):
            return
        with self.lock:
            if typ == "DELETED":
                b.gone = True
                return
            b.uid = tr["metadata"]["uid"]
            b.finalizers = list(tr["metadata"].get("finalizers") or [])
            if c.FINALIZER in b.finalizers:
                b.finalizer_seen = True
            ok = c.succeeded(tr)
            if ok is not None and b.status is None:
                b.status, b.done_at = ok, time.time()
                cond = c.succeeded_condition(tr) or {}
                b.reason = f"{cond.get('reason', '')}: {cond.get('message', '')[:300]}"
                b.result = "".join(str(r.get("value", "")) for r in
                                   (tr.get("status") or {}).get("results") or ())
            steps = (tr.get("status") or {}).get("steps") or ()
            b.step_running = any(s.get("running") for s in steps)
            if not b.step_at and any(s.get("running") or s.get("terminated") for s in steps):
                b.step_at = time.time()

    def on_secret(self, typ: str, s: dict) -> None:
        name = s["metadata"]["name"]
        if typ == "DELETED" or not name.startswith(c.SECRET_PREFIX):
            return
        b = self.builds.get(name[len(c.SECRET_PREFIX):])
        if b is None:
            return
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (s.get("data") or {}).items()
                if k in (c.KEY_HOST, c.KEY_ERROR)}
        with self.lock:
            if not b.secret_at:
                b.secret_at = time.time()
            if c.KEY_ERROR in data:
                b.error = data[c.KEY_ERROR]
            elif c.KEY_HOST in data:
                b.served_host = self.by_address.get(data[c.KEY_HOST].split("@")[-1], data[c.KEY_HOST])

    def on_lease(self, typ: str, lease: dict) -> None:
        md = lease["metadata"]
        labels = md.get("labels") or {}
        host = labels.get(c.LABEL_HOST, "")
        if labels.get(c.LABEL_ROLE) != "slot" or host not in self.names:
            return
        with self.lock:
            held = self.slots[host]
            if typ == "DELETED":
                held.pop(md["name"], None)
                return
            if md["name"] in held:
                return
            at = time.time()
            ann = (md.get("annotations") or {}).get(c.ANN_ALLOCATED_AT)
            if ann:
                at = datetime.fromisoformat(ann.replace("Z", "+00:00")).timestamp()
            lim = self.limit(host, at)
            if len(held) >= lim:
                self.over.append(f"{md['name']} taken at {time.strftime('%H:%M:%S', time.localtime(at))} "
                                 f"on {host} already running {len(held)} ({sorted(held)}) with limit {lim}")
                self.log(f"OVER-ALLOCATION: {self.over[-1]}")
            held[md["name"]] = at
            self.max_slots[host] = max(self.max_slots[host], len(held))

    # --- the host sampler ------------------------------------------------------------------
    def host_view(self, h) -> tuple[list[str], list[tuple[int, set[int], str]]] | None:
        try:
            users = [u for u in h.users() if c.USER_RE.match(u)]
            procs = [p for p in h.processes()
                     if any(u >= BUILD_USER_MIN_UID for u in p[1]) or "sleep 36" in p[2]
                     or "conmon" in p[2]]
            return users, procs
        except (OSError, RuntimeError):
            return None          # powered off

    def _sample(self) -> None:
        while not self._stop.is_set():
            for h in self.hosts:
                v = self.host_view(h)
                if v is None:
                    continue
                users, procs = v
                self.max_users[h.name] = max(self.max_users[h.name], len(users))
                self.max_procs[h.name] = max(self.max_procs[h.name], len(procs))
            self.samples += 1
            self._stop.wait(1.0)

    def start(self) -> None:
        self.mirrors = [
            Mirror("taskruns", self.co.list_namespaced_custom_object,
                   ("tekton.dev", "v1", self.ns, "taskruns"), self.on_taskrun),
            Mirror("secrets", self.core.list_namespaced_secret, (self.ns,), self.on_secret,
                   f"{c.LABEL_MANAGED}={c.MANAGED_VALUE}"),
            Mirror("slots", self.coord.list_namespaced_lease, (NS,), self.on_lease,
                   f"{c.LABEL_ROLE}=slot")]
        for m in self.mirrors:
            m.start()
        for m in self.mirrors:
            assert m.synced.wait(120), f"mirror {m.name} never listed: {m.errors}"
        t = threading.Thread(target=self._sample, name="sampler", daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for m in self.mirrors:
            m.stop()

    # --- API calls that survive an API server restart -----------------------------------------
    def retry(self, what: str, fn, *a, attempts: int = 90, **kw):
        for i in range(attempts):
            try:
                return fn(*a, **kw)
            except client.ApiException as e:
                if e.status in (404, 409, 422) or i == attempts - 1:
                    raise
            except Exception:   # noqa: BLE001 - connection refused while it restarts
                if i == attempts - 1:
                    raise
            time.sleep(1)
        raise AssertionError(what)

    # --- builds ------------------------------------------------------------------------
    def create(self, b: Build) -> None:
        body = {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
                "metadata": {"name": b.name, "labels": {"mpc-soak": "build"}},
                "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": SOAK_PLATFORM}],
                         "timeout": "30m",
                         "taskSpec": {
                             "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
                             "results": [{"name": "ok"}],
                             "volumes": [{"name": "ssh", "secret": {"secretName": c.secret_name(b.name)}},
                                         {"name": "soak", "configMap": {"name": "soak-sleeper"}}],
                             "steps": [{
                                 "name": "build", "image": self.inst.builder_image,
                                 "env": [{"name": "BUILD", "value": b.name},
                                         {"name": "SLEEP", "value": f"{b.sleep:.1f}"},
                                         {"name": "CONTAINER", "value": "1" if b.container else "0"},
                                         {"name": "RESULT_OK", "value": "$(results.ok.path)"}],
                                 "computeResources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                                 "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"},
                                                  {"name": "soak", "mountPath": "/soak"}],
                                 "script": BUILD_SCRIPT}]}}}
        try:
            tr = self.retry("create", self.co.create_namespaced_custom_object, "tekton.dev", "v1",
                            self.ns, "taskruns", body)
        except client.ApiException as e:   # created by an attempt whose answer was lost
            if e.status != 409:
                raise
            tr = self.co.get_namespaced_custom_object("tekton.dev", "v1", self.ns, "taskruns", b.name)
        with self.lock:
            b.uid, b.created = tr["metadata"]["uid"], time.time()

    def delete_build(self, b: Build, why: str) -> None:
        with self.lock:
            b.deleted = why
            b.touched.append(why)
        try:
            self.retry("delete", self.co.delete_namespaced_custom_object, "tekton.dev", "v1",
                       self.ns, "taskruns", b.name)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def in_flight(self) -> list[Build]:
        return [b for b in self.builds.values() if b.created and b.status is None
                and not b.deleted and not b.gone]

    # --- faults ----------------------------------------------------------------------------
    def _pick(self, cands: list[Build]) -> Build | None:
        return self.rng.choice(sorted(cands, key=lambda b: b.idx)) if cands else None

    def fault(self, f: Fault) -> bool:
        """Run ``f``; False when it has no victim yet (try again later)."""
        k = f.kind
        if k == "delete_mid_provision":
            cands = [b for b in self.in_flight() if not b.secret_at
                     and self._provisioning(b)]
            b = self._pick(cands)
            if b is None:
                return False
            self.delete_build(b, k)
            f.result = b.name
        elif k == "delete_mid_build":
            b = self._pick([b for b in self.in_flight() if b.served_host and b.step_running])
            if b is None:
                return False
            self.delete_build(b, k)
            f.result = f"{b.name} on {b.served_host}"
        elif k == "kill_provision_pod":
            pods = [p for p in self._pods(NS) if p.status.phase == "Running"
                    and re.match(r"^mpc-provision-[0-9a-f-]{36}$",
                                 (p.metadata.labels or {}).get("tekton.dev/pipelineRun", ""))]
            if not pods:
                return False
            pod = self.rng.choice(sorted(pods, key=lambda p: p.metadata.name))
            uid = pod.metadata.labels["tekton.dev/pipelineRun"][len("mpc-provision-"):]
            b = next((b for b in self.builds.values() if b.uid == uid), None)
            how = self.rng.choice(["sigkill", "delete"])
            if how == "sigkill":
                pids = faults.sigkill_pod(self.inst.node, pod)
                if not pids:
                    return False
            else:
                self.retry("delete pod", self.core.delete_namespaced_pod, pod.metadata.name, NS,
                           grace_period_seconds=0)
            if b:
                with self.lock:
                    b.touched.append(k)
            f.result = f"{how} {pod.metadata.name} (build {b.name if b else '?'})"
        elif k == "kill_leader":
            lease = self.retry("leader", self.coord.read_namespaced_lease, "mpc-glue-leader", NS)
            holder = lease.spec.holder_identity
            pod = next((p for p in self._pods(NS, "app.kubernetes.io/name=mpc-glue")
                        if p.metadata.name == holder and p.status.phase == "Running"), None)
            if pod is None:
                return False
            how = self.rng.choice(["sigkill", "delete"])
            if how == "sigkill":
                if not faults.sigkill_pod(self.inst.node, pod):
                    return False
            else:
                self.retry("delete pod", self.core.delete_namespaced_pod, holder, NS,
                           grace_period_seconds=0)
            f.result = f"{how} {holder}"
        elif k == "host_down":
            h = f.arg
            secs = float(HOST_DOWN) if HOST_DOWN else self.rng.uniform(30, 60)
            t = threading.Thread(target=self._host_down, args=(h, secs), daemon=True)
            t.start()
            self.threads.append(t)
            f.result = f"{h.name} for {secs:.0f} s"
        elif k == "apiserver_restart":
            self.api_segments += faults.apiserver_requests(self.inst.node) - self.api_before
            took = faults.restart_apiserver(self.inst.node)
            self.api_before = self.retry("metrics", faults.apiserver_requests, self.inst.node)
            f.result = f"unavailable {took:.1f} s"
        elif k == "lower_concurrency":
            h = f.arg
            self.set_pool(h.name, concurrency=1)
            f.result = f"{h.name} 2 -> 1"
        elif k in ("drain", "undrain"):
            h = f.arg
            if not self.drain_supported:
                f.result = "skipped: the pool schema has no drain field yet"
            else:
                self.set_pool(h.name, drain=(k == "drain"))
                f.result = h.name
        self.faults_done[k] = self.faults_done.get(k, 0) + 1
        self.log(f"fault {k}: {f.result}")
        return True

    def _provisioning(self, b: Build) -> bool:
        try:
            pr = self.co.get_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns",
                                                      c.provision_run_name(b.uid))
        except Exception:   # noqa: BLE001 - 404 or the API server away
            return False
        return c.succeeded(pr) is None

    def _pods(self, ns: str, selector: str = "") -> list[client.V1Pod]:
        return self.retry("pods", self.core.list_namespaced_pod, ns, label_selector=selector).items

    def _host_down(self, h, secs: float) -> None:
        with self.lock:
            self.down[h.name].append([time.time(), 0.0])
        faults.host_off(h, self.inst.node)
        time.sleep(secs)
        faults.host_on(h, self.inst.node)
        with self.lock:
            self.down[h.name][-1][1] = time.time()
        self.log(f"host {h.name} is back")

    def set_pool(self, host: str, **changes) -> None:
        with self.lock:
            doc = copy.deepcopy(self.pool_doc)
            for e in doc["hosts"]:
                if e["name"] == host:
                    e.update(changes)
                    if e.get("drain") is False:
                        del e["drain"]
            self.retry("pool", self.core.patch_namespaced_config_map, c.HOST_POOL_CONFIGMAP, NS,
                       {"data": {c.POOL_KEY: yaml.safe_dump(doc)}})
            self.pool_doc = doc
            e = next(e for e in doc["hosts"] if e["name"] == host)
            self.limits[host].append((time.time(), 0 if e.get("drain") else e["concurrency"]))

    def was_down(self, host: str, a: float, b: float) -> bool:
        return any(off <= b and (on or time.time()) >= a for off, on in self.down.get(host, ()))


def plan(rng: random.Random, n: int, hosts: list) -> list[Fault]:
    scale = max(1, round(n / 40))
    span = lambda lo, hi: rng.randint(max(1, int(n * lo)), max(1, int(n * hi)))  # noqa: E731
    out = []
    for kind, count in (("delete_mid_provision", 2 * scale), ("delete_mid_build", 2 * scale),
                        ("kill_provision_pod", 2 * scale), ("kill_leader", 2 + scale // 5)):
        out += [Fault(kind, span(0.1, 0.85)) for _ in range(count)]
    lowered, drained, other = rng.sample(hosts[:2], 2) + [hosts[2]]
    for _ in range(max(1, n // 150)):
        out.append(Fault("host_down", span(0.15, 0.7), rng.choice([lowered, drained, other])))
    out.append(Fault("apiserver_restart", span(0.2, 0.8)))
    out.append(Fault("lower_concurrency", span(0.2, 0.4), lowered))
    out.append(Fault("drain", span(0.4, 0.6), drained))
    out.append(Fault("undrain", span(0.75, 0.9), drained))
    return sorted(out, key=lambda f: (f.at, f.kind))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


@pytest.fixture
def soak_hosts(mpc, host_farm):
    """Three SSH hosts in the node's netns, added to the pool as linux/amd64 (2, 2, 1
    slots); the pool, the hosts and their admin secrets go back as they were after."""
    core = client.CoreV1Api(mpc.kube)
    made = []
    before = core.read_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS).data[c.POOL_KEY]
    doc = yaml.safe_load(before)
    try:
        for conc in CONCURRENCY:
            h = e2e_hosts.move_into_node(host_farm.add(), mpc.node)
            made.append(h)
            h.exec(PREPARE_HOST)
            core.create_namespaced_secret(NS, client.V1Secret(
                metadata=client.V1ObjectMeta(name=f"admin-{h.name}"),
                data={"id_rsa": base64.b64encode(h.admin_key).decode()}))
            doc["hosts"].append({"name": h.name, "address": h.address, "user": h.admin_user,
                                 "secret": f"admin-{h.name}", "platform": SOAK_PLATFORM,
                                 "concurrency": conc, "hostKey": h.host_public_key})
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS,
                                         {"data": {c.POOL_KEY: yaml.safe_dump(doc)}})
        yield made, doc
    finally:
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS, {"data": {c.POOL_KEY: before}})
        for h in made:
            try:
                core.delete_namespaced_secret(f"admin-{h.name}", NS)
            except client.ApiException:
                pass
            h.destroy()


@pytest.fixture
def sweeping_watcher(mpc):
    """The watcher as shipped, with ``--sweep-interval`` set to ``SWEEP`` (the bound on how
    long a finished build's leftovers may wait for the sweep); put back after."""
    with watcher_flag(mpc, "--sweep-interval", SWEEP):
        yield


@pytest.mark.timeout(int(2 * TIMEOUT + 1800))
def test_soak_nothing_leaks_nothing_over_allocates_under_faults(mpc, e2e_namespace, soak_hosts,
                                                               sweeping_watcher):
    inst, ns = mpc, e2e_namespace
    hosts, pool_doc = soak_hosts
    t_start = time.monotonic()
    rng = random.Random(SEED)
    drain_ok = "drain" in hostpool.schema()["$defs"]["host"]["properties"]
    print(f"\nSOAK seed {SEED} (replay: MPC_SOAK_SEED={SEED}), {BUILDS} builds in waves of {WAVE}, "
          f"hosts {[(h.name, cc) for h, cc in zip(hosts, CONCURRENCY)]}, drain "
          f"{'supported' if drain_ok else 'not in the pool schema yet: skipped'}", flush=True)
    client.CoreV1Api(inst.kube).create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="soak-sleeper"), data={"sleeper": SLEEPER}))
    soak = Soak(inst, ns, hosts, rng, pool_doc, drain_ok)
    builds = [Build(i, f"b{i:04d}", round(rng.uniform(2, 6), 1), rng.random() < 0.15)
              for i in range(BUILDS)]
    soak.builds = {b.name: b for b in builds}
    schedule = plan(rng, BUILDS, hosts)
    print("SOAK schedule: " + ", ".join(f"{f.kind}@{f.at}" + (f"({f.arg.name})" if f.arg else "")
                                        for f in schedule), flush=True)
    soak.api_before = faults.apiserver_requests(inst.node)
    soak.start()
    pending = list(schedule)
    started = 0
    try:
        # --- run: waves of builds, faults when their turn comes -----------------------------
        deadline = time.monotonic() + TIMEOUT
        while started < BUILDS or pending:
            assert time.monotonic() < deadline, "soak did not get through its schedule in time"
            if started < BUILDS and len(soak.in_flight()) <= WAVE // 2:
                for b in builds[started:started + WAVE]:
                    soak.create(b)
                started = min(BUILDS, started + WAVE)
            for f in [f for f in pending if f.at <= started]:
                f.due_since = f.due_since or time.monotonic()
                if soak.fault(f):
                    pending.remove(f)
                elif time.monotonic() - f.due_since > 180 or (
                        started >= BUILDS and not soak.in_flight()):
                    f.result = "skipped: no victim in that state"
                    soak.log(f"fault {f.kind}: {f.result}")
                    pending.remove(f)
            prune(soak)
            time.sleep(0.5)
        soak.log(f"all {BUILDS} builds started, every fault injected")
        wait_for("every build finished or deleted", lambda: (prune(soak), not soak.in_flight())[1],
                 timeout=TIMEOUT, interval=2)
        for t in soak.threads[1:]:
            t.join(timeout=120)                       # a host still down comes back
        t_builds = time.monotonic() - t_start
        soak.log("every build finished; waiting for cleanup (bounded by the sweep)")
        # --- cleanup: everything must go, within a few sweep intervals ------------------------
        bound = 3 * _secs(SWEEP) + 240
        t0 = time.monotonic()
        leaks: dict[str, list] = {}
        while True:
            prune(soak)
            leaks = find_leaks(soak)
            if not any(leaks.values()) or time.monotonic() - t0 > bound:
                break
            time.sleep(3)
        t_clean = time.monotonic() - t0
        api_after = soak.retry("metrics", faults.apiserver_requests, inst.node)
    finally:
        soak.stop()
        for f in pending:
            f.result = f.result or "not run (the soak stopped early)"
        for h in hosts:                     # a host still powered off comes back for teardown
            if h.proc is None:
                faults.host_on(h, inst.node)

    # --- outcomes -----------------------------------------------------------------------
    classify(soak)
    outcomes: dict[str, int] = {}
    for b in builds:
        outcomes[b.outcome.split(":")[0]] = outcomes.get(b.outcome.split(":")[0], 0) + 1
    bad = [f"{b.name}: {b.outcome}" for b in builds if b.outcome.startswith(("UNEXPLAINED", "HUNG"))]
    to_secret = [b.secret_at - b.created for b in builds if b.served_host and b.secret_at]
    api_total = soak.api_segments + api_after - soak.api_before
    leaked = {k: v for k, v in leaks.items() if v}
    print(f"\nFIGURES soak seed {SEED}: {BUILDS} builds in {t_builds:.0f} s, cleanup "
          f"{t_clean:.0f} s; outcomes {outcomes}")
    print(f"FIGURES faults injected: {soak.faults_done}; skipped: "
          f"{[(f.kind, f.result) for f in schedule if f.result.startswith(('skipped', 'not run'))]}")
    print(f"FIGURES leaks found: {sum(len(v) for v in leaks.values())} {leaked or ''}")
    print(f"FIGURES over-allocations: {len(soak.over)} {soak.over or ''}")
    print("FIGURES per host max slots/users/build processes vs limits: " + "; ".join(
        f"{h}: {soak.max_slots[h]}/{soak.max_users[h]}/{soak.max_procs[h]} (limits "
        f"{[v for _, v in soak.limits[h]]})" for h in soak.names) + f"; {soak.samples} samples")
    print(f"FIGURES time to secret (served): p50 {_pct(to_secret, 50):.1f} s, p99 "
          f"{_pct(to_secret, 99):.1f} s (n={len(to_secret)})")
    # the slot is held from before the secret is written; the build's pod mounts it only
    # at the kubelet's next retry, whose back-off doubles up to 2m2s while the build waits
    for label, lo, hi in (("within 30 s", 0, 30), ("after 60 s or more", 60, float("inf"))):
        idle = [b.step_at - b.secret_at for b in builds if b.served_host and b.secret_at
                and b.step_at and lo <= b.secret_at - b.created < hi]
        print(f"FIGURES secret -> build step, secret {label} of its create: p50 "
              f"{_pct(idle, 50):.1f} s, p99 {_pct(idle, 99):.1f} s (n={len(idle)})")
    print(f"FIGURES API requests: {api_total:.0f} in all, {api_total / BUILDS:.0f} per build "
          f"(the soak's own observers: {soak.cc.requests}, "
          f"{(api_total - soak.cc.requests) / BUILDS:.0f} per build without them)")
    print(f"FIGURES watch relists: {[(m.name, m.relists) for m in soak.mirrors]}")
    if bad or leaked or soak.over:
        print("--- soak log\n" + "\n".join(soak.fault_log))
        print("--- mpc-glue log (tail)\n" + inst.watcher_log(tail=120))
        print(failed_runs(soak))
    assert not bad, f"seed {SEED}: builds without an explained end:\n" + "\n".join(bad)
    assert not leaked, f"seed {SEED}: leaks after {t_clean:.0f} s of cleanup: {leaked}"
    assert not soak.over, f"seed {SEED}: over-allocations: {soak.over}"


def _secs(d: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)?", d)
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def prune(soak: Soak) -> None:
    """Record how finished builds ended (their step log) and delete their TaskRuns once the
    watcher let go and deprovisioning deleted their secret (keeps the node's pod count low)."""
    for b in list(soak.builds.values()):
        if b.pruned or b.gone or b.status is None or b.deleted:
            continue
        if c.FINALIZER in b.finalizers or b.name in secret_names(soak):
            continue
        try:
            tr = soak.co.get_namespaced_custom_object("tekton.dev", "v1", soak.ns, "taskruns", b.name)
            if tr.get("status", {}).get("podName"):
                b.log = soak.core.read_namespaced_pod_log(tr["status"]["podName"], soak.ns,
                                                          container="step-build")[-4000:]
            soak.co.delete_namespaced_custom_object("tekton.dev", "v1", soak.ns, "taskruns", b.name)
            b.pruned = True
        except Exception as e:   # noqa: BLE001 - API server away: next round
            soak.errors.append(f"prune {b.name}: {e!r}"[:200])


def secret_names(soak: Soak) -> set[str]:
    return {n[len(c.SECRET_PREFIX):] for n in soak.mirrors[1].items}


def find_leaks(soak: Soak) -> dict[str, list]:
    out: dict[str, list] = {"users": [], "processes": [], "containers": [], "slots": [],
                            "waiters": [], "secrets": [], "finalizers": []}
    for h in soak.hosts:
        v = soak.host_view(h)
        if v is None:
            out["users"].append(f"{h.name}: down")
            continue
        users, procs = v
        out["users"] += [f"{h.name}:{u}" for u in users]
        out["processes"] += [f"{h.name}:{pid} uids {sorted(uids)} {cmd[:60]}" for pid, uids, cmd in procs]
        r = h.exec("podman ps -a -q", check=False)
        out["containers"] += [f"{h.name}:root:{i}" for i in r.stdout.split()]
    try:
        leases = soak.coord.list_namespaced_lease(NS).items
        out["slots"] = [le.metadata.name for le in leases
                        if (le.metadata.labels or {}).get(c.LABEL_ROLE) == "slot"
                        and (le.metadata.labels or {}).get(c.LABEL_HOST) in soak.names]
        out["waiters"] = [le.metadata.name for le in leases
                          if (le.metadata.labels or {}).get(c.LABEL_ROLE) == "waiter"]
        out["secrets"] = [s.metadata.name for s in soak.core.list_namespaced_secret(soak.ns).items
                          if s.metadata.name.startswith(c.SECRET_PREFIX)]
        trs = soak.co.list_namespaced_custom_object("tekton.dev", "v1", soak.ns, "taskruns")["items"]
        out["finalizers"] = [t["metadata"]["name"] for t in trs
                             if c.FINALIZER in (t["metadata"].get("finalizers") or ())]
    except Exception as e:   # noqa: BLE001
        out["slots"].append(f"API unreadable: {e!r}"[:200])
    return out


# Reasons Tekton gives a TaskRun it failed itself, never because of a missing or late
# secret (a build waiting for mpc stays Pending until its own timeout: TaskRunTimeout,
# which is not in this list)
CLUSTER_FAILURES = {"PodCreationFailed", "CreateContainerConfigError", "TaskRunImagePullFailed",
                    "TaskRunValidationFailed", "TaskRunResolutionFailed"}


def classify(soak: Soak) -> None:
    """Why each build ended as it did; UNEXPLAINED/HUNG ones fail the soak."""
    for b in soak.builds.values():
        if b.deleted:
            b.outcome = f"deleted: {b.deleted}"
        elif not b.created:
            b.outcome = "HUNG: never created"
        elif b.status is None:
            b.outcome = "HUNG: still running"
        elif b.status and "soak-ok" in b.log + b.result:
            # the result too: a step log can come back empty after faults on the node
            b.outcome = "served"
        elif b.status:
            b.outcome = (f"UNEXPLAINED: succeeded without soak-ok in its log or result: "
                         f"{b.log[-300:]!r} {b.result!r}")
        elif b.error or "mpc-error:" in b.log:
            msg = b.error or b.log.split("mpc-error:", 1)[1]
            causes = []
            if "kill_provision_pod" in b.touched:
                causes.append(c.provision_run_name(b.uid))
            for h in soak.hosts:
                if soak.was_down(h.name, b.created, b.secret_at or b.done_at):
                    causes += [h.name, h.address]
            if causes and any(x in msg for x in causes):
                b.outcome = "error secret naming its cause"
            else:
                b.outcome = (f"UNEXPLAINED: error secret {msg.strip()[:400]!r} (faults on it: "
                             f"{b.touched}, hosts down meanwhile: "
                             f"{[h.name for h in soak.hosts if soak.was_down(h.name, b.created, b.done_at)]})")
        elif b.served_host and soak.was_down(b.served_host, b.secret_at, b.done_at):
            b.outcome = f"failed: its host {b.served_host} went down under it"
        elif not b.secret_at and b.reason.split(":")[0] in CLUSTER_FAILURES:
            # Tekton failed it before mpc answered (its pod could not be made, e.g. while
            # the API server restarted): mpc's part is only to leave nothing behind
            b.outcome = f"failed by the cluster before its secret: {b.reason}"
        else:
            b.outcome = (f"UNEXPLAINED: failed (served by {b.served_host or 'nobody'}, secret "
                         f"{'seen' if b.secret_at else 'never seen'}; {b.reason}; "
                         f"log {b.log[-400:]!r})")


def failed_runs(soak: Soak) -> str:
    """The failed mpc PipelineRuns and their reasons, for the report."""
    try:
        prs = soak.co.list_namespaced_custom_object("tekton.dev", "v1", NS, "pipelineruns")["items"]
    except Exception:   # noqa: BLE001
        return traceback.format_exc()
    lines = []
    for pr in prs:
        if c.succeeded(pr) is False:
            cond = next((x for x in pr["status"]["conditions"] if x["type"] == "Succeeded"), {})
            lines.append(f"{pr['metadata']['name']}: {cond.get('reason')}: {cond.get('message', '')[:300]}")
    return "--- failed mpc runs\n" + "\n".join(lines)
