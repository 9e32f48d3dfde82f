"""The Helm chart in contract mode (AWS License Manager): rendered by the real helm binary,
validated against real Kubernetes schemas, and its env accepted by the sidecar's own config.

In AWS the pod checks out with its IRSA role, as the other modes meter; off AWS (anywhere) the
buyer's license token comes from a Secret, mounted as a file into the sidecar container only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm import (
    CHART,
    KUBE_VERSIONS,
    env_of,
    helm,
    helm_binary,
    load_all,
    parent_chart,
    pod_spec,
    render_parent,
    sidecar,
    sidecar_accepts,
    token_holders,
    validate,
)

__all__ = ["helm_binary"]  # the session fixture that fetches helm, used here too

SKU = "prod-sku-7a1b"
ROLE = "arn:aws:iam::111122223333:role/AWSLicenseManagerConsumptionRole"
CONTRACT = [
    "metering.mode=contract",
    f"metering.contract.productSku={SKU}",
    "metering.contract.entitlements[0].name=PremiumTier",
    "metering.contract.entitlements[0].unit=None",
    "metering.contract.entitlements[1].name=Users",
    "metering.contract.entitlements[1].unit=Count",
    "metering.contract.entitlements[1].value=10",
]
EXISTING = ["metering.contract.anywhere.existingSecret=aws-marketplace-license-config"]
LICENSE_DIR = "/var/run/secrets/marketplace-license"
ENTITLEMENTS = [
    {"name": "PremiumTier", "unit": "None"},
    {"name": "Users", "unit": "Count", "value": 10},
]


def render_contract(*sets: str, kube: str = "1.33.0", check: bool = True) -> list[dict[str, Any]]:
    args = ["template", "shop", str(CHART), "--namespace", "shop", "--kube-version", kube]
    for s in (*CONTRACT, *sets):
        args += ["--set", s]
    return load_all(helm(*args, check=check).stdout)


def refused(*sets: str) -> str:
    args = ["template", "x", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0, out.stdout[:300]
    return out.stderr


def license_mounts(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Container name -> where it sees the license Secret's volume."""
    volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
    found: dict[str, list[str]] = {}
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        paths = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in volumes]
        if paths:
            found[c["name"]] = paths
    return found


@pytest.mark.parametrize("kube", ["1.28.0", *KUBE_VERSIONS])
def test_contract_mode_in_aws_renders_valid_manifests_with_irsa_and_no_key(kube: str) -> None:
    docs = render_contract(
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=" + ROLE, kube=kube
    )
    validate(docs, kube)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "ServiceAccount"]
    spec = pod_spec(docs)
    c = sidecar(spec)
    env = env_of(c)
    assert env["MARKETPLACE_MODE"] == "contract"
    assert env["MARKETPLACE_LICENSE_PRODUCT_SKU"] == SKU
    assert json.loads(env["MARKETPLACE_LICENSE_ENTITLEMENTS"]) == ENTITLEMENTS
    assert env["MARKETPLACE_LICENSE_CHECKOUT_TYPE"] == "PROVISIONAL"
    # Nothing of the metering modes (the sidecar refuses them in contract mode), no anywhere.
    for name in (
        "MARKETPLACE_PRODUCT_CODE",
        "MARKETPLACE_PUBLIC_KEY_FILE",
        "MARKETPLACE_REGISTER_INTERVAL_SECONDS",
        "MARKETPLACE_DIMENSIONS",
        "MARKETPLACE_LICENSE_TOKEN_FILE",
        "MARKETPLACE_LICENSE_ROLE_ARN",
        "AWS_REGION",
    ):
        assert name not in env, name
    # The checkout and the product's leases survive a sidecar restart: a pod-lifetime volume.
    assert env["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    assert spec["volumes"] == [
        {"name": "marketplace-sidecar-state", "emptyDir": {"sizeLimit": "4Mi"}}
    ]
    assert c["volumeMounts"] == [
        {"name": "marketplace-sidecar-state", "mountPath": "/var/lib/marketplace-sidecar"}
    ]
    assert all(
        "marketplace-sidecar-state" not in str(other.get("volumeMounts"))
        for other in spec["containers"]
        if other["name"] != "marketplace-sidecar"
    )
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready only with a license
    assert token_holders(docs) == {}


@pytest.mark.parametrize("kube", ["1.28.0", *KUBE_VERSIONS])
def test_anywhere_token_from_the_buyers_secret_reaches_the_sidecar_container_only(
    kube: str,
) -> None:
    """AWS's documented Secret (keys license_token and iam_role): the token is a file in the
    sidecar container, the role ARN comes from the same Secret, and no Secret is created."""
    docs = render_contract(*EXISTING, kube=kube)
    validate(docs, kube)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "ServiceAccount"]
    spec = pod_spec(docs)
    env = env_of(sidecar(spec))
    assert env["MARKETPLACE_LICENSE_TOKEN_FILE"] == f"{LICENSE_DIR}/license_token"
    assert env["MARKETPLACE_LICENSE_ROLE_ARN"] == {
        "secretKeyRef": {"name": "aws-marketplace-license-config", "key": "iam_role"}
    }
    assert env["AWS_REGION"] == "us-east-1"
    assert license_mounts(spec) == {"marketplace-sidecar": [LICENSE_DIR]}
    [volume] = [v for v in spec["volumes"] if v["name"] == "marketplace-sidecar-license"]
    assert volume["secret"] == {
        "secretName": "aws-marketplace-license-config",
        "defaultMode": 0o444,
        "items": [{"key": "license_token", "path": "license_token"}],
    }
    assert token_holders(docs) == {}  # the license token is not a Kubernetes API token


def test_anywhere_keys_role_and_region_are_the_sellers_to_set() -> None:
    spec = pod_spec(
        render_contract(
            *EXISTING,
            "metering.contract.anywhere.tokenKey=token",
            f"metering.contract.anywhere.roleArn={ROLE}",
            "metering.contract.anywhere.region=eu-west-1",
        )
    )
    env = env_of(sidecar(spec))
    assert env["MARKETPLACE_LICENSE_ROLE_ARN"] == ROLE
    assert env["AWS_REGION"] == "eu-west-1"
    [volume] = [v for v in spec["volumes"] if v["name"] == "marketplace-sidecar-license"]
    assert volume["secret"]["items"] == [{"key": "token", "path": "license_token"}]


def test_anywhere_token_given_as_a_value_becomes_a_secret_of_the_release() -> None:
    token = "eyJhbGciOiJSUzUxMiJ9.eyJsaWNlbnNlIjoiYSJ9.c2ln"
    docs = render_contract(
        f"metering.contract.anywhere.token={token}", f"metering.contract.anywhere.roleArn={ROLE}"
    )
    validate(docs, "1.33.0")
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "shop-marketplace-sidecar-license"
    assert secret["stringData"] == {"license_token": token, "iam_role": ROLE}
    spec = pod_spec(docs)
    assert env_of(sidecar(spec))["MARKETPLACE_LICENSE_ROLE_ARN"] == ROLE
    assert license_mounts(spec) == {"marketplace-sidecar": [LICENSE_DIR]}
    # The token is in the Secret only: not in any env, annotation or the Deployment.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert token not in json.dumps(deployment)


def test_as_a_dependency_the_license_token_stays_in_the_sidecar(tmp_path: Path) -> None:
    chart = parent_chart(tmp_path, None)
    sets = [f"marketplace-sidecar.{s}" for s in (*CONTRACT, *EXISTING)]
    sets += ["marketplace-sidecar.product.code=", "marketplace-sidecar.product.publicKey="]
    for kube in ("1.28.0", "1.33.0"):
        docs = render_parent(chart, *sets, kube=kube)
        validate(docs, kube)
        spec = pod_spec(docs)
        assert license_mounts(spec) == {"marketplace-sidecar": [LICENSE_DIR]}
        assert [c["name"] for c in spec["containers"]][-1] == "product"


@pytest.mark.parametrize("anywhere", [False, True])
def test_contract_env_passes_the_sidecars_own_validation(tmp_path: Path, anywhere: bool) -> None:
    """What the chart renders is what `marketplace-sidecar run` accepts in contract mode."""
    sets = [
        "metering.contract.checkoutType=PERPETUAL",
        "metering.contract.checkSeconds=3600",
        "metering.contract.onLoss=serve",
        "metering.contract.keyFingerprint=aws:111122223333:Seller:issuer-fingerprint",
        "metering.contract.leaseTimeoutSeconds=120",
    ]
    if anywhere:
        sets += [*EXISTING, f"metering.contract.anywhere.roleArn={ROLE}"]
    env = env_of(sidecar(pod_spec(render_contract(*sets))))
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    assert plain["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    if anywhere:
        token = tmp_path / "license_token"
        token.write_text("eyJhbGciOiJSUzUxMiJ9.e30.c2ln\n")
        plain["MARKETPLACE_LICENSE_TOKEN_FILE"] = str(token)  # the Secret's file in the pod
    fields = (
        "s.mode, s.license_product_sku, s.license_checkout_type, int(s.license_check_seconds), "
        "s.license_on_loss, s.license_key_fingerprint, s.license_role_arn, "
        "len(s.license_entitlements) > 0, int(s.license_lease_timeout_seconds), "
        "str(s.state_dir)"
    )
    assert sidecar_accepts(plain, fields) == [
        "contract",
        SKU,
        "PERPETUAL",
        "3600",
        "serve",
        "aws:111122223333:Seller:issuer-fingerprint",
        ROLE if anywhere else "None",
        "True",
        "120",
        str(tmp_path),
    ]


def test_contract_with_consumption_env_passes_the_sidecars_own_validation() -> None:
    """metering.dimensions in contract mode: the product code, the dimensions and a state
    volume whose sizeLimit is the MARKETPLACE_STATE_VOLUME_BYTES the sidecar guards."""
    docs = render_contract(
        "metering.dimensions[0]=scans", "metering.dimensions[1]=users", "product.code=prod-abc"
    )
    validate(docs, "1.33.0")
    spec = pod_spec(docs)
    env = env_of(sidecar(spec))
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    assert "MARKETPLACE_PRODUCT_CODE" in env and "MARKETPLACE_STATE_DIR" in env
    volumes = {v["name"]: v for v in spec["volumes"]}
    limit = volumes["marketplace-sidecar-state"]["emptyDir"]["sizeLimit"]
    assert env["MARKETPLACE_STATE_VOLUME_BYTES"] == limit == "128Mi"
    plain["MARKETPLACE_STATE_DIR"] = "/"  # an existing directory on this machine
    fields = "s.mode, s.product_code, s.dimensions, s.state_volume_bytes"
    assert sidecar_accepts(plain, fields) == ["contract", "prod-abc", "scans,users", "134217728"]
    # Its MeterUsage sends are paced in slots as custom mode's: a StatefulSet's ordinal too.
    label = "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["MARKETPLACE_POD_INDEX"] == {"fieldRef": {"fieldPath": label}}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # Required in contract mode.
        (["metering.mode=contract"], "/metering/contract/productSku"),
        (["metering.mode=contract", f"metering.contract.productSku={SKU}"], "entitlements"),
        # Contract settings in another mode.
        (
            ["product.code=p", f"metering.contract.productSku={SKU}"],
            "/metering/contract/productSku",
        ),
        (
            ["product.code=p", "metering.contract.anywhere.existingSecret=lic"],
            "/metering/contract/anywhere/existingSecret",
        ),
        (["product.code=p", "metering.contract.onLoss=serve"], "/metering/contract/onLoss"),
        (["product.code=p", "metering.contract.checkSeconds=600"], "checkSeconds"),
        (["product.code=p", "metering.contract.leaseTimeoutSeconds=60"], "leaseTimeoutSeconds"),
        # Other modes' settings in contract mode.
        ([*CONTRACT, "product.code=p"], "/product/code"),
        # Contract with consumption takes dimensions and a product code, never a public key.
        ([*CONTRACT, "metering.dimensions[0]=users", "product.publicKey=k"], "/product/publicKey"),
        ([*CONTRACT, "readinessGate.enabled=true"], "/readinessGate/enabled"),
        ([*CONTRACT, "events.enabled=true"], "/events/enabled"),
        # Bad values, named.
        ([*CONTRACT, "metering.contract.entitlements[0].unit=Seats"], "/unit"),
        ([*CONTRACT, "metering.contract.entitlements[0].value=5"], "entitlements/0"),
        ([*CONTRACT, "metering.contract.entitlements[1].value=0"], "/value"),
        ([*CONTRACT, "metering.contract.checkoutType=FLOATING"], "checkoutType"),
        ([*CONTRACT, "metering.contract.checkSeconds=30"], "checkSeconds"),
        ([*CONTRACT, "metering.contract.leaseTimeoutSeconds=4"], "leaseTimeoutSeconds"),
        ([*CONTRACT, "metering.contract.productSku=has space"], "productSku"),
        ([*CONTRACT, "metering.contract.anywhere.roleArn=role/x"], "/anywhere/roleArn"),
        ([*CONTRACT, "metering.contract.anywhere.region=mars"], "/anywhere/region"),
        ([*CONTRACT, "metering.contract.anywhere.existingSecret=Bad_Name"], "existingSecret"),
        ([*CONTRACT, "metering.contract.anywhere.token=a b"], "/anywhere/token"),
        # A token value needs a role to assume.
        ([*CONTRACT, "metering.contract.anywhere.token=eyJ.x.y"], "/anywhere/existingSecret"),
    ],
)
def test_contract_schema_refuses_naming_the_field(sets: list[str], message: str) -> None:
    stderr = refused(*sets)
    assert message in stderr, stderr


def test_a_token_value_and_an_existing_secret_together_are_refused() -> None:
    stderr = refused(
        *CONTRACT,
        *EXISTING,
        "metering.contract.anywhere.token=eyJ.x.y",
        f"metering.contract.anywhere.roleArn={ROLE}",
    )
    assert "set existingSecret or token, not both" in stderr, stderr


def test_every_contract_knob_is_documented_in_values_and_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metering"]["contract"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    contract = schema["properties"]["metering"]["properties"]["contract"]["properties"]

    def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    def schema_leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            nested = v.get("properties") if v.get("type") == "object" else None
            out |= schema_leaves(nested, f"{prefix}{k}.") if nested else {prefix + k}
        return out

    assert leaves(values) == schema_leaves(contract)
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("  contract:\n") :].splitlines()
    for leaf in leaves(values):
        name = leaf.rsplit(".", 1)[-1]
        line = next(i for i, x in enumerate(block) if x.strip().startswith(name + ":"))
        assert block[line - 1].strip().startswith("#"), f"{leaf} has no comment"


def notes(tmp_path: Path, *sets: str) -> str:
    """NOTES.txt rendered as a named template (`helm install --dry-run` needs a cluster)."""
    chart = tmp_path / "chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        text = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes.tpl").write_text(
            '{{- define "notes-under-test" -}}\n' + text + "{{- end -}}\n"
        )
        (chart / "templates" / "notes-rendered.yaml").write_text(
            'notes: {{ include "notes-under-test" . | toJson }}\n'
        )
    args = ["template", "shop", str(chart), "--show-only", "templates/notes-rendered.yaml"]
    for s in sets:
        args += ["--set", s]
    return str(yaml.safe_load(helm(*args).stdout)["notes"])


def test_notes_say_where_the_license_token_comes_from(tmp_path: Path) -> None:
    off_aws = notes(tmp_path, *CONTRACT, *EXISTING)
    assert "license token in Secret aws-marketplace-license-config" in off_aws
    assert "no eks.amazonaws.com/role-arn" not in off_aws  # off AWS, IRSA is not the way
    in_aws = notes(tmp_path, *CONTRACT)
    assert "no eks.amazonaws.com/role-arn and\nmetering.contract.anywhere is empty" in in_aws
    assert "AWS Marketplace\nmetering accepts only IRSA" not in in_aws  # License Manager's rules
    assert "credentials from the license token" not in in_aws


def test_the_docs_values_block_renders_as_a_dependency(tmp_path: Path) -> None:
    """docs/contract-anywhere.md's values, merged into the example product chart's own: valid
    manifests, the buyer's Secret mounted into the sidecar only, the SKU and entitlements sent."""
    import re

    text = (CHART.parent / "docs" / "contract-anywhere.md").read_text()
    (block,) = re.findall(r"```yaml\n(marketplace-sidecar:\n.*?)```", text, re.S)
    ours = yaml.safe_load(block)["marketplace-sidecar"]
    chart = parent_chart(tmp_path, None)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["marketplace-sidecar"].pop("product")  # contract mode refuses product.*
    values["marketplace-sidecar"]["metering"] = ours["metering"]
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    for kube in ("1.28.0", "1.33.0"):
        docs = render_parent(chart, kube=kube)
        validate(docs, kube)
        spec = pod_spec(docs)
        env = env_of(sidecar(spec))
        assert env["MARKETPLACE_LICENSE_PRODUCT_SKU"] == ours["metering"]["contract"]["productSku"]
        assert json.loads(env["MARKETPLACE_LICENSE_ENTITLEMENTS"]) == ENTITLEMENTS
        assert license_mounts(spec) == {"marketplace-sidecar": [LICENSE_DIR]}
