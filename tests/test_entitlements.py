"""GetEntitlements: sidecar.aws.entitlement against the emulator's Entitlement Service, over real
HTTP with unmodified botocore (AWS_ENDPOINT_URL_MARKETPLACE_ENTITLEMENT_SERVICE)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from sidecar.aws import entitlement
from sidecar.aws.entitlement import (
    ENDPOINT_ENV,
    PAGINATION_LOOP,
    Entitlement,
    EntitlementCallError,
    entitlement_client,
    get_entitlements,
)
from sidecar.emulator.service import Emulator, EmulatorServer

PRODUCT = "prod-contract-1"
BUYER = "111122223333"
OTHER = "444455556666"


@pytest.fixture
def ent(
    emulator_server: EmulatorServer, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> Any:
    monkeypatch.setenv(ENDPOINT_ENV, emulator_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return entitlement_client()


def put(server: EmulatorServer, account: str, items: list[dict[str, Any]], **more: Any) -> None:
    body = {"product_code": PRODUCT, "customer_aws_account_id": account, "entitlements": items}
    body.update(more)
    r = requests.post(server.url + "/_emulator/entitlements", json=body, timeout=5)
    assert r.status_code == 200, r.text


def configure(server: EmulatorServer, **spec: Any) -> None:
    r = requests.post(server.url + "/_emulator/entitlements/config", json=spec, timeout=5)
    assert r.status_code == 200, r.text


def calls(server: EmulatorServer) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = requests.get(
        server.url + "/_emulator/entitlements", timeout=5
    ).json()["calls"]
    return found


def test_the_client_is_in_us_east_1_and_follows_botocores_endpoint_variable(ent: Any) -> None:
    assert ent.meta.region_name == "us-east-1"
    assert ent.meta.endpoint_url == os.environ[ENDPOINT_ENV]


def test_every_value_type_comes_back_exact_with_its_expiry(
    emulator_server: EmulatorServer, ent: Any
) -> None:
    """Integer, double (as the exact decimal of the double AWS sent, never a float), boolean
    (false stays false, not "no value") and string; an expiry in Unix seconds."""
    put(
        emulator_server,
        BUYER,
        [
            {"dimension": "seats", "integer": 25, "expiration": 1_830_000_000},
            {"dimension": "storage_tb", "double": "0.1"},
            {"dimension": "tiny", "double": 1e-7},
            {"dimension": "whole", "double": 2},
            {"dimension": "sso", "boolean": False},
            {"dimension": "tier", "string": "gold"},
            {"dimension": "flag"},
        ],
    )
    got = {e.dimension: e for e in get_entitlements(ent, PRODUCT, BUYER)}
    assert got["seats"] == Entitlement("seats", 25, 1_830_000_000.0, BUYER, "integer")
    assert got["storage_tb"].value == "0.1"
    # The member AWS set: a DoubleValue's exact text and a StringValue look alike otherwise.
    kinds = {d: e.kind for d, e in got.items()}
    assert kinds == {
        "seats": "integer",
        "storage_tb": "double",
        "tiny": "double",
        "whole": "double",
        "sso": "boolean",
        "tier": "string",
        "flag": None,
    }
    assert got["tiny"].value == "0.0000001"
    assert got["whole"].value == "2"
    assert got["sso"].value is False
    assert got["tier"].value == "gold"
    assert got["flag"].value is None
    assert not any(isinstance(e.value, float) for e in got.values())


def test_all_pages_are_read_and_only_by_the_buyers_account(
    emulator_server: EmulatorServer, ent: Any
) -> None:
    """60 entitlements are 3 pages of 25: all of them come back, none of another buyer's, and
    every call filters by CUSTOMER_AWS_ACCOUNT_ID alone (the model forbids combining it with
    CUSTOMER_IDENTIFIER)."""
    put(emulator_server, BUYER, [{"dimension": f"d{i:02d}", "integer": i} for i in range(60)])
    put(emulator_server, OTHER, [{"dimension": "d00", "integer": 999}])
    got = get_entitlements(ent, PRODUCT, BUYER)
    assert sorted(e.value for e in got) == list(range(60))  # type: ignore[type-var]
    seen = calls(emulator_server)
    assert len(seen) == 3
    assert all(c["filter"] == {"CUSTOMER_AWS_ACCOUNT_ID": [BUYER]} for c in seen)
    assert [c["next_token"] is None for c in seen] == [True, False, False]


def test_a_next_token_loop_is_cut_and_reported_not_returned_as_a_short_list(
    emulator_server: EmulatorServer, ent: Any
) -> None:
    put(emulator_server, BUYER, [{"dimension": "seats", "integer": 5}])
    configure(emulator_server, loop_next_token=True)
    with pytest.raises(EntitlementCallError) as caught:
        get_entitlements(ent, PRODUCT, BUYER)
    assert caught.value.info.code == PAGINATION_LOOP
    assert caught.value.info.retryable
    assert len(calls(emulator_server)) == 2


def test_endless_fresh_tokens_stop_at_the_page_bound(
    emulator_server: EmulatorServer, ent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty pages with a new NextToken each time ("NextToken might still be present" with an
    empty set, the model says): followed, but never past MAX_PAGES."""
    monkeypatch.setattr(entitlement, "MAX_PAGES", 12)
    configure(emulator_server, endless_pages=True)
    with pytest.raises(EntitlementCallError) as caught:
        get_entitlements(ent, PRODUCT, BUYER)
    assert caught.value.info.code == PAGINATION_LOOP
    assert len(calls(emulator_server)) == 12


@pytest.mark.parametrize(
    ("error", "kind", "retryable", "hint_has"),
    [
        ("ThrottlingException", "transient", True, "retried"),
        ("InternalServiceErrorException", "transient", True, "retried"),
        ("AccessDeniedException", "configuration", False, "EMULATOR"),
        ("InvalidParameterException", "configuration", False, "MARKETPLACE_PRODUCT_CODE"),
    ],
)
def test_errors_are_classified(
    emulator_server: EmulatorServer,
    ent: Any,
    error: str,
    kind: str,
    retryable: bool,
    hint_has: str,
) -> None:
    configure(emulator_server, faults=[{"error": error, "first": 1}])
    with pytest.raises(EntitlementCallError) as caught:
        get_entitlements(ent, PRODUCT, BUYER)
    info = caught.value.info
    assert (info.code, info.kind, info.retryable) == (error, kind, retryable)
    if hint_has == "EMULATOR":  # against a local endpoint the hint says what to set locally
        assert info.hint
    else:
        assert hint_has in info.hint


def test_access_denied_names_the_iam_action() -> None:
    info = entitlement.classify_entitlement("AccessDeniedException", "denied")
    assert "aws-marketplace:GetEntitlements" in info.hint


def test_an_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    with pytest.raises(EntitlementCallError) as caught:
        get_entitlements(entitlement_client(timeout=2), PRODUCT, BUYER)
    assert caught.value.info.kind == "transient"


def test_a_bad_endpoint_value_is_refused_before_any_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "ftp://127.0.0.1:1")
    with pytest.raises(EntitlementCallError) as caught:
        entitlement_client()
    assert ENDPOINT_ENV in caught.value.info.message


# -- the emulator's side: what AWS's model says -----------------------------------------------


def test_both_customer_filters_together_are_refused_each_alone_works(
    emulator_server: EmulatorServer, ent: Any
) -> None:
    put(
        emulator_server,
        BUYER,
        [{"dimension": "seats", "integer": 3}, {"dimension": "gb", "integer": 9}],
        customer_identifier="cust-legacy-1",
        license_arn="arn:aws:license-manager::111122223333:license:l-abc",
    )
    with pytest.raises(ClientError) as caught:
        ent.get_entitlements(
            ProductCode=PRODUCT,
            Filter={"CUSTOMER_IDENTIFIER": ["cust-legacy-1"], "CUSTOMER_AWS_ACCOUNT_ID": [BUYER]},
        )
    assert caught.value.response["Error"]["Code"] == "InvalidParameterException"
    legacy = ent.get_entitlements(
        ProductCode=PRODUCT, Filter={"CUSTOMER_IDENTIFIER": ["cust-legacy-1", "nobody"]}
    )
    assert len(legacy["Entitlements"]) == 2
    narrowed = ent.get_entitlements(
        ProductCode=PRODUCT, Filter={"CUSTOMER_AWS_ACCOUNT_ID": [BUYER], "DIMENSION": ["gb"]}
    )
    assert [e["Dimension"] for e in narrowed["Entitlements"]] == ["gb"]
    assert narrowed["Entitlements"][0]["LicenseArn"].endswith("l-abc")
    by_license = ent.get_entitlements(
        ProductCode=PRODUCT,
        Filter={"LICENSE_ARN": ["arn:aws:license-manager::111122223333:license:l-other"]},
    )
    assert by_license["Entitlements"] == []


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"ProductCode": PRODUCT, "MaxResults": 26}, "less than or equal to 25"),
        ({"ProductCode": PRODUCT, "MaxResults": 0}, "greater than or equal to 1"),
        ({"ProductCode": "x" * 256}, "length less than or equal to 255"),
        ({"ProductCode": PRODUCT, "Filter": {"OFFER": ["a"]}}, "enum value set"),
        ({"ProductCode": PRODUCT, "NextToken": " "}, "regular expression pattern"),
    ],
)
def test_requests_are_validated_against_the_pinned_model(
    emulator_server: EmulatorServer, params: dict[str, Any], says: str
) -> None:
    """Raw awsJson1.1 (botocore would refuse some of these client-side): the emulator's own
    model-driven checks answer ValidationException naming the constraint."""
    r = requests.post(
        emulator_server.url,
        json=params,
        headers={
            "X-Amz-Target": "AWSMPEntitlementService.GetEntitlements",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": "AWS4-HMAC-SHA256 Credential=local/20261207/us-east-1/"
            "aws-marketplace/aws4_request, SignedHeaders=host, Signature=00",
            "X-Amz-Date": "20261207T000000Z",
        },
        timeout=5,
    )
    assert r.status_code == 400
    assert r.json()["__type"] == "ValidationException"
    assert says in r.json()["message"]


def test_unsigned_requests_are_refused(emulator_server: EmulatorServer) -> None:
    r = requests.post(
        emulator_server.url,
        json={"ProductCode": PRODUCT},
        headers={"X-Amz-Target": "AWSMPEntitlementService.GetEntitlements"},
        timeout=5,
    )
    assert r.status_code == 400
    assert r.json()["__type"] == "MissingAuthenticationTokenException"


def test_a_forged_next_token_is_invalid(emulator_server: EmulatorServer, ent: Any) -> None:
    with pytest.raises(ClientError) as caught:
        ent.get_entitlements(ProductCode=PRODUCT, NextToken="bm90LWEtdG9rZW4=")
    assert caught.value.response["Error"]["Code"] == "InvalidParameterException"


def test_the_cbor_protocol_answers_what_botocores_cbor_parser_reads(
    emulator_server: EmulatorServer,
) -> None:
    """The model lists smithy-rpc-v2-cbor first; SDKs that pick it are answered in CBOR."""
    import botocore.session
    from botocore.parsers import create_parser
    from botocore.serialize import create_serializer

    put(
        emulator_server,
        BUYER,
        [{"dimension": "seats", "integer": 7, "expiration": 1_830_000_000}],
    )
    model = botocore.session.get_session().get_service_model("marketplace-entitlement")
    op = model.operation_model("GetEntitlements")
    request = create_serializer("smithy-rpc-v2-cbor").serialize_to_request(
        {"ProductCode": PRODUCT, "Filter": {"CUSTOMER_AWS_ACCOUNT_ID": [BUYER]}}, op
    )
    r = requests.post(
        emulator_server.url + request["url_path"],
        data=request["body"],
        headers={
            **dict(request["headers"].items()),
            "Authorization": "AWS4-HMAC-SHA256 Credential=local/20261207/us-east-1/"
            "aws-marketplace/aws4_request, SignedHeaders=host, Signature=00",
            "X-Amz-Date": "20261207T000000Z",
        },
        timeout=5,
    )
    assert r.status_code == 200
    assert r.headers["smithy-protocol"] == "rpc-v2-cbor"
    assert op.output_shape is not None
    parsed = create_parser("smithy-rpc-v2-cbor").parse(
        {"status_code": 200, "headers": dict(r.headers), "body": r.content}, op.output_shape
    )
    (only,) = parsed["Entitlements"]
    assert only["Value"] == {"IntegerValue": 7}
    assert only["ExpirationDate"].timestamp() == 1_830_000_000


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({ENDPOINT_ENV: "ftp://127.0.0.1:1"}, f"{ENDPOINT_ENV}: must be an http(s) URL"),
        (
            {
                ENDPOINT_ENV: "http://entitlement.example:80",
                "MARKETPLACE_TEST_ONLY_TIME_SCALE": "60",
                "MARKETPLACE_TEST_ONLY_TIME_ORIGIN": "1800000000",
            },
            f"({ENDPOINT_ENV} must point at 127.0.0.1 or be unset)",
        ),
    ],
)
def test_run_refuses_a_bad_entitlement_endpoint_before_binding(
    emulator_server: EmulatorServer, extra: dict[str, str], says: str, tmp_path: Any
) -> None:
    """The same guard as the metering endpoint: an http(s) URL, and loopback under the
    test-only fast clock; exit 2 with one line naming the variable."""
    import subprocess
    import sys

    from tests.helpers import ROOT, loopback_env

    env = loopback_env(
        emulator_server.url,
        MARKETPLACE_MODE="saas",
        MARKETPLACE_DIMENSIONS="users",
        MARKETPLACE_STATE_DIR=str(tmp_path),
        **extra,
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert says in out.stderr
