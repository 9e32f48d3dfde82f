"""Issue 23, contracts with consumption: with MARKETPLACE_SAAS_CONTRACT_DIMENSIONS, a sealed
record bills only the usage above the customer's contract entitlements (AWS: "For SaaS contracts,
you only meter for usage beyond a customer's contract entitlements").

Against the emulator over loopback HTTP: the entitlements are read with boto3 from its
GetEntitlements (the sidecar's own reader, sidecar.app.entitlement_reader), the records sent with
boto3 to its BatchMeterUsage, and what AWS would bill is read from its ledger. On SQLite and a
real PostgreSQL server; the test's clock drives the sidecar and the emulator.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests

from sidecar.app import entitlement_reader
from sidecar.aws.metering import MeteringGateway
from sidecar.usage import saas_contract, saas_ledger
from sidecar.usage.db import Schema, open_store
from sidecar.usage.hours import HOUR, HourPolicy, hour_of, hour_start
from sidecar.usage.overage import Basis
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import ManualClock
from tests.test_saas_service import run_until_sent
from tests.usage_kit import aws_env

DIMS = ("users", "api_calls", "gb")
CONTRACT = (("users", Basis.HOUR), ("api_calls", Basis.TERM), ("gb", Basis.HOUR))
FAR = 1_900_000_000.0  # an expiry years away


def settled() -> None:
    """Wait for the sidecar's first-sight GetEntitlements threads: a late one would store the
    contract as it was before a test changed it."""
    deadline = time.monotonic() + 30
    while any(t.name == "entitlements" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "GetEntitlements at resolve never finished"
        time.sleep(0.01)


def new_buyer(url: str) -> dict[str, Any]:
    resp = requests.post(
        url + "/_emulator/saas/customers",
        json={"customer_aws_account_id": "300000000007", "token_ttl_seconds": 86400},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


class Car:
    """One sidecar (SaasService) and one buyer, both against the emulator."""

    def __init__(
        self,
        server: Any,
        emulator: Any,
        store: Any,
        clock: ManualClock,
        contract: Any,
        buyer: dict[str, Any] | None = None,
        zero_records: bool = False,
    ) -> None:
        self.server, self.clock, self.http = server, clock, requests.Session()
        emulator.meter_clock = clock.time
        self.buyer = buyer or new_buyer(server.url)
        self.account = str(self.buyer["customer_aws_account_id"])
        self.key = f"{self.account}/{self.buyer['license_arn']}"
        self.product = str(self.buyer["product_code"])
        if buyer is None:
            self.contract({})  # no contract yet: resolving reads an empty answer
        reader = entitlement_reader(cast(Any, SimpleNamespace(aws_timeout_seconds=5.0)))
        self.svc = SaasService(
            SaasPolicy(
                dimensions=DIMS,
                hours=HourPolicy(seal_margin=60, spread=0),
                calls_per_second=1024.0,
                zero_records=zero_records,
                contract=contract,
            ),
            store,
            lambda: MeteringGateway("us-east-1", 5.0),
            clock=clock,
            rng=lambda: 0.5,
            entitlements=reader,
        )
        if buyer is None:  # else resolved by the store's earlier sidecar
            token = json.dumps({"registration_token": self.buyer["registration_token"]}).encode()
            assert self.svc.resolve(token)[0] == 200
            settled()  # resolving reads the contract in a thread: done before the test moves on

    def contract(self, ents: dict[str, tuple[str, Any, float | None]]) -> None:
        """The buyer's contract in the emulator: dimension -> (kind, value, expiration)."""
        items = [
            {"dimension": d, kind: v, **({} if exp is None else {"expiration": exp})}
            for d, (kind, v, exp) in ents.items()
        ]
        resp = self.http.post(
            self.server.url + "/_emulator/entitlements",
            json={
                "product_code": self.product,
                "customer_aws_account_id": self.account,
                "entitlements": items,
            },
            timeout=5,
        )
        assert resp.status_code == 200, resp.text

    def learn(self) -> None:
        """What an agreement or license event triggers: GetEntitlements, stored."""
        assert self.svc.refresh_entitlements(self.account)

    def use(self, dimension: str, quantity: int | str) -> None:
        doc = {
            "customer_aws_account_id": self.account,
            "license_arn": self.buyer["license_arn"],
            "dimension": dimension,
            "quantity": quantity,
        }
        status, answer = self.svc.post(json.dumps(doc).encode())
        assert status == 202, answer

    def next_hour(self) -> int:
        """Seal the current hour and send it; the clock is then in the next hour."""
        hour = hour_of(self.clock.t)
        self.clock.t = hour_start(hour + 1) + 120
        run_until_sent(self.svc, self.clock, 30, 10)
        return hour

    def billed(self, hour: int, dimension: str) -> int | str | None:
        """What AWS (the emulator's ledger) bills for the hour, None without a record."""
        book = self.http.get(self.server.url + "/_emulator/saas/ledger", timeout=5).json()
        assert book["counts"].get("duplicate_record", 0) == 0
        got = [
            r["quantity"]
            for r in book["records"]
            if r["hour"] == hour and r["dimension"] == dimension and r["customer"] == self.key
        ]
        assert len(got) <= 1, got
        return got[0] if got else None

    def deprovisioned(self, event_id: str, at: float) -> None:
        """AWS's "License Deprovisioned" for the buyer, timed `at`, applied: a final window."""
        from datetime import UTC, datetime

        event = {
            "version": "0",
            "id": event_id,
            "detail-type": "License Deprovisioned - Manufacturer",
            "source": "aws.agreement-marketplace",
            "account": "294406891311",
            "time": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "us-east-1",
            "resources": [],
            "detail": {
                "agreement": {"id": "agmt-1"},
                "acceptor": {"accountId": self.account},
                "product": {"code": self.product},
                "license": {"arn": self.buyer["license_arn"]},
            },
        }
        assert self.svc.handle_message("m-" + event_id, json.dumps(event)) == "applied"

    def explained(self, hour: int, dimension: str) -> dict[str, Any]:
        """GET /v1/usage's row for the hour: its quantity and what the contract covered."""
        from sidecar.usage.hours import iso_hour

        for item in self.svc.report()["records"]:
            if item["hour"] == iso_hour(hour) and item["dimension"] == dimension:
                return dict(item)
        raise AssertionError(f"no record for {dimension} at {hour}")


def passes(
    clock: ManualClock, services: list[Any], until: Callable[[], bool] = lambda: False
) -> None:
    """Up to 10 of the leader's passes, 30 s apart, each service ticking in turn; stops early
    once `until()` holds."""
    for _ in range(10):
        for svc in services:
            svc.tick()
        if until():
            return
        clock.t += 30
        clock.mono += 30


@pytest.fixture(params=["sqlite", "postgresql"])
def car(
    request: pytest.FixtureRequest,
    emulator_server: Any,
    emulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    aws_env(monkeypatch, emulator_server, "seller")
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE", emulator_server.url)
    made: list[Car] = []

    def make(contract: Any = CONTRACT, store: Any = None, zero_records: bool = False) -> Car:
        clock = ManualClock()
        clock.t = hour_start(hour_of(clock.t)) + 600.0
        s = store or open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
        made.append(Car(emulator_server, emulator, s, clock, contract, zero_records=zero_records))
        return made[-1]

    yield make
    for c in made:
        c.svc.close()


def test_twelve_used_with_ten_entitled_an_hour_bills_exactly_two(car: Any) -> None:
    c = car()
    c.contract({"users": ("integer", 10, FAR)})
    c.learn()
    for _ in range(12):
        c.use("users", 1)
    first = c.next_hour()
    assert c.billed(first, "users") == 2
    row = c.explained(first, "users")
    assert row["quantity"] == 2 and row["state"] == "sent"
    assert row["contract"]["used"] == 12 and row["contract"]["covered"] == 10
    assert row["contract"]["billed"] == 2 and row["contract"]["basis"] == "hour"
    # Each hour on its own: 7 of 10 is fully covered, and still one record (quantity 0).
    c.use("users", 7)
    second = c.next_hour()
    assert c.billed(second, "users") == 0
    assert c.explained(second, "users")["contract"]["covered"] == 7
    seen = c.svc.customer(c.account)[1]["contract_hours"]
    assert [(h["used"], h["covered"], h["billed"]) for h in seen] == [(7, 7, 0), (12, 10, 2)]


def test_a_zero_record_of_a_contract_dimension_shows_the_contract_it_held(car: Any) -> None:
    """An hour the buyer used nothing of a contract dimension is still sent (a quantity-0 record,
    MARKETPLACE_SAAS_ZERO_RECORDS) and explained like any other: what was entitled, covered and
    left of the pool, not `contract: null`. Those rows go with the outbox's after 48 hours (an
    idle fleet's zero hours would otherwise fill the table for 62 days); hours with usage stay."""
    from sidecar.usage import saas_ledger

    c = car(zero_records=True)
    c.contract({"users": ("integer", 10, FAR), "api_calls": ("integer", 100, FAR)})
    c.learn()
    c.use("api_calls", 30)
    first = c.next_hour()  # users: nothing used
    second = c.next_hour()  # nothing used at all
    assert [c.billed(h, d) for h in (first, second) for d in ("users", "api_calls")] == [0] * 4
    users = c.explained(first, "users")
    assert users["zero_record"] and users["quantity"] == 0
    assert users["contract"] == {
        "basis": "hour",
        "used": 0,
        "entitled": 10,
        "covered": 0,
        "billed": 0,
        "term_end": None,
        "why": "above 10 an hour",
    }
    pool = c.explained(second, "api_calls")
    assert pool["zero_record"] and pool["contract"]["entitled"] == 100
    assert pool["contract"]["why"] == "above the term's 100 (70 left before this hour)"
    assert c.explained(second, "gb")["contract"]["why"] == "no contract quantity"
    seen = c.svc.customer(c.account)[1]["contract_hours"]
    assert len(seen) == 6  # 3 contract dimensions, 2 hours
    # The pool still holds 70: the zero hour drew nothing.
    c.use("api_calls", 75)
    third = c.next_hour()
    assert c.billed(third, "api_calls") == 5

    def kept() -> list[tuple[str, int]]:
        got = c.svc.store.read(
            lambda db: db.execute(
                "SELECT dimension, hour FROM saas_contract_hours ORDER BY hour, dimension"
            ).fetchall()
        )
        return [(str(d), int(h)) for d, h in got]

    later = c.clock.t + 49 * HOUR
    c.svc.store.write(lambda db: saas_ledger.prune(db, later))
    assert kept() == [("api_calls", first), ("api_calls", third)]


def test_without_the_setting_every_unit_is_metered_as_before(car: Any) -> None:
    c = car(contract=())
    c.contract({"users": ("integer", 10, FAR)})
    c.learn()
    c.use("users", 12)
    hour = c.next_hour()
    assert c.billed(hour, "users") == 12
    assert c.explained(hour, "users")["contract"] is None


def test_a_term_pool_of_100_is_drawn_down_across_hours_then_overage(car: Any) -> None:
    c = car()
    c.contract({"api_calls": ("integer", 100, FAR)})
    c.learn()
    got = []
    for used in (40, 50, 30, 5):
        c.use("api_calls", used)
        hour = c.next_hour()
        got.append((c.billed(hour, "api_calls"), c.explained(hour, "api_calls")["contract"]))
    assert [b for b, _ in got] == [0, 0, 20, 5]
    assert [k["covered"] for _, k in got] == [40, 50, 10, 0]
    assert all(k["basis"] == "term" and k["term_end"] for _, k in got)
    # A renewal (a new expiration) is a new term: a full pool again.
    c.contract({"api_calls": ("integer", 100, FAR + 365 * 86400)})
    c.learn()
    c.use("api_calls", 30)
    hour = c.next_hour()
    assert c.billed(hour, "api_calls") == 0


def test_a_downgrade_learned_before_sealing_applies_to_that_hour_not_to_sealed_ones(
    car: Any,
) -> None:
    c = car()
    c.contract({"users": ("integer", 10, FAR)})
    c.learn()
    c.use("users", 12)
    c.contract({"users": ("integer", 5, FAR)})  # the buyer downgrades inside the hour
    c.learn()
    first = c.next_hour()
    assert c.billed(first, "users") == 7
    # An upgrade learned after the hour was sealed and sent: AWS holds the first record; the
    # sidecar never resends it with another quantity. The next hour uses the new contract.
    c.contract({"users": ("integer", 20, FAR)})
    c.learn()
    c.use("users", 12)
    second = c.next_hour()
    assert c.billed(first, "users") == 7
    assert c.billed(second, "users") == 0


def test_an_entitlement_that_expires_mid_term_stops_covering_after_its_hour(car: Any) -> None:
    c = car()
    h = hour_of(c.clock.t)
    ends = hour_start(h + 1) + 1800  # inside the second hour
    c.contract({"users": ("integer", 10, ends), "api_calls": ("integer", 100, ends)})
    c.learn()
    billed = []
    for _ in range(3):
        c.use("users", 12)
        c.use("api_calls", 30)
        hour = c.next_hour()
        billed.append((c.billed(hour, "users"), c.billed(hour, "api_calls")))
    # The hour it ends in is still covered; the one after is billed whole.
    assert billed == [(2, 0), (2, 0), (12, 30)]
    why = c.explained(h + 2, "users")["contract"]
    assert why["entitled"] is None and why["covered"] == 0


def test_decimal_entitlements_are_exact(car: Any) -> None:
    c = car()
    c.contract({"gb": ("double", 0.5, FAR)})
    c.learn()
    c.use("gb", "1.25")
    first = c.next_hour()
    assert c.billed(first, "gb") == "0.75"
    row = c.explained(first, "gb")["contract"]
    assert (row["used"], row["entitled"], row["covered"]) == ("1.25", "0.5", "0.5")
    c.use("gb", "0.3")
    second = c.next_hour()
    assert c.billed(second, "gb") == 0


def test_usage_sealed_in_a_final_window_is_charged_too(car: Any) -> None:
    c = car()
    c.contract({"users": ("integer", 10, FAR)})
    c.learn()
    c.use("users", 12)
    hour = hour_of(c.clock.t)
    c.deprovisioned("evt-final-1", c.clock.t)
    passes(c.clock, [c.svc], until=lambda: c.billed(hour, "users") is not None)  # in the window
    assert hour_of(c.clock.t) == hour
    assert c.billed(hour, "users") == 2


def test_a_final_window_learned_hours_late_still_seals_at_once(car: Any) -> None:
    """docs/saas-lifecycle.md, "A final window that closed while the queue was unreachable": the
    buyer's open usage "is sealed by the leader's next pass and sent at once", however long the
    queue was down (SQS keeps messages for days): here the event is learned 4 hours late."""
    c = car(contract=())
    c.use("users", 12)
    hour = hour_of(c.clock.t)
    c.deprovisioned("evt-final-late", c.clock.t - 4 * HOUR)
    passes(c.clock, [c.svc], until=lambda: c.billed(hour, "users") is not None)  # next passes
    assert hour_of(c.clock.t) == hour
    assert c.billed(hour, "users") == 12


# -- schema 4 -> 5: a store written by the sidecar before this change ---------------------------

SCHEMA_4 = Schema(
    name=SAAS_SCHEMA.name,
    version=4,
    sqlite=SAAS_SCHEMA.sqlite.removesuffix(saas_ledger.MIGRATION_6[0]).removesuffix(
        saas_contract.MIGRATION_5[0]
    ),
    postgresql=SAAS_SCHEMA.postgresql.removesuffix(saas_ledger.MIGRATION_6[1]).removesuffix(
        saas_contract.MIGRATION_5[1]
    ),
    migrations={k: v for k, v in SAAS_SCHEMA.migrations.items() if k <= 4},
)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_schema_4_store_is_migrated_and_its_decimal_entitlements_still_count(
    request: pytest.FixtureRequest,
    emulator_server: Any,
    emulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """What the sidecar before this change stored (schema 4: a resolved customer, GetEntitlements'
    DoubleValue kept as its exact text with no kind, an open hour) is sealed right after the
    upgrade: 2 used with 0.5 entitled bills 1.5."""
    from sidecar.usage import saas_ledger

    url = request.getfixturevalue("pg_url") if kind == "postgresql" else None
    aws_env(monkeypatch, emulator_server, "seller")
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    buyer = new_buyer(emulator_server.url)
    account, arn = str(buyer["customer_aws_account_id"]), str(buyer["license_arn"])
    old = open_store(SCHEMA_4, state_dir=tmp_path, database_url=url)
    with pytest.raises(Exception, match="kind"):
        old.read(lambda db: db.execute("SELECT kind FROM saas_entitlements").fetchall())
    answer = {"CustomerAWSAccountId": account, "LicenseArn": arn, "ProductCode": "prod-1"}
    key = f"{account}/{arn}"
    t = clock.t

    def schema_4_writes(db: Any) -> None:
        saas_ledger.save_customer(db, key, answer, t, "d", t + HOUR)
        db.execute(
            "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, last_event, "
            "updated_at, entitlements_at) VALUES (?, 'subscribed', 0, 0, 'GetEntitlements', ?, ?)",
            (account, t, t),
        )
        db.execute(
            "INSERT INTO saas_entitlements (subject, dimension, value, expiration, learned_at) "
            "VALUES (?, 'gb', ?, ?, ?)",
            (account, json.dumps("0.5"), FAR, t),
        )
        db.execute(
            "INSERT INTO saas_open (customer, dimension, hour, quantity) VALUES (?, 'gb', ?, ?)",
            (key, hour_of(t), 2_000_000),
        )

    old.write(schema_4_writes)
    old.close()
    new = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    c = Car(emulator_server, emulator, new, clock, CONTRACT, buyer=buyer)
    hour = c.next_hour()
    assert c.billed(hour, "gb") == "1.5"
    assert c.explained(hour, "gb")["contract"]["entitled"] == "0.5"
    c.svc.close()


def test_the_pool_is_exact_with_two_replicas_on_one_postgresql(
    pg_url: str, emulator_server: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sidecars of a fleet take usage and both try to seal: the seal lock lets one at a
    time draw on the pool, so it covers exactly 100 of the 120 units."""
    aws_env(monkeypatch, emulator_server, "seller")
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE", emulator_server.url)
    clock = ManualClock()
    clock.t = hour_start(hour_of(clock.t)) + 600.0
    a = Car(
        emulator_server, emulator, open_store(SAAS_SCHEMA, database_url=pg_url), clock, CONTRACT
    )
    b = SaasService(
        a.svc.policy,
        open_store(SAAS_SCHEMA, database_url=pg_url),
        lambda: MeteringGateway("us-east-1", 5.0),
        clock=clock,
        rng=lambda: 0.5,
    )
    a.contract({"api_calls": ("integer", 100, FAR)})
    a.learn()
    doc = {
        "customer_aws_account_id": a.account,
        "license_arn": a.buyer["license_arn"],
        "dimension": "api_calls",
        "quantity": 1,
    }
    hours = []
    for _ in range(4):
        for _ in range(15):
            a.use("api_calls", 1)
            assert b.post(json.dumps(doc).encode())[0] == 202
        hours.append(hour_of(clock.t))
        clock.t = hour_start(hours[-1] + 1) + 120
        passes(clock, [a.svc, b])  # both seal and send; the seal lock lets one at a time
    assert [a.billed(h, "api_calls") for h in hours] == [0, 0, 0, 20]
    a.svc.close()
    b.close()


def test_a_string_or_boolean_entitlement_is_a_feature_and_covers_nothing(car: Any) -> None:
    """A StringValue "10" looks like a DoubleValue's text once stored: the kind kept with it
    tells them apart, so a feature never hides billable usage."""
    c = car()
    c.contract({"users": ("string", "10", FAR), "gb": ("boolean", True, FAR)})
    c.learn()
    c.use("users", 12)
    c.use("gb", 3)
    hour = c.next_hour()
    assert (c.billed(hour, "users"), c.billed(hour, "gb")) == (12, 3)
    assert c.explained(hour, "users")["contract"]["why"] == "no contract quantity"


def test_an_entitlement_beyond_any_column_still_seals(car: Any) -> None:
    """A DoubleValue of 1e300 is 1e306 micro-units: kept as text, the hour seals (covered)."""
    c = car()
    c.contract({"users": ("double", 1e300, FAR)})
    c.learn()
    c.use("users", 12)
    hour = c.next_hour()
    assert c.billed(hour, "users") == 0
    assert str(c.explained(hour, "users")["contract"]["entitled"]).startswith("1000000000")


def test_a_pool_downgraded_below_its_draws_bills_everything_after(car: Any) -> None:
    c = car()
    c.contract({"api_calls": ("integer", 100, FAR)})
    c.learn()
    c.use("api_calls", 60)
    first = c.next_hour()
    c.contract({"api_calls": ("integer", 50, FAR)})  # amended down, same term
    c.learn()
    c.use("api_calls", 10)
    second = c.next_hour()
    assert (c.billed(first, "api_calls"), c.billed(second, "api_calls")) == (0, 10)


def test_explanations_are_kept_two_invoice_months_and_a_live_pool_keeps_its_draws(
    car: Any,
) -> None:
    from sidecar.usage import saas_ledger

    c = car()
    ends = c.clock.t + 90 * 86400
    c.contract({"users": ("integer", 10, FAR), "api_calls": ("integer", 100, ends)})
    c.learn()
    c.use("users", 12)
    c.use("api_calls", 70)
    first = c.next_hour()

    def rows() -> list[str]:
        got = c.svc.store.read(
            lambda db: db.execute("SELECT basis FROM saas_contract_hours ORDER BY basis").fetchall()
        )
        return [str(b) for (b,) in got]

    for days, left in ((61, ["hour", "term"]), (63, ["term"]), (90 + 63, [])):
        now = c.clock.t + days * 86400
        c.svc.store.write(lambda db, t=now: saas_ledger.prune(db, t))
        assert rows() == left, days
    assert c.billed(first, "api_calls") == 0


def test_entitlements_never_read_bill_every_unit_and_say_so(car: Any, emulator_server: Any) -> None:
    """GetEntitlements refused when the buyer was resolved, and no event since: the sidecar
    cannot know the contract, so it bills every unit rather than guess, and warns."""
    resp = requests.post(
        emulator_server.url + "/_emulator/entitlements/config",
        json={"faults": [{"error": "AccessDeniedException", "first": 5}]},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    c = car(zero_records=True)
    c.use("users", 12)
    hour = c.next_hour()
    assert c.billed(hour, "users") == 12
    assert c.explained(hour, "users")["contract"]["why"].startswith("entitlements never read")
    # The zero records of its other contract dimensions billed nothing whole: not counted.
    assert c.explained(hour, "gb")["contract"]["why"].startswith("entitlements never read")
    blind = [w for w in c.svc.report()["warnings"] if "entitlements were never read" in w]
    assert len(blind) == 1 and blind[0].startswith("1 records of contract dimensions")


@pytest.mark.parametrize("order", [(5, 10), (10, 5)])
def test_a_dimension_listed_twice_keeps_the_last_listed_value(
    car: Any, order: tuple[int, int]
) -> None:
    """docs/saas-lifecycle.md: "GetEntitlements may list one dimension twice (concurrent
    agreements); the store keeps one value per dimension, the last listed". Both orders: the
    one kept must follow the answer, not the process's hash order."""
    c = car()
    resp = c.http.post(
        c.server.url + "/_emulator/entitlements",
        json={
            "product_code": c.product,
            "customer_aws_account_id": c.account,
            "entitlements": [
                {"dimension": "users", "integer": n, "expiration": FAR} for n in order
            ],
        },
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    c.learn()
    c.use("users", 12)
    hour = c.next_hour()
    assert c.billed(hour, "users") == 12 - order[-1]
    assert c.explained(hour, "users")["contract"]["covered"] == order[-1]


# -- schema 4 -> 5 on a fleet: a replica of the schema-4 sidecar still running ------------------

LEGACY_V3 = Path(__file__).parent / "legacy_v3"
# What the schema-4 sidecar's sessions set (its pgstore.SESSION_OPTIONS, commit ff6babb):
# micro-units, so schema 3's guard lets it write; nothing about contracts.
SCHEMA_4_SESSION = (
    "-c idle_in_transaction_session_timeout=5000 -c lock_timeout=2000 "
    "-c sidecar.quantity_unit=micro"
)
# The schema-4 sidecar's seal statements, word for word (its saas_ledger._seal_hour and
# saas_events.final_seal, placeholders in psycopg's form): the one that bills is the outbox insert.
OLD_SEAL_OUTBOX = (
    "INSERT INTO saas_outbox (customer, dimension, hour, quantity, zero, record, state, "
    "sealed_at, deadline) VALUES (%s, %s, %s, %s, %s, %s, 'sealed', %s, %s), "
    "(%s, %s, %s, %s, %s, %s, 'sealed', %s, %s) ON CONFLICT (customer, dimension, hour) DO NOTHING"
)
OLD_FINAL_SEAL_OUTBOX = (
    "INSERT INTO saas_outbox (customer, dimension, hour, quantity, zero, record, "
    "state, sealed_at, deadline) VALUES (%s, %s, %s, %s, 0, %s, 'sealed', %s, %s) "
    "ON CONFLICT (customer, dimension, hour) DO NOTHING"
)


def test_a_schema_4_replica_still_running_cannot_seal_contract_hours_whole(pg_url: str) -> None:
    """A rolling upgrade on one PostgreSQL: a replica of the schema-4 sidecar (tests/legacy_v3:
    the store as its own code left it) keeps its session and never reads the schema version
    again. After a new replica migrated the store, the old one's seal of the ended hour is
    refused by the database, loudly, and changes nothing; the new replica then seals that hour
    net of the contract: 6 used with 10 entitled bills 0, not 6."""
    import psycopg

    from sidecar.core import quantity as qty
    from sidecar.usage import saas_ledger as L  # noqa: N812
    from sidecar.usage.hours import iso_hour
    from tests.helpers import NOW

    a = "111111111111/arn:aws:license-manager::111111111111:license:l-111111111111"
    b = "222222222222/arn:aws:license-manager::222222222222:license:l-222222222222"
    hour = hour_of(NOW) - 1  # open in the fixture: A used 6 scans, B 0.25
    old = _schema_4_replica(pg_url)  # its session opened before the upgrade
    new = open_store(SAAS_SCHEMA, database_url=pg_url)  # migrates 4 -> 5
    try:
        # The buyer A's contract covers 10 scans an hour, as GetEntitlements stored it.
        new.write(
            lambda db: [
                db.execute(
                    "INSERT INTO saas_lifecycle (subject, state, state_time, event_time, "
                    "last_event, updated_at, entitlements_at) VALUES "
                    "('111111111111', 'subscribed', 0, 0, 'GetEntitlements', ?, ?)",
                    (NOW, NOW),
                ),
                db.execute(
                    "INSERT INTO saas_entitlements (subject, dimension, value, expiration, "
                    "learned_at, kind) VALUES ('111111111111', 'scans', '10', ?, ?, 'integer')",
                    (FAR, NOW),
                ),
            ]
        )
        now = NOW + 120
        # The old leader's seal of the hour: its totals, then its outbox rows (whole).
        totals = _old_totals(old, hour)
        assert [(c, int(q)) for c, _, q in totals] == [(a, 6 * qty.SCALE), (b, qty.SCALE // 4)]
        rows = _old_rows(totals, hour, now)
        with pytest.raises(psycopg.errors.RaiseException) as refused:
            old.execute(OLD_SEAL_OUTBOX, rows)
        assert "schema 5" in str(refused.value) and "upgrade every replica" in str(refused.value)
        old.rollback()
        with pytest.raises(psycopg.errors.RaiseException, match="upgrade every replica"):
            old.execute(OLD_FINAL_SEAL_OUTBOX, rows[:5] + rows[6:8])  # its final-window seal
        old.rollback()

        def outbox() -> list[tuple[str, int]]:
            got = new.read(
                lambda db: db.execute(
                    "SELECT customer, quantity FROM saas_outbox WHERE hour = ? ORDER BY customer",
                    (hour,),
                ).fetchall()
            )
            return [(str(c), int(q)) for c, q in got]

        assert outbox() == []  # nothing billed whole, the totals still open
        spec = L.SealSpec(("scans", "users"), "license", False, HourPolicy(60, 0), CONTRACT_4)
        assert new.write(lambda db: L.seal(db, hour, now, spec), locks=L.SEAL_LOCKS) == [(hour, 2)]
        assert outbox() == [(a, 0), (b, qty.SCALE // 4)]  # A's 6 covered by its 10
        why = new.read(lambda db: L.report(db, now, HourPolicy(60, 0)))["records"]
        assert {
            r["customer"]: r["contract"]["covered"] for r in why if r["hour"] == iso_hour(hour)
        } == {a: 6, b: 0}
    finally:
        old.close()
        new.close()


CONTRACT_4 = (("scans", Basis.HOUR),)


def _schema_4_replica(pg_url: str) -> Any:
    """The schema-4 store as its own code left it (tests/legacy_v3), and a session of that
    sidecar on it (a psycopg connection, in a transaction), opened before any upgrade."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute((LEGACY_V3 / "saas_postgresql.sql").read_text().encode())
    return psycopg.connect(pg_url, options=SCHEMA_4_SESSION)


def _old_totals(old: Any, hour: int) -> list[tuple[Any, ...]]:
    """The schema-4 seal's first statement (ordered here, for the assertions): the hour's totals."""
    return list(
        old.execute(
            "SELECT customer, dimension, quantity FROM saas_open WHERE hour = %s ORDER BY customer",
            (hour,),
        ).fetchall()
    )


def _old_rows(totals: list[tuple[Any, ...]], hour: int, now: float) -> list[Any]:
    """The schema-4 seal's outbox values for the hour's totals, flat (one row per total)."""
    rows: list[Any] = []
    for customer, dimension, quantity in totals:
        record = json.dumps({"Timestamp": int(hour_start(hour)), "Dimension": dimension})
        rows += [customer, dimension, hour, quantity, 0, record, now, now + 6 * HOUR]
    return rows


def test_a_schema_4_seal_in_flight_during_the_upgrade_commits_first_and_the_next_is_refused(
    pg_url: str,
) -> None:
    """The old leader is writing an hour's records when a new replica starts: the migration
    waits for that seal (its guard is created first, on the outbox the seal holds) instead of
    failing or deadlocking, the hour commits as sealed before the upgrade, and the old
    replica's next seal is refused."""
    import psycopg

    from tests.helpers import NOW

    hour, now = hour_of(NOW) - 1, NOW + 120
    old = _schema_4_replica(pg_url)
    totals = _old_totals(old, hour)
    old.execute(OLD_SEAL_OUTBOX, _old_rows(totals, hour, now))  # in flight, not committed
    opened: list[Any] = []
    failed: list[BaseException] = []

    def upgrade() -> None:
        try:
            opened.append(open_store(SAAS_SCHEMA, database_url=pg_url))
        except BaseException as exc:  # reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=upgrade, daemon=True)
    thread.start()
    try:
        with psycopg.connect(pg_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                ).fetchone()
                if row and int(row[0]) > 0:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the migration never waited for the old seal")
        old.execute("DELETE FROM saas_open WHERE hour = %s", (hour,))  # the seal's next steps
        old.execute(
            "INSERT INTO saas_sealed_hours (hour, sealed_at, records) VALUES (%s, %s, %s)",
            (hour, now, len(totals)),
        )
        old.commit()
        thread.join(60)
        assert not failed and opened, failed
        sealed = opened[0].read(
            lambda db: db.execute(
                "SELECT COUNT(*) FROM saas_outbox WHERE hour = ?", (hour,)
            ).fetchone()
        )
        assert int(sealed[0]) == len(totals) == 2
        with pytest.raises(psycopg.errors.RaiseException, match="upgrade every replica"):
            old.execute(OLD_SEAL_OUTBOX, _old_rows(totals, hour + 1, now + HOUR))
        old.rollback()
    finally:
        old.close()
        for s in opened:
            s.close()
