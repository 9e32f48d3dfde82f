"""Custom mode's hourly sends from a fleet, paced in slots under the account's MeterUsage quota.

What a seller notices: every pod of a fleet seals its hour at the same moment; without pacing
they stampede AWS's 10 calls/s (benchmarks/metering_fleet.py: 3.8 calls per record, most of
them ThrottlingException, the last record 3.5 minutes late). The fleet test runs real pods
(UsageService, boto3 over HTTP) against the emulator's MeterUsage token bucket and counts
calls and throttles; it does not measure durations.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path

import pytest

from sidecar.aws.metering import MeteringGateway
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.hours import HOUR, HourPolicy
from sidecar.usage.pacing import Slots, frame_slots, home_slot, is_ordinal, ordinal
from sidecar.usage.service import UsagePolicy, UsageService
from tests.helpers import ManualClock
from tests.usage_kit import post, run_for, service


class PodGateway(MeteringGateway):
    """The sidecar's gateway with this pod's own access key (the emulator's pod identity)."""

    def __init__(self, url: str, pod: str) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=pod,
            aws_secret_access_key="fleet",
            region_name="us-east-1",
        )
        self._client = session.client(
            "meteringmarketplace",
            endpoint_url=url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )


class OffsetClock:
    """Real time, shifted so that an hour ends `lead` seconds from now."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.align(3600.0)

    def align(self, lead: float) -> None:
        """Jump (forward only) to `lead` seconds before the end of this clock's hour."""
        now = self.time()
        self.hour_end = (math.floor(now / HOUR) + 1) * HOUR
        self.offset += self.hour_end - lead - now

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))


def test_ordinals_are_distinct_slots_and_other_names_hash() -> None:
    assert [home_slot(f"web-{i}", 8) for i in range(8)] == list(range(8))
    assert home_slot("web-10", 8) == 2
    deployment = {home_slot(f"web-7d9f8b6c5d-{s}", 1000) for s in ("x2x9k", "q7hzm", "bb4lr")}
    assert len(deployment) == 3  # hashed, stable: the same name always has the same slot
    assert home_slot("web-7d9f8b6c5d-x2x9k", 1000) in deployment


# Kubernetes' generated names: the pod-template-hash is a uint32 in decimal with each digit
# mapped through rand.SafeEncodeString, and generateName's suffix is rand.String(5), both from
# this alphabet (k8s.io/apimachinery/pkg/util/rand).
K8S_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


def deployment_pod(rng: random.Random, deployment: str = "api") -> str:
    template_hash = "".join(K8S_ALPHANUMS[ord(c) % 27] for c in str(rng.getrandbits(32)))
    return f"{deployment}-{template_hash}-" + "".join(rng.choice(K8S_ALPHANUMS) for _ in range(5))


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("web-0", 0),
        ("web-3", 3),
        ("my-app-db-12", 12),
        ("cache.v2-7", 7),
        ("shop-10345", 10345),  # 0, 1 and 3 are never in a generated suffix
        ("x" * 50 + "-123456789", 123456789),  # 52 + 1 + 9: the longest a StatefulSet makes
    ],
)
def test_a_statefulset_pods_name_gives_its_ordinal(name: str, number: int) -> None:
    assert ordinal(name) == number
    assert is_ordinal(name) and home_slot(name, 100_000) == number % 100_000


@pytest.mark.parametrize(
    "name",
    [
        "api-7d9f8b6c5-24567",  # a Deployment's pod whose random suffix is all digits
        "api-5f6d4c9b8f-99999",
        "api-779bd5b64d-22222",
        "web-1234567890-45678",  # pod-template-hash in raw digits (Kubernetes before 1.11)
        "api-4567894567-24567",  # an all-digit pod-template-hash and an all-digit suffix
        "fluentd-24567",  # a DaemonSet's pod (and a Job's, a bare ReplicaSet's): <owner>-<5>
        "shop-45678",  # so a StatefulSet's 45679th pod without the pod-index label is hashed
        "api-7d9f8b6c5-x2x9k",
        "web-007",  # leading zeros: strconv.Itoa never writes them
        "web-1234567890",  # ten digits: more than a StatefulSet's ordinals
        "ip-10-0-1-23",  # an EC2 host name (no MARKETPLACE_POD_NAME)
        # generateName cut to 58 characters (here inside the template hash) + 5 random: 63
        ("billing-api-for-a-very-long-named-product-deployment-5f6d4c9b8f-")[:58] + "24567",
        "3f9a2c1d7b44",  # a container id as host name
        "web-",
        "42",
        "",
    ],
)
def test_deployment_pods_and_host_names_are_never_taken_for_ordinals(name: str) -> None:
    """The misread of main: `name-<digits>` alone was an ordinal, and 0.12% of a Deployment's
    pods (all-digit random suffix) kept a hashed slot as if nobody else could hold it."""
    assert ordinal(name) is None and not is_ordinal(name)


def test_no_generated_deployment_pod_name_is_an_ordinal() -> None:
    rng = random.Random(21)
    names = [deployment_pod(rng) for _ in range(20_000)]
    digits = [n for n in names if n.rsplit("-", 1)[1].isdigit()]
    assert len(digits) > 5  # the case exists: (7/27)^5 of suffixes, about 24 here
    assert [n for n in names if is_ordinal(n)] == []


def test_the_pod_index_label_is_the_slot_whatever_the_name() -> None:
    """MARKETPLACE_POD_INDEX (the apps.kubernetes.io/pod-index label, Kubernetes 1.28+)."""
    assert home_slot("api-7d9f8b6c5-x2x9k", 50, 7) == 7 and is_ordinal("api-7d9f8b6c5-x2x9k", 7)
    assert home_slot("web-3", 50, 0) == 0 and is_ordinal("anything", 0)  # 0 is an index
    assert home_slot("web-3", 50, None) == 3
    assert home_slot("web-0", 8, 12) == 4


def test_a_throttled_hashed_pod_probes_forward_in_the_frame_it_lost() -> None:
    """A Deployment pod throttled in slot s (another pod hashed there) tries s+1 or s+2 of
    the same frame, so its record is not a frame late; co-losers split between the two."""
    slots = Slots(9.0, 50)
    now = 1_000 * slots.width
    picks = {slots.after_throttle(1000, 1, False, now, random.Random(i).random) for i in range(40)}
    assert picks == {1001, 1002}
    assert slots.after_throttle(1001, 2, False, now, random.Random(3).random) in (1002, 1003)
    # A StatefulSet pod keeps its own slot on a first throttle (a late call, not a shared
    # slot: moving would take another pod's), and moves at random from the second.
    assert slots.after_throttle(1000, 1, True, now, random.random) == 1050
    # So does a hashed pod whose calls went through in its slot three frames in a row.
    assert slots.after_throttle(1000, 1, False, now, random.random, held=3) == 1050
    assert slots.after_throttle(1000, 2, False, now, random.Random(1).random, 3) in (1001, 1002)
    later = slots.after_throttle(1000, 2, True, now, random.Random(5).random)
    assert now < slots.at(later) <= now + slots.frame + 2 * slots.width


def _hashed_fleet_hours(pods: int, records: int, hours: int, seed: int) -> list[tuple[int, int]]:
    """A fleet of Deployment pods in a slot-exact model of the bucket (one call per slot goes
    through; the pod first in line at a slot wins): each pod follows pacing's own choices
    (`home_slot`, `Slots.next_index`, `Slots.after_throttle`) as `UsageService` does, and keeps
    what it learnt from one hour to the next. Returns (throttles, slots used) per hour."""
    rng = random.Random(seed)
    slots = Slots(1.0, pods)
    names = [deployment_pod(rng) for _ in range(pods)]
    home = [home_slot(n, pods) for n in names]
    throttles = [0] * pods
    held = [0] * pods
    out = []
    start = 0
    for _ in range(hours):
        left = [records] * pods
        due = [slots.next_index(home[p], start) for p in range(pods)]
        throttled, t = 0, start
        while any(left):
            wanting = [p for p in range(pods) if left[p] and due[p] == t]
            rng.shuffle(wanting)
            for rank, p in enumerate(wanting):
                if rank == 0:
                    left[p] -= 1
                    throttles[p] = 0
                    held[p] += 1
                    due[p] = slots.next_index(home[p], t + 1)
                    continue
                throttled += 1
                throttles[p] += 1
                index = slots.after_throttle(t, throttles[p], False, float(t), rng.random, held[p])
                if index % pods != home[p]:
                    held[p] = 0
                home[p] = index % pods
                due[p] = slots.next_index(home[p], float(t), index)
            t += 1
        out.append((throttled, t - start))
        start = t + 10 * pods  # the next hour, in another frame
    return out


def test_a_deployment_fleet_settles_in_its_first_hour_and_then_hardly_collides() -> None:
    """Ten fleets of 50 hashed pods x 4 records in 50 slots: every first hour ends within its
    4 frames and half a frame (main: a throttled pod retried up to half a frame later and fell
    a frame behind: 6-8 frames), and in the second hour at least 9 of the 10 fleets have not
    a single throttle (main: its random moves kept colliding, 17-40 throttles each)."""
    hours = [_hashed_fleet_hours(50, 4, 2, seed) for seed in range(10)]
    assert all(first > 0 for (first, _), _ in hours)  # the hash put pods together
    assert max(used for (_, used), _ in hours) <= 4 * 50 + 25
    second = [throttled for _, (throttled, _) in hours]
    assert sum(1 for n in second if n == 0) >= 9 and sum(second) <= 10, second


def test_a_frame_is_the_fleet_or_what_fits_the_spread() -> None:
    assert frame_slots(50, 600.0, 9.0, 4) == 50
    assert frame_slots(None, 600.0, 9.0, 4) == 1350  # 4 records per pod fit 600 s at 9/s
    assert frame_slots(None, 0.0, 9.0, 4) == 1


def test_a_pod_alone_sends_its_hour_back_to_back(tmp_path: Path, clock: ManualClock) -> None:
    """MARKETPLACE_FLEET_SIZE=1: no spread, one record per slot (1/9 s) from the seal on."""
    dims = ("a", "b", "c", "d")
    svc = service(tmp_path, clock, dimensions=dims, fleet_size=1)
    for d in dims:
        post(svc, {"dimension": d, "quantity": 2})
    hp = svc.policy.hours
    clock.t = math.floor(clock.t / HOUR) * HOUR + HOUR + hp.seal_margin  # the seal is due
    sent = []
    for _ in range(4):
        svc.tick(clock.t)
        sent.append(svc.counters().hours_by_state["sent"])
        clock.t += 1 / 9
    assert sent == [1, 2, 3, 4]
    svc.close()


def test_throttled_pods_retry_in_different_slots() -> None:
    """Fifty pods throttled at the same instant: their retries do not land together."""
    slots = Slots(9.0, 50)
    now = 1_000_000.0
    first = [slots.retry_index(now, 1, random.Random(i).random) for i in range(50)]
    assert max(first.count(k) for k in first) <= 6  # spread over half a frame's 25 slots
    assert all(now < slots.at(k) <= now + slots.frame / 2 + 2 * slots.width for k in first)
    later = [slots.retry_index(now, 3, random.Random(i).random) for i in range(50)]
    assert max(slots.at(k) for k in later) > now + slots.frame / 2  # repeated: wider


def _fleet(
    tmp_path: Path,
    server: EmulatorServer,
    emulator: Emulator,
    pods: int,
    dims: int,
    names: list[str] | None = None,
    hours: int = 1,
) -> list[tuple[int, int, int]]:
    """`pods` pods (StatefulSet names, or `names`) with usage on `dims` dimensions each in the
    hour ending seconds from now, and then in each of the next `hours` - 1 hours (the clock
    jumps there), paced at 5 calls/s against a quota of 20/s with a burst of 1 (a slot is four
    times as long as the bucket's refill, so a call late by less than 150 ms is never
    throttled). Returns (records sent, MeterUsage calls, throttles) per hour."""
    emulator.reconfigure({"meter_throttle_rps": 20.0, "meter_throttle_burst": 1})
    clock = OffsetClock()
    emulator.meter_clock = clock.time
    dimensions = tuple(f"dim{i}" for i in range(dims))
    services = []
    for i in range(pods):
        state = tmp_path / f"pod{i}"
        state.mkdir()
        gateway = PodGateway(server.url, f"fleet-pod-{i}")
        policy = UsagePolicy(
            "prod-fleet",
            dimensions,
            state,
            entitlement_check="none",
            hours=HourPolicy(seal_margin=0.5, spread=600.0),
            max_sleep=0.5,
            fleet_size=pods,
            calls_per_second=5.0,
            pod_name=names[i] if names else f"fleet-{i}",
        )
        rng = random.Random(i).random  # the same retry choices every run
        services.append(UsageService(policy, lambda g=gateway: g, clock=clock, rng=rng))  # type: ignore[misc]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in services]
    records = pods * dims
    out = []
    for hour in range(1, hours + 1):
        clock.align(lead=3.0)  # the usage is in the hour that ends three seconds from now
        first_call = len(emulator.calls)
        for i, svc in enumerate(services):
            for d in dimensions:
                status, _ = svc.post(f'{{"dimension": "{d}", "quantity": {i + 1}}}'.encode())
                assert status == 202
        if hour == 1:
            for t in threads:
                t.start()
        deadline = time.monotonic() + 60
        sent = 0
        while time.monotonic() < deadline:
            sent = sum(s.counters().hours_by_state["sent"] for s in services) - records * (hour - 1)
            if sent >= records:
                break
            time.sleep(0.1)
        calls = [c for c in emulator.calls[first_call:] if c["op"] == "MeterUsage"]
        throttled = sum(1 for c in calls if c["code"] == "ThrottlingException")
        out.append((sent, len(calls), throttled))
    stop.set()
    for t in threads:
        t.join(10)
    for s in services:
        s.close()
    emulator.reconfigure({"meter_throttle_rps": None})
    return out


@pytest.mark.slow  # a fleet: 8 sidecars sealing together
def test_a_fleet_sealing_together_sends_each_record_about_once(
    tmp_path: Path, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    """8 pods x 3 dimensions seal at the same second: with the fleet's size each pod has its
    own slot, so every record is sent and (nearly) every call is accepted: at most 1.2 calls
    per record, the issue's goal (main: no slots, the pods' random spread collides)."""
    ((sent, calls, throttled),) = _fleet(tmp_path, emulator_server, emulator, pods=8, dims=3)
    assert sent == 24, (sent, calls, throttled)
    assert calls <= 1.2 * 24, (calls, throttled)
    ledger = emulator.ledger()
    assert len(ledger["records"]) == 24
    assert ledger["counts"].get("DuplicateRequestException", 0) == 0


# Eight Deployment pods whose names hash into 8 slots as 0, 0, 2, 2, 3, 5, 7, 7: three of
# them lose a shared slot in the first frame.
DEPLOYMENT_PODS = [
    "api-5d4f8b7c9-2c9tq",
    "api-5d4f8b7c9-6h29r",
    "api-5d4f8b7c9-dn8qx",
    "api-5d4f8b7c9-f7x5s",
    "api-5d4f8b7c9-hmwq6",
    "api-5d4f8b7c9-jx4b8",
    "api-5d4f8b7c9-p9zk2",
    "api-5d4f8b7c9-24567",  # an all-digit suffix: hashed like the others (main: "ordinal")
]


@pytest.mark.slow  # fast twin: the slot-by-slot model test of the first hour
def test_a_deployment_fleet_sends_its_second_hour_without_throttles(
    tmp_path: Path, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    """8 Deployment pods x 3 dimensions, two hours: the pods sharing a hashed slot are
    throttled in the first hour and probe forward to the slots nobody hashed to; every record
    of both hours is sent, none twice, and the second hour goes out at one call per record
    (main: the throttled pods moved to random slots, which other pods held)."""
    homes = sorted(home_slot(n, 8) for n in DEPLOYMENT_PODS)
    assert len(set(homes)) < 8  # the hash shares slots: the case this is about
    first, second = _fleet(
        tmp_path, emulator_server, emulator, pods=8, dims=3, names=DEPLOYMENT_PODS, hours=2
    )
    assert first[0] == second[0] == 24, (first, second)
    assert first[2] > 0, first  # the shared slots were found out
    assert second[1] <= 24 + 1, second  # a call late by 150 ms may cost one retry
    ledger = emulator.ledger()
    assert len(ledger["records"]) == 48
    assert ledger["counts"].get("DuplicateRequestException", 0) == 0


@pytest.mark.parametrize("fleet", [1, 7])
def test_slots_of_a_frame_never_coincide_for_a_statefulset(fleet: int) -> None:
    slots = Slots(9.0, fleet)
    now = 1_700_000_123.4
    firsts = [slots.next_index(home_slot(f"app-{i}", fleet), now) for i in range(fleet)]
    assert len(set(firsts)) == fleet
    assert all(slots.at(k) - slots.width / 2 <= now + slots.frame for k in firsts)


@pytest.mark.parametrize(("fleet", "index", "dims"), [(4, 6, 1), (None, 2000, 4)])
def test_an_ordinal_past_the_frame_says_the_fleet_size_is_too_small(
    tmp_path: Path, clock: ManualClock, fleet: int | None, index: int, dims: int
) -> None:
    """A StatefulSet scaled past MARKETPLACE_FLEET_SIZE (or past what fits the spread window
    when it is unset): ordinal 6 of a frame of 4 slots shares slot 2 with pod 2, and one of
    them is throttled every hour. The pod knows it from its own ordinal, so it says so (GET
    /v1/usage and /readyz warnings) instead of paying the throttles silently; pods inside the
    frame say nothing."""
    names = tuple(f"d{i}" for i in range(dims))
    svc = service(tmp_path, clock, dimensions=names, fleet_size=fleet, pod_index=index)
    try:
        warnings = svc.report()["warnings"]
        assert any("MARKETPLACE_FLEET_SIZE" in w and f"ordinal {index}" in w for w in warnings), (
            warnings
        )
        assert svc.notices() == [w for w in warnings if w.startswith("fleet_size_too_small")]
    finally:
        svc.close()
    inside = tmp_path / "inside"
    inside.mkdir()
    ok = service(inside, clock, dimensions=names, fleet_size=fleet, pod_index=1)
    try:
        assert not [w for w in ok.report()["warnings"] if "FLEET_SIZE" in w]
    finally:
        ok.close()


def test_a_small_fleet_throttled_by_a_neighbour_backs_off(
    tmp_path: Path, clock: ManualClock, emulator: Emulator
) -> None:
    """Another product of the account uses the whole MeterUsage quota (every call throttled for
    a while). A frame of one slot is 1/9 s: moving the slot is no backoff, and a pod alone would
    call 9 times a second for as long as the neighbour runs, taking the neighbour's quota with
    it (AWS does not say throttled calls are free of it). Consecutive throttles back off as any
    other retryable error does (capped exponential, MARKETPLACE_BACKOFF_*)."""
    emulator.reconfigure({"faults": [{"error": "ThrottlingException", "first": 10_000}]})
    svc = service(tmp_path, clock, dimensions=("a",), fleet_size=1)
    try:
        post(svc, {"dimension": "a", "quantity": 1})
        hp = svc.policy.hours
        clock.t = math.floor(clock.t / HOUR) * HOUR + HOUR + hp.seal_margin
        run_for(svc, clock, 60.0)
        calls = [c for c in emulator.calls if c["op"] == "MeterUsage"]
        # Backoff from the second throttle, 1-2 s doubling: about 7 calls in a minute, not 270.
        assert 1 <= len(calls) <= 10, len(calls)
        assert svc.counters().hours_by_state["sealed"] == 1  # still kept, sent later
    finally:
        svc.close()
