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

The slot comes from the pod's name: the ordinal of a StatefulSet pod (`name-3`), which is
distinct for every pod of the fleet, otherwise a hash of the name (a Deployment's pods may share
a slot: the later one is throttled, moves to a random slot and keeps that one; a StatefulSet
pod throttled once in its own slot was late, not sharing it, and keeps it). Slots are
counted from the epoch, so pods agree on them through their clocks alone, and a frame may be
longer than an hour. On a throttle the pod retries in a random slot of the next c/2 frames
(c: consecutive throttles, up to 4): pods throttled together do not retry together, and a fleet
larger than `slots` widens its retries.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

AWS_CALLS_PER_SECOND = 10.0  # AWS's MeterUsage quota per account and region (default)
DEFAULT_CALLS_PER_SECOND = 9.0  # the fleet's default share of it: 10% left for start checks
MAX_RETRY_FRAMES = 2.0  # a throttled pod retries within at most this many frames
_ORDINAL = re.compile(r".*-([0-9]{1,9})")


def is_ordinal(name: str) -> bool:
    """A StatefulSet's pod name (`name-3`): its slot is its own, not a hash's."""
    return _ORDINAL.fullmatch(name) is not None


def home_slot(name: str, slots: int) -> int:
    """This pod's slot in a frame of `slots`: a StatefulSet ordinal, else a hash of the name."""
    found = _ORDINAL.fullmatch(name)
    if found:
        return int(found.group(1)) % slots
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
