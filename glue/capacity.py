"""Which waiting builds may start provisioning now: FIFO per platform, over free slots.

Waiting happens here, in the watcher's memory, not in Task pods: a build of a
full platform gets no provisioning run (no pod, no API polling) until a slot is
free for it. Everything comes from the watch cache, so a queue of 1,000
builds costs the API server nothing while it waits; see docs/queue.md.

For a platform with static hosts, with F free slots (each host's current
limit minus the slot Leases it holds; a draining host offers none) and R
provisioning runs in flight that hold no slot yet, the oldest ``F - R``
waiting builds are admitted. Order is the API server's creationTimestamp (one
clock, whatever pod looks), then uid. The provisioning Task still takes its
slot atomically, so a decision made on a cache a moment old can make a run
wait briefly in its pod, never over-allocate a host.

A build waits at most the pool's ``maxWaitSeconds`` (measured from its
creationTimestamp); then it gets its answer: an error secret saying the
platform stayed full.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpc.runner import hostpool, slots

from .objects import parse_time
from .store import Store

ADMIT, WAIT, TIMED_OUT = "admit", "wait", "timed-out"


@dataclass(frozen=True)
class Decision:
    verdict: str
    position: int = 0        # among the platform's waiting builds, 0 = oldest
    waiting: int = 0
    free: int = 0
    timeout_in: float = 0.0  # seconds until a waiting build has waited maxWaitSeconds


def free_slots(pool: hostpool.Pool, platform: str, store: Store) -> int:
    """Free slots of ``platform``: the Tasks' own rule (``slots.free_slots``) on the cache."""
    with store.lock:
        held = list(store.slots.values())
    return sum(slots.free_slots(pool.hosts_for(platform), held).values())


def decide(pool: hostpool.Pool | None, store: Store, uid: str, now: float) -> Decision:
    """May build ``uid`` (which holds our finalizer and has no provisioning run) start now?

    The store's admission index gives the platform's waiting and in-flight builds
    without a scan; when there is room for every waiting build (a burst), no order is
    needed at all. Only a full platform looks up the build's place in line (a bisection).
    """
    b = store.build(uid)
    if (b is None or pool is None or not b.platform or b.platform in pool.local_platforms
            or not pool.hosts_for(b.platform) or not pool.namespace_allowed(b.namespace)):
        return Decision(ADMIT)      # the provisioning run answers at once (host or error)
    free = free_slots(pool, b.platform, store)
    with store.lock:
        waiters, in_flight = store.admission_sets(b.platform)
        queued, room = len(waiters), free - len(in_flight)
        if queued <= room:
            return Decision(ADMIT, 0, queued, free)
        position = store.place_in_line(b.platform, b.created, uid)
    if position < room:
        return Decision(ADMIT, position, queued, free)
    left = ((parse_time(b.created) or 0.0) + pool.max_wait_seconds - now) if b.created else 1e9
    if left <= 0:
        return Decision(TIMED_OUT, position, queued, free)
    return Decision(WAIT, position, queued, free, left)
