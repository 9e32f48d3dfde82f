"""Values that only look valid: a trailing newline, CRLF or NUL on a validated field.

Python's `$` (and `re.match`) accept "x\\n"; AWS matches whole values and would refuse the
whole dimension-hour after the sidecar answered 202. PostgreSQL cannot store NUL in text: that
was a 500. Each must be a 400 naming the field, with nothing stored, on SQLite and PostgreSQL
alike; and the emulator must refuse such values as AWS does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from sidecar.aws.metering import MeteringGateway
from sidecar.aws.region import region_from_task
from sidecar.emulator.service import Emulator, EmulatorServer
from sidecar.usage.db import open_store
from sidecar.usage.saas import SAAS_SCHEMA, SaasPolicy, SaasService
from sidecar.usage.validate import Limits, RejectedError, parse
from tests.test_config import env, problems  # noqa: F401 - `env` is a fixture
from tests.test_saas_api import Served
from tests.usage_kit import aws_env

SUFFIXES = {"lf": "\n", "crlf": "\r\n", "nul": "\x00"}
ACCOUNT = "111122223333"
ARN = f"arn:aws:license-manager::{ACCOUNT}:license:l-0123456789abcdef"
NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None for SQLite in tmp_path; a fresh PostgreSQL database URL otherwise."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


def _served(url: str | None, tmp_path: Path, identity: str) -> Served:
    store = open_store(SAAS_SCHEMA, state_dir=tmp_path, database_url=url)
    saas = SaasService(
        SaasPolicy(
            dimensions=("users",),
            identity=identity,
            product_code="prod-abc",
            accept_unresolved=True,  # the field reaches the store without a resolved customer
        ),
        store,
        lambda: MeteringGateway("us-east-1", 5.0),
    )
    return Served(saas)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, emulator_server: EmulatorServer) -> None:
    aws_env(monkeypatch, emulator_server, "pod-full-match")


CASES = {  # field -> (identity, the record with the field's value as {v})
    "id": ("license", {"id": "rec-1{v}"}),
    "customer_aws_account_id": ("license", {"customer_aws_account_id": ACCOUNT + "{v}"}),
    "license_arn": ("license", {"license_arn": ARN + "{v}"}),
    "customer_identifier": ("customer_identifier", {"customer_identifier": "cust-1{v}"}),
}


def _record(identity: str, override: dict[str, str], suffix: str) -> dict[str, Any]:
    base: dict[str, Any] = {"dimension": "users", "quantity": 3}
    if identity == "license":
        base.update(customer_aws_account_id=ACCOUNT, license_arn=ARN)
    else:
        base["customer_identifier"] = "cust-1"
    base.update({k: v.format(v=suffix) for k, v in override.items()})
    return base


@pytest.mark.parametrize("suffix", list(SUFFIXES))
@pytest.mark.parametrize("field", list(CASES))
def test_a_saas_field_with_a_trailing_control_character_is_a_400_and_nothing_is_stored(
    field: str, suffix: str, backend: str | None, tmp_path: Path, aws: None
) -> None:
    identity, override = CASES[field]
    served = _served(backend, tmp_path, identity)
    try:
        bad = _record(identity, override, SUFFIXES[suffix])
        for body in (bad, [bad]):  # one record, and a list
            r = requests.post(f"{served.url}/v1/usage", json=body, timeout=10)
            assert r.status_code == 400, r.text
            named = r.json()["error"]["field"]
            assert named.rsplit(".", 1)[-1] == field, r.text
        records = served.saas.counters().records_by_state
        assert sum(records.values()) == 0, records
        # The same record without the suffix is accepted: the field was the only problem.
        good = requests.post(
            f"{served.url}/v1/usage", json=_record(identity, override, ""), timeout=10
        )
        assert good.status_code == 202, good.text
    finally:
        served.close()


@pytest.mark.parametrize("token", ["tok-1\x00", "tok\x00-1", "tok-1\r\n", "tok\n-1", "tok\x7f"])
def test_a_registration_token_with_a_control_character_never_reaches_aws(
    token: str, backend: str | None, tmp_path: Path, aws: None, emulator: Emulator
) -> None:
    served = _served(backend, tmp_path, "license")
    try:
        r = requests.post(
            f"{served.url}/v1/customers/resolve", json={"registration_token": token}, timeout=10
        )
        assert r.status_code == 400 and r.json()["error"]["field"] == "registration_token", r.text
        assert [c for c in emulator.calls if c.get("op") == "ResolveCustomer"] == []
    finally:
        served.close()


@pytest.mark.parametrize("suffix", list(SUFFIXES))
@pytest.mark.parametrize(
    ("field", "record"),
    [
        ("id", {"id": "rec-1{v}"}),
        ("tags.team{v}", {"allocations": [{"quantity": 3, "tags": {"team{v}": "a"}}]}),
        ("tags.team", {"allocations": [{"quantity": 3, "tags": {"team": "a{v}"}}]}),
    ],
)
def test_a_custom_field_with_a_trailing_control_character_is_a_400(
    field: str, record: dict[str, Any], suffix: str
) -> None:
    s = SUFFIXES[suffix]
    doc: dict[str, Any] = {"dimension": "users", "quantity": 3}
    for key, value in record.items():
        if isinstance(value, str):
            doc[key] = value.format(v=s)
        else:
            doc[key] = [
                {
                    "quantity": 3,
                    "tags": {k.format(v=s): v.format(v=s) for k, v in a["tags"].items()},
                }
                for a in value
            ]
    with pytest.raises(RejectedError) as exc:
        parse(json.dumps(doc).encode(), Limits(("users",)), NOW)
    assert exc.value.status == 400
    assert exc.value.problems[0].field.endswith(field.format(v=s))


def _client(server: EmulatorServer) -> Any:
    return boto3.client(
        "meteringmarketplace",
        region_name="us-east-1",
        endpoint_url=server.url,
        aws_access_key_id="pod-full-match",
        aws_secret_access_key="test-secret",  # nosec B106 # the emulator's dummy
    )


def _code(call: Any) -> str:
    try:
        call()
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return "ok"


@pytest.mark.parametrize("suffix", list(SUFFIXES))
def test_the_emulator_refuses_what_aws_refuses(
    suffix: str, emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    s = SUFFIXES[suffix]
    c = _client(emulator_server)
    stamp = datetime.now(UTC)

    def batch(account: str = ACCOUNT, arn: str = ARN) -> Any:
        record = {"Timestamp": stamp, "Dimension": "users", "Quantity": 1}
        record.update(CustomerAWSAccountId=account, LicenseArn=arn)
        return lambda: c.batch_meter_usage(UsageRecords=[record])

    def meter(code: str = "prod-abc", key: str = "team", value: str = "a") -> Any:
        alloc = {"AllocatedUsageQuantity": 1, "Tags": [{"Key": key, "Value": value}]}
        return lambda: c.meter_usage(
            ProductCode=code,
            Timestamp=stamp,
            UsageDimension="users",
            UsageQuantity=1,
            UsageAllocations=[alloc],
        )

    assert _code(batch()) == "ok"  # an unknown customer: answered, not refused
    assert _code(batch(account=ACCOUNT + s)) == "ValidationException"
    assert _code(batch(arn=ARN + s)) == "ValidationException"
    assert _code(meter()) == "ok"
    assert _code(meter(code="prod-abc" + s)) == "ValidationException"
    assert _code(meter(key="team" + s)) == "InvalidTagException"
    assert _code(meter(value="a" + s)) == "InvalidTagException"
    register = c.register_usage
    assert _code(lambda: register(ProductCode="prod-abc" + s, PublicKeyVersion=1)) == (
        "ValidationException"
    )


@pytest.mark.parametrize("suffix", list(SUFFIXES))
def test_configuration_values_are_whole_matches(
    suffix: str,
    env: pytest.MonkeyPatch,  # noqa: F811 - the fixture imported above
) -> None:
    s = SUFFIXES[suffix]
    if s != "\x00":  # an environment variable cannot hold NUL
        env.setenv("MARKETPLACE_PRODUCT_CODE", "prod-abc" + s)
        assert any("MARKETPLACE_PRODUCT_CODE" in p for p in problems(env))
    assert region_from_task({"TaskARN": f"arn:aws:ecs:us-east-1{s}:1:task/x"}) is None
    assert region_from_task({"TaskARN": "arn:aws:ecs:us-east-1:1:task/x"}) == "us-east-1"
