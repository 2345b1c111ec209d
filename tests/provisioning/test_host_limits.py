"""A host's limit is what it holds now: lowering concurrency and draining never
over-allocate, and builds already running finish and release normally."""
from __future__ import annotations

import threading

import yaml
from kubernetes import config as kconfig

from mpc.runner import contract
from mpc.runner.hostpool import Host
from mpc.runner.kube import Kube
from mpc.runner import slots as slotmod
from mpc.runner.slots import Holder, Slots

from .conftest import make_taskrun, read_secret


def tasks_kube(controller) -> Kube:
    return Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))


def host(concurrency: int, **kw) -> Host:
    return Host(name="h1", address="192.0.2.1", user="mpcadmin", secret="admin-h1",
                platform="linux/arm64", concurrency=concurrency, **kw)


def holder(i: int) -> Holder:
    return Holder("builds", f"build-{i}", f"00000000-0000-4000-8000-{i:012d}", "linux/arm64")


def test_lowered_concurrency_gives_no_slot_while_the_old_slots_fill_the_new_limit(controller):
    slots = Slots(tasks_kube(controller), controller.namespace)
    four = host(4)
    taken = [slots.allocate([four], holder(i)) for i in range(4)]
    assert sorted(s.index for s in taken) == [0, 1, 2, 3]
    for s in taken[:2]:           # builds on slots 0 and 1 end; 2 and 3 still run
        slots.release(s)
    assert sorted(s.index for s in slots.all()) == [2, 3]

    two = host(2)                 # the platform team lowers the limit to 2
    assert slots.free_count([two]) == 0
    assert slotmod.free_slots([two], slots.all()) == {"h1": 0}
    assert slots.allocate([two], holder(10)) is None
    assert slots.allocate([two], holder(11)) is None
    assert len(slots.all()) == 2

    slots.release(taken[3])       # one old build ends: one new build fits, not two
    assert slots.free_count([two]) == 1
    got = [slots.allocate([two], holder(i)) for i in (12, 13)]
    assert got[0] is not None and got[1] is None
    assert len(slots.all()) == 2


def test_racing_takers_on_a_lowered_host_never_exceed_its_limit(controller):
    kube = tasks_kube(controller)
    slots = Slots(kube, controller.namespace)
    old = slots.allocate([host(4)], holder(0))
    for i in range(1, 4):
        slots.allocate([host(4)], holder(i))
    for s in slots.all():
        if s.index != 3:
            slots.release(s)
    assert [s.index for s in slots.all()] == [3]
    two = host(2)                 # room for exactly one more build
    won: list = []
    barrier = threading.Barrier(6)

    def take(i: int) -> None:
        mine = Slots(tasks_kube(controller), controller.namespace)
        barrier.wait()
        for _ in range(20):       # like a waiter polling: retry after giving back
            s = mine.allocate([two], holder(100 + i))
            if s is not None:
                won.append(s)
                return
    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    assert len(slots.all()) == 2
    assert old is not None


def test_pure_capacity_counts_ignore_slot_indices_and_drained_hosts():
    a = Host("a", "192.0.2.1", "u", "s", "linux/arm64", 2)
    b = Host("b", "192.0.2.2", "u", "s", "linux/arm64", 3, drain=True)
    c = Host("c", "192.0.2.3", "u", "s", "linux/amd64", 1)

    class S:
        def __init__(self, host):
            self.host = host
    held = [S("a"), S("a"), S("a"), S("b")]          # a holds 3 after being lowered to 2
    assert slotmod.free_slots([a, b, c], held) == {"a": 0, "b": 0, "c": 1}
    assert slotmod.free_per_platform([a, b, c], held) == {"linux/arm64": 0, "linux/amd64": 1}


def set_drain(controller, doc: dict, name: str, drain: bool) -> None:
    for h in doc["hosts"]:
        if h["name"] == name:
            h["drain"] = drain
    controller.set_pool_text(yaml.safe_dump(doc))


def test_drained_host_gets_no_new_build_and_its_running_build_ends_normally(
        controller, kube, namespace, make_host):
    a, b = make_host(), make_host()
    doc = controller.install_pool([a, b], concurrency=2, maxWaitSeconds=0)
    first = make_taskrun(kube, namespace)
    assert controller.provision(first).results["outcome"] == "served"
    on = controller.leases("slot")[0].metadata.labels[contract.LABEL_HOST]
    drained, other = (a, b) if on == a.name else (b, a)
    first_user = read_secret(kube, first)["host"].split("@")[0]
    assert first_user in drained.users()

    set_drain(controller, doc, drained.name, True)
    later = [make_taskrun(kube, namespace) for _ in range(3)]
    results = [controller.provision(tr).results for tr in later]
    # two fit on the other host; the third finds the drained host's free slot unusable
    assert results[:2] == [{"outcome": "served", "host": other.name}] * 2
    assert results[2]["outcome"] == "error"
    assert "became free" in read_secret(kube, later[2])["error"]
    assert not [u for u in drained.users() if contract.USER_RE.match(u)
                and u != first_user]

    controller.deprovision(first)            # the running build ends normally
    assert first_user not in drained.users()
    assert {l.metadata.labels[contract.LABEL_HOST] for l in controller.leases("slot")} \
        == {other.name}

    set_drain(controller, doc, drained.name, False)   # back in service
    back = make_taskrun(kube, namespace)
    assert controller.provision(back).results == {"outcome": "served", "host": drained.name}


def test_releasing_a_stale_view_of_a_slot_never_frees_its_next_holder(controller):
    """The sweep reads a done build's slot, removes its user, then releases the slot. If the
    slot was freed and taken by another build meanwhile (same Lease name), releasing the
    stale view must leave the new holder's slot alone: deleting it by name let a second
    build onto the host (over its limit), and the next sweep removed the first build's
    user under it (seen in the soak: 'Connection closed by remote host')."""
    slots = Slots(tasks_kube(controller), controller.namespace)
    one = host(1)
    stale = slots.allocate([one], holder(1))          # what the sweep read
    slots.release(slots.all()[0])                     # the build's own release goes first
    now = slots.allocate([one], holder(2))            # the next build takes the same slot
    assert now is not None and now.lease_name == stale.lease_name
    slots.release(stale)                              # the sweep's release, late
    assert [s.holder.uid for s in slots.all()] == [holder(2).uid]
    assert slots.allocate([one], holder(3)) is None   # the host stays at its limit
    slots.release(now)
    assert slots.all() == []
