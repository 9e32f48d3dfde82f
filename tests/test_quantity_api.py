"""Fractional quantities through a real custom-mode sidecar process: the HTTP API, the Python
client and the Node example, every answer checked against the shipped OpenAPI document."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from decimal import Decimal
from typing import Any

import pytest
import requests

from sidecar.client import UsageError, report_usage
from tests.helpers import ROOT
from tests.test_usage_api import check, custom, wait_ready

__all__ = ["custom"]  # the fixture, imported for the tests below

NODE = shutil.which("node")
NODE_EXAMPLE = ROOT / "examples" / "node" / "verify.js"


def test_fractions_are_accepted_exactly_and_shown_as_decimal_strings(custom: Any) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    url = car.api + "/v1/usage"
    for _ in range(10):  # ten tenths, as JSON numbers read from their text
        resp = requests.post(url, data=b'{"dimension": "scans", "quantity": 0.1}', timeout=10)
        assert resp.status_code == 202, resp.text
        check("/v1/usage", "POST", resp)
        assert resp.json()["records"][0]["quantity"] == "0.1"
    resp = requests.post(
        url, json={"dimension": "users", "quantity": "2.25", "id": "j"}, timeout=10
    )
    assert resp.status_code == 202 and resp.json()["records"][0]["quantity"] == "2.25"
    for same in (b'"2.250"', b"2.25", b'"2.25"'):
        again = requests.post(
            url, data=b'{"dimension": "users", "id": "j", "quantity": ' + same + b"}", timeout=10
        )
        assert again.status_code == 200 and again.json()["repeats"] == 1, same
    other = requests.post(
        url, json={"dimension": "users", "quantity": "2.26", "id": "j"}, timeout=10
    )
    assert other.status_code == 409
    report = car.get("/v1/usage")
    check("/v1/usage", "GET", report)
    assert report.json()["totals"]["scans"]["open"] == 1  # exactly one: whole, an integer
    assert report.json()["totals"]["users"]["open"] == "2.25"
    bad = requests.post(url, data=b'{"dimension": "scans", "quantity": 0.0000001}', timeout=10)
    assert bad.status_code == 400
    check("/v1/usage", "POST", bad)
    assert bad.json()["error"]["field"] == "quantity"
    assert "6 decimal places" in bad.json()["error"]["message"]


def test_the_python_client_sends_decimals_exactly_and_refuses_floats(custom: Any) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    answer = report_usage(
        [
            {"dimension": "scans", "quantity": Decimal("0.1"), "id": "d1"},
            {"dimension": "scans", "quantity": "0.2", "id": "d2"},
            {"dimension": "scans", "quantity": 3, "id": "d3"},
            {
                "dimension": "users",
                "quantity": Decimal("1.50"),
                "allocations": [
                    {"quantity": Decimal("0.5"), "tags": {"team": "a"}},
                    {"quantity": "1", "tags": {"team": "b"}},
                ],
            },
        ],
        url=car.api,
    )
    assert [r["quantity"] for r in answer["records"]] == ["0.1", "0.2", 3, "1.5"]
    assert (
        report_usage({"dimension": "scans", "quantity": Decimal("1E-1"), "id": "d1"}, url=car.api)[
            "repeats"
        ]
        == 1
    )
    totals = car.get("/v1/usage").json()["totals"]
    assert totals["scans"]["open"] == "3.3" and totals["users"]["open"] == "1.5"
    with pytest.raises(UsageError) as caught:
        report_usage({"dimension": "scans", "quantity": 0.1}, url=car.api)
    assert caught.value.reason == "invalid" and "float" in caught.value.message
    with pytest.raises(UsageError) as caught:
        report_usage(
            [{"dimension": "users", "quantity": 1, "allocations": [{"quantity": 1.0, "tags": {}}]}],
            url=car.api,
        )
    assert "records[0].allocations[0].quantity" in caught.value.message
    assert car.get("/v1/usage").json()["totals"]["scans"]["open"] == "3.3"  # nothing sent


def test_a_float_is_refused_before_anything_is_sent() -> None:
    """The listener never accepts: a connection the client made would wait in its backlog
    (the kernel completes the handshake), so a non-blocking accept afterwards finds it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with pytest.raises(UsageError) as caught:
            report_usage({"dimension": "a", "quantity": 2.5}, url=f"http://127.0.0.1:{port}")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert caught.value.reason == "invalid"


def test_an_astronomic_decimal_is_refused_before_it_is_written_out() -> None:
    """`Decimal("1E+999999999")` is finite: formatted, it would be a gigabyte of zeros in the
    caller's own process. The client refuses it by range first, and sends nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        for value in (Decimal("1E+999999999"), Decimal("1E+10"), Decimal("-0.5")):
            with pytest.raises(UsageError, match=r"from 0 to 9999999999\.999999"):
                report_usage({"dimension": "a", "quantity": value}, url=f"http://127.0.0.1:{port}")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def _node(script: str, url: str) -> dict[str, Any]:
    assert NODE is not None, "node is required (.ci/run installs it)"
    driver = (
        "const m = require(process.argv[1]);"
        f"({script})(m, process.argv[2]).then("
        "(doc) => console.log(JSON.stringify({ok: doc})),"
        "(err) => console.log(JSON.stringify({reason: err.reason, message: err.detail})));"
    )
    out = subprocess.run(
        [NODE, "-e", driver, str(NODE_EXAMPLE), url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_the_node_example_reports_decimal_strings_and_refuses_fractional_numbers(
    custom: Any,
) -> None:
    car = custom(MARKETPLACE_ENTITLEMENT_CHECK="none")
    wait_ready(car)
    sent = _node(
        "(m, url) => m.reportUsage([{dimension: 'scans', quantity: '0.1', id: 'n1'},"
        " {dimension: 'scans', quantity: 2, id: 'n2'}], {url})",
        car.api,
    )
    assert [r["quantity"] for r in sent["ok"]["records"]] == ["0.1", 2]
    refused = _node(
        "(m, url) => m.reportUsage({dimension: 'scans', quantity: 0.1}, {url})", car.api
    )
    assert refused["reason"] == "invalid" and "decimal strings" in refused["message"]
    bad = _node(
        "(m, url) => m.reportUsage({dimension: 'scans', quantity: '0.1\\n'}, {url})", car.api
    )
    assert bad["reason"] == "invalid"
    by_sidecar = _node(
        "(m, url) => m.reportUsage({dimension: 'nope', quantity: '1'}, {url})", car.api
    )
    assert by_sidecar["reason"] == "invalid" and "dimension" in by_sidecar["message"]
    cli = subprocess.run(
        [str(NODE), str(NODE_EXAMPLE), "usage", car.api],
        input='{"dimension": "scans", "quantity": "0.9", "id": "n3"}',
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["records"][0]["quantity"] == "0.9"
    assert car.get("/v1/usage").json()["totals"]["scans"]["open"] == 3  # 0.1 + 2 + 0.9
