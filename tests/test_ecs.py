"""ECS artefacts: the task definition against botocore's RegisterTaskDefinition model (plus the
enums and required fields the model does not enforce), the CloudFormation template through
cfn-lint, and the two kept consistent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.model import Shape
from botocore.validate import ParamValidator

from tests.helpers import ROOT

ECS = ROOT / "manifests" / "ecs"
TASK: dict[str, Any] = json.loads((ECS / "task-definition.json").read_text())
CFN: dict[str, Any] = json.loads((ECS / "cloudformation.json").read_text())
SIDECAR = "marketplace-sidecar"
FARGATE_MEMORY = {
    "256": (512, 2048),
    "512": (1024, 4096),
    "1024": (2048, 8192),
    "2048": (4096, 16384),
    "4096": (8192, 30720),
}


def input_shape() -> Shape:
    client = boto3.client(
        "ecs", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    shape = client.meta.service_model.operation_model("RegisterTaskDefinition").input_shape
    assert isinstance(shape, Shape)
    return shape


def enum_errors(value: Any, shape: Shape, path: str = "$") -> Iterator[str]:
    if shape.type_name == "structure" and isinstance(value, dict):
        for k, v in value.items():
            if k in shape.members:  # type: ignore[attr-defined]
                yield from enum_errors(v, shape.members[k], f"{path}.{k}")  # type: ignore[attr-defined]
    elif shape.type_name == "list" and isinstance(value, list):
        for i, v in enumerate(value):
            yield from enum_errors(v, shape.member, f"{path}[{i}]")  # type: ignore[attr-defined]
    elif shape.type_name == "map" and isinstance(value, dict):
        for k, v in value.items():
            yield from enum_errors(v, shape.value, f"{path}.{k}")  # type: ignore[attr-defined]
    elif getattr(shape, "enum", None) and value not in shape.enum:  # type: ignore[attr-defined]
        yield f"{path}: {value!r} not in {shape.enum}"  # type: ignore[attr-defined]


def problems(task: dict[str, Any]) -> list[str]:
    shape = input_shape()
    report = ParamValidator().validate(task, shape)
    found = [report.generate_report()] if report.has_errors() else []
    found += list(enum_errors(task, shape))
    containers = {c.get("name"): c for c in task.get("containerDefinitions", [])}
    for i, c in enumerate(task.get("containerDefinitions", [])):
        for field in ("name", "image"):
            if not c.get(field):
                found.append(f"$.containerDefinitions[{i}].{field} is required")
        for dep in c.get("dependsOn", []):
            target = containers.get(dep["containerName"])
            if target is None:
                found.append(f"{c.get('name')} depends on unknown {dep['containerName']}")
            elif dep["condition"] == "HEALTHY" and "healthCheck" not in target:
                found.append(f"{dep['containerName']} has no healthCheck for HEALTHY")
    if "FARGATE" in task.get("requiresCompatibilities", []):
        low, high = FARGATE_MEMORY.get(task.get("cpu", ""), (0, -1))
        if not low <= int(task.get("memory", 0)) <= high:
            found.append(
                f"Fargate cpu {task.get('cpu')} does not allow memory {task.get('memory')}"
            )
    return found


def test_task_definition_is_valid_register_task_definition_input() -> None:
    assert problems(TASK) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda t: t["containerDefinitions"][1]["dependsOn"][0].update(condition="READY"),
            "not in",
        ),
        (lambda t: t.update(cpu=512), "Invalid type"),
        (lambda t: t["containerDefinitions"][0].update(essentiall=True), "Unknown parameter"),
        (lambda t: t["containerDefinitions"][0].pop("healthCheck"), "no healthCheck"),
        (lambda t: t["containerDefinitions"][0].pop("image"), "image is required"),
        (lambda t: t.update(memory="8192"), "does not allow memory"),
    ],
)
def test_the_checker_catches_real_mistakes(mutate: Any, expected: str) -> None:
    task = json.loads(json.dumps(TASK))
    mutate(task)
    assert any(expected in p for p in problems(task)), problems(task)


def test_sidecar_wiring() -> None:
    sidecar, product = TASK["containerDefinitions"]
    assert sidecar["name"] == SIDECAR and sidecar["essential"] is True
    # Liveness (/healthz): the product waits for the entitlement itself (docs/ecs.md).
    assert sidecar["healthCheck"]["command"] == [
        "CMD",
        "marketplace-sidecar",
        "probe",
        "--path",
        "/healthz",
    ]
    assert sidecar["readonlyRootFilesystem"] is True and sidecar["user"].startswith("10001")
    assert product["dependsOn"] == [{"containerName": SIDECAR, "condition": "HEALTHY"}]
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    assert env["MARKETPLACE_LISTEN"].startswith("127.0.0.1:")
    assert env["MARKETPLACE_PROBE_LISTEN"].startswith("127.0.0.1:")  # no kubelet on ECS
    assert "taskRoleArn" in TASK and "role" in TASK["taskRoleArn"]
    assert all(c["logConfiguration"]["logDriver"] == "awslogs" for c in (sidecar, product))


def test_cloudformation_template_passes_cfn_lint() -> None:
    from cfnlint.api import lint_all

    matches = lint_all((ECS / "cloudformation.json").read_text())
    # Errors and warnings fail; informational advice (I-rules) does not, as with the CLI.
    assert [str(m) for m in matches if m.rule.id[0] in "EW"] == []
    broken = json.loads((ECS / "cloudformation.json").read_text())
    broken["Resources"]["TaskDefinition"]["Properties"]["Cpu"] = "333"
    assert any(m.rule.id[0] == "E" for m in lint_all(json.dumps(broken)))


def test_cloudformation_and_task_definition_agree() -> None:
    td = CFN["Resources"]["TaskDefinition"]["Properties"]
    assert [c["Name"] for c in td["ContainerDefinitions"]] == [
        c["name"] for c in TASK["containerDefinitions"]
    ]
    sidecar, product = td["ContainerDefinitions"]
    assert (
        sidecar["HealthCheck"]["Command"]
        == TASK["containerDefinitions"][0]["healthCheck"]["command"]
    )
    assert product["DependsOn"] == [{"ContainerName": SIDECAR, "Condition": "HEALTHY"}]
    assert (td["Cpu"], td["Memory"], td["NetworkMode"]) == (
        TASK["cpu"],
        TASK["memory"],
        TASK["networkMode"],
    )
    assert td["TaskRoleArn"] == {"Fn::GetAtt": ["TaskRole", "Arn"]}


def test_iam_policies_grant_only_metering() -> None:
    role = CFN["Resources"]["TaskRole"]["Properties"]
    statement = role["Policies"][0]["PolicyDocument"]["Statement"][0]
    on, off = statement["Action"]["Fn::If"][1:]
    assert off == ["aws-marketplace:RegisterUsage"]
    assert on == ["aws-marketplace:RegisterUsage", "aws-marketplace:MeterUsage"]
    assert statement["Resource"] == "*"
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "ecs-tasks.amazonaws.com"
    }
    iam = ROOT / "manifests" / "iam"
    plain = json.loads((iam / "policy.json").read_text())["Statement"][0]
    assert plain["Action"] == ["aws-marketplace:RegisterUsage"]
    trust = json.loads((iam / "irsa-trust-policy.json").read_text())["Statement"][0]
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"


def test_task_role_trust_policies_carry_confused_deputy_conditions() -> None:
    """Only ECS tasks of the role's own account (and region, for the template) may assume it."""
    plain = json.loads((ROOT / "manifests" / "iam" / "ecs-task-trust-policy.json").read_text())
    (statement,) = plain["Statement"]
    assert statement["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"
    account = statement["Condition"]["StringEquals"]["aws:SourceAccount"]
    assert account == "111122223333"
    arn = statement["Condition"]["ArnLike"]["aws:SourceArn"]
    assert arn.startswith("arn:aws:ecs:") and arn.split(":")[4] == account and arn.endswith(":*")
    (cfn,) = CFN["Resources"]["TaskRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert cfn["Condition"] == {
        "ArnLike": {
            "aws:SourceArn": {
                "Fn::Sub": "arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:*"
            }
        },
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
    }


def test_log_groups_exist_before_tasks_start() -> None:
    """awslogs-create-group needs logs:CreateLogGroup, which AWS's standard execution-role
    policy lacks: the task definition does not use it (docs/ecs.md creates the group), and the
    template creates its LogGroup itself."""
    for c in TASK["containerDefinitions"]:
        assert "awslogs-create-group" not in c["logConfiguration"]["options"]
    for c in CFN["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]:
        options = c["LogConfiguration"]["Options"]
        assert options["awslogs-group"] == {"Ref": "LogGroup"}
        assert "awslogs-create-group" not in options


def test_the_template_takes_the_sidecar_image_by_digest_only() -> None:
    import re

    pattern = re.compile(CFN["Parameters"]["SidecarImage"]["AllowedPattern"])
    repo = "709825985650.dkr.ecr.us-east-1.amazonaws.com/seller/marketplace-sidecar"
    assert pattern.match(f"{repo}@sha256:" + "c" * 64)
    assert not pattern.match(f"{repo}:0.1.0")
    assert not pattern.match(f"{repo}@sha256:" + "c" * 63)
    assert TASK["containerDefinitions"][0]["image"].startswith(f"{repo}@sha256:")


# -- SaaS products: the seller's backend with its sidecar, the store in PostgreSQL ---------------

SAAS_TASK: dict[str, Any] = json.loads((ECS / "task-definition-saas.json").read_text())
SAAS_ENV = {
    "MARKETPLACE_PRODUCT_CODE": "REPLACE_WITH_PRODUCT_CODE",
    "MARKETPLACE_MODE": "saas",
    "MARKETPLACE_DIMENSIONS": "REPLACE_WITH_DIMENSION_A,REPLACE_WITH_DIMENSION_B",
    "MARKETPLACE_SAAS_IDENTITY": "license",
    "MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS": "false",
    "MARKETPLACE_ZERO_USAGE_RECORDS": "true",
    "MARKETPLACE_DRAIN_SECONDS": "20",
    "MARKETPLACE_LISTEN": "127.0.0.1:8787",
    "MARKETPLACE_PROBE_LISTEN": "127.0.0.1:8788",
}


def test_saas_task_definition_is_valid_register_task_definition_input() -> None:
    assert problems(SAAS_TASK) == []


def test_saas_task_definition_checker_catches_a_secret_in_the_wrong_shape() -> None:
    task = json.loads(json.dumps(SAAS_TASK))
    task["containerDefinitions"][0]["secrets"][0]["valueFrom"] = 42
    assert any("Invalid type" in p for p in problems(task)), problems(task)
    task = json.loads(json.dumps(SAAS_TASK))
    task["containerDefinitions"][0]["secrets"][0].pop("valueFrom")
    assert any("valueFrom" in p for p in problems(task)), problems(task)


def test_saas_sidecar_wiring_keeps_the_database_url_in_secrets_manager() -> None:
    sidecar, backend = SAAS_TASK["containerDefinitions"]
    assert sidecar["name"] == SIDECAR and sidecar["essential"] is True
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    # exactly: no key, no URL; the product code pins ResolveCustomer to this product
    assert env == SAAS_ENV
    (secret,) = sidecar["secrets"]
    assert secret["name"] == "MARKETPLACE_USAGE_DATABASE_URL"
    assert secret["valueFrom"].startswith("arn:aws:secretsmanager:")
    assert "postgres" not in json.dumps(SAAS_TASK)  # no URL anywhere in the file
    # The backend reaches the sidecar on loopback and never gets the database URL.
    assert backend["dependsOn"] == [{"containerName": SIDECAR, "condition": "HEALTHY"}]
    assert "secrets" not in backend
    backend_env = {e["name"]: e["value"] for e in backend["environment"]}
    assert backend_env["MARKETPLACE_SIDECAR_URL"] == "http://127.0.0.1:8787"
    # ECS sends SIGKILL after stopTimeout: it must cover the drain budget.
    assert sidecar["stopTimeout"] > float(env["MARKETPLACE_DRAIN_SECONDS"])
    assert sidecar["readonlyRootFilesystem"] is True and sidecar["user"].startswith("10001")
    # /healthz: the database is shared by every task; an outage must not keep the backend
    # (dependsOn HEALTHY) from starting, its POSTs get 503 and retry.
    assert sidecar["healthCheck"]["command"] == [
        "CMD",
        "marketplace-sidecar",
        "probe",
        "--path",
        "/healthz",
    ]
    for c in (sidecar, backend):
        assert "awslogs-create-group" not in c["logConfiguration"]["options"]
    # The execution role (not the task role) reads the secret: exactly that secret.
    iam = ROOT / "manifests" / "iam"
    read = json.loads((iam / "policy-saas-execution-secret.json").read_text())
    assert read["Statement"] == [
        {
            "Sid": "ReadTheMeteringDatabaseUrl",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": secret["valueFrom"],
        }
    ]
    assert SAAS_TASK["executionRoleArn"] != SAAS_TASK["taskRoleArn"]


def test_saas_iam_policy_grants_resolve_customer_and_batch_meter_usage_only() -> None:
    iam = ROOT / "manifests" / "iam"
    policy = json.loads((iam / "policy-saas.json").read_text())
    assert policy["Version"] == "2012-10-17"
    assert policy["Statement"] == [
        {
            "Sid": "SaasMetering",
            "Effect": "Allow",
            "Action": ["aws-marketplace:ResolveCustomer", "aws-marketplace:BatchMeterUsage"],
            "Resource": "*",
        }
    ]
    # Both actions exist in the Metering Service's model (a typo would grant nothing).
    client = boto3.client(
        "meteringmarketplace",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    operations = set(client.meta.service_model.operation_names)
    actions = {a.split(":", 1)[1] for a in policy["Statement"][0]["Action"]}
    assert actions <= operations
    assert client.meta.service_model.signing_name == "aws-marketplace"


# -- Every example, every mode: the fleet's registration time, Fargate's volume, the README -------

CUSTOM_TASK: dict[str, Any] = json.loads((ECS / "task-definition-custom.json").read_text())
# ECS API reference, ContainerDefinition.startTimeout: "The valid values for Fargate are 2-120
# seconds": the longest a container with dependsOn HEALTHY waits for the sidecar on Fargate.
FARGATE_START_TIMEOUT_MAX = 120
# HealthCheck limits (botocore's ECS model documentation).
HEALTH_LIMITS = {
    "interval": (5, 300),
    "timeout": (2, 60),
    "retries": (1, 10),
    "startPeriod": (0, 300),
}
# The fleet table's largest row: 1,000 tasks of an account registering at once, time goal
# 1.25 x N / 5 s + 5 s (RegisterUsage's 5 calls/s per account and region) = 255 s.
FLEET_REGISTRATION_SECONDS = 1.25 * 1000 / 5 + 5


def _lower(value: Any) -> Any:
    """A CloudFormation container (PascalCase keys) as RegisterTaskDefinition input."""
    if isinstance(value, dict):
        return {k[0].lower() + k[1:]: _lower(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower(v) for v in value]
    return value


def _cfn_sidecar() -> dict[str, Any]:
    sidecar = CFN["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    out: dict[str, Any] = _lower({k: v for k, v in sidecar.items() if k != "StopTimeout"})
    return out


CONTRACT_TASK: dict[str, Any] = json.loads((ECS / "task-definition-contract.json").read_text())

EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task-definition.json": (TASK, TASK["containerDefinitions"][0]),
    "task-definition-custom.json": (CUSTOM_TASK, CUSTOM_TASK["containerDefinitions"][0]),
    "task-definition-saas.json": (SAAS_TASK, SAAS_TASK["containerDefinitions"][0]),
    "task-definition-contract.json": (CONTRACT_TASK, CONTRACT_TASK["containerDefinitions"][0]),
    "cloudformation.json": ({"requiresCompatibilities": ["FARGATE"]}, _cfn_sidecar()),
}


def health_limit_problems(task: dict[str, Any]) -> Iterator[str]:
    fargate = "FARGATE" in task.get("requiresCompatibilities", [])
    for c in task.get("containerDefinitions", []):
        for field, (low, high) in HEALTH_LIMITS.items():
            value = c.get("healthCheck", {}).get(field)
            if value is not None and not low <= value <= high:
                yield f"{c['name']}: healthCheck.{field} {value} outside {low}-{high}"
        if fargate and c.get("startTimeout", 0) > FARGATE_START_TIMEOUT_MAX:
            yield f"{c['name']}: startTimeout {c['startTimeout']} > 120 on Fargate"


@pytest.fixture(scope="module")
def registering_sidecar() -> Iterator[Any]:
    """A sidecar whose first RegisterUsage never gets an answer: it stays `registering`, as every
    task of a large fleet does while the account's 5 calls/s let the others through."""
    import socket

    from tests.helpers import loopback_env, start_sidecar

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (the kernel does), never answers
    car = start_sidecar(
        loopback_env(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            MARKETPLACE_PUBLIC_KEY=_demo_key(),
        )
    )
    try:
        assert car.entitlement()["state"] == "registering"
        yield car
    finally:
        car.stop()
        silent.close()


def _demo_key() -> str:
    from tests.helpers import new_key, pem

    return pem(new_key())


def health_command_exit(command: list[str], probe_url: str) -> int:
    """The task definition's health command, run as ECS runs it ("CMD": no shell)."""
    import os
    import subprocess
    import sys

    assert command[0] == "CMD" and command[1] == "marketplace-sidecar", command
    env = {**os.environ, "MARKETPLACE_PROBE_LISTEN": probe_url.removeprefix("http://")}
    run = [sys.executable, "-m", "sidecar", *command[2:]]
    return subprocess.run(run, env=env, capture_output=True, timeout=30, check=False).returncode


def survives_registration_of(
    sidecar: dict[str, Any], passes_while_registering: bool, fargate: bool
) -> float:
    """How long the sidecar may stay `registering` before ECS gives up on the task: the product
    (dependsOn HEALTHY) stops waiting after startTimeout (at most 120 s on Fargate), and the
    health check turns UNHEALTHY after startPeriod + retries x interval (a service then
    replaces the task). A check that passes while registering bounds neither."""
    if passes_while_registering:
        return float("inf")
    hc = sidecar["healthCheck"]
    unhealthy_after = hc.get("startPeriod", 0) + hc.get("retries", 3) * hc.get("interval", 30)
    start_timeout = sidecar.get("startTimeout", FARGATE_START_TIMEOUT_MAX if fargate else 1e9)
    return float(min(unhealthy_after, start_timeout))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_no_example_stops_a_task_that_is_still_registering(
    name: str, registering_sidecar: Any
) -> None:
    """Issue: startPeriod 30 + 3 x 10 s marked the sidecar UNHEALTHY after ~60 s (and the
    product gives up after startTimeout, at most 120 s on Fargate) while a 1,000-task fleet
    takes up to 255 s to register. The health check is a liveness check (/healthz); the product
    waits for the entitlement itself (GET /v1/entitlement, docs/ecs.md)."""
    task, sidecar = EXAMPLES[name]
    assert list(health_limit_problems({**task, "containerDefinitions": [sidecar]})) == []
    code = health_command_exit(sidecar["healthCheck"]["command"], registering_sidecar.probe)
    fargate = "FARGATE" in task.get("requiresCompatibilities", [])
    survived = survives_registration_of(sidecar, code == 0, fargate)
    assert survived >= FLEET_REGISTRATION_SECONDS, (name, code, survived)
    # The check still catches a dead sidecar: the command's own timeout is below ECS's.
    assert sidecar["healthCheck"]["timeout"] > 2  # `probe --timeout` defaults to 2 s


def test_the_health_command_fails_when_nothing_answers() -> None:
    """The liveness check is not vacuous: with no sidecar on the probe port it exits non-zero."""
    from tests.helpers import free_port

    for _, sidecar in EXAMPLES.values():
        command = sidecar["healthCheck"]["command"]
        assert health_command_exit(command, f"http://127.0.0.1:{free_port()}") != 0


def test_the_health_limits_checker_catches_fargate_limits() -> None:
    task = json.loads(json.dumps(TASK))
    task["containerDefinitions"][0]["startTimeout"] = 300
    task["containerDefinitions"][0]["healthCheck"]["retries"] = 11
    found = list(health_limit_problems(task))
    assert any("startTimeout 300" in p for p in found) and any("retries 11" in p for p in found)
    # and a readiness check (/readyz) would not survive the fleet's registration
    readiness = {**task["containerDefinitions"][0], "startTimeout": 120}
    readiness["healthCheck"] = {"interval": 10, "retries": 10, "startPeriod": 300}
    assert survives_registration_of(readiness, False, True) == 120 < FLEET_REGISTRATION_SECONDS


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_pins_the_sidecar_by_digest_and_creates_no_log_group(name: str) -> None:
    task, sidecar = EXAMPLES[name]
    if name == "cloudformation.json":
        assert CFN["Parameters"]["SidecarImage"]["AllowedPattern"].endswith("@sha256:[a-f0-9]{64}$")
        containers = CFN["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
        options = [c["LogConfiguration"]["Options"] for c in containers]
    else:
        assert "@sha256:" in sidecar["image"], sidecar["image"]
        options = [c["logConfiguration"]["options"] for c in task["containerDefinitions"]]
    assert all("awslogs-create-group" not in o for o in options), options


def test_custom_state_volume_is_the_images_volume() -> None:
    """Fargate makes an empty bind volume root-owned 0755 unless the image declares the same path
    as a VOLUME (AWS, "Use bind mounts with Amazon ECS"): the mount, MARKETPLACE_STATE_DIR and
    the Dockerfile's VOLUME, owned by the task's user, must be one path."""
    import re

    dockerfile = (ROOT / "Dockerfile").read_text()
    (volume,) = re.findall(r'^VOLUME \["([^"]+)"\]$', dockerfile, re.M)
    assert re.search(rf"chown 10001:10001 {re.escape(volume)}\b", dockerfile)
    sidecar = CUSTOM_TASK["containerDefinitions"][0]
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    assert sidecar["user"] == "10001:10001"
    assert [m["containerPath"] for m in sidecar["mountPoints"]] == [env["MARKETPLACE_STATE_DIR"]]
    assert env["MARKETPLACE_STATE_DIR"] == volume
    cfn = _cfn_sidecar()
    assert f'"value": "{volume}"' in json.dumps(cfn["environment"])
    assert volume in json.dumps(cfn["mountPoints"])


@pytest.mark.parametrize(
    "name",
    [
        "task-definition.json",
        "task-definition-custom.json",
        "task-definition-saas.json",
        "task-definition-contract.json",
    ],
)
def test_run_starts_from_each_task_definition_without_a_warning(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment of each file, as `run` would read it: valid, and nothing logged as ignored
    or risky (the SaaS file without MARKETPLACE_PRODUCT_CODE warned that any product's token
    would resolve)."""
    import os

    from sidecar.config import config_warnings
    from sidecar.config_validate import validate

    sidecar = EXAMPLES[name][1]
    for key in [k for k in os.environ if k.startswith("MARKETPLACE_")]:
        monkeypatch.delenv(key)
    for e in sidecar["environment"]:
        monkeypatch.setenv(e["name"], e["value"].replace("\\n", "\n"))
    for s in sidecar.get("secrets", []):
        monkeypatch.setenv(s["name"], "postgresql://metering@db.internal:5432/metering")
    if "MARKETPLACE_PUBLIC_KEY" in os.environ:
        monkeypatch.setenv("MARKETPLACE_PUBLIC_KEY", _demo_key())
    if "MARKETPLACE_DIMENSIONS" in os.environ:
        monkeypatch.setenv("MARKETPLACE_DIMENSIONS", "dimension_a,dimension_b")
    settings = validate()
    assert settings.ignored() == [] and config_warnings(settings) == []


def test_docs_deploy_every_mode_with_its_own_files() -> None:
    """Issue: the CLI deploy lines were hourly-only. docs/ecs.md registers each task definition
    with the task-role policy of its mode, and every file it names exists."""
    import re

    text = (ROOT / "docs" / "ecs.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    for path in re.findall(r"file://([\w./-]+)", text):
        assert (ROOT / path).is_file(), path
    policy_of = {
        "task-definition.json": "policy.json",
        "task-definition-custom.json": "policy-custom-metering.json",
        "task-definition-saas.json": "policy-saas.json",
        "task-definition-contract.json": "policy-contract.json",
    }
    for task, policy in policy_of.items():
        (block,) = [b for b in blocks if f"file://manifests/ecs/{task}" in b]
        assert f"file://manifests/iam/{policy}" in block, (task, block)
        group = json.loads((ECS / task).read_text())["containerDefinitions"][0]
        log_group = group["logConfiguration"]["options"]["awslogs-group"]
        assert f"create-log-group --log-group-name {log_group}\n" in block
        role = json.loads((ECS / task).read_text())["taskRoleArn"].rsplit("/", 1)[1]
        assert f"--role-name {role} " in block
    custom = json.loads((ROOT / "manifests" / "iam" / "policy-custom-metering.json").read_text())
    assert "aws-marketplace:MeterUsage" in json.dumps(custom)


# -- Contract pricing: AWS License Manager, the task role as identity ----------------------------

CONTRACT_ENV = {
    "MARKETPLACE_MODE": "contract",
    "MARKETPLACE_LICENSE_PRODUCT_SKU": "REPLACE_WITH_PRODUCT_ID",
    "MARKETPLACE_LICENSE_ENTITLEMENTS": json.dumps(
        [{"name": "REPLACE_WITH_ENTITLEMENT_NAME", "unit": "None"}]
    ),
    "MARKETPLACE_LICENSE_CHECKOUT_TYPE": "PROVISIONAL",
    "MARKETPLACE_DRAIN_SECONDS": "20",
    "MARKETPLACE_LISTEN": "127.0.0.1:8787",
    "MARKETPLACE_PROBE_LISTEN": "127.0.0.1:8788",
    "MARKETPLACE_STATE_DIR": "/var/lib/marketplace-sidecar",
}


def test_contract_task_definition_is_valid_register_task_definition_input() -> None:
    assert problems(CONTRACT_TASK) == []


def test_contract_sidecar_wiring_has_no_metering_settings_and_keeps_its_checkout() -> None:
    sidecar, product = CONTRACT_TASK["containerDefinitions"]
    assert sidecar["name"] == SIDECAR and sidecar["essential"] is True
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    assert env == CONTRACT_ENV  # no product code, key or dimensions: refused there
    # The checkout and the product's leases live on the task volume, the image's VOLUME path,
    # so a sidecar restarted in place (its restart policy) extends the same seat.
    assert CONTRACT_TASK["volumes"] == [{"name": "marketplace-sidecar-state"}]
    assert sidecar["mountPoints"] == [
        {"sourceVolume": "marketplace-sidecar-state", "containerPath": env["MARKETPLACE_STATE_DIR"]}
    ]
    assert (
        env["MARKETPLACE_STATE_DIR"]
        == CUSTOM_TASK["containerDefinitions"][0]["mountPoints"][0]["containerPath"]
    )
    assert "secrets" not in sidecar  # the task role is the identity, no license token
    assert sidecar["readonlyRootFilesystem"] is True and sidecar["user"] == "10001:10001"
    # ECS sends SIGKILL after stopTimeout: CheckInLicense's bound must fit before it.
    assert sidecar["stopTimeout"] > float(env["MARKETPLACE_DRAIN_SECONDS"])
    assert product["dependsOn"] == [{"containerName": SIDECAR, "condition": "HEALTHY"}]
    assert CONTRACT_TASK["taskRoleArn"].endswith("/my-contract-product-task-role")


def _license_operations_called() -> set[str]:
    """The License Manager operations sidecar/aws/license.py calls (`_call("method", ...)`)."""
    import re

    import botocore.session

    source = (ROOT / "sidecar" / "aws" / "license.py").read_text()
    methods = set(re.findall(r'_call\(\s*"([a-z_]+)"', source))
    client = botocore.session.get_session().create_client(
        "license-manager", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    mapping: dict[str, str] = client.meta.method_to_api_mapping
    assert methods and methods <= set(mapping), methods
    return {mapping[m] for m in methods}


def test_contract_iam_policy_grants_exactly_what_the_sidecar_calls() -> None:
    """Least privilege tied to the code: a call added without its permission (or a permission
    left after its call is gone) fails here. GetAccessToken and AssumeRoleWithWebIdentity (the
    anywhere identity) are unsigned: no permission of the role is involved."""
    policy = json.loads((ROOT / "manifests" / "iam" / "policy-contract.json").read_text())
    assert policy["Version"] == "2012-10-17"
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow" and statement["Resource"] == "*"
    granted = {a.removeprefix("license-manager:") for a in statement["Action"]}
    assert all(a.startswith("license-manager:") for a in statement["Action"])
    assert granted == _license_operations_called()
    assert granted == {"CheckoutLicense", "ExtendLicenseConsumption", "CheckInLicense"}


def test_license_token_trust_policy_admits_only_tokens_issued_in_the_buyers_account() -> None:
    """The seller guide's role for off-AWS installs: License Manager's OIDC issuer, web identity
    only, and only tokens whose amr names the buyer's account as issuer."""
    trust = json.loads((ROOT / "manifests" / "iam" / "license-token-trust-policy.json").read_text())
    (statement,) = trust["Statement"]
    assert statement["Principal"] == {"Federated": "openid-license-manager.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    condition = statement["Condition"]["ForAnyValue:StringLike"]
    assert condition == {
        "openid-license-manager.amazonaws.com:amr": (
            "aws:license-manager:token-issuer-account-id:111122223333"
        )
    }
    assert "*" not in json.dumps(condition)


# -- SaaS lifecycle events: the us-east-1 stack (rule, queue, dead-letter queue, policies) -------

EVENTS_STACK = ROOT / "manifests" / "saas-events" / "cloudformation.json"


def _events_stack() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(EVENTS_STACK.read_text())
    return loaded


def test_saas_events_stack_passes_cfn_lint() -> None:
    from cfnlint.api import lint_all

    matches = lint_all(EVENTS_STACK.read_text())
    assert [str(m) for m in matches if m.rule.id[0] in "EW"] == []
    broken = _events_stack()
    broken["Resources"]["Queue"]["Properties"]["VisibilityTimeout"] = 99999
    assert any(m.rule.id[0] == "E" for m in lint_all(json.dumps(broken)))


def test_saas_events_rule_takes_marketplace_saas_events_from_the_default_bus_in_us_east_1() -> None:
    stack = _events_stack()
    (assertion,) = stack["Rules"]["OnlyUsEast1"]["Assertions"]
    assert assertion["Assert"] == {"Fn::Equals": [{"Ref": "AWS::Region"}, "us-east-1"]}
    rule = stack["Resources"]["Rule"]["Properties"]
    assert rule["EventBusName"] == "default" and rule["State"] == "ENABLED"
    assert rule["EventPattern"]["source"] == ["aws.agreement-marketplace"]
    types = set(rule["EventPattern"]["detail-type"])
    for kind in ("Created", "Amended", "Ended"):
        assert {
            f"Purchase Agreement {kind} - Manufacturer",
            f"Purchase Agreement {kind} - Proposer",
        } <= types
    assert {"License Updated - Manufacturer", "License Deprovisioned - Manufacturer"} <= types
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["Queue", "Arn"]}
    # Undeliverable events land in the dead-letter queue, not nowhere.
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    queue = stack["Resources"]["Queue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["DeadLetterQueue", "Arn"]
    }
    assert queue["MessageRetentionPeriod"] == 1209600  # 14 days: the longest outage it bridges
    outputs = stack["Outputs"]
    assert outputs["QueueUrl"]["Value"] == {"Ref": "Queue"}


def test_saas_events_queue_policy_admits_only_the_rule_and_the_products_topics() -> None:
    statements = _events_stack()["Resources"]["QueuePolicy"]["Properties"]["PolicyDocument"][
        "Statement"
    ]
    rule = statements[0]
    assert rule["Principal"] == {"Service": "events.amazonaws.com"}
    assert rule["Action"] == "sqs:SendMessage"
    assert rule["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["Rule", "Arn"]}}}
    topics = [s["Fn::If"] for s in statements if "Fn::If" in s]
    assert [t[0] for t in topics] == ["HasSubscriptionTopic", "HasEntitlementTopic"]
    for (_, allow, absent), param in zip(
        topics, ("SubscriptionTopicArn", "EntitlementTopicArn"), strict=True
    ):
        assert allow["Principal"] == {"Service": "sns.amazonaws.com"}
        assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Ref": param}}}
        assert absent == {"Ref": "AWS::NoValue"}
    deny = statements[-1]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {
        "Bool": {"aws:SecureTransport": "false"}
    }
    params = _events_stack()["Parameters"]
    import re

    pattern = re.compile(params["SubscriptionTopicArn"]["AllowedPattern"])
    assert pattern.fullmatch("")
    assert pattern.fullmatch(
        "arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-abc123"
    )
    assert not pattern.fullmatch("arn:aws:sns:us-east-1:287250355862:someone-elses-topic")


def test_saas_events_consumer_policy_and_iam_file_grant_what_the_sidecar_calls() -> None:
    """ReceiveMessage, DeleteMessage, ChangeMessageVisibility (and GetQueueAttributes, for
    doctor) on the queue alone; GetEntitlements. Each action exists in its service's model."""
    stack_policy = _events_stack()["Resources"]["ConsumerPolicy"]["Properties"]["PolicyDocument"]
    file_policy = json.loads((ROOT / "manifests" / "iam" / "policy-saas-events.json").read_text())
    for policy in (stack_policy, file_policy):
        queue, entitlements = policy["Statement"]
        assert queue["Action"] == [
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
        ]
        assert queue["Resource"] != "*"
        assert entitlements["Action"] == ["aws-marketplace:GetEntitlements"]
    import botocore.session

    session = botocore.session.get_session()
    sqs = session.get_service_model("sqs").operation_names
    assert {
        "ReceiveMessage",
        "DeleteMessage",
        "ChangeMessageVisibility",
        "GetQueueAttributes",
    } <= set(sqs)
    assert "GetEntitlements" in session.get_service_model("marketplace-entitlement").operation_names
    assert '"MARKETPLACE_SAAS_EVENTS_QUEUE_URL"' in (ROOT / "docs" / "ecs.md").read_text()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_restarts_a_crashed_sidecar_in_place(name: str) -> None:
    """Without a restart policy an essential sidecar that crashes stops the whole task, and a
    replaced task starts with an empty volume: custom mode's acknowledged, unsent usage and
    contract mode's checkout go with it. ECS restarts a container in place, keeping the task's
    volumes, if it ran `restartAttemptPeriod` seconds (60: the minimum) and its exit code is
    not ignored (0: the sidecar's clean stop; a config error exits at once, so it is never
    restarted into a loop)."""
    task, sidecar = EXAMPLES[name]
    assert sidecar["restartPolicy"] == {
        "enabled": True,
        "ignoredExitCodes": [0],
        "restartAttemptPeriod": 60,
    }
    if name == "task-definition-saas.json":
        return  # its store is PostgreSQL, shared by the tasks; nothing lives in the task
    # Hourly mode too: a restarted container's RegisterUsage is not the task's first call, so
    # AWS would answer a refused task with a token; the kept verdict on the volume stops that.
    (mount,) = sidecar["mountPoints"]
    assert json.dumps({"name": "MARKETPLACE_STATE_DIR", "value": mount["containerPath"]}) in (
        json.dumps(sidecar["environment"])
    )
    if name != "cloudformation.json":
        assert task["volumes"] == [{"name": mount["sourceVolume"]}]
    else:
        props = CFN["Resources"]["TaskDefinition"]["Properties"]
        assert props["Volumes"] == [{"Name": mount["sourceVolume"]}]


def test_the_checker_refuses_a_malformed_restart_policy() -> None:
    broken = json.loads(json.dumps(CUSTOM_TASK))
    broken["containerDefinitions"][0]["restartPolicy"]["enabled"] = "yes"
    assert problems(broken)
