"""Shared parts of the glue watcher benchmarks: the API server's own request counters,
process figures, bulk creation, a host pool, and a watch that times provisioning runs."""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner import hostpool

PLATFORM = "linux/arm64"
READS, WRITES = ("GET", "LIST"), ("POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY")

# --- the API server's apiserver_request_total --------------------------------------------
# key: (verb, resource, subresource); non-resource requests (/metrics, /healthz) are left out
Key = tuple[str, str, str]
_SAMPLE = re.compile(r'^(apiserver_request_total|apiserver_longrunning_requests)\{(.*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(api: client.ApiClient) -> Counter:
    """The API server's request counters by (verb, resource, subresource). Requests that
    ended count in apiserver_request_total; a WATCH counts there only once it ends, so open
    watches (apiserver_longrunning_requests) are added: a delta is then the WATCHes started."""
    _, url, headers, _, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    r = api.rest_client.pool_manager.request("GET", url, headers=headers)
    out: Counter = Counter()
    for line in r.data.decode().splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        if not labels.get("resource"):
            continue
        out[(labels["verb"], labels["resource"], labels.get("subresource", ""))] += \
            float(m.group(3))
    return out


class CountingClient:
    """An admin ApiClient that counts its own requests the way the API server does, so a
    test can take what it did itself out of the server's counters."""

    def __init__(self, api: client.ApiClient):
        self.api, self.sent = api, Counter()
        self._lock = threading.Lock()
        inner = api.rest_client.request

        def request(method, url, *a, **kw):
            key = request_key(method, url)
            with self._lock:
                self.sent[key] += 1
            return inner(method, url, *a, **kw)
        api.rest_client.request = request


def request_key(method: str, url: str) -> Key:
    u = urlsplit(url)
    parts = [p for p in u.path.split("/") if p]
    parts = parts[2:] if parts[0] == "api" else parts[3:]      # drop /api/v1 or /apis/g/v
    if len(parts) >= 3 and parts[0] == "namespaces":
        parts = parts[2:]
    resource, name, sub = (parts + ["", "", ""])[:3]
    verb = method
    if method == "GET":
        verb = "WATCH" if "watch=true" in (u.query or "") else ("GET" if name else "LIST")
    return verb, resource, sub


def minus(a: Counter, b: Counter) -> Counter:
    return Counter({k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0) > 0})


# the watcher's resources; its Leases are slot Leases it only watches (no leader election here)
WATCHER_RESOURCES = ("taskruns", "pipelineruns", "configmaps", "events", "leases")
TEKTON_RESOURCES = ("customruns", "pipelineruns", "pipelines", "resolutionrequests",
                    "stepactions", "taskruns", "tasks", "verificationpolicies")


def watchers_share(counts: Counter) -> Counter:
    """The part of the API server's counts that can be the watcher's. Left out: resources
    it never uses; PUT leases (the API server's own identity Lease, every 10 s); and the
    controller-manager's metadata informers, which LIST and WATCH every Tekton resource
    alike: customruns, which the watcher never touches, counts them, and as many LISTs
    and WATCHes are taken out of taskruns and pipelineruns."""
    out = Counter({k: n for k, n in counts.items()
                   if k[1] in WATCHER_RESOURCES and k[:2] != ("PUT", "leases")})
    for verb in ("LIST", "WATCH"):
        kcm = counts.get((verb, "customruns", ""), 0)
        for res in ("taskruns", "pipelineruns"):
            if (verb, res, "") in out:
                out[(verb, res, "")] = max(0, out[(verb, res, "")] - kcm)
    return +out


def by_verb(counts: Counter) -> Counter:
    out: Counter = Counter()
    for (verb, _, _), n in counts.items():
        out[verb] += n
    return out


def describe(counts: Counter, per: float = 1.0) -> str:
    """'reads R (GET x, LIST y), writes W (POST ...), WATCH n' per ``per``."""
    v = by_verb(counts)

    def part(verbs):
        n = sum(v[x] for x in verbs)
        inner = ", ".join(f"{x} {v[x] / per:.2f}" for x in verbs if v[x])
        return f"{n / per:.2f}" + (f" ({inner})" if inner else "")
    return f"reads {part(READS)}, writes {part(WRITES)}, WATCH {v['WATCH'] / per:.2f}"


def detail(counts: Counter, per: float = 1.0, top: int = 12) -> str:
    """Each (verb, resource) per ``per``; at most ``top`` of them, the largest."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{verb} {res}{'/' + sub if sub else ''} {n / per:.2f}"
                      for (verb, res, sub), n in sorted(items[:top]))
    rest = sum(n for _, n in items[top:])
    return shown + (f", {len(items) - top} more {rest / per:.2f}" if rest else "")


# --- processes ---------------------------------------------------------------------------
def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MiB, CPU seconds) of a live process."""
    hwm = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
               if ln.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# --- objects -----------------------------------------------------------------------------
SCRIPT = "#!/bin/sh\nset -eu\n" + "echo 'some build step that does real work here'\n" * 25


def unrelated_taskrun(name: str) -> dict:
    """A TaskRun that is not a build (no build secret) but has a PLATFORM param, ~4 KB."""
    return {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "labels": {"app": "unrelated", "tekton.dev/task": "lint"}},
            "spec": {"params": [{"name": "PLATFORM", "value": "linux/amd64"}],
                     "taskSpec": {"params": [{"name": "PLATFORM", "type": "string"}],
                                  "steps": [{"name": f"s{i}", "image": "busybox", "script": SCRIPT}
                                            for i in range(3)]}}}


def new_namespace(kube, prefix: str = "bench") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace(client.V1Namespace(
        metadata=client.V1ObjectMeta(name=name)))
    return name


def release(kube, ns, wait: bool = False) -> None:
    """Drop the builds (and any finalizer) so a later watcher does not inherit them;
    ``wait``: until the namespace is gone (its deletion is a burst of requests)."""
    co = client.CustomObjectsApi(kube)
    for tr in co.list_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns")["items"]:
        if tr["metadata"].get("finalizers"):
            co.patch_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns",
                                              tr["metadata"]["name"],
                                              {"metadata": {"finalizers": None}})
    core = client.CoreV1Api(kube)
    core.delete_namespace(ns)
    while wait and ns in {n.metadata.name for n in core.list_namespace().items}:
        time.sleep(1)


def host_pool(kube, ctrl_ns: str, hosts: int, concurrency: int, **extra) -> hostpool.Pool:
    """ConfigMap mpc-host-pool with ``hosts`` static hosts of PLATFORM (no namespace limit)."""
    doc = {"hosts": [{"name": f"h{i}", "address": f"192.0.2.{i + 1}", "user": "admin",
                      "secret": "admin-key", "platform": PLATFORM, "concurrency": concurrency}
                     for i in range(hosts)], **extra}
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: yaml.safe_dump(doc)}))
    return hostpool.parse_yaml(yaml.safe_dump(doc))


def create_many(kube, ns, bodies, workers=16) -> dict[str, float]:
    """Create ``bodies`` (TaskRuns) in parallel; uid -> monotonic time the create returned."""
    co = client.CustomObjectsApi(kube)
    done: dict[str, float] = {}

    def one(body):
        tr = co.create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", body)
        done[tr["metadata"]["uid"]] = time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, bodies))
    return done


def watch_provision_runs(api: client.ApiClient, ctrl_ns, seen: dict,
                         stop: threading.Event) -> threading.Thread:
    """Record when each provisioning PipelineRun (by build uid) appears, from a watch."""
    def stream():
        co = client.CustomObjectsApi(api)
        rv = co.list_namespaced_custom_object("tekton.dev", "v1", ctrl_ns, "pipelineruns")[
            "metadata"]["resourceVersion"]
        while not stop.is_set():
            resp = co.list_namespaced_custom_object(
                "tekton.dev", "v1", ctrl_ns, "pipelineruns", watch=True, resource_version=rv,
                timeout_seconds=5, allow_watch_bookmarks=True, _preload_content=False)
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    ev = json.loads(line)
                    md = ev["object"].get("metadata", {})
                    rv = md.get("resourceVersion", rv)
                    labels = md.get("labels") or {}
                    uid = labels.get(c.LABEL_TASKRUN_UID)
                    if (ev["type"] == "ADDED" and uid and uid not in seen
                            and labels.get(c.LABEL_ROLE) == "provision"):
                        seen[uid] = time.monotonic()
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    return t


def provision_runs_by_build(kube, ctrl_ns) -> Counter:
    runs = client.CustomObjectsApi(kube).list_namespaced_custom_object(
        "tekton.dev", "v1", ctrl_ns, "pipelineruns",
        label_selector=f"{c.LABEL_ROLE}=provision")["items"]
    return Counter(r["metadata"]["labels"][c.LABEL_TASKRUN_UID] for r in runs)


def event_reasons(kube, ns) -> Counter:
    """(involved uid, reason) -> count of the Events in ``ns``."""
    out: Counter = Counter()
    cont = None
    while True:
        page = client.CoreV1Api(kube).list_namespaced_event(ns, limit=500, _continue=cont)
        for e in page.items:
            out[(e.involved_object.uid, e.reason)] += 1
        cont = page.metadata._continue
        if not cont:
            return out
