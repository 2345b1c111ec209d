"""40 builds race for 3 hosts x 2 slots: no host ever holds more than 2 builds."""
from __future__ import annotations

import threading
import time
from collections import Counter

from kubernetes import config as kconfig

from mpc.runner import contract
from mpc.runner.deprovision import deprovision
from mpc.runner.kube import Kube

from .conftest import make_taskrun, read_secret

BUILDS = 40


def test_forty_racing_provisions_never_overallocate(controller, kube, namespace, make_host):
    hosts = [make_host() for _ in range(3)]
    controller.install_pool(hosts, concurrency=2, maxWaitSeconds=600)
    trs = [make_taskrun(kube, namespace) for _ in range(BUILDS)]
    runs = [controller.start("mpc-provision", tr, PLATFORM="linux/arm64") for tr in trs]

    peak_users: Counter = Counter()
    peak_slots: Counter = Counter()
    samples = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal samples
        while not stop.is_set():
            for h in hosts:
                n = sum(1 for u in h.users() if contract.USER_RE.match(u))
                peak_users[h.name] = max(peak_users[h.name], n)
            per_host = Counter(l.metadata.labels[contract.LABEL_HOST]
                               for l in controller.leases("slot"))
            for name, n in per_host.items():
                peak_slots[name] = max(peak_slots[name], n)
            samples += 1
            time.sleep(0.05)

    # A build that got its host "runs" briefly and is then deprovisioned, freeing the slot.
    tasks_kube = Kube(kconfig.new_client_from_config(str(controller.kubeconfig),
                                                     persist_config=False))
    done: set[str] = set()

    def finish_builds() -> None:
        while not stop.is_set():
            for tr in trs:
                uid = tr["metadata"]["uid"]
                if uid in done:
                    continue
                s = read_secret(kube, tr)
                if s and "host" in s:
                    deprovision(tasks_kube, controller.namespace, namespace, tr["metadata"]["name"],
                                uid, provisioning_grace=0)
                    done.add(uid)
                elif s and "error" in s:
                    done.add(uid)
            time.sleep(0.1)

    threads = [threading.Thread(target=sample), threading.Thread(target=finish_builds)]
    for t in threads:
        t.start()
    try:
        outcomes = Counter(r.wait(timeout=900).check().results["outcome"] for r in runs)
    finally:
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    print(f"outcomes={dict(outcomes)} peak users={dict(peak_users)} "
          f"peak slots={dict(peak_slots)} samples={samples}")
    assert sum(outcomes.values()) == BUILDS
    assert set(outcomes) <= {"served", "error"}
    assert outcomes["served"] >= 6
    assert samples > 20
    assert max(peak_users.values()) <= 2 and max(peak_slots.values()) <= 2
    assert max(peak_slots.values()) == 2, "the hosts were never full: the race was not exercised"
    for tr, r in zip(trs, runs):
        if r.results["outcome"] == "error":
            assert "error" in (read_secret(kube, tr) or {})
