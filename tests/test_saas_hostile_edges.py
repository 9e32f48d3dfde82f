"""SaaS mode's edges attacked as a hostile neighbour or a buyer's browser would: the database
URL's password in driver messages, the internet-facing registration example held open by a
silent client, and the local API when the store goes away under a read."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sidecar.emulator.service import Emulator, EmulatorServer
from tests.helpers import ROOT, Sidecar, loopback_env, start_sidecar
from tests.test_saas_api import Served, buyer_of, served  # noqa: F401 # the fixture, reused
from tests.test_saas_registration import handler, load_example, saas_sidecar  # noqa: F401

SECRET = "pw+9%zzq"  # a '+' and a broken percent-escape: libpq quotes such a value verbatim


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/db",
        f"postgresql://postgres@127.0.0.1:1/db?password={SECRET}",
    ],
)
def test_a_password_with_a_broken_percent_escape_is_refused_without_being_shown(
    emulator_server: EmulatorServer, url: str
) -> None:
    """libpq answers `invalid percent-encoded token: "<the password>"`: the value must be
    refused by the configuration (exit 2, field named) and never printed by doctor or run."""
    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="saas",
        MARKETPLACE_DIMENSIONS="users",
        MARKETPLACE_USAGE_DATABASE_URL=url,
    )
    for command in ("doctor", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = out.stdout + out.stderr
        assert "pw+9" not in text and "9%zzq" not in text, text
        if command == "run":
            assert out.returncode == 2, text
            assert "MARKETPLACE_USAGE_DATABASE_URL" in text and "percent" in text, text
        else:
            assert "percent" in text, text


def test_doctor_scrubs_a_query_string_password_from_driver_messages() -> None:
    from sidecar.config import scrub_url_secret

    url = "postgresql://postgres@127.0.0.1:1/db?password=s3cr+t%2Fx&sslmode=require"
    message = 'invalid value "s3cr+t%2Fx" and "s3cr+t/x" and "s3cr t/x"'
    # Every spelling of the password is replaced; the rest of the message is kept.
    assert scrub_url_secret(message, url) == 'invalid value "***" and "***" and "***"'


# -- the registration example: internet-facing in a seller's deployment --------------------


@pytest.fixture
def example_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    example = load_example()
    monkeypatch.setattr(example, "REQUEST_SECONDS", 1.0)
    monkeypatch.setattr(example, "MAX_CONNECTIONS", 4)
    server = example.RegistrationServer(("127.0.0.1", 0), "http://127.0.0.1:9")
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    yield example, server
    server.shutdown()
    server.server_close()


def _silent_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    return sock


def test_a_silent_or_dripping_client_is_cut_at_the_request_deadline(
    example_server: tuple[Any, Any],
) -> None:
    _, server = example_server
    port = server.server_address[1]
    silent = _silent_client(port)
    dripping = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    dripping.sendall(head)
    started = time.monotonic()
    cut = False
    while time.monotonic() - started < 6:  # one byte every 0.3 s never ends the deadline
        try:
            dripping.sendall(b"a")
        except OSError:
            cut = True
            break
        time.sleep(0.3)
    else:
        try:
            cut = dripping.recv(1) == b""
        except OSError:
            cut = True
    assert cut and time.monotonic() - started < 4, "a dripping client kept its thread"
    silent.settimeout(4)
    with contextlib.suppress(ConnectionResetError):
        assert silent.recv(1) == b""  # closed by the server, not by our timeout
    silent.close()
    dripping.close()


def test_silent_clients_cannot_take_every_thread(
    example_server: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    example, server = example_server
    # The served ones hold on for the whole test: no request deadline, no read timeout.
    monkeypatch.setattr(example, "REQUEST_SECONDS", 60.0)
    monkeypatch.setattr(example, "READ_SECONDS", 60.0)
    port = server.server_address[1]
    before = threading.active_count()
    held = [_silent_client(port) for _ in range(example.MAX_CONNECTIONS * 5)]
    try:
        # Wait until the server has accepted every one: all but MAX_CONNECTIONS are closed at
        # accept (the client reads EOF), the rest are being served, silently, right now.
        closed: set[int] = set()
        deadline = time.monotonic() + 20
        while len(closed) < len(held) - example.MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"only {len(closed)} closed at accept"
            for i, sock in enumerate(held):
                if i not in closed and _closed_by_server(sock):
                    closed.add(i)
        grown = threading.active_count() - before
        # a handler thread and its deadline timer per served connection, no more
        assert grown <= 2 * example.MAX_CONNECTIONS, f"{grown} threads for idle sockets"
    finally:
        for sock in held:
            sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_offer_type_field_is_only_a_hint_in_the_example(
    handler: tuple[str, list[Any]],  # noqa: F811
    saas_sidecar: Sidecar,  # noqa: F811
    emulator: Emulator,
) -> None:
    """A buyer can post x-amzn-marketplace-offer-type=free-trial by hand: with a forged token it
    registers nobody, and with a real one the customer the product is handed is AWS's answer,
    the same with or without the field; only the `free_trial` flag follows it."""
    url, seen = handler
    trial = {"x-amzn-marketplace-offer-type": "free-trial"}
    forged = requests.post(url, data={"x-amzn-marketplace-token": "forged", **trial}, timeout=30)
    assert forged.status_code == 400 and "not valid" in forged.text
    assert seen == [] and saas_sidecar.get("/v1/customers").json()["customers"] == []
    buyer = emulator.saas_customer({"customer_aws_account_id": "444455556666"})
    token = {"x-amzn-marketplace-token": buyer["registration_token"]}
    for form in ({**token, **trial}, token):
        r = requests.post(url, data=form, allow_redirects=False, timeout=30)
        assert r.status_code == 200, r.text
    (with_field, flagged), (without_field, plain) = seen
    assert flagged is True and plain is False
    assert with_field["license_arn"] == buyer["license_arn"]
    assert {k: v for k, v in with_field.items() if k != "from_store"} == {
        k: v for k, v in without_field.items() if k != "from_store"
    }


# -- the local API -----------------------------------------------------------------------


def test_the_usage_report_answers_503_when_the_store_is_gone(served: Served) -> None:  # noqa: F811
    served.saas.store.close()
    r = requests.get(f"{served.url}/v1/usage", timeout=5)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit()
    assert r.json()["error"]["code"] == "store_unavailable"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/customers/%2F",
        "/v1/customers/..",
        "/v1/customers/%2e%2e",
        "/v1/customers/%ff%fe",
        "/v1/customers/%00",
        "/v1/customers/" + "9" * 3000,
        "/v1/customers/%",
        "/v1/customers//x",
        "/v1/customers/a%2Fb%2F..%2F..",
    ],
)
def test_customer_path_tricks_never_500(served: Served, path: str) -> None:  # noqa: F811
    r = requests.get(served.url + path, timeout=5)
    assert r.status_code in (400, 404), (path, r.status_code, r.text)
    assert r.json()["error"]["code"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"registration_token": 5}',
        b'{"registration_token": null}',
        b'{"registration_token": ["a"]}',
        b'{"registration_token": ""}',
        b'{"registration_token": " a"}',
        b'{"registration_token": "' + b"a" * 10240 + b'"}',
        b'"registration_token"',
        b"[]",
        b"{}",
    ],
)
def test_resolve_refuses_odd_tokens_naming_the_field(served: Served, body: bytes) -> None:  # noqa: F811
    r = requests.post(
        f"{served.url}/v1/customers/resolve",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"].get("field") == "registration_token", r.text


def test_the_probe_listener_serves_no_customer_data(served: Served, emulator: Emulator) -> None:  # noqa: F811
    buyer = buyer_of(served, emulator)
    for path in ("/v1/customers", "/v1/customers/111122223333", "/v1/usage", "/readyz"):
        r = requests.get(served.probe_url + path, timeout=5)
        assert r.status_code in (200, 404), (path, r.text)
        assert buyer["license_arn"] not in r.text and "license" not in r.text, r.text


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"customer_aws_account_id": "\uff11" * 12}, "customer_aws_account_id"),
        ({"customer_aws_account_id": "111122223333 "}, "customer_aws_account_id"),
        ({"license_arn": "arn:aws:license-manager::1:license:l 1"}, "license_arn"),
        ({"customer_identifier": "cust-1"}, "customer_identifier"),
    ],
)
def test_saas_records_with_bad_identities_store_nothing(
    served: Served,  # noqa: F811
    record: dict[str, str],
    field: str,
) -> None:
    base = {
        "customer_aws_account_id": "111122223333",
        "license_arn": "arn:aws:license-manager::111122223333:license:l-1",
        "dimension": "users",
        "quantity": 1,
    }
    r = requests.post(f"{served.url}/v1/usage", json=[{**base, **record}], timeout=5)
    assert r.status_code == 400, r.text
    assert field in r.text, r.text
    assert requests.get(f"{served.url}/v1/usage", timeout=5).json()["records"] == []


def test_no_secret_in_usage_report_or_metrics(served: Served, emulator: Emulator) -> None:  # noqa: F811
    buyer = emulator.saas_customer({"customer_aws_account_id": "111122223333"})
    token = buyer["registration_token"]
    r = requests.post(
        f"{served.url}/v1/customers/resolve", json={"registration_token": token}, timeout=20
    )
    assert r.status_code == 200, r.text
    texts = [
        r.text,
        requests.get(f"{served.url}/v1/usage", timeout=5).text,
        requests.get(f"{served.url}/v1/customers", timeout=5).text,
        served.metrics.render().decode(),
    ]
    for text in texts:
        assert token not in text and token[:24] not in text


def test_debug_logs_and_every_endpoint_keep_the_database_password_and_token_out(
    emulator_server: EmulatorServer, emulator: Emulator, pg_url: str
) -> None:
    """A real sidecar at DEBUG on PostgreSQL, with a password holding an encoded @ and :."""
    encoded = "p%40ss%3Aw0rd-7c1"  # decodes to p@ss:w0rd-7c1
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{encoded}@")
    assert encoded in url
    car = start_sidecar(
        loopback_env(
            emulator_server.url,
            MARKETPLACE_MODE="saas",
            MARKETPLACE_DIMENSIONS="users",
            MARKETPLACE_PRODUCT_CODE="",
            MARKETPLACE_USAGE_DATABASE_URL=url,
            MARKETPLACE_LOG_LEVEL="DEBUG",
            MARKETPLACE_THROTTLE_SCHEDULE_SECONDS="",
        )
    )
    try:
        buyer = emulator.saas_customer({"customer_aws_account_id": "777788889999"})
        token = buyer["registration_token"]
        r = requests.post(
            f"{car.api}/v1/customers/resolve", json={"registration_token": token}, timeout=30
        )
        assert r.status_code == 200, r.text
        record = {
            "customer_aws_account_id": "777788889999",
            "license_arn": r.json()["license_arn"],
            "dimension": "users",
            "quantity": 3,
        }
        assert requests.post(f"{car.api}/v1/usage", json=[record], timeout=10).status_code == 202
        seen = [r.text] + [
            car.get(path, probe=probe).text
            for path, probe in (
                ("/v1/usage", False),
                ("/v1/customers", False),
                ("/readyz", False),
                ("/readyz", True),
                ("/metrics", True),
            )
        ]
    finally:
        car.stop()
    seen.append(car.logs())
    for text in seen:
        for secret in (encoded, "p@ss:w0rd-7c1", "w0rd-7c1", token):
            assert secret not in text, (secret, text[:2000])


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/json"}, b'{"x-amzn-marketplace-token": "t"}', 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"a=" + b"b" * 17000, 413),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"&".join([b"a=1"] * 11), 400),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"x-amzn-marketplace-token=%ff",
            400,
        ),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"x-amzn-marketplace-token=a&x-amzn-marketplace-token=b",
            400,
        ),
    ],
)
def test_the_registration_page_refuses_odd_forms_without_calling_the_sidecar(
    example_server: tuple[Any, Any], headers: dict[str, str], body: bytes, status: int
) -> None:
    _, server = example_server
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    r = requests.post(url, data=body, headers=headers, timeout=5, allow_redirects=False)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("text/html")
    assert "Location" not in r.headers
