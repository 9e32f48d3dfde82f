"""SaaS mode's local API: the real Router behind the real LocalServer over loopback HTTP.

The routing units run the real SaasService (SQLite store, boto3 to the emulator) in-process
behind the real listeners: which path reaches the service, limits, statuses and headers,
readiness on both listeners, and the 404 that names the mode. The end-to-end tests below run the
`run` process itself, on SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
import requests
import yaml

from sidecar.aws.metering import MeteringGateway
from sidecar.client import CustomerError, UsageError, report_usage, resolve_customer
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.ops.metrics import Metrics
from sidecar.server.api import API_LIMITS, PROBE_LIMITS, LocalServer, Router
from sidecar.usage.db import open_store
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from tests.helpers import Sidecar, loopback_env, start_sidecar
from tests.usage_kit import aws_env

ROUTES = frozenset({"/readyz", "/v1/customers", "/v1/customers/{id}", "/v1/customers/resolve"})


class Served:
    """The real SaasService (SQLite store, boto3 gateway to the emulator) behind the API and
    probe listeners."""

    def __init__(self, saas: SaasService) -> None:
        self.saas = saas
        self.metrics = Metrics(None, ROUTES)
        self.api = LocalServer(
            ("127.0.0.1", 0),
            Router(None, lambda: None, saas=saas, readiness=saas.ready, metrics=self.metrics),
            API_LIMITS,
        )
        self.probe = LocalServer(
            ("127.0.0.1", 0),
            Router(None, lambda: None, listener="probe", readiness=saas.ready),
            PROBE_LIMITS,
            name="probe",
        )
        for server in (self.api, self.probe):
            server.serve_in_thread(server.name)
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.probe_url = f"http://127.0.0.1:{self.probe.server_address[1]}"

    def close(self) -> None:
        for server in (self.api, self.probe):
            server.shutdown()
            server.server_close()
        self.saas.close()


@pytest.fixture
def served(
    monkeypatch: pytest.MonkeyPatch,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    tmp_path: Path,
) -> Iterator[Served]:
    aws_env(monkeypatch, emulator_server, "pod-saas-api")
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path)
    saas = SaasService(
        SaasPolicy(dimensions=("users", "scans")),
        store,
        lambda: MeteringGateway("us-east-1", 5.0),
    )
    s = Served(saas)
    yield s
    s.close()


def buyer_of(served: Served, emulator: Emulator, account: str = "111122223333") -> dict[str, Any]:
    buyer = emulator.saas_customer({"customer_aws_account_id": account})
    r = requests.post(
        f"{served.url}/v1/customers/resolve",
        json={"registration_token": buyer["registration_token"]},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    return {**buyer, **r.json()}


def test_each_saas_path_reaches_the_service(served: Served, emulator: Emulator) -> None:
    buyer = buyer_of(served, emulator)
    assert buyer["customer_aws_account_id"] == "111122223333"
    listed = requests.get(f"{served.url}/v1/customers", timeout=5).json()
    assert [c["customer"] for c in listed["customers"]] == [buyer["customer"]]
    one = requests.get(f"{served.url}/v1/customers/111122223333", timeout=5)
    assert one.status_code == 200 and one.json()["license_arn"] == buyer["license_arn"]
    record = {
        "customer_aws_account_id": "111122223333",
        "license_arn": buyer["license_arn"],
        "dimension": "users",
        "quantity": 2,
    }
    r = requests.post(f"{served.url}/v1/usage", json=[record], timeout=5)
    assert r.status_code == 202, r.text
    report = requests.get(f"{served.url}/v1/usage", timeout=5).json()
    assert [(x["customer"], x["quantity"]) for x in report["records"]] == [(buyer["customer"], 2)]


def test_a_customer_key_in_the_path_is_percent_decoded(served: Served, emulator: Emulator) -> None:
    buyer = buyer_of(served, emulator)
    assert "/" in buyer["customer"]  # account id / license ARN
    r = requests.get(f"{served.url}/v1/customers/{quote(buyer['customer'], safe='')}", timeout=5)
    assert r.status_code == 200 and r.json()["customer"] == buyer["customer"]
    r = requests.get(f"{served.url}/v1/customers/cust%2Bid%3D1", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_customer"  # looked up


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/customers/%ff%fe", 400, "invalid_customer"),  # not UTF-8
        ("/v1/customers/%0a", 400, "invalid_customer"),  # a control character
        ("/v1/customers/" + "9" * 2049, 400, "invalid_customer"),
        ("/v1/customers/a/b", 404, "not_found"),
        ("/v1/customers/", 404, "not_found"),
    ],
)
def test_bad_customer_paths_are_client_errors_named_by_the_router(
    served: Served, path: str, status: int, code: str
) -> None:
    r = requests.get(served.url + path, timeout=5)
    assert r.status_code == status and r.json()["error"]["code"] == code
    if status == 400:
        assert r.json()["error"]["message"].startswith("customer: ")


def test_wrong_methods_get_405_with_allow(served: Served, emulator: Emulator) -> None:
    buyer_of(served, emulator)
    r = requests.get(f"{served.url}/v1/customers/resolve", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.delete(f"{served.url}/v1/customers/111122223333", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = requests.head(f"{served.url}/v1/customers/111122223333", timeout=5)
    assert r.status_code == 200 and r.content == b""


def test_entitlement_answers_a_404_that_names_the_mode(served: Served) -> None:
    for method, path in (("GET", "/v1/entitlement"), ("POST", "/v1/entitlement/challenge")):
        r = requests.request(method, served.url + path, json={"nonce": "n"}, timeout=5)
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "no_entitlement_in_saas_mode"
        assert "MARKETPLACE_MODE=saas" in error["message"]


def test_the_service_answers_keep_their_status_code_and_hint(
    served: Served, emulator: Emulator
) -> None:
    late = emulator.saas_customer({"token_ttl_seconds": 0.001})
    time.sleep(0.05)
    r = requests.post(
        f"{served.url}/v1/customers/resolve",
        json={"registration_token": late["registration_token"]},
        timeout=20,
    )
    assert r.status_code == 410
    assert r.json()["error"]["code"] == "expired_token"
    assert r.json()["error"]["hint"].startswith("redeem the token")
    r = requests.post(
        f"{served.url}/v1/customers/resolve", json={"registration_token": "forged"}, timeout=20
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"


def test_body_limits_per_path(served: Served) -> None:
    big = {"registration_token": "x" * (16 * 1024)}
    r = requests.post(f"{served.url}/v1/customers/resolve", json=big, timeout=5)
    assert r.status_code == 413 and "16384 bytes" in r.json()["error"]["message"]
    records = [{"dimension": "users", "quantity": 1, "pad": "x" * 300}] * 2000
    r = requests.post(f"{served.url}/v1/usage", json=records, timeout=5)
    # about 700 KB: under the API's 1 MiB, so the service itself judges it (not a 413 "bytes")
    assert r.status_code in (400, 413) and "bytes" not in r.json()["error"]["message"]


def test_a_lone_surrogate_in_a_token_is_refused_before_the_service(served: Served) -> None:
    body = b'{"registration_token": "\\ud800"}'
    r = requests.post(
        f"{served.url}/v1/customers/resolve",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_readiness_is_the_store_on_both_listeners(served: Served) -> None:
    r = requests.get(f"{served.url}/readyz", timeout=5)
    assert r.status_code == 200 and r.json() == {"ready": True, "state": "ready"}
    r = requests.get(f"{served.probe_url}/readyz", timeout=5)
    assert r.status_code == 200 and r.json() == {"ready": True, "state": "ready"}
    for path in ("/v1/customers", "/v1/customers/resolve", "/v1/usage"):  # billing data
        assert requests.get(served.probe_url + path, timeout=5).status_code == 404


def test_the_probe_listener_hides_why_the_store_is_down() -> None:
    def down() -> tuple[bool, str | None]:
        return False, "database unreachable: connection refused to db.internal:5432"

    api = Router(None, lambda: None, readiness=down).handle("GET", "/readyz", b"")
    assert api.status == 503
    assert api.body == {
        "ready": False,
        "state": "store_unavailable",
        "error": {
            "code": "store_unavailable",
            "message": "database unreachable: connection refused to db.internal:5432",
        },
    }
    probe = Router(None, lambda: None, listener="probe", readiness=down)
    reply = probe.handle("GET", "/readyz", b"")
    assert reply.status == 503
    assert reply.body == {
        "ready": False,
        "state": "store_unavailable",
        "error": {"code": "store_unavailable"},
    }


def test_ready_with_warnings_shows_their_codes_and_only_the_api_shows_messages() -> None:
    """Issue 19: a quarantined dimension or a clock refusal leaves the sidecar ready (the other
    dimensions and hours still bill), with the reasons a human should act on."""

    def ready() -> tuple[bool, str | None]:
        return True, None

    def warned() -> list[str]:
        return ["dimension_quarantined: AWS refused seats", "clock_skew: resent until 12:00"]

    api = Router(None, lambda: None, readiness=ready, notices=warned).handle("GET", "/readyz", b"")
    assert api.status == 200
    assert api.body == {"ready": True, "state": "ready", "warnings": warned()}
    probe = Router(None, lambda: None, listener="probe", readiness=ready, notices=warned)
    reply = probe.handle("GET", "/readyz", b"")
    assert reply.status == 200
    assert reply.body["warnings"] == ["dimension_quarantined", "clock_skew"]


def test_a_readiness_check_that_raises_answers_503_not_500() -> None:
    def broken() -> tuple[bool, str | None]:
        raise RuntimeError("boom")

    reply = Router(None, lambda: None, readiness=broken).handle("GET", "/readyz", b"")
    assert reply.status == 503 and reply.body["error"]["code"] == "store_unavailable"


def test_customer_requests_are_counted_under_one_bounded_route(served: Served) -> None:
    for i in range(5):
        requests.get(f"{served.url}/v1/customers/cust-{i}", timeout=5)
    want = 'path="/v1/customers/{id}",status="404"} 5.0'
    deadline = time.monotonic() + 5  # counted just after the answer is flushed
    while want not in (text := served.metrics.render().decode()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert want in text
    assert "cust-1" not in text
    assert "marketplace_entitlement_state" not in text  # no state machine in saas mode


def test_other_modes_answer_customers_with_a_404_naming_saas_mode() -> None:
    router = Router(None, lambda: None, readiness=lambda: (True, None))
    for method, path in (
        ("POST", "/v1/customers/resolve"),
        ("GET", "/v1/customers"),
        ("GET", "/v1/customers/123456789012"),
    ):
        reply = router.handle(method, path, b"{}")
        assert reply.status == 404, path
        assert reply.body["error"]["code"] == "customers_need_saas_mode"


def test_a_slow_resolve_body_is_cut_at_the_request_deadline(served: Served) -> None:
    """Existing limits apply: a client dripping its token cannot hold a thread past 10 s."""
    with socket.create_connection(("127.0.0.1", served.api.server_address[1]), timeout=15) as s:
        s.sendall(b"POST /v1/customers/resolve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:80]


# -- end to end: the real `run` process, SaasService, the emulator, SQLite and PostgreSQL -------

SPEC: dict[str, Any] = yaml.safe_load(
    resources.files("sidecar").joinpath("openapi.yaml").read_text()
)
PASSWORD = "s3cret-pw-7f1"


def check(path: str, method: str, resp: requests.Response) -> None:
    """The answer is declared in the shipped OpenAPI document, with its headers."""
    op = SPEC["paths"][path][method.lower()]
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{method} {path} answered undocumented {resp.status_code}"
    schema = {**declared["content"]["application/json"]["schema"], "components": SPEC["components"]}
    jsonschema.validate(resp.json(), schema, cls=jsonschema.Draft202012Validator)
    for header in declared.get("headers", {}):
        assert header in resp.headers, header


@pytest.fixture
def saas_car(emulator_server: EmulatorServer, emulator: Emulator) -> Iterator[Any]:
    started: list[Sidecar] = []

    def launch(**extra: str) -> Sidecar:
        env = loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="saas",
            MARKETPLACE_DIMENSIONS="users,scans",
            # start_sidecar's hourly test defaults, left blank as a shared template would
            MARKETPLACE_PRODUCT_CODE="",
            MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
            **extra,
        )
        car = start_sidecar(env)
        started.append(car)
        return car

    yield launch
    for car in started:
        car.stop()


def issue(emulator: Emulator, **spec: Any) -> dict[str, Any]:
    return emulator.saas_customer(spec)


def resolve(car: Sidecar, token: str) -> requests.Response:
    r = requests.post(
        car.api + "/v1/customers/resolve", json={"registration_token": token}, timeout=20
    )
    check("/v1/customers/resolve", "POST", r)
    return r


def test_saas_on_sqlite_resolves_stores_and_takes_usage(
    saas_car: Any, emulator: Emulator, tmp_path: Path
) -> None:
    car = saas_car(MARKETPLACE_STATE_DIR=str(tmp_path))
    ready = car.get("/readyz")
    check("/readyz", "GET", ready)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "state": "ready"}
    r = car.get("/v1/entitlement")
    check("/v1/entitlement", "GET", r)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_entitlement_in_saas_mode"

    buyer = issue(emulator, customer_aws_account_id="111122223333")
    r = resolve(car, buyer["registration_token"])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["customer_aws_account_id"] == "111122223333"
    assert got["license_arn"] == buyer["license_arn"] and got["from_store"] is False
    calls = emulator.saas_ledger()["counts"]["calls"]
    again = resolve(car, buyer["registration_token"])
    assert again.status_code == 200 and again.json()["from_store"] is True
    assert emulator.saas_ledger()["counts"]["calls"] == calls  # no second ResolveCustomer

    record = {
        "customer_aws_account_id": "111122223333",
        "license_arn": buyer["license_arn"],
        "dimension": "users",
        "quantity": 3,
        "id": "job-1",
    }
    r = requests.post(car.api + "/v1/usage", json=record, timeout=10)
    check("/v1/usage", "POST", r)
    assert r.status_code == 202, r.text
    r = requests.post(car.api + "/v1/usage", json=record, timeout=10)
    assert r.status_code == 200  # the same id: counted once
    # The product's client carries the customer in each record as is.
    assert (
        report_usage({**record, "id": "job-3", "dimension": "scans"}, url=car.api)["accepted"] == 1
    )
    with pytest.raises(UsageError) as refused:
        report_usage({**record, "customer_identifier": "c-1", "id": "job-4"}, url=car.api)
    assert refused.value.reason == "invalid"  # both identifier kinds in one record
    stranger = {**record, "customer_aws_account_id": "999988887777", "id": "job-2"}
    r = requests.post(car.api + "/v1/usage", json=stranger, timeout=10)
    check("/v1/usage", "POST", r)
    assert r.status_code == 400 and "customer" in r.json()["error"]["message"]

    listed = car.get("/v1/customers")
    check("/v1/customers", "GET", listed)
    assert [c["customer_aws_account_id"] for c in listed.json()["customers"]] == ["111122223333"]
    one = car.get("/v1/customers/111122223333")
    check("/v1/customers/{id}", "GET", one)
    assert one.status_code == 200 and one.json()["state"] == "active"
    unknown = car.get("/v1/customers/999988887777")
    check("/v1/customers/{id}", "GET", unknown)
    assert unknown.status_code == 404
    report = car.get("/v1/usage")
    check("/v1/usage", "GET", report)
    assert report.status_code == 200

    metrics = car.get("/metrics", probe=True).text
    assert "marketplace_saas_leader 1.0" in metrics
    assert 'marketplace_saas_customers{state="active"} 1.0' in metrics
    assert 'marketplace_usage_units_accepted_total{dimension="users"} 3.0' in metrics
    assert car.stop() == 0


def test_saas_token_errors_are_distinct(saas_car: Any, emulator: Emulator, tmp_path: Path) -> None:
    car = saas_car(MARKETPLACE_STATE_DIR=str(tmp_path))
    r = resolve(car, "not-a-token-the-emulator-issued")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"
    late = issue(emulator, token_ttl_seconds=0.001)
    time.sleep(0.05)
    r = resolve(car, late["registration_token"])
    assert r.status_code == 410, r.text
    assert r.json()["error"]["code"] == "expired_token"
    assert "as soon as the buyer's browser posts it" in r.json()["error"]["hint"]
    with pytest.raises(CustomerError) as caught:
        resolve_customer(late["registration_token"], url=car.api)
    assert caught.value.reason == "expired_token" and caught.value.hint


def test_saas_on_postgresql_reports_a_database_outage_and_recovers(
    saas_car: Any, emulator: Emulator, pg_server: Any, pg_url: str
) -> None:
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    car = saas_car(MARKETPLACE_USAGE_DATABASE_URL=url)
    assert car.get("/readyz").status_code == 200
    buyer = issue(emulator)
    assert resolve(car, buyer["registration_token"]).status_code == 200
    record = {
        "customer_aws_account_id": buyer["customer_aws_account_id"],
        "license_arn": buyer["license_arn"],
        "dimension": "scans",
        "quantity": 1,
    }
    pg_server.stop("immediate")
    try:
        deadline = time.monotonic() + 15
        while (ready := car.get("/readyz")).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        check("/readyz", "GET", ready)
        assert ready.status_code == 503, ready.text
        assert ready.json()["state"] == "store_unavailable"
        assert ready.json()["error"]["message"]  # the reason, on the API port
        probe = car.get("/readyz", probe=True)
        assert probe.status_code == 503
        assert probe.json() == {
            "ready": False,
            "state": "store_unavailable",
            "error": {"code": "store_unavailable"},
        }
        r = requests.post(car.api + "/v1/usage", json=record, timeout=15)
        check("/v1/usage", "POST", r)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert car.get("/metrics", probe=True).status_code == 200  # never a 500 scrape
    finally:
        pg_server.start()
    deadline = time.monotonic() + 20
    while car.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert car.get("/readyz").status_code == 200
    r = requests.post(car.api + "/v1/usage", json=record, timeout=15)
    assert r.status_code == 202, r.text
    assert car.stop() == 0
    logs = car.logs()
    assert PASSWORD not in logs
    assert "postgresql://postgres@127.0.0.1" in logs  # the startup line, without the password


def test_the_run_loop_thread_sends_sealed_hours_and_sigterm_exits_0(
    saas_car: Any, emulator: Emulator, tmp_path: Path
) -> None:
    """The wiring starts SaasService.run: with time 3600x faster (a second is an hour), a
    posted record is sealed and sent by BatchMeterUsage without anything else asking."""
    origin = time.time()
    emulator.reconfigure({"time_scale": 3600.0, "time_origin": origin})
    car = saas_car(
        MARKETPLACE_STATE_DIR=str(tmp_path),
        MARKETPLACE_TEST_ONLY_TIME_SCALE="3600",
        MARKETPLACE_TEST_ONLY_TIME_ORIGIN=str(origin),
        MARKETPLACE_ZERO_USAGE_RECORDS="false",
    )
    buyer = issue(emulator, token_ttl_seconds=10_000_000)
    customer = resolve(car, buyer["registration_token"]).json()
    record = {
        "customer_aws_account_id": customer["customer_aws_account_id"],
        "license_arn": customer["license_arn"],
        "dimension": "users",
        "quantity": 5,
    }
    assert requests.post(car.api + "/v1/usage", json=record, timeout=10).status_code == 202
    deadline = time.monotonic() + 20
    sent: list[dict[str, Any]] = []
    while not sent and time.monotonic() < deadline:
        sent = [r for r in emulator.saas_ledger()["records"] if r["dimension"] == "users"]
        time.sleep(0.1)
    assert [(r["customer"], r["quantity"]) for r in sent] == [(customer["customer"], 5)]
    assert emulator.saas_ledger()["counts"]["duplicate_record"] == 0
    assert car.stop() == 0


def test_a_pinned_product_code_refuses_another_products_buyer_in_license_identity(
    monkeypatch: pytest.MonkeyPatch,
    emulator_server: EmulatorServer,
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    """The seller's credentials resolve the buyers of EVERY product of the account: a token of
    product B posted to product A's registration page must not become A's customer (its usage
    would be billed on B's license)."""
    aws_env(monkeypatch, emulator_server, "pod-saas-pin")
    saas = SaasService(
        SaasPolicy(dimensions=("users",), product_code="prod-a"),
        open_store(SAAS_SCHEMA, state_dir=tmp_path),
        lambda: MeteringGateway("us-east-1", 5.0),
    )
    served = Served(saas)
    try:
        for account, product, status in (
            ("111122223333", "prod-b", 400),
            ("444455556666", "prod-a", 200),
        ):
            buyer = emulator.saas_customer(
                {"customer_aws_account_id": account, "product_code": product}
            )
            r = requests.post(
                f"{served.url}/v1/customers/resolve",
                json={"registration_token": buyer["registration_token"]},
                timeout=20,
            )
            assert r.status_code == status, r.text
        assert r.json()["customer_aws_account_id"] == "444455556666"
        listed = requests.get(f"{served.url}/v1/customers", timeout=5).json()
        assert [c["customer_aws_account_id"] for c in listed["customers"]] == ["444455556666"]
    finally:
        served.close()
