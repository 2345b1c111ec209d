"""Queue admission: which waiting builds may start provisioning now, FIFO per platform,
over free slots; and the index of waiting builds it decides on.

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

The store keeps an ``Index`` of which builds are *waiting* (hold our finalizer,
unfinished, no provisioning run nor its answer) and which are *in flight* (a
provisioning run still running that holds no slot yet), per platform. Every change
to a build, a run or a slot re-classifies the one build it concerns (``state``), so
a decision counts them in O(1) instead of scanning every cached build (a burst of N
builds cost O(N^2) before), and finds a build's place in line by bisection.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpc.runner import hostpool, slots

from .objects import parse_time

if TYPE_CHECKING:
    from .store import Build, Run, Store

ADMIT, WAIT, TIMED_OUT = "admit", "wait", "timed-out"
WAITING, IN_FLIGHT = "waiting", "in-flight"


def state(b: "Build | None", runs: "dict[str, Run]", slots_held: int) -> tuple | None:
    """(platform, WAITING | IN_FLIGHT) of build ``b`` by its cached state, or None."""
    if b is None or not b.platform or not b.ours or b.finished:
        return None
    run = runs.get(b.provision_run)
    if run is None:
        return None if b.failed_run in runs else (b.platform, WAITING)
    if run.succeeded is None and not slots_held:
        return (b.platform, IN_FLIGHT)
    return None


class Index:
    """Waiting and in-flight build uids per platform, and the waiting ones in FIFO order."""

    def __init__(self) -> None:
        self._class: dict[str, tuple] = {}      # build uid -> (platform, WAITING|IN_FLIGHT)
        self._by_class: dict[tuple, set] = {}   # (platform, class) -> build uids
        self._line: dict[str, list] = {}        # platform -> sorted (created, uid) waiting
        self._created: dict[str, str] = {}      # waiting build uid -> its key's created

    def put(self, uid: str, new: tuple | None, created: str) -> None:
        """Build ``uid`` is now in class ``new`` (None: in none)."""
        old = self._class.get(uid)
        if old == new:
            return
        if old is not None:
            self._by_class[old].discard(uid)
            del self._class[uid]
            if old[1] == WAITING:
                line = self._line[old[0]]
                del line[bisect.bisect_left(line, (self._created[uid], uid))]
                del self._created[uid]
        if new is not None:
            self._by_class.setdefault(new, set()).add(uid)
            self._class[uid] = new
            if new[1] == WAITING:
                self._created[uid] = created
                bisect.insort(self._line.setdefault(new[0], []), (created, uid))

    def place_in_line(self, platform: str, created: str, uid: str) -> int:
        """How many of the platform's waiting builds are older (creationTimestamp, then
        uid) than build ``uid``: a bisection, not a scan."""
        return bisect.bisect_left(self._line.get(platform, []), (created, uid))

    def waiting(self, uid: str) -> bool:
        return self._class.get(uid, ("", ""))[1] == WAITING

    def sets(self, platform: str) -> tuple[set, set]:
        """(waiting, in flight) build uids of ``platform``; read them under the store's
        lock."""
        return (self._by_class.get((platform, WAITING), set()),
                self._by_class.get((platform, IN_FLIGHT), set()))


@dataclass(frozen=True)
class Decision:
    verdict: str
    position: int = 0        # among the platform's waiting builds, 0 = oldest
    waiting: int = 0
    free: int = 0
    timeout_in: float = 0.0  # seconds until a waiting build has waited maxWaitSeconds


def free_slots(pool: hostpool.Pool, platform: str, store: "Store") -> int:
    """Free slots of ``platform``: the Tasks' own rule (``slots.free_slots``) on the cache."""
    with store.lock:
        held = list(store.slots.values())
    return sum(slots.free_slots(pool.hosts_for(platform), held).values())


def decide(pool: hostpool.Pool | None, store: "Store", uid: str, now: float) -> Decision:
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
        waiters, in_flight = store.admission.sets(b.platform)
        queued, room = len(waiters), free - len(in_flight)
        if queued <= room:
            return Decision(ADMIT, 0, queued, free)
        position = store.admission.place_in_line(b.platform, b.created, uid)
    if position < room:
        return Decision(ADMIT, position, queued, free)
    left = ((parse_time(b.created) or 0.0) + pool.max_wait_seconds - now) if b.created else 1e9
    if left <= 0:
        return Decision(TIMED_OUT, position, queued, free)
    return Decision(WAIT, position, queued, free, left)
