"""SaaS mode end to end: real `run` processes, the emulator over HTTP, PostgreSQL or SQLite.

Shared by tests/test_saas_fleet.py and benchmarks/saas_*.py. Clients keep their own book of
what the sidecars acknowledged (id -> customer, dimension, hour, quantity) and of what they
could not learn the fate of (a killed sidecar, a timeout); the audit compares that book with
the emulator's BatchMeterUsage ledger, which is AWS's view of what will be billed.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from tests.helpers import ROOT, free_port, loopback_env

HOUR = 3600
DIMS = ("api_calls", "storage_gb", "seats")
LicenseKey = tuple[str, str, int]  # (customer as the ledger names it, dimension, epoch hour)


# -- customers and the emulator's operator endpoints ------------------------------------------


@dataclass(frozen=True)
class Customer:
    """A buyer the emulator knows, with the registration token its browser would post."""

    account: str
    license_arn: str
    token: str
    identifier: str | None = (
        None  # set when the product uses MARKETPLACE_SAAS_IDENTITY=customer_identifier
    )

    @property
    def key(self) -> str:
        """How the emulator's ledger names this customer."""
        return self.identifier or f"{self.account}/{self.license_arn}"

    def fields(self) -> dict[str, str]:
        """The customer fields of a usage record."""
        if self.identifier is not None:
            return {"customer_identifier": self.identifier}
        return {"customer_aws_account_id": self.account, "license_arn": self.license_arn}


class Ops:
    """The emulator's operator endpoints, over HTTP as any test client would use them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def configure(self, **changes: Any) -> None:
        resp = self.http.post(self.url + "/_emulator/config", json=changes, timeout=10)
        assert resp.status_code == 200, resp.text

    def customer(
        self, n: int, *, identifier: bool = False, product_code: str | None = None
    ) -> Customer:
        account = str(200_000_000_000 + n)
        arn = f"arn:aws:license-manager::{account}:license:l-{uuid.uuid4().hex[:20]}"
        # A day of the emulator's clock: with a scaled clock an hour may last seconds.
        doc: dict[str, Any] = {
            "customer_aws_account_id": account,
            "license_arn": arn,
            "token_ttl_seconds": 86400,
        }
        if identifier:
            doc["customer_identifier"] = f"cust-{n}-{uuid.uuid4().hex[:8]}"
            doc["product_code"] = product_code
        resp = self.http.post(self.url + "/_emulator/saas/customers", json=doc, timeout=10)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        return Customer(
            account,
            arn,
            body["registration_token"],
            doc.get("customer_identifier"),
        )

    def ledger(self) -> dict[str, Any]:
        resp = self.http.get(self.url + "/_emulator/saas/ledger", timeout=30)
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    def calls(self, op: str | None = None) -> list[dict[str, Any]]:
        resp = self.http.get(self.url + "/_emulator/calls", timeout=30)
        assert resp.status_code == 200, resp.text
        return [c for c in resp.json() if op is None or c.get("op") == op]


# -- the test-only scaled clock ----------------------------------------------------------------


def aligned_origin(scale: float, into_hour: float, now: float | None = None) -> float:
    """An origin for the scaled clock (sidecars and emulator alike) that puts scaled time
    `into_hour` seconds into an hour at `now`. With a scale just above 1 this shifts the
    clock without speeding it up: rate limits and latencies stay as in production."""
    now = time.time() if now is None else now
    shift = (into_hour - now) % HOUR  # scaled(now) = now + (now - origin) * (scale - 1)
    return now - shift / (scale - 1.0)


def scaled_now(scale: float, origin: float) -> float:
    return origin + (time.time() - origin) * scale


def epoch_hour(iso_hour: str) -> int:
    """'2027-01-15T08:00:00Z' (a usage answer's hour) -> hours since the epoch."""
    stamp = datetime.fromisoformat(iso_hour.replace("Z", "+00:00")).astimezone(UTC)
    return math.floor(stamp.timestamp() / HOUR)


# -- sidecar processes ------------------------------------------------------------------------


@dataclass
class Car:
    """One `marketplace-sidecar run` process in SaaS mode."""

    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]
    api: str
    probe: str

    @property
    def pod(self) -> str:
        """The access key id: the emulator's `pod` for every call this process makes."""
        return self.env["AWS_ACCESS_KEY_ID"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, path: str, *, probe: bool = False, timeout: float = 5.0) -> requests.Response:
        return requests.get((self.probe if probe else self.api) + path, timeout=timeout)

    def leader(self) -> bool | None:
        """The `marketplace_saas_leader` gauge; None when it cannot be read."""
        try:
            text = self.get("/metrics", probe=True, timeout=2).text
        except requests.RequestException:
            return None
        for line in text.splitlines():
            if line.startswith("marketplace_saas_leader"):
                return float(line.rsplit(" ", 1)[1]) == 1.0
        return None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain); a process still there after `timeout` gets SIGABRT first, so
        faulthandler writes every thread's stack to its log, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            tail = self.logs()[-6000:]
            raise AssertionError(
                f"{self.name} still running {timeout:g} s after SIGTERM; its log ends:\n{tail}"
            ) from None

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def saas_env(
    endpoint: str,
    *,
    database_url: str | None = None,
    state_dir: Path | None = None,
    scale: float | None = None,
    origin: float | None = None,
    **extra: str,
) -> dict[str, str]:
    """SaaS mode on a loopback emulator; each call names a new pod (its own access key id)."""
    env = loopback_env(
        endpoint,
        MARKETPLACE_MODE="saas",
        MARKETPLACE_DIMENSIONS=",".join(DIMS),
        MARKETPLACE_BACKOFF_BASE_SECONDS="0.05",
        MARKETPLACE_BACKOFF_CAP_SECONDS="0.5",
        MARKETPLACE_DRAIN_SECONDS="3",
        MARKETPLACE_LOG_LEVEL="WARNING",
        PYTHONFAULTHANDLER="1",
    )
    if database_url is not None:
        env["MARKETPLACE_USAGE_DATABASE_URL"] = database_url
    if state_dir is not None:
        env["MARKETPLACE_STATE_DIR"] = str(state_dir)
    if scale is not None:
        env["MARKETPLACE_TEST_ONLY_TIME_SCALE"] = repr(scale)
        env["MARKETPLACE_TEST_ONLY_TIME_ORIGIN"] = repr(origin if origin is not None else 0.0)
    env.update(extra)
    return env


def spawn(env: dict[str, str], logdir: Path, name: str) -> Car:
    """Start a process (not waiting). Its stderr goes to a file: a pipe nobody reads would
    fill up and block the sidecar's logging."""
    api, probe = free_port(), free_port()
    full = {
        **env,
        "PYTHONFAULTHANDLER": "1",  # SIGABRT from `Car.stop` writes every thread's stack
        "MARKETPLACE_LISTEN": f"127.0.0.1:{api}",
        "MARKETPLACE_PROBE_LISTEN": f"127.0.0.1:{probe}",
    }
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run"],
            env=full,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return Car(name, full, log, proc, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{probe}")


def wait_up(car: Car, timeout: float = 30.0) -> Car:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if car.proc.poll() is not None:
            raise AssertionError(f"{car.name} exited {car.proc.returncode}: {car.logs()[-3000:]}")
        try:
            car.get("/healthz", timeout=2)
            return car
        except requests.RequestException:
            time.sleep(0.05)
    car.stop()
    raise AssertionError(f"{car.name} did not start in {timeout:.0f}s: {car.logs()[-3000:]}")


def start_fleet(envs: list[dict[str, str]], logdir: Path, prefix: str = "car") -> list[Car]:
    """Start every process at once (on a fresh database they race to create the schema)."""
    cars = [spawn(env, logdir, f"{prefix}{i}") for i, env in enumerate(envs)]
    try:
        for car in cars:
            wait_up(car)
    except BaseException:
        for car in cars:
            car.stop(timeout=5)
        raise
    return cars


def wait_leader(cars: Iterable[Car], timeout: float = 15.0, *, besides: Car | None = None) -> Car:
    """The one live car whose leader gauge reads 1 (never two at once)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, bool | None] = {}
    while time.monotonic() < deadline:
        live = [c for c in cars if c.alive() and c is not besides]
        seen = {c.name: c.leader() for c in live}
        leaders = [c for c in live if seen[c.name]]
        assert len(leaders) <= 1, f"two leaders at once: {seen}"
        if leaders:
            return leaders[0]
        time.sleep(0.1)
    raise AssertionError(f"no leader in {timeout:.0f}s; gauges: {seen}")


# -- resolving customers ----------------------------------------------------------------------


def resolve(car: Car, customer: Customer, timeout: float = 20.0) -> dict[str, Any]:
    """POST /v1/customers/resolve; retried while the sidecar answers 503 (store, AWS)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = requests.post(
            car.api + "/v1/customers/resolve",
            json={"registration_token": customer.token},
            timeout=15,
        )
        if resp.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        assert resp.status_code == 200, f"{car.name}: {resp.status_code} {resp.text}"
        doc: dict[str, Any] = resp.json()
        return doc


# -- the clients' book -----------------------------------------------------------------------


@dataclass
class Book:
    """What the clients were told. `acked`: id -> (customer, dimension, hour, quantity);
    `unknown`: records posted without an answer (503, connection lost) until acknowledged."""

    acked: dict[str, tuple[str, str, int, int]] = field(default_factory=dict)
    unknown: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, status
    races: int = 0
    resends: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[str, str] = field(default_factory=dict)  # id -> customer key

    def expected(self) -> dict[LicenseKey, int]:
        """Acknowledged quantity per customer/dimension/hour (zero sums left out)."""
        out: dict[LicenseKey, int] = {}
        for cust, dim, hour, qty in self.acked.values():
            out[(cust, dim, hour)] = out.get((cust, dim, hour), 0) + qty
        return {k: v for k, v in out.items() if v}

    def units(self) -> int:
        return sum(q for *_, q in self.acked.values())


def post_usage(
    http: requests.Session, car: Car, records: list[dict[str, Any]], book: Book
) -> int | None:
    """POST one batch with ids; acknowledged records move to `acked`. The status, or None
    when the connection failed (the fate of the batch is unknown)."""
    with book.lock:
        for r in records:
            if r["id"] not in book.acked:
                book.unknown[r["id"]] = r
    started = time.time()
    try:
        resp = http.post(car.api + "/v1/usage", json=records, timeout=15)
    except requests.ConnectionError as exc:
        time.sleep(0.5)  # a killed process closes its sockets a moment before it is reaped
        if car.alive():  # a live sidecar must answer, if only 503 + Retry-After
            with book.lock:
                book.unexpected.append(f"{car.name} dropped the connection: {exc}"[:300])
        return None
    except requests.RequestException:
        return None
    with book.lock:
        book.timeline.append((started, time.time(), resp.status_code))
        book.statuses[resp.status_code] += 1
        if resp.status_code in (200, 202):
            _ack(resp.json(), records, book, car.name)
        elif resp.status_code == 503:
            book.retry_after.append(resp.headers.get("Retry-After", ""))
        else:
            book.unexpected.append(f"{car.name}: {resp.status_code} {resp.text[:300]}")
    return resp.status_code


def _ack(doc: dict[str, Any], records: list[dict[str, Any]], book: Book, who: str) -> None:
    answers = {a.get("id"): a for a in doc.get("records", []) if isinstance(a, dict)}
    for r in records:
        answer = answers.get(r["id"])
        if answer is None or "hour" not in answer:
            book.unexpected.append(f"{who}: no answer with an hour for {r['id']}: {doc}")
            continue
        entry = (book.keys[r["id"]], r["dimension"], epoch_hour(answer["hour"]), r["quantity"])
        before = book.acked.get(r["id"])
        if before is not None and before != entry:
            book.unexpected.append(f"{who}: {r['id']} acknowledged as {before}, now {entry}")
        book.acked[r["id"]] = entry
        book.unknown.pop(r["id"], None)


def new_batch(
    rng: random.Random, customers: list[Customer], book: Book, size: int
) -> list[dict[str, Any]]:
    out = []
    for _ in range(size):
        cust = rng.choice(customers)
        rid = uuid.uuid4().hex
        with book.lock:
            book.keys[rid] = cust.key
        out.append(
            {
                **cust.fields(),
                "dimension": rng.choice(DIMS),
                "quantity": rng.randint(0, 50),
                "id": rid,
            }
        )
    return out


class Clients:
    """Threads posting usage with ids to random live sidecars. A batch without an answer (503,
    connection lost) is posted again, with the same ids, after Retry-After. With `races`,
    some batches go to two sidecars at once, and some acknowledged batches are posted again
    to another sidecar: every sidecar of the fleet must recognise the ids."""

    def __init__(
        self,
        cars: Callable[[], list[Car]],
        customers: list[Customer],
        book: Book,
        *,
        threads: int = 4,
        races: bool = False,
        seed: int = 1,
        max_batch: int = 15,
    ) -> None:
        self.cars = cars
        self.customers = customers
        self.book = book
        self.races = races
        self.max_batch = max_batch
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(seed * 100 + i,), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _live(self, rng: random.Random) -> Car | None:
        live = [c for c in self.cars() if c.alive()]
        return rng.choice(live) if live else None

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)  # test data
        http = requests.Session()
        pending: list[list[dict[str, Any]]] = []
        done: list[list[dict[str, Any]]] = []
        while not self.stop.is_set():
            car = self._live(rng)
            if car is None:
                self.stop.wait(0.05)
                continue
            roll = rng.random()
            fresh = not pending
            if pending:
                batch = pending.pop(0)
                with self.book.lock:
                    self.book.resends += 1
            elif self.races and roll < 0.05 and done:
                self._repeat(http, rng.choice(done), car)
                continue
            else:
                batch = new_batch(rng, self.customers, self.book, rng.randint(1, self.max_batch))
            if self.races and fresh and roll > 0.92:
                status = self._race(rng, batch, car)
            else:
                status = post_usage(http, car, batch, self.book)
            if status in (200, 202):
                done = [*done[-49:], batch]
            else:  # unknown fate (None) or 503: the same ids again, after Retry-After
                pending.append(batch)
                self.stop.wait(1.0 if status == 503 else 0.1)
                continue
            self.stop.wait(0.005)

    def _race(self, rng: random.Random, batch: list[dict[str, Any]], car: Car) -> int | None:
        """The same batch to two sidecars at once: one stores it, the other answers 200."""
        others = [c for c in self.cars() if c.alive() and c is not car]
        if not others:
            return post_usage(requests.Session(), car, batch, self.book)
        other = rng.choice(others)
        got: list[int | None] = [None, None]

        def one(i: int, target: Car) -> None:
            got[i] = post_usage(requests.Session(), target, batch, self.book)

        ts = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate((car, other))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        with self.book.lock:
            self.book.races += 1
            if None not in got and 503 not in got and sorted(s or 0 for s in got) != [200, 202]:
                self.book.unexpected.append(f"same batch to two sidecars answered {got}")
        return 202 if 202 in got else 200 if 200 in got else 503 if 503 in got else None

    def _repeat(self, http: requests.Session, batch: list[dict[str, Any]], car: Car) -> None:
        """An acknowledged batch again, to any sidecar: 200, every record a repeat."""
        status = post_usage(http, car, batch, self.book)
        if status not in (None, 200, 503):
            with self.book.lock:
                self.book.unexpected.append(f"a repeated batch answered {status}")


def settle(book: Book, cars: Callable[[], list[Car]], timeout: float = 30.0) -> None:
    """Post every record whose fate is unknown again, under its id, until acknowledged:
    counted once whether or not a killed sidecar or a failed commit had stored it."""
    http = requests.Session()
    deadline = time.monotonic() + timeout
    rng = random.Random(7)  # which sidecar
    while time.monotonic() < deadline:
        with book.lock:
            left = list(book.unknown.values())
        if not left:
            return
        live = [c for c in cars() if c.alive()]
        for start in range(0, len(left), 500):
            status = post_usage(http, rng.choice(live), left[start : start + 500], book)
            if status != 202 and status != 200:
                time.sleep(0.2)
    raise AssertionError(f"{len(book.unknown)} records never acknowledged")


# -- the audit --------------------------------------------------------------------------------


def billed(ledger: dict[str, Any]) -> dict[LicenseKey, int]:
    """The ledger's non-zero quantities per customer/dimension/hour."""
    out: dict[LicenseKey, int] = {}
    for rec in ledger["records"]:
        if rec["quantity"]:
            out[(rec["customer"], rec["dimension"], int(rec["hour"]))] = int(rec["quantity"])
    return out


def wait_billed(ops: Ops, book: Book, timeout: float) -> dict[str, Any]:
    """Poll the ledger until it holds every acknowledged customer/dimension/hour; the last
    ledger read (the caller asserts on it, so a timeout shows the difference)."""
    want = book.expected()
    deadline = time.monotonic() + timeout
    while True:
        ledger = ops.ledger()
        if billed(ledger) == want or time.monotonic() > deadline:
            return ledger
        time.sleep(0.3)


def audit(ledger: dict[str, Any], book: Book) -> None:
    """The exactly-once check: AWS bills what was acknowledged, once, with nothing else."""
    records = ledger["records"]
    keys = [(r["customer"], r["dimension"], int(r["hour"])) for r in records]
    assert len(keys) == len(set(keys)), "two records for one customer/dimension/hour"
    want = book.expected()
    got = billed(ledger)
    missing = {k: v for k, v in want.items() if got.get(k) != v}
    extra = {k: v for k, v in got.items() if k not in want}
    assert not missing and not extra, (
        f"ledger differs from acknowledged usage: {len(missing)} acknowledged keys not billed "
        f"as such (first: {sorted(missing.items())[:5]}, billed there: "
        f"{[got.get(k) for k in sorted(missing)[:5]]}); {len(extra)} billed keys never "
        f"acknowledged (first: {sorted(extra.items())[:5]})"
    )
    counts = ledger["counts"]
    assert counts.get("duplicate_record", 0) == 0, counts
    assert not book.unexpected, book.unexpected[:10]


def describe(book: Book, ledger: dict[str, Any]) -> str:
    return json.dumps(
        {
            "acknowledged_records": len(book.acked),
            "units": book.units(),
            "statuses": dict(book.statuses),
            "resends": book.resends,
            "races": book.races,
            "ledger_records": len(ledger["records"]),
            "counts": ledger["counts"],
        }
    )
