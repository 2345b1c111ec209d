"""Giving slots back: remove the builds' users from the host, then delete the slots.

A slot's host is the pool's entry of that name. A host no longer in the pool
(removed, renamed, or its entry now names another address or port) is reached
as the slot recorded it when it was taken (``slots.target_annotations``:
address, port, admin user, admin-key Secret, and the pool's ``hostKey`` if it
had one; otherwise the key recorded on first use in its ``hostkeys`` Lease
still pins the connection). So a removed host's builds keep their slots until
they end and are then cleaned up like any other.

A removed host that cannot be reached (down, decommissioned, its admin Secret
deleted, or a slot from before slots recorded their host): the slot is kept
and the time of the first failure is written on it
(``build.mpc.dev/unreachable-since``, log event "removed host unreachable");
every deprovisioning and sweep run tries again, and once
``REMOVED_HOST_GRACE_SECONDS`` (24 hours) have passed since that first
failure the slot is released without removing the user, with a warning log
event naming the host and users to check by hand. Nothing of mpc runs there
again (the host is not in the pool), and capacity accounting is never stuck.
The grace is measured on the runners' wall clocks: a skew of minutes between
pods is immaterial against a day. A host still in the pool is never given up
on: its slots stay until its users are removed.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from . import contract, hostkeys, log
from .hostpool import Host, Pool
from .kube import Kube
from .remote import HostError, script
from .slots import Slot, Slots

REMOVED_HOST_GRACE_SECONDS = 24 * 3600


@dataclass
class Report:
    removed_users: list[str] = field(default_factory=list)
    released_slots: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    secret_deleted: bool = False
    round_trips: int = 0


def remove_users(kube: Kube, namespace: str, host: Host, users: list[str]) -> int:
    """Remove build users from a host (idempotent); returns SSH round trips."""
    bad = [u for u in users if not contract.USER_RE.match(u)]
    if bad:
        raise ValueError(f"not mpc build users: {bad}")
    if not users:
        return 0
    with hostkeys.session(kube, namespace, host) as s:
        s.run(script("deprovision-users.sh", BUILD_USERS=" ".join(users),
                     CONTAINER_LABEL=contract.LABEL_BUILD_USER, CACHE_ROOT=contract.CACHE_ROOT,
                     HOST_BUILDER_COMMAND=contract.HOST_BUILDER_COMMAND))
        return s.round_trips


def host_for(pool: Pool | None, slot: Slot) -> tuple[Host | None, bool]:
    """(where ``slot``'s users live, whether that host left the pool).

    The pool's entry when it still describes the host the slot was taken on;
    otherwise the host as the slot recorded it. With the pool unreadable the
    recorded host is used, but nobody is declared removed.
    """
    here = pool.host(slot.host) if pool is not None else None
    rec = slot.target
    if here is not None and (rec is None or (rec.address, rec.port) == (here.address, here.port)):
        return here, False
    return rec, pool is not None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _since(value: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _unreachable(slots: Slots, host_name: str, hs: list[Slot], error: str, report: Report,
                 grace: float) -> None:
    """A removed host could not be reached: record it, or give up after ``grace``."""
    users = sorted({s.holder.user for s in hs})
    seen = [t for t in (_since(s.unreachable_since) for s in hs if s.unreachable_since) if t]
    first = min(seen) if seen else None
    if first is None:
        stamp = _now().isoformat()
        for s in hs:
            slots.mark_unreachable(s, stamp)
        log.event("removed host unreachable; slots kept, released if it stays unreachable",
                  level="warning", host=host_name, users=users, error=error,
                  give_up_after_seconds=grace)
    elif (_now() - first).total_seconds() >= grace:
        for s in hs:
            slots.release(s)
            report.released_slots.append(s.lease_name)
        log.event("removed host unreachable too long; slots released, users NOT removed",
                  level="warning", host=host_name, users=users, error=error,
                  unreachable_since=first.isoformat(), grace_seconds=grace,
                  address=hs[0].target.address if hs[0].target else "")
        return
    report.errors.append(f"{host_name}: removed from the pool and unreachable: {error}")


def release_slots(kube: Kube, namespace: str, pool: Pool | None, slots: Slots,
                  held: list[Slot], report: Report,
                  grace: float = REMOVED_HOST_GRACE_SECONDS) -> None:
    """Remove the users of ``held`` from their hosts, then free those slots."""
    by_host: dict[tuple, list[Slot]] = {}
    for s in held:
        host, removed = host_for(pool, s)
        key = (s.host, host.address if host else "", host.port if host else 0)
        by_host.setdefault(key, []).append(s)
    for (host_name, _, _), hs in by_host.items():
        host, removed = host_for(pool, hs[0])
        if host is None:
            if removed:
                _unreachable(slots, host_name, hs, "the slot does not record how to reach it",
                             report, grace)
            else:
                report.errors.append(f"{host_name}: host pool unreadable and the slot does "
                                     "not record the host; slot kept")
            continue
        if removed:
            log.event("host not in the pool; reaching it as the slot recorded it",
                      host=host_name, address=host.address, port=host.port)
        users = sorted({s.holder.user for s in hs})
        try:
            report.round_trips += remove_users(kube, namespace, host, users)
        except HostError as e:
            if removed:
                _unreachable(slots, host_name, hs, str(e), report, grace)
            else:
                report.errors.append(str(e))
            continue
        report.removed_users += users
        for s in hs:
            slots.release(s)
            report.released_slots.append(s.lease_name)
