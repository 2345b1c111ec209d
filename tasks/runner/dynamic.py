"""Serving builds from dynamic hosts: claim a warm VM or launch one, release it, sweep.

Provisioning a build of a dynamic platform (``provision``): queue like a
build of a full static platform (the waiter Leases of ``slots.py``) while
neither a place on a ready VM nor a free instance of the quota exists; else
take a place on a ready (warm) VM, or reserve a record (``vms.py``: quota
first, then launch) and launch a VM whose host key mpc made, wait until SSH
answers with exactly that key (pinned from the first connection: a VM that
offers another key is a failed boot, never trusted), then create the build
user and write the secret through ``provision.create_user`` and
``buildsecret`` exactly as for a static host. A VM that does not boot within
``bootTimeoutSeconds`` is terminated and another is launched, at most
``launchAttempts`` times.

Releasing (``release``): remove the user, drop the build's place; a
single-use VM (``maxBuildsPerVM: 1``) or one past ``maxAgeSeconds`` with no
build left is terminated, others go back to the warm pool. Terminating is
``retire``: mark the record terminating (only when no build holds a place),
terminate, wait until the provider says the VM is terminated, and only then
delete the record.

The sweep (``sweep``, called by ``deprovision.sweep``) lists the provider's
VMs tagged with this installation *before* the records, so a VM launched
right now (its record was created before its launch) is never taken for an
orphan; it terminates every VM no record accounts for, frees the places of
finished or vanished builds, retires records whose VM is gone, old or
abandoned mid-launch, and launches VMs until ``minIdle`` are warm, within the
quota.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kubernetes import client

from . import buildsecret, contract, hostkeys, log
from .cloud import LaunchRequest, Provider, ProviderError, for_platform
from .hostpool import Dynamic, Host, Pool
from .kube import Kube
from .remote import HostError
from .slots import Gone, Holder, Slots, holder_of
from .vms import BOOTING, LAUNCHING, READY, TERMINATING, VM, Conflict, Records, count

TERMINATE_CONFIRM_SECONDS = 300
BOOT_POLL_SECONDS = 1.0


class BootFailed(Exception):
    """A launched VM did not answer SSH with its pinned key in time (or at all)."""


@dataclass
class Report:
    terminated_orphans: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    released_places: list[str] = field(default_factory=list)
    launched_warm: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def vm_host(dyn: Dynamic, vm: VM) -> Host:
    return dyn.vm_host(vm.name, vm.address, vm.host_key)


def _reusable(dyn: Dynamic, vm: VM) -> bool:
    """May ``vm`` take another build (beyond those it holds)?"""
    if vm.state != READY or vm.age() > dyn.max_age_seconds:
        return False
    return dyn.max_builds_per_vm > 1 or vm.builds_served == 0


# --- launching and booting -----------------------------------------------------------
def launch(kube: Kube, namespace: str, provider: Provider, records: Records, dyn: Dynamic,
           rec: VM, host_key_private: bytes) -> VM:
    """Launch the VM ``rec`` stands for (or adopt the one an earlier, killed attempt
    launched for it) and record its id and address: state booting."""
    current = [rec]

    def fence() -> None:                # before every attempt of the launch call
        current[0] = records.fence(current[0])

    found = [i for i in provider.find(rec.uid) if not i.gone]
    inst = found[0] if found else provider.launch(LaunchRequest(
        record=f"{namespace}/{rec.name}", record_uid=rec.uid,
        client_token=contract.vm_client_token(rec.uid), platform=dyn.platform,
        host_key_private=host_key_private, host_key_public=rec.host_key, fence=fence))
    rec = current[0]
    address = inst.address
    deadline = time.monotonic() + 60
    while not address and time.monotonic() < deadline:
        time.sleep(BOOT_POLL_SECONDS)
        address = (provider.describe([inst.id]).get(inst.id) or inst).address
    if not address:
        raise BootFailed(f"instance {inst.id} got no private address")
    launched = (inst.launched_at.isoformat() if inst.launched_at
                else time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    log.event("VM launched", platform=dyn.platform, record=rec.name, instance=inst.id,
              address=address)
    return records.update(rec, state=BOOTING, annotations={
        contract.ANN_INSTANCE_ID: inst.id, contract.ANN_ADDRESS: address,
        contract.ANN_LAUNCHED_AT: launched})


def wait_for_ssh(kube: Kube, namespace: str, records: Records, dyn: Dynamic, vm: VM) -> VM:
    """Until the VM answers SSH as its admin with the key mpc gave it (renewing the record)."""
    deadline = time.monotonic() + dyn.boot_timeout_seconds
    last = ""
    while True:
        try:
            with hostkeys.session(kube, namespace, vm_host(dyn, vm)) as s:
                s.run("true", timeout=30, attempts=1)
            return vm
        except hostkeys.HostKeyChanged as e:       # not possible with a pinned key; be sure
            raise BootFailed(str(e)) from None
        except HostError as e:
            last = str(e)
            if "host key" in last.lower() or "IDENTIFICATION HAS CHANGED" in last:
                raise BootFailed(f"{vm.name} offered another host key than the one mpc "
                                 f"gave it: {last}") from None
        if time.monotonic() >= deadline:
            raise BootFailed(f"{vm.name} ({vm.instance_id} at {vm.address}) did not answer SSH "
                             f"within {dyn.boot_timeout_seconds}s: {last}")
        vm = records.renew(vm)
        time.sleep(BOOT_POLL_SECONDS)


def retire(provider: Provider, records: Records, vm: VM, why: str,
           confirm_seconds: float = TERMINATE_CONFIRM_SECONDS) -> bool:
    """Terminate ``vm`` and delete its record once the provider confirms; False if it holds
    builds (nothing done) or termination is not confirmed yet (record kept, terminating)."""
    if vm.state != TERMINATING:
        try:
            vm = records.update(vm, state=TERMINATING)
        except Conflict:
            return False
        if records.places_on(vm.name):           # a build took a place meanwhile: keep it
            try:
                records.update(vm, state=READY)
            except Conflict:
                pass
            return False
    ids = [vm.instance_id] if vm.instance_id else []
    ids += [i.id for i in provider.find(vm.uid) if not i.gone and i.id not in ids]
    provider.terminate(ids)
    deadline = time.monotonic() + confirm_seconds
    while True:
        live = [i for i in provider.describe(ids).values() if not i.gone]
        live += [i for i in provider.find(vm.uid) if not i.gone and i.id not in ids]
        if not live:
            break
        if time.monotonic() >= deadline:
            log.event("termination not confirmed yet; record kept", level="warning",
                      record=vm.name, instances=[i.id for i in live])
            return False
        provider.terminate([i.id for i in live])
        time.sleep(BOOT_POLL_SECONDS)
    records.delete(vm)
    log.event("VM terminated, record deleted", record=vm.name, instances=ids, why=why)
    return True


def launch_ready(kube: Kube, namespace: str, provider: Provider, records: Records,
                 dyn: Dynamic, holder: Holder | None, keep=None
                 ) -> tuple[VM | None, str | None, str]:
    """Reserve, launch and boot one VM; with ``holder`` take its first place before it is
    ready (no warm claim can race for it). (vm, place, "") or (None, None, why).
    ``keep(record)``, asked once the record is reserved: False gives it back unlaunched
    (why "surplus")."""
    priv, pub = buildsecret.new_keypair()
    pub = " ".join(pub.split()[:2])
    rec = records.reserve(dyn, pub, holder.uid if holder else "")
    if rec is None:
        return None, None, "quota"
    if keep is not None and not keep(rec):
        records.delete(rec)
        return None, None, "surplus"
    vm = rec
    started = time.monotonic()
    try:
        vm = launch(kube, namespace, provider, records, dyn, rec, priv)
        vm = wait_for_ssh(kube, namespace, records, dyn, vm)
        place = records.take_place(vm, dyn, holder) if holder else None
        vm = records.update(vm, state=READY, annotations={
            contract.ANN_READY_AT: time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            contract.ANN_BUILDS_SERVED: "1" if holder else "0"})
        count(kube, namespace, dyn.platform, boot_seconds=time.monotonic() - started, launches=1)
        return vm, place, ""
    except (BootFailed, ProviderError, Conflict, HostError) as e:
        log.event("launch failed; terminating", level="warning", record=rec.name, error=str(e))
        count(kube, namespace, dyn.platform, launch_failures=1)
        if holder:
            for p in records.places_on(rec.name):
                records.drop(p)
        current = records.get(rec.name)
        if current is not None and current.uid == rec.uid:
            try:
                retire(provider, records, current, f"launch failed: {e}")
            except ProviderError as e2:
                log.event("could not terminate; left for the sweep", level="warning",
                          record=rec.name, error=str(e2))
        return None, None, str(e)


# --- claiming a warm VM ------------------------------------------------------------------
def claim(records: Records, dyn: Dynamic, holder: Holder) -> tuple[VM | None, str | None]:
    """Take a place on a ready VM (fullest first, to let others empty and retire)."""
    candidates = [v for v in records.all(dyn.platform) if _reusable(dyn, v)]
    places: dict[str, int] = {}
    for p in records.all_places():
        vmname = (p.metadata.labels or {}).get(contract.LABEL_VM, "")
        places[vmname] = places.get(vmname, 0) + 1
    candidates = [v for v in candidates if places.get(v.name, 0) < dyn.max_builds_per_vm]
    candidates.sort(key=lambda v: (-places.get(v.name, 0), v.name))
    for vm in candidates:
        place = records.take_place(vm, dyn, holder)
        if place is None:
            continue
        cur = records.get(vm.name)          # a retire may have started: then give it back
        if cur is None or cur.uid != vm.uid or not _reusable(dyn, cur):
            records.drop(place)
            continue
        try:
            cur = records.update(cur, annotations={
                contract.ANN_BUILDS_SERVED: str(cur.builds_served + 1)})
        except Conflict:
            cur = records.get(vm.name) or cur
        return cur, place
    return None, None


def free_capacity(records: Records, dyn: Dynamic) -> int:
    vms = records.all(dyn.platform)
    used: dict[str, int] = {}
    for p in records.all_places():
        n = (p.metadata.labels or {}).get(contract.LABEL_VM, "")
        used[n] = used.get(n, 0) + 1
    warm = sum(max(0, dyn.max_builds_per_vm - used.get(v.name, 0)) for v in vms if _reusable(dyn, v))
    return warm + max(0, dyn.max_instances - len(vms))


# --- provisioning one build --------------------------------------------------------------
def provision(kube: Kube, req, pool: Pool, dyn: Dynamic, taskrun: dict, poll: float = 0.5):
    """Serve one build of dynamic platform ``dyn`` (``req``: a ``provision.Request``)."""
    from .provision import Outcome, _fail, create_user, live_taskrun
    ns = req.controller_namespace
    ids = {"namespace": req.taskrun_namespace, "name": req.taskrun_name, "uid": req.taskrun_uid}
    holder = Holder(req.taskrun_namespace, req.taskrun_name, req.taskrun_uid, req.platform,
                    req.owner)
    records, slots = Records(kube, ns), Slots(kube, ns)
    release(kube, ns, pool, req.taskrun_uid)          # an earlier attempt's place and user
    try:
        provider = for_platform(kube, ns, pool, dyn)
    except ProviderError as e:
        return _fail(kube, taskrun, f"mpc cannot reach the cloud of platform {req.platform}: "
                     f"{e}. The platform team must fix the provider settings in the host pool.")
    max_wait = pool.max_wait_seconds if req.max_wait_seconds is None else req.max_wait_seconds
    deadline = time.monotonic() + max_wait
    failures: list[str] = []
    ns_place: str | None = None
    slots.enqueue(holder)
    last_renew = last_alive = time.monotonic()
    waited = False
    try:
        while True:
            vm = place = None
            if dyn.max_instances_per_namespace and ns_place is None:
                ns_place = records.take_namespace_place(dyn, holder)
            ns_ok = not dyn.max_instances_per_namespace or ns_place is not None
            if ns_ok and _position(slots, records, dyn, holder) < free_capacity(records, dyn):
                vm, place = claim(records, dyn, holder)
                if vm is not None:
                    count(kube, ns, dyn.platform, warm_claims=1)
                    _event(kube, taskrun, "VMClaimed", f"warm VM {vm.instance_id} "
                           f"({vm.name}, platform {dyn.platform}) claimed")
                else:
                    started = time.monotonic()
                    vm, place, why = launch_ready(kube, ns, provider, records, dyn, holder)
                    if vm is not None:
                        _event(kube, taskrun, "VMLaunched", f"VM {vm.instance_id} ({vm.name}, "
                               f"platform {dyn.platform}) launched for this build; it answered "
                               f"SSH {time.monotonic() - started:.0f}s later")
                    elif why != "quota":
                        _event(kube, taskrun, "VMLaunchFailed", f"a VM of platform "
                               f"{dyn.platform} failed to launch or boot: {why}", "Warning")
                    if vm is None and why != "quota":
                        failures.append(why)
                        if len(failures) >= dyn.launch_attempts:
                            _give_back_ns(records, ns_place)
                            return _fail(kube, taskrun, (
                                f"no VM of platform {req.platform} became reachable: "
                                f"{len(failures)} launches failed ({'; '.join(failures)}). The "
                                "platform team should check the image, network and key pair."),
                                failed_hosts={f"launch-{i}": f for i, f in enumerate(failures)})
                        continue
            if vm is not None:
                if live_taskrun(kube, req) is None:
                    release(kube, ns, pool, req.taskrun_uid)
                    return Outcome("gone")
                host = vm_host(dyn, vm)
                priv, pub = buildsecret.new_keypair()
                try:
                    user_dir, known_hosts, trips, _ = create_user(kube, req, host, holder.user, pub)
                except HostError as e:
                    failures.append(f"{vm.name}: {e}")
                    log.event("VM failed; trying another", level="warning", vm=vm.name,
                              error=str(e), **ids)
                    records.drop(place)
                    try:
                        retire(provider, records, records.get(vm.name) or vm, f"failed: {e}")
                    except ProviderError:
                        pass
                    if len(failures) >= dyn.launch_attempts:
                        _give_back_ns(records, ns_place)
                        return _fail(kube, taskrun, f"provisioning failed on every VM of "
                                     f"platform {req.platform}: {'; '.join(failures)}")
                    continue
                taskrun = live_taskrun(kube, req)
                if taskrun is None:
                    release(kube, ns, pool, req.taskrun_uid)
                    return Outcome("gone", round_trips=trips)
                buildsecret.write(kube, taskrun, {
                    contract.KEY_PRIVATE_KEY: priv, contract.KEY_HOST: f"{holder.user}@{vm.address}",
                    contract.KEY_USER_DIR: user_dir, contract.KEY_KNOWN_HOSTS: known_hosts + "\n"})
                log.event("provisioned on a VM", vm=vm.name, instance=vm.instance_id,
                          user=holder.user, **ids)
                return Outcome("served", host=vm.name, round_trips=trips)
            if time.monotonic() >= deadline:
                _give_back_ns(records, ns_place)
                return _fail(kube, taskrun, f"no VM of platform {req.platform} became free "
                             f"within {max_wait}s (maxInstances {dyn.max_instances}"
                             + (f", maxInstancesPerNamespace {dyn.max_instances_per_namespace}"
                                if dyn.max_instances_per_namespace else "")
                             + ", all busy). Retry the build later or ask the platform team "
                             "for a higher quota.")
            if not waited:
                log.event("dynamic platform at its quota: waiting", platform=req.platform, **ids)
                count(kube, ns, dyn.platform, quota_blocked=1)
                _event(kube, taskrun, "WaitingForVM", (
                    f"platform {dyn.platform} is at its quota (maxInstances {dyn.max_instances}"
                    + (f", maxInstancesPerNamespace {dyn.max_instances_per_namespace}"
                       if dyn.max_instances_per_namespace else "")
                    + "): waiting for a VM"))
                waited = True
            time.sleep(poll)
            if time.monotonic() - last_alive > 3:
                last_alive = time.monotonic()
                if live_taskrun(kube, req) is None:
                    _give_back_ns(records, ns_place)
                    raise Gone(req.taskrun_uid)
            if time.monotonic() - last_renew > 10:
                slots.renew(holder)
                last_renew = time.monotonic()
    except Gone:
        return Outcome("gone")
    finally:
        slots.dequeue(holder.uid)


def _position(slots: Slots, records: Records, dyn: Dynamic, holder: Holder) -> int:
    """``holder``'s place in its platform's FIFO queue, not counting the builds ahead of it
    that their namespace's quota holds back (they could not take a VM if one were free:
    counting them would keep other namespaces' builds waiting behind them)."""
    me = contract.waiter_name(holder.uid)
    queue = slots.live([w for w in slots.waiters() if w.holder.platform == dyn.platform], me)
    limit = dyn.max_instances_per_namespace
    if limit:
        holding: set[str] = set()
        per_ns: dict[str, int] = {}
        for p in records.all_namespace_places():
            lab, ann = p.metadata.labels or {}, p.metadata.annotations or {}
            if ann.get(contract.ANN_PLATFORM) != dyn.platform:
                continue
            holding.add(lab.get(contract.LABEL_TASKRUN_UID, ""))
            ns = lab.get(contract.LABEL_TASKRUN_NAMESPACE, "")
            per_ns[ns] = per_ns.get(ns, 0) + 1
        queue = [w for w in queue if w.name == me or w.holder.uid in holding
                 or per_ns.get(w.holder.namespace, 0) < limit]
    names = [w.name for w in queue]
    return names.index(me) if me in names else len(names)


def _event(kube: Kube, taskrun: dict, reason: str, message: str, kind: str = "Normal") -> bool:
    """An Event on the build TaskRun (best effort: a failure is logged, never raised)."""
    m = taskrun["metadata"]
    digest = hashlib.sha256("\0".join((m["uid"], reason, message)).encode()).hexdigest()[:16]
    ts = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{m['name'][:200].rstrip('-.')}.{digest}",
                         "namespace": m["namespace"],
                         "labels": {contract.LABEL_MANAGED: contract.MANAGED_VALUE}},
            "involvedObject": {**contract.involved_object(taskrun), "namespace": m["namespace"]},
            "reason": reason, "message": message[:1000], "type": kind,
            "source": {"component": hostkeys.COMPONENT},
            "reportingComponent": hostkeys.COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1}
    try:
        kube.core.create_namespaced_event(m["namespace"], body)
        return True
    except client.ApiException as e:
        if e.status != 409:
            log.event("could not post event", level="warning", reason=reason, status=e.status)
        return False


def _give_back_ns(records: Records, name: str | None) -> None:
    if name:
        records.drop(name)


# --- releasing a build ----------------------------------------------------------------------
def release(kube: Kube, namespace: str, pool: Pool | None, uid: str) -> list[str]:
    """Remove the build's users from its VMs, drop its places, retire VMs that are done.

    Returns errors (a place whose user could not be removed is kept for the sweep)."""
    from .provision import remove_users
    records = Records(kube, namespace)
    errors: list[str] = []
    for p in records.places_of(uid):
        lab, ann = p.metadata.labels or {}, p.metadata.annotations or {}
        vm = records.get(lab.get(contract.LABEL_VM, ""))
        dyn = pool.dynamic_for(vm.platform) if (pool and vm) else None
        if vm is not None and dyn is not None and vm.address and vm.state in (READY, BOOTING):
            try:
                remove_users(kube, namespace, vm_host(dyn, vm), [ann.get(contract.ANN_USER, "")])
            except (HostError, ValueError) as e:
                if dyn.max_builds_per_vm > 1:      # a single-use VM takes its user with it
                    errors.append(f"{vm.name}: {e}")
                    continue
        records.drop(p)
        if vm is None:
            continue
        if dyn is None or not _keep(dyn, vm):
            try:
                provider = for_platform(kube, namespace, pool, dyn) if dyn else None
                if provider and not records.places_on(vm.name):
                    retire(provider, records, records.get(vm.name) or vm, "released")
            except ProviderError as e:
                errors.append(f"{vm.name}: {e}")
    for p in records.namespace_places_of(uid):
        records.drop(p)
    return errors


def _keep(dyn: Dynamic, vm: VM) -> bool:
    return dyn.max_builds_per_vm > 1 and vm.state == READY and vm.age() <= dyn.max_age_seconds


# --- the sweep ----------------------------------------------------------------------------
def sweep(kube: Kube, namespace: str, pool: Pool, build_state) -> Report:
    """Terminate orphans, clean records, free places of done builds, keep minIdle warm."""
    rep = Report()
    records = Records(kube, namespace)
    providers: dict[str, Provider] = {}
    for dyn in pool.dynamic:
        try:
            providers[dyn.platform] = for_platform(kube, namespace, pool, dyn)
        except ProviderError as e:
            rep.errors.append(f"{dyn.platform}: {e}")
    # 1. the cloud's VMs first, then the records (see module docstring)
    listed: dict[str, list] = {}
    seen_accounts: set[tuple] = set()
    for plat, prov in providers.items():
        acct = (getattr(prov, "settings", None) and (prov.settings.region, prov.settings.endpoint,
                                                     prov.settings.credentials_secret))
        try:
            listed[plat] = [] if acct in seen_accounts else prov.list_managed()
        except ProviderError as e:
            rep.errors.append(f"{plat}: {e}")
        seen_accounts.add(acct)
    all_vms = records.all()
    by_uid = {v.uid: v for v in all_vms}
    # 2. VMs no record accounts for
    for plat, insts in listed.items():
        orphans = [i for i in insts if not i.gone
                   and by_uid.get(i.tags.get(contract.TAG_RECORD_UID, "")) is None]
        if orphans:
            try:
                providers[plat].terminate([i.id for i in orphans])
                rep.terminated_orphans += [i.id for i in orphans]
                for p in {i.tags.get(contract.TAG_PLATFORM) or plat for i in orphans}:
                    count(kube, namespace, p, orphans_terminated=sum(
                        1 for i in orphans if (i.tags.get(contract.TAG_PLATFORM) or plat) == p))
                log.event("orphaned VMs terminated", level="warning",
                          instances=[i.id for i in orphans])
            except ProviderError as e:
                rep.errors.append(str(e))
    # 3. places of builds that are done
    for p in records.all_places() + records.all_namespace_places():
        build = holder_of(p.metadata)
        if build_state(kube, *build.build)[1]:
            rep.errors += release(kube, namespace, pool, build.uid)
            rep.released_places.append(p.metadata.name)
    # 4. records: gone, abandoned, old, terminating, or of a platform no longer in the pool
    all_vms = records.all()
    for vm in all_vms:
        dyn = pool.dynamic_for(vm.platform)
        prov = providers.get(vm.platform)
        if prov is None:
            continue                             # platform unknown or unreachable: keep
        try:
            why = _retire_reason(kube, records, prov, dyn, vm, build_state)
            if why and retire(prov, records, vm, why):
                rep.retired.append(vm.name)
        except ProviderError as e:
            rep.errors.append(f"{vm.name}: {e}")
    # 5. the warm pools
    for dyn in pool.dynamic:
        prov = providers.get(dyn.platform)
        if prov is None or dyn.min_idle == 0:
            continue
        vms = records.all(dyn.platform)
        busy = {(p.metadata.labels or {}).get(contract.LABEL_VM) for p in records.all_places()}
        warm = [v for v in vms if (_reusable(dyn, v) and v.name not in busy)
                or (v.state in (LAUNCHING, BOOTING) and not v.holder_uid and not v.stale)]
        need = min(dyn.min_idle - len(warm), dyn.max_instances - len(vms))
        if need <= 0:
            continue
        keep = _warm_keep(records, dyn)
        with ThreadPoolExecutor(max_workers=min(need, 8)) as ex:
            results = list(ex.map(
                lambda _: launch_ready(kube, namespace, prov, records, dyn, None, keep),
                range(need)))
        for vm, _, why in results:
            if vm is not None:
                rep.launched_warm.append(vm.name)
            elif why not in ("quota", "surplus"):
                rep.errors.append(f"{dyn.platform}: warm launch failed: {why}")
    log.event("dynamic sweep done", orphans=rep.terminated_orphans, retired=rep.retired,
              places=rep.released_places, warm=rep.launched_warm, errors=rep.errors)
    return rep


def _warm_keep(records: Records, dyn: Dynamic):
    """Whether a just-reserved warm record is one of the ``minIdle`` the platform lacks.

    Sweeps may overlap (a restarted watcher starts one while the old one's run goes on):
    each reserves records for the warm VMs it finds missing, then keeps a record only if
    it is among the first missing ones, by name, of all warm records being launched. Every
    sweep sees the same order, and records only leave it, so together they keep minIdle,
    not minIdle each."""
    def keep(rec: VM) -> bool:
        vms = records.all(dyn.platform)
        busy = {(p.metadata.labels or {}).get(contract.LABEL_VM) for p in records.all_places()}
        ready = [v for v in vms if _reusable(dyn, v) and v.name not in busy]
        starting = sorted(v.name for v in vms if v.state in (LAUNCHING, BOOTING)
                          and not v.holder_uid and not v.stale)
        return rec.name in starting[:max(0, dyn.min_idle - len(ready))]
    return keep


def _retire_reason(kube: Kube, records: Records, prov: Provider, dyn: Dynamic | None, vm: VM,
                   build_state) -> str | None:
    if vm.state == TERMINATING:
        return "terminating"
    places = records.places_on(vm.name)
    if vm.state in (LAUNCHING, BOOTING):
        if vm.stale:
            return "abandoned while launching"
        if vm.holder_uid and not places:
            # the launching build is done and nobody renews: the provisioner gives it back
            return None
        return None
    if dyn is None:
        return "platform no longer in the pool" if not places else None
    if vm.instance_id:
        inst = prov.describe([vm.instance_id]).get(vm.instance_id)
        if inst is None or inst.gone:
            for p in places:                      # the VM died under its builds
                records.drop(p)
            return "instance gone"
    if places:
        # Places whose builds are done are left only when their users could not be
        # removed (step 3 tried): while the VM answers, the next sweep tries again; a VM
        # that does not answer is terminated, which takes those users with it.
        for p in places:
            if not build_state(kube, *holder_of(p.metadata).build)[1]:
                return None                       # a build still runs there
        problem = _unhealthy(kube, records, dyn, vm)
        if problem is None:
            return None
        for p in places:
            records.drop(p)
        return f"unreachable with only finished builds: {problem}"
    if vm.age() > dyn.max_age_seconds:
        return "past maxAgeSeconds"
    if not _reusable(dyn, vm):
        return "single-use VM without build"
    problem = _unhealthy(kube, records, dyn, vm)
    return f"unhealthy: {problem}" if problem else None


def _unhealthy(kube: Kube, records: Records, dyn: Dynamic, vm: VM) -> str | None:
    """Why ``vm`` fails the SSH health check (as its admin, pinned key), or None."""
    try:
        with hostkeys.session(kube, records.namespace, vm_host(dyn, vm)) as s:
            s.run("true", timeout=30, attempts=2)
    except HostError as e:
        return str(e)
    return None



def deprovision(kube: Kube, namespace: str, uid: str, load_pool) -> list[str]:
    """``release`` for deprovisioning: reads the pool (``load_pool()``) only when the build
    holds something on a dynamic host."""
    records = Records(kube, namespace)
    if not records.places_of(uid) and not records.namespace_places_of(uid):
        return []
    return release(kube, namespace, load_pool(), uid)
