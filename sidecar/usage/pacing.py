"""Custom mode's sending slots: a fleet's hourly MeterUsage calls paced under AWS's quota. Pure.

AWS allows 10 MeterUsage calls per second per account and region, shared by every pod, and
every pod seals its hour at the same moment. Random spreading cannot keep a fleet under a
token bucket: random sends collide, and each collision is a ThrottlingException and a retry
(3.8 calls per record in benchmarks/metering_fleet.py before this). So time is cut into slots
of 1/`rate` seconds (`rate`: the fleet's share of the quota), and a frame of `slots` slots (one
per pod of the fleet) repeats: a pod sends at most one record per frame, in its own slot. With
a distinct slot per pod no two pods ever call in the same slot, and a fleet of N pods with D
records each is done D frames (D * N / rate seconds) after the seal, while a pod alone
(`slots` = 1) sends its records back to back.

The slot comes from the pod: its StatefulSet ordinal, distinct for every pod of the fleet (the
`apps.kubernetes.io/pod-index` label, which the Helm chart passes as MARKETPLACE_POD_INDEX, or
else a name of the shape `name-3` that no Deployment pod has), otherwise a hash of the name. A
StatefulSet pod throttled once in its own slot was late, not sharing it, and keeps it; throttled
again, it retries in a random slot of the next c/2 frames (c: consecutive throttles, up to 4).
A Deployment's hashed slots collide (50 names in 50 slots leave a third of the pods sharing):
the later pod of a shared slot probes forward, one or two slots on, and keeps the first slot
where a call goes through. A forward probe stays in the frame it lost (its record is not a
frame late) and fills the gaps the hash left, so the fleet settles on one slot per pod within
its first hour and sends the hours after without sharing one; its cost is that first hour's
probes (more with the fleet's size: clusters of taken slots are walked one slot at a time).
Slots are counted from the epoch, so pods agree on them through their clocks alone, and a
frame may be longer than an hour.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

AWS_CALLS_PER_SECOND = 10.0  # AWS's MeterUsage quota per account and region (default)
DEFAULT_CALLS_PER_SECOND = 9.0  # the fleet's default share of it: 10% left for start checks
MAX_RETRY_FRAMES = 2.0  # a throttled StatefulSet pod retries within at most this many frames
PROBE_REACH = 2  # a hashed pod throttled in slot s probes slot s+1 or s+2 (co-losers split)
SETTLED = 3  # frames in a row a hashed pod's calls went through in its slot: the slot is its own
# A StatefulSet pod's name: `<statefulset>-<ordinal>`, the ordinal in decimal without leading
# zeros (the controller writes strconv.Itoa), the whole name at most 62 characters (the
# StatefulSet's name is at most 52: its controller-revision-hash label must fit 63).
_ORDINAL = re.compile(r"[a-z0-9]([-.a-z0-9]*[a-z0-9])?-(0|[1-9][0-9]{0,8})")
# A generated pod name: `<owner>-<5 random>` (a DaemonSet's, a Job's, a bare ReplicaSet's) or a
# Deployment's `<deployment>-<pod-template-hash>-<5 random>`, the suffix 5 of
# "bcdfghjklmnpqrstvwxz2456789" (rand.String): 0.12% of suffixes are all digits, which
# `name-<digits>` alone would take for an ordinal. So 5 digits of that alphabet are a suffix:
# a StatefulSet needs 24,567 pods or more before one of its ordinals looks like one.
_SUFFIX = re.compile(r".+-[2456789]{5}")
_GENERATED = 63  # a generated name cut to 58 characters plus 5: never a StatefulSet pod's
_EC2_HOST = re.compile(r"ip-[0-9]{1,3}(-[0-9]{1,3}){3}")  # an EC2 host name (ECS, no pod name)


def ordinal(name: str, index: int | None = None) -> int | None:
    """This pod's StatefulSet ordinal: `index` (the pod-index label) if given, else the one a
    StatefulSet pod's name ends with; None for any other pod (a Deployment's, a host name)."""
    if index is not None:
        return index
    if len(name) >= _GENERATED or _SUFFIX.fullmatch(name) or _EC2_HOST.fullmatch(name):
        return None
    found = _ORDINAL.fullmatch(name)
    return int(found.group(2)) if found else None


def is_ordinal(name: str, index: int | None = None) -> bool:
    """A StatefulSet's pod: its slot is its own, not a hash's."""
    return ordinal(name, index) is not None


def home_slot(name: str, slots: int, index: int | None = None) -> int:
    """This pod's slot in a frame of `slots`: a StatefulSet ordinal, else a hash of the name."""
    found = ordinal(name, index)
    if found is not None:
        return found % slots
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % slots


def frame_slots(fleet: int | None, spread: float, rate: float, records: int) -> int:
    """Slots per frame: the fleet's size, or (unknown) as many pods as fit `records` each
    into the `spread` window at `rate`."""
    if fleet is not None:
        return max(1, fleet)
    return max(1, math.floor(spread * rate / max(1, records)))


@dataclass(frozen=True)
class Slots:
    rate: float  # the fleet's MeterUsage calls per second (one slot = 1/rate s)
    slots: int  # slots per frame (pods in the fleet)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.slots < 1:
            raise ValueError("rate must be > 0 and slots >= 1")

    @property
    def width(self) -> float:
        return 1.0 / self.rate

    @property
    def frame(self) -> float:
        return self.slots / self.rate

    def at(self, index: int) -> float:
        return index * self.width

    def next_index(self, home: int, now: float, after: int | None = None) -> int:
        """The first slot of `home` not before `now` (a slot is still current for half its
        width, so a sender woken a little late keeps it; one not yet reached is waited for)
        and not before slot `after`."""
        first = math.ceil(now / self.width - 0.5)
        if after is not None:
            first = max(first, after)
        return first + (home - first) % self.slots

    def retry_index(self, now: float, throttles: int, rng: Callable[[], float]) -> int:
        """A random slot within the next min(throttles, 4) / 2 frames after `now`."""
        reach = min(max(throttles, 1), 2 * MAX_RETRY_FRAMES) / 2 * self.frame
        return math.ceil((now + rng() * reach) / self.width) + 1

    def probe_index(self, slot: int, rng: Callable[[], float]) -> int:
        """A hashed pod throttled in `slot`: one of the next PROBE_REACH slots, this frame."""
        return slot + 1 + min(PROBE_REACH - 1, int(rng() * PROBE_REACH))

    def after_throttle(
        self,
        slot: int,
        throttles: int,
        own: bool,
        now: float,
        rng: Callable[[], float],
        held: int = 0,
    ) -> int:
        """The slot for the next paced send after the `throttles`-th ThrottlingException in a
        row, the last in `slot`; the pod's home becomes this slot's place in the frame. A pod
        whose slot is its `own` (a StatefulSet's ordinal), or a hashed pod that has `held` its
        slot for SETTLED frames in a row, keeps it on a first throttle: the call was late (the
        bucket refilled too little since the previous slot's call), and moving would take
        another pod's slot and set off a chain of throttles. Throttled again, a StatefulSet
        pod retries at random in the next frames; a hashed pod probes forward."""
        if (own or held >= SETTLED) and throttles <= 1:
            return slot + self.slots
        if own:
            return self.retry_index(now, throttles, rng)
        return self.probe_index(slot, rng)
