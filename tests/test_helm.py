"""The Helm chart, rendered by a real helm v3 binary and validated against real Kubernetes
schemas (kubernetes-validate, strict) for the versions we support."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar import __version__
from sidecar.entitlement.keys import UnusableKeyError, load_public_key
from tests.helpers import ROOT, new_key, pem
from tests.test_keys import JWT_IO_DEMO_KEY

HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "helm"
PEM = pem(new_key()).strip()  # a real key: the schema refuses what the sidecar would refuse
BASE = ["product.code=prod-abc"]
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
GATE = "aws-marketplace.amazonaws.com/entitled"
# kubernetes-validate reads and parses its JSON schema files (the definitions are megabytes)
# on every document it checks; they never change within a run, so each is parsed once.
kubernetes_validate.utils.schema_contents = functools.cache(
    kubernetes_validate.utils.schema_contents
)


def load_all(text: str) -> list[dict[str, Any]]:
    """The documents of a rendered manifest (libyaml's parser when built in: same documents,
    a tenth of the CPU of the pure-Python one on the chart's output)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d]


@pytest.fixture(scope="session", autouse=True)
def helm_binary() -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "get-helm.sh"), str(HELM.parent)], check=True, capture_output=True
    )


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = _template_of_our_chart(args) if args[:3:2] == ("template", str(CHART)) else _helm(args)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@functools.cache
def _template_of_our_chart(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """`helm template` of the repository's chart: no test writes to it (they copy it) and it
    draws nothing random or dated, so the same arguments render the same text; a worker runs
    each distinct render once. Callers only read the answer."""
    return _helm(args)


def _helm(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    home = ROOT / ".tools" / "helm-home"
    env = {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "PATH": "/usr/bin:/bin",
        # A render lives ~0.1 s: Go's collector only costs CPU there (a third of each call,
        # 234 calls a run); the heap stays under 100 MB.
        "GOGC": "off",
    }
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=60)


def render(
    *sets: str, kube: str = "1.33.0", chart: Path = CHART, release: str = "shop"
) -> list[dict[str, Any]]:
    args = [
        "template",
        release,
        str(chart),
        "--namespace",
        "shop",
        "--kube-version",
        kube,
        "--set-string",
        f"product.publicKey={PEM}",
    ]
    for s in (*BASE, *sets):
        args += ["--set", s]
    return load_all(helm(*args).stdout)


CRD_KINDS = {"PodMonitor"}  # Prometheus Operator CRD: no schema offline; asserted field by field


def validate(docs: list[dict[str, Any]], kube: str) -> None:
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, kube, strict=True)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def sidecar(spec: dict[str, Any]) -> dict[str, Any]:
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == "marketplace-sidecar":
            return dict(c)
    raise AssertionError("no sidecar container")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_lint_strict() -> None:
    out = helm(
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "product.code=p",
        "--set-string",
        f"product.publicKey={PEM}",
    )
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("gate", ["false", "true"])
@pytest.mark.parametrize(
    "source",
    [[], ["product.existingConfigMap=product-config"], ["product.existingSecret=product-secret"]],
)
def test_every_combination_validates(kube: str, gate: str, source: list[str]) -> None:
    docs = render(f"readinessGate.enabled={gate}", *source, kube=kube)
    validate(docs, kube)
    kinds = sorted(d["kind"] for d in docs)
    rbac = ["Role", "RoleBinding"] if gate == "true" else []
    config = [] if source else ["ConfigMap"]
    assert kinds == sorted(["Deployment", "ServiceAccount", *rbac, *config])


@pytest.mark.parametrize("kube", ["1.27.0", "1.28.0", *KUBE_VERSIONS])
def test_classic_mode_validates_on_older_clusters(kube: str) -> None:
    docs = render("mode=classic", kube=kube)
    validate(docs, kube)
    spec = pod_spec(docs)
    assert "initContainers" not in spec
    assert "startupProbe" not in sidecar(spec)


@pytest.mark.parametrize(
    ("kube", "native"), [("1.28.0", False), ("1.29.0", True), ("1.33.0", True)]
)
def test_auto_mode_follows_the_cluster_version(kube: str, native: bool) -> None:
    spec = pod_spec(render(kube=kube))
    assert ("initContainers" in spec) is native
    if native:
        c = spec["initContainers"][0]
        assert c["restartPolicy"] == "Always"
        assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "mp-probe"}


def test_probes_ports_and_security() -> None:
    spec = pod_spec(render())
    c = sidecar(spec)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "mp-probe"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "mp-probe"}
    assert c["ports"] == [{"name": "mp-probe", "containerPort": 8788, "protocol": "TCP"}]
    env = env_of(c)
    assert env["MARKETPLACE_LISTEN"] == "127.0.0.1:8787"
    assert env["MARKETPLACE_PROBE_LISTEN"] == "0.0.0.0:8788"
    assert env["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["limits"]["memory"] == "160Mi"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["marketplace-sidecar-state"]
    assert spec["automountServiceAccountToken"] is False


def test_key_sources_are_wired() -> None:
    c = sidecar(pod_spec(render("product.existingSecret=product-secret")))
    assert env_of(c)["MARKETPLACE_PRODUCT_CODE"] == {
        "secretKeyRef": {"name": "product-secret", "key": "productCode"}
    }
    spec = pod_spec(render("product.existingConfigMap=cm", "product.publicKeyKey=key.pem"))
    key = next(v for v in spec["volumes"] if v["name"] == "marketplace-sidecar-key")
    assert key["configMap"] == {
        "name": "cm",
        "items": [{"key": "key.pem", "path": "public-key.pem"}],
    }
    docs = render()
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["productCode"] == "prod-abc"
    assert cm["data"]["publicKey"].startswith("-----BEGIN PUBLIC KEY-----")


def test_readiness_gate_adds_condition_env_and_least_rbac() -> None:
    docs = render("readinessGate.enabled=true")
    spec = pod_spec(docs)
    assert spec["readinessGates"] == [{"conditionType": GATE}]
    assert sidecar(spec)["resources"]["requests"]["memory"] == "144Mi"  # measured: ~107 MiB
    assert spec["automountServiceAccountToken"] is False  # projected into the sidecar only
    env = env_of(sidecar(spec))
    assert env["MARKETPLACE_READINESS_GATE"] == GATE
    assert env["MARKETPLACE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["MARKETPLACE_SERVICEACCOUNT_DIR"] == SA_DIR
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    ]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    assert "readinessGates" not in pod_spec(render())


def test_events_add_their_rbac_env_and_token() -> None:
    docs = render("events.enabled=true")
    validate(docs, "1.33.0")
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    spec = pod_spec(docs)
    env = env_of(sidecar(spec))
    assert env["MARKETPLACE_KUBE_EVENTS"] == "true" and "MARKETPLACE_READINESS_GATE" not in env
    assert env["MARKETPLACE_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert spec["automountServiceAccountToken"] is False and "readinessGates" not in spec


def test_gate_and_events_together_grant_exactly_two_rules_and_no_read() -> None:
    docs = render("readinessGate.enabled=true", "events.enabled=true")
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBE_API_VOLUME = {
    "name": "marketplace-sidecar-kube-api",
    "projected": {
        "defaultMode": 0o444,
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                        },
                        {
                            "path": "pod-uid",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"},
                        },
                    ]
                }
            },
        ],
    },
}


def token_holders(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Container name -> how it could reach a Kubernetes API token."""
    spec = pod_spec(docs)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    token_volumes = {
        v["name"]
        for v in spec.get("volumes", [])
        if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))
    }
    holders: dict[str, list[str]] = {}
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        ways = []
        if spec.get("automountServiceAccountToken") is not False:
            ways.append("pod automount")
        if sa.get("automountServiceAccountToken") is not False:
            ways.append("service account automount")
        for m in c.get("volumeMounts", []):
            if m["name"] in token_volumes or m["mountPath"].startswith("/var/run/secrets/kube"):
                ways.append(f"mount {m['name']} at {m['mountPath']}")
        if ways:
            holders[c["name"]] = ways
    return holders


@pytest.mark.parametrize("kube", ["1.28.0", "1.33.0"])
@pytest.mark.parametrize(
    "sets",
    [
        ["readinessGate.enabled=true"],
        ["events.enabled=true"],
        ["readinessGate.enabled=true", "events.enabled=true"],
    ],
)
def test_only_the_sidecar_container_gets_the_api_token(kube: str, sets: list[str]) -> None:
    docs = render(*sets, kube=kube)
    validate(docs, kube)
    spec = pod_spec(docs)
    assert token_holders(docs) == {
        "marketplace-sidecar": [f"mount marketplace-sidecar-kube-api at {SA_DIR}"]
    }
    mount = next(
        m for m in sidecar(spec)["volumeMounts"] if m["name"] == "marketplace-sidecar-kube-api"
    )
    assert mount == {"name": "marketplace-sidecar-kube-api", "mountPath": SA_DIR, "readOnly": True}
    volume = next(v for v in spec["volumes"] if v["name"] == "marketplace-sidecar-kube-api")
    assert volume == KUBE_API_VOLUME


def test_without_gate_or_events_nobody_gets_a_token() -> None:
    docs = render()
    assert token_holders(docs) == {}
    assert not any(v["name"] == "marketplace-sidecar-kube-api" for v in pod_spec(docs)["volumes"])
    assert "MARKETPLACE_SERVICEACCOUNT_DIR" not in env_of(sidecar(pod_spec(docs)))


def test_metrics_annotations_and_pod_monitor() -> None:
    docs = render("metrics.podMonitor.enabled=true", "metrics.podMonitor.labels.release=prom")
    validate(docs, "1.33.0")
    annotations = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"][
        "metadata"
    ]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8788",
        "prometheus.io/path": "/metrics",
    }
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "mp-probe", "path": "/metrics", "interval": "30s"}
    ]
    pod_labels = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not any(d["kind"] == "PodMonitor" for d in render())
    plain = next(d for d in render("metrics.podAnnotations=false") if d["kind"] == "Deployment")
    assert "annotations" not in plain["spec"]["template"]["metadata"]


def test_irsa_annotation_image_digest_and_scheduling_knobs() -> None:
    docs = render(
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/m",
        "image.registry=709825985650.dkr.ecr.us-east-1.amazonaws.com/seller",
        "image.digest=sha256:" + "a" * 64,
        "sample.nodeSelector.kubernetes\\.io/os=linux",
        "sample.priorityClassName=high",
        "imagePullSecrets[0].name=regcred",
        "extraEnv[0].name=HTTPS_PROXY",
        "extraEnv[0].value=http://proxy:3128",
    )
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::1:role/m"
    spec = pod_spec(docs)
    c = sidecar(spec)
    assert c["image"] == (
        "709825985650.dkr.ecr.us-east-1.amazonaws.com/seller/marketplace-sidecar@sha256:" + "a" * 64
    )
    assert env_of(c)["HTTPS_PROXY"] == "http://proxy:3128"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["priorityClassName"] == "high"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["product.code=bad code!"], "/product/code"),
        (["mode=sidecar"], "value must be one of 'auto', 'native', 'classic'"),
        (["readinessGate.conditionType=entitled"], "/readinessGate/conditionType"),
        (["config.registerIntervalSeconds=5"], "/config/registerIntervalSeconds"),
        (["image.digest=latest"], "/image/digest"),
        (
            ["image.registry=709825985650.dkr.ecr.us-east-1.amazonaws.com/seller/"],
            "/image/registry",
        ),
        (["image.tag=1.0:bad"], "/image/tag"),
        (["sample.replica=2"], "additional properties 'replica' not allowed"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(sets: list[str], message: str) -> None:
    args = ["template", "x", str(CHART), "--set-string", f"product.publicKey={PEM}"]
    for s in (*BASE, *sets):
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_missing_product_code_and_key_say_what_to_set() -> None:
    out = helm("template", "x", str(CHART), check=False)
    assert "product.code is required" in out.stderr
    out = helm("template", "x", str(CHART), "--set", "product.code=p", check=False)
    assert "product.publicKey is required" in out.stderr


def _spki(key: Any) -> str:
    return str(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    )


def _key_cases() -> dict[str, str]:
    """Values a seller might paste as product.publicKey, by name."""
    good = pem(new_key()).strip()
    body = good.splitlines()[1:-1]
    other = pem(new_key())
    return {
        "rsa-2048": good,
        "rsa-3072": pem(new_key(3072)),
        "rsa-4096, one base64 line, CRLF": "-----BEGIN PUBLIC KEY-----\r\n"
        + "".join(pem(new_key(4096)).splitlines()[1:-1])
        + "\r\n-----END PUBLIC KEY-----\r\n",
        "indented (a YAML block)": "\n".join("  " + line for line in good.splitlines()) + "\n",
        "the docs' ...": "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----",
        "a REPLACE_WITH placeholder": "-----BEGIN PUBLIC KEY-----\nREPLACE_WITH_THE_KEY\n"
        "-----END PUBLIC KEY-----",
        "bare ...": "...",
        "truncated": "\n".join([good.splitlines()[0], *body[:3], good.splitlines()[-1]]),
        "rsa-1024": pem(new_key(1024)),
        "the jwt.io demo key (1024 bits)": JWT_IO_DEMO_KEY,
        "ec p-256": _spki(ec.generate_private_key(ec.SECP256R1()).public_key()),
        "a private key": new_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode(),
        "two keys": good + "\n" + other,
        "text before": "my key:\n" + good,
        "text after": good + "\nfrom AMMP",
        "base64 with a stray character": good.replace(body[2], body[2][:10] + "!" + body[2][11:]),
    }


KEY_CASES = _key_cases()


@pytest.mark.parametrize("name", sorted(KEY_CASES))
def test_the_schema_refuses_exactly_the_keys_the_sidecar_refuses_at_start(name: str) -> None:
    """Issue: a placeholder key passed the schema, and the pod then crash-looped on
    `MARKETPLACE_PUBLIC_KEY ... not a PEM public key`. The chart now refuses it at `helm
    template`/`install`, naming the value; every key the sidecar accepts still renders."""
    value = KEY_CASES[name]
    try:
        load_public_key(value)
        sidecar_accepts = True
    except UnusableKeyError:
        sidecar_accepts = False
    args = ["template", "x", str(CHART), "--set", "product.code=p"]
    out = helm(*args, "--set-string", f"product.publicKey={value}", check=False)
    if sidecar_accepts:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0 and "at '/product/publicKey'" in out.stderr, out.stderr
    assert sidecar_accepts is (name in KEYS_THE_SIDECAR_ACCEPTS)  # each case is what it says


KEYS_THE_SIDECAR_ACCEPTS = {
    "rsa-2048",
    "rsa-3072",
    "rsa-4096, one base64 line, CRLF",
    "indented (a YAML block)",
}


def test_notes_explain_checks_and_warn_without_irsa(tmp_path: Path) -> None:
    # `helm install --dry-run` needs a cluster to render NOTES.txt; render the same text as a
    # named template instead, through the same helm binary and values.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    text = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "notes-under-test" -}}\n' + text + "{{- end -}}\n"
    )
    (chart / "templates" / "notes-rendered.yaml").write_text(
        'notes: {{ include "notes-under-test" . | toJson }}\n'
    )

    def notes(*sets: str) -> str:
        args = [
            "template",
            "shop",
            str(chart),
            "--namespace",
            "shop",
            "--kube-version",
            "1.30.0",
            "--show-only",
            "templates/notes-rendered.yaml",
            "--set-string",
            f"product.publicKey={PEM}",
        ]
        for s in (*BASE, *sets):
            args += ["--set", s]
        return str(yaml.safe_load(helm(*args).stdout)["notes"])

    text = notes()
    assert "marketplace-sidecar probe" in text and "native sidecar" in text
    assert "only IRSA" in text
    with_irsa = notes(
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:x",
        "readinessGate.enabled=true",
    )
    assert "only IRSA" not in with_irsa and GATE in with_irsa
    assert "deploy/shop-marketplace-sidecar-sample" in text
    assert f"image marketplace-sidecar:{__version__}" in text
    no_sample = notes("sample.enabled=false")
    assert "deploy/" not in no_sample and "-sample" not in no_sample
    assert "exec POD -c marketplace-sidecar -- marketplace-sidecar doctor" in no_sample
    # No registry: the bare name would be pulled from Docker Hub, where anyone may own it.
    assert "image.registry is empty" in text and "docker.io/library/marketplace-sidecar" in text
    ours = notes("image.registry=709825985650.dkr.ecr.us-east-1.amazonaws.com/seller")
    assert "image.registry is empty" not in ours


def parent_chart(tmp_path: Path, app_version: str | None) -> Path:
    """tests/charts/example-product with the given appVersion (None: no appVersion line)."""
    chart = tmp_path / "example-product"
    shutil.copytree(ROOT / "tests" / "charts" / "example-product", chart)
    meta = chart / "Chart.yaml"
    lines = [
        line
        for line in meta.read_text().replace("file://../../../helm", f"file://{CHART}").splitlines()
        if not line.startswith("appVersion:")
    ]
    if app_version is not None:
        lines.append(f'appVersion: "{app_version}"')
    meta.write_text("\n".join(lines) + "\n")
    helm("dependency", "build", str(chart))
    return chart


def render_parent(chart: Path, *sets: str, kube: str = "1.30.0") -> list[dict[str, Any]]:
    args = ["template", "shop", str(chart), "--namespace", "shop", "--kube-version", kube]
    for s in sets:
        args += ["--set", s]
    return load_all(helm(*args).stdout)


def test_default_tag_is_the_sidecars_own_version() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["image"]["tag"] == __version__ == meta["appVersion"]
    assert sidecar(pod_spec(render()))["image"] == f"marketplace-sidecar:{__version__}"


@pytest.mark.parametrize("app_version", ["2.3.4", None])
def test_as_a_dependency_of_a_sellers_chart(tmp_path: Path, app_version: str | None) -> None:
    """The parent's appVersion (or its absence) must not leak into the sidecar image."""
    chart = parent_chart(tmp_path, app_version)
    for kube, native in (("1.28.0", False), ("1.30.0", True)):
        docs = render_parent(chart, kube=kube)
        validate(docs, kube)
        assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "ServiceAccount"]
        spec = pod_spec(docs)
        assert [c["name"] for c in spec["containers"]][-1] == "product"
        assert ("initContainers" in spec) is native
        c = sidecar(spec)
        assert c["image"] == f"marketplace-sidecar:{__version__}"
        assert env_of(c)["MARKETPLACE_PRODUCT_CODE"] == {
            "configMapKeyRef": {"name": "shop-marketplace-sidecar", "key": "productCode"}
        }
        sa = next(d for d in docs if d["kind"] == "ServiceAccount")
        assert spec["serviceAccountName"] == sa["metadata"]["name"]
        assert "role-arn" in str(sa["metadata"]["annotations"])
        assert sa["metadata"]["labels"]["app.kubernetes.io/version"] == __version__
        assert token_holders(docs) == {}
    registry = "709825985650.dkr.ecr.us-east-1.amazonaws.com/seller"
    pinned = render_parent(
        chart,
        f"marketplace-sidecar.image.registry={registry}",
        "marketplace-sidecar.image.digest=sha256:" + "b" * 64,
    )
    assert sidecar(pod_spec(pinned))["image"] == (
        f"{registry}/marketplace-sidecar@sha256:" + "b" * 64
    )
    tagged = render_parent(
        chart,
        f"marketplace-sidecar.image.registry={registry}",
        "marketplace-sidecar.image.tag=0.1.1",
    )
    assert sidecar(pod_spec(tagged))["image"] == f"{registry}/marketplace-sidecar:0.1.1"


def test_as_a_dependency_the_token_stays_in_the_sidecar(tmp_path: Path) -> None:
    chart = parent_chart(tmp_path, None)
    docs = render_parent(
        chart,
        "marketplace-sidecar.readinessGate.enabled=true",
        "marketplace-sidecar.events.enabled=true",
    )
    validate(docs, "1.30.0")
    assert token_holders(docs) == {
        "marketplace-sidecar": [f"mount marketplace-sidecar-kube-api at {SA_DIR}"]
    }
    role = next(d for d in docs if d["kind"] == "Role")
    assert [r["resources"] for r in role["rules"]] == [["pods/status"], ["events"]]


def test_an_empty_tag_without_digest_names_the_value() -> None:
    out = helm(
        "template",
        "x",
        str(CHART),
        "--set",
        "product.code=p",
        "--set-string",
        f"product.publicKey={PEM}",
        "--set",
        "image.tag=",
        check=False,
    )
    assert out.returncode != 0
    assert "image.tag (or image.digest) is required" in out.stderr


def test_plain_manifests_are_in_sync_with_the_chart(tmp_path: Path) -> None:
    committed = (ROOT / "manifests" / "kubernetes" / "marketplace-sidecar.yaml").read_text()
    subprocess.run([str(ROOT / "scripts" / "render-manifests.sh")], check=True, capture_output=True)
    regenerated = (ROOT / "manifests" / "kubernetes" / "marketplace-sidecar.yaml").read_text()
    assert regenerated == committed, "run scripts/render-manifests.sh and commit the result"
    docs = [d for d in yaml.safe_load_all(committed) if d]
    validate(docs, "1.29.0")


# -- custom-metered products (metering.mode=custom) --------------------------------------------

CUSTOM = ["metering.mode=custom", "metering.dimensions={users,scans}"]


def render_custom(*sets: str, kube: str = "1.33.0") -> list[dict[str, Any]]:
    """Custom mode needs no public key: render without one."""
    args = ["template", "shop", str(CHART), "--namespace", "shop", "--kube-version", kube]
    for s in (*BASE, *CUSTOM, *sets):
        args += ["--set", s]
    return load_all(helm(*args).stdout)


@pytest.mark.parametrize("kube", ["1.28.0", *KUBE_VERSIONS])
def test_custom_mode_renders_valid_manifests_without_a_key(kube: str) -> None:
    docs = render_custom(kube=kube)
    validate(docs, kube)
    spec = pod_spec(docs)
    c = sidecar(spec)
    env = env_of(c)
    assert env["MARKETPLACE_MODE"] == "custom"
    assert env["MARKETPLACE_DIMENSIONS"] == "users,scans"
    assert env["MARKETPLACE_ENTITLEMENT_CHECK"] == "meter_zero"
    assert env["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    assert float(env["MARKETPLACE_DRAIN_SECONDS"]) <= 25  # inside the default 30 s grace
    assert "MARKETPLACE_PUBLIC_KEY_FILE" not in env
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "marketplace-sidecar-key" not in volumes  # no key: a missing ConfigMap key would
    assert [m["name"] for m in c["volumeMounts"]] == ["marketplace-sidecar-state"]  # block start
    assert volumes["marketplace-sidecar-state"]["emptyDir"] == {"sizeLimit": "128Mi"}
    assert env["MARKETPLACE_STATE_VOLUME_BYTES"] == "128Mi"  # the sidecar refuses before it
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"] == {"productCode": "prod-abc"}


def test_hourly_mode_is_unchanged_by_the_metering_block() -> None:
    spec = pod_spec(render())
    env = env_of(sidecar(spec))
    assert "MARKETPLACE_MODE" not in env and "MARKETPLACE_DIMENSIONS" not in env
    assert env["MARKETPLACE_PUBLIC_KEY_FILE"] == "/etc/marketplace-sidecar/public-key.pem"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["marketplace-sidecar-state"]["emptyDir"] == {"sizeLimit": "1Mi"}
    assert "marketplace-sidecar-key" in volumes


def sidecar_accepts(env: dict[str, str], fields: str) -> list[str]:
    """`load()` of the sidecar itself on exactly this environment; `fields` (an expression over
    the settings `s` and keys `k`) printed, split; the test fails if it exits instead."""
    import sys

    out = subprocess.run(
        [sys.executable, "-c", f"from sidecar.config import load; s, k = load(); print({fields})"],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


POD_INDEX = {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}


@pytest.mark.parametrize("kube", ["1.28.0", "1.33.0"])
def test_custom_mode_passes_the_statefulset_pod_index_and_the_sidecar_takes_it(
    kube: str, tmp_path: Path
) -> None:
    """The pod's StatefulSet ordinal is its MeterUsage slot: the chart passes the pod-index
    label with the downward API (no RBAC), which is "" on a Deployment's pods; the sidecar
    takes both (main: not rendered, so a StatefulSet's slot came from its name alone)."""
    docs = render_custom(kube=kube)
    validate(docs, kube)  # a label subscript is a valid env fieldRef
    env = env_of(sidecar(pod_spec(docs)))
    assert env["MARKETPLACE_POD_INDEX"] == POD_INDEX
    assert "MARKETPLACE_POD_INDEX" not in env_of(sidecar(pod_spec(render())))  # hourly mode
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    for label, taken in (("", "None"), ("0", "0"), ("17", "17")):  # Deployment, StatefulSet
        assert sidecar_accepts({**plain, "MARKETPLACE_POD_INDEX": label}, "s.pod_index") == [taken]


def test_custom_mode_env_passes_the_sidecars_own_validation(tmp_path: Path) -> None:
    """What the chart renders is what `marketplace-sidecar run` accepts (and nothing more)."""
    env = env_of(
        sidecar(
            pod_spec(render_custom("metering.entitlementCheck=dry_run", "config.logLevel=DEBUG"))
        )
    )
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    fields = "s.mode, ','.join(s.dimension_list), s.entitlement_check, k"
    assert sidecar_accepts(plain, fields) == ["custom", "users,scans", "dry_run", "{}"]


def test_check_dimension_is_rendered_only_when_set_and_the_sidecar_accepts_it(
    tmp_path: Path,
) -> None:
    """metering.entitlementDimension reaches the sidecar as MARKETPLACE_ENTITLEMENT_DIMENSION,
    which `run` accepts with the same dimensions."""
    assert "MARKETPLACE_ENTITLEMENT_DIMENSION" not in env_of(sidecar(pod_spec(render_custom())))
    docs = render_custom(
        "metering.dimensions={users,scans,entitlement_check}",
        "metering.entitlementDimension=entitlement_check",
    )
    validate(docs, "1.33.0")
    env = env_of(sidecar(pod_spec(docs)))
    assert env["MARKETPLACE_ENTITLEMENT_DIMENSION"] == "entitlement_check"
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    fields = "s.entitlement_dimension, ','.join(s.dimension_list)"
    assert sidecar_accepts(plain, fields) == [
        "entitlement_check",
        "users,scans,entitlement_check",
    ]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["metering.mode=custom"], "/metering/dimensions"),
        (["metering.mode=metered"], "value must be one of 'hourly', 'custom', 'saas'"),
        (["metering.mode=custom", "metering.dimensions={a,b,a}"], "/metering/dimensions"),
        (["metering.mode=custom", "metering.dimensions={a\\,b}"], "/metering/dimensions/0"),
        (
            [
                "metering.mode=custom",
                "metering.dimensions={" + ",".join(f"d{i}" for i in range(25)) + "}",
            ],
            "/metering/dimensions",
        ),
        (["metering.entitlementCheck=always"], "/metering/entitlementCheck"),
        (["metering.drainSeconds=-1"], "/metering/drainSeconds"),
        (["metering.fleetSize=0"], "/metering/fleetSize"),
        (["metering.fleetSize=100001"], "/metering/fleetSize"),
        (["metering.fleetSize=lots"], "/metering/fleetSize"),
        (
            ["metering.mode=saas", "metering.dimensions={a}", "metering.fleetSize=50"],
            "metering.fleetSize is only used with metering.mode=hourly",
        ),
        (
            [*CUSTOM, "metering.entitlementDimension=check"],
            "metering.entitlementDimension=check is not one of metering.dimensions",
        ),
        (
            [
                "metering.mode=custom",
                "metering.dimensions={users,check}",
                "metering.entitlementCheck=dry_run",
                "metering.entitlementDimension=check",
            ],
            "metering.entitlementDimension is only used with metering.mode=custom and "
            "metering.entitlementCheck=meter_zero",
        ),
        ([r"metering.entitlementDimension=a\,b"], "/metering/entitlementDimension"),
    ],
)
def test_metering_schema_rejects_bad_values_naming_the_field(sets: list[str], message: str) -> None:
    args = ["template", "x", str(CHART), "--set-string", f"product.publicKey={PEM}"]
    for s in (*BASE, *sets):
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_fleet_size_is_rendered_only_when_set_and_the_sidecar_accepts_it(tmp_path: Path) -> None:
    for unset in ((), ("metering.fleetSize=",), ("metering.fleetSize=null",)):
        assert "MARKETPLACE_FLEET_SIZE" not in env_of(sidecar(pod_spec(render(*unset))))
    docs = render("metering.fleetSize=300")
    validate(docs, "1.33.0")
    env = env_of(sidecar(pod_spec(docs)))
    assert env["MARKETPLACE_FLEET_SIZE"] == "300"
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    key_file = tmp_path / "public-key.pem"  # the mounted key in the pod
    key_file.write_text(pem(new_key()))
    plain["MARKETPLACE_PUBLIC_KEY_FILE"] = str(key_file)
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    assert sidecar_accepts(plain, "s.mode, s.fleet_size") == ["hourly", "300"]


def test_custom_mode_renders_the_fleets_slots_and_the_sidecar_accepts_them(
    tmp_path: Path,
) -> None:
    """Custom mode paces its hourly MeterUsage in slots: metering.fleetSize and
    metering.meterCallsPerSecond reach the sidecar, which takes them (main: refused to render)."""
    env = env_of(sidecar(pod_spec(render_custom())))
    assert "MARKETPLACE_FLEET_SIZE" not in env and env["MARKETPLACE_METER_CALLS_PER_SECOND"] == "9"
    docs = render_custom("metering.fleetSize=40", "metering.meterCallsPerSecond=4")
    validate(docs, "1.33.0")
    env = env_of(sidecar(pod_spec(docs)))
    assert (env["MARKETPLACE_FLEET_SIZE"], env["MARKETPLACE_METER_CALLS_PER_SECOND"]) == (
        "40",
        "4",
    )
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"  # from the ConfigMap in the pod
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)  # the emptyDir in the pod
    fields = "s.mode, s.fleet_size, s.meter_calls_per_second, len(s.ignored())"
    assert sidecar_accepts(plain, fields) == ["custom", "40", "4.0", "0"]
    out = helm(
        "template", "x", str(CHART), *[a for s in (*BASE, *CUSTOM) for a in ("--set", s)],
        "--set", "metering.meterCallsPerSecond=0", check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "/metering/meterCallsPerSecond" in out.stderr, out.stderr


def test_plain_manifests_pull_the_sidecar_from_a_marketplace_registry_and_match_irsa() -> None:
    """A seller applying the plain YAML must not pull `marketplace-sidecar:<tag>` from Docker Hub,
    and the IRSA trust policy must name the ServiceAccount that YAML creates, or STS refuses."""
    committed = (ROOT / "manifests" / "kubernetes" / "marketplace-sidecar.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(committed) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "marketplace-sidecar"]
    image = sidecar["image"]
    assert image.startswith("709825985650.dkr.ecr.us-east-1.amazonaws.com/"), image
    assert "replace-with-your-seller-prefix/marketplace-sidecar:" in image
    assert "replace-with-your-seller-prefix" in committed.split("---")[0]  # the header says so
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    meta = account["metadata"]
    subject = f"system:serviceaccount:{meta['namespace']}:{meta['name']}"
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    trust = json.loads((ROOT / "manifests" / "iam" / "irsa-trust-policy.json").read_text())
    (condition,) = trust["Statement"]
    subs = [v for k, v in condition["Condition"]["StringEquals"].items() if k.endswith(":sub")]
    assert subs == [subject]


# -- SaaS products (metering.mode=saas) ---------------------------------------------------------

SAAS = ["metering.mode=saas", "metering.dimensions={api_calls,storage_gb}"]
DB_SECRET = "metering.saas.database.existingSecret=app-metering-db"
SAAS_EXACT_ENV: list[dict[str, Any]] = [
    {"name": "MARKETPLACE_MODE", "value": "saas"},
    {"name": "MARKETPLACE_DIMENSIONS", "value": "api_calls,storage_gb"},
    {"name": "MARKETPLACE_SAAS_IDENTITY", "value": "license"},
    {"name": "MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS", "value": "false"},
    {"name": "MARKETPLACE_ZERO_USAGE_RECORDS", "value": "true"},
    {"name": "MARKETPLACE_DRAIN_SECONDS", "value": "20"},
    {
        "name": "MARKETPLACE_USAGE_DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "app-metering-db", "key": "url"}},
    },
    {"name": "MARKETPLACE_LISTEN", "value": "127.0.0.1:8787"},
    {"name": "MARKETPLACE_PROBE_LISTEN", "value": "0.0.0.0:8788"},
    {"name": "MARKETPLACE_LOG_FORMAT", "value": "json"},
    {"name": "MARKETPLACE_LOG_LEVEL", "value": "INFO"},
]


def render_saas(*sets: str, kube: str = "1.33.0", check: bool = True) -> list[dict[str, Any]]:
    """SaaS mode: no public key and (license identity) no product code either."""
    args = ["template", "shop", str(CHART), "--namespace", "shop", "--kube-version", kube]
    for s in (*SAAS, *sets):
        args += ["--set", s]
    return load_all(helm(*args).stdout)


@pytest.mark.parametrize("kube", ["1.28.0", *KUBE_VERSIONS])
def test_saas_mode_on_postgresql_renders_exact_env_and_no_key_or_product_code(kube: str) -> None:
    docs = render_saas(DB_SECRET, kube=kube)
    validate(docs, kube)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "ServiceAccount"]  # no ConfigMap
    spec = pod_spec(docs)
    c = sidecar(spec)
    assert c["env"] == SAAS_EXACT_ENV  # nothing hourly-only (key, RegisterUsage period) leaks in
    # The store is the database: no local state, no key, so no volume at all.
    assert "volumeMounts" not in c and "volumes" not in spec
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "mp-probe"}
    assert token_holders(docs) == {}
    # The database URL never appears in the rendered objects, only the Secret's name.
    assert "postgresql://" not in json.dumps(docs)


@pytest.mark.parametrize("store", [DB_SECRET, "metering.saas.state.existingClaim=usage"])
def test_saas_probes_never_hold_the_backend_back_on_a_store_outage(store: str) -> None:
    """A database down (SaaS mode has no entitlement to wait for) must neither keep the
    backend from starting (native sidecar's startupProbe) nor take every pod sharing that
    database out of its Service (readiness): the probes ask whether the sidecar answers.
    Other modes keep /readyz: there it means entitled."""
    spec = pod_spec(render_saas(store, kube="1.33.0"))
    c = spec["initContainers"][0]
    assert c["name"] == "marketplace-sidecar" and c["restartPolicy"] == "Always"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "mp-probe"}, probe
    classic = sidecar(pod_spec(render_saas(store, "mode=classic")))
    assert classic["readinessProbe"]["httpGet"]["path"] == "/healthz"
    hourly = pod_spec(render(kube="1.33.0"))["initContainers"][0]
    assert hourly["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert hourly["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_saas_env_passes_the_sidecars_own_validation(tmp_path: Path, store: str) -> None:
    """What the chart renders in saas mode is what `marketplace-sidecar run` accepts."""
    sets = [DB_SECRET] if store == "postgresql" else []
    env = env_of(sidecar(pod_spec(render_saas(*sets, "config.logLevel=DEBUG"))))
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    if store == "postgresql":  # the secretKeyRef, resolved by the kubelet
        plain["MARKETPLACE_USAGE_DATABASE_URL"] = "postgresql://app:pw@db.example:5432/metering"
    else:  # the chart's path, where the volume is mounted in the pod; here a local dir
        assert plain["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
        plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)
    expected = ["saas", "license", "api_calls,storage_gb", "db" if sets else "dir", "{}"]
    fields = (
        "s.mode, s.saas_identity, ','.join(s.dimension_list), "
        "'db' if s.usage_database_url else 'dir', k"
    )
    assert sidecar_accepts(plain, fields) == expected


def test_saas_license_identity_passes_a_given_product_code_to_pin_resolve_customer() -> None:
    docs = render_saas(DB_SECRET, "product.code=prod-abc")
    env = env_of(sidecar(pod_spec(docs)))
    ref = env["MARKETPLACE_PRODUCT_CODE"]["configMapKeyRef"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == ref["name"] and cm["data"][ref["key"]] == "prod-abc"
    assert "MARKETPLACE_PUBLIC_KEY" not in json.dumps(docs)  # still no key in saas mode


def test_saas_mode_on_sqlite_keeps_the_state_volume_and_one_replica() -> None:
    docs = render_saas()
    validate(docs, "1.33.0")
    spec = pod_spec(docs)
    env = env_of(sidecar(spec))
    assert env["MARKETPLACE_STATE_DIR"] == "/var/lib/marketplace-sidecar"
    assert "MARKETPLACE_USAGE_DATABASE_URL" not in env
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes == {
        "marketplace-sidecar-state": {
            "name": "marketplace-sidecar-state",
            "emptyDir": {"sizeLimit": "128Mi"},
        }
    }
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and "strategy" not in deployment["spec"]
    # Two replicas on SQLite would each send their own count: AWS bills the first one only.
    args = ["template", "shop", str(CHART), "--set", "sample.replicas=2"]
    for s in SAAS:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0
    assert "metering.saas.database.existingSecret" in out.stderr and "ONE replica" in out.stderr
    assert len(render_saas(DB_SECRET, "sample.replicas=3")) == 2  # fine on PostgreSQL


def test_saas_sqlite_on_a_persistent_claim_recreates_instead_of_rolling() -> None:
    docs = render_saas("metering.saas.state.existingClaim=metering-state")
    validate(docs, "1.33.0")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one RWO claim, one writer
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume == {
        "name": "marketplace-sidecar-state",
        "persistentVolumeClaim": {"claimName": "metering-state"},
    }
    # With a database the claim is not used: the store is PostgreSQL.
    on_db = pod_spec(render_saas(DB_SECRET, "metering.saas.state.existingClaim=metering-state"))
    assert "volumes" not in on_db


def test_saas_knobs_reach_the_env() -> None:
    docs = render_saas(
        DB_SECRET,
        "metering.saas.database.key=DATABASE_URL",
        "metering.saas.identity=customer_identifier",
        "metering.saas.acceptUnresolvedCustomers=true",
        "metering.saas.zeroUsageRecords=false",
        "metering.drainSeconds=25",
        "product.code=prod-abc",
    )
    validate(docs, "1.33.0")
    env = env_of(sidecar(pod_spec(docs)))
    assert env["MARKETPLACE_SAAS_IDENTITY"] == "customer_identifier"
    assert env["MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS"] == "true"
    assert env["MARKETPLACE_ZERO_USAGE_RECORDS"] == "false"
    assert env["MARKETPLACE_DRAIN_SECONDS"] == "25"
    assert env["MARKETPLACE_USAGE_DATABASE_URL"] == {
        "secretKeyRef": {"name": "app-metering-db", "key": "DATABASE_URL"}
    }
    # customer_identifier records go with the product code in the request.
    assert env["MARKETPLACE_PRODUCT_CODE"] == {
        "configMapKeyRef": {"name": "shop-marketplace-sidecar", "key": "productCode"}
    }
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"] == {"productCode": "prod-abc"}  # and no public key


def test_saas_customer_identifier_without_a_product_code_says_what_to_set() -> None:
    args = ["template", "x", str(CHART), "--set", "metering.saas.identity=customer_identifier"]
    for s in SAAS:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and "product.code is required" in out.stderr, out.stderr
    secret = render_saas(
        "metering.saas.identity=customer_identifier", "product.existingSecret=product-secret"
    )
    assert env_of(sidecar(pod_spec(secret)))["MARKETPLACE_PRODUCT_CODE"] == {
        "secretKeyRef": {"name": "product-secret", "key": "productCode"}
    }


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["metering.mode=saas"], "/metering/dimensions"),
        ([*SAAS, "metering.saas.identity=both"], "/metering/saas/identity"),
        # The URL holds a password: there is no plain-value field to put it in.
        (
            [*SAAS, "metering.saas.database.url=postgresql://u:pw@db/m"],
            "additional properties 'url' not allowed",
        ),
        ([*SAAS, "metering.saas.databaseUrl=postgresql://u:pw@db/m"], "databaseUrl"),
        ([*SAAS, "metering.saas.database.existingSecret=Bad_Name"], "existingSecret"),
        ([*SAAS, "metering.saas.database.key=a/b"], "/metering/saas/database/key"),
        ([*SAAS, "metering.saas.acceptUnresolvedCustomers=maybe"], "acceptUnresolvedCustomers"),
        ([*SAAS, "metering.saas.zeroUsageRecords=1"], "zeroUsageRecords"),
        ([*SAAS, "metering.saas.state.existingClaim=/data"], "existingClaim"),
    ],
)
def test_saas_schema_rejects_bad_values_naming_the_field(sets: list[str], message: str) -> None:
    args = ["template", "x", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_every_saas_knob_is_documented_in_values_and_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metering"]["saas"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    saas = schema["properties"]["metering"]["properties"]["saas"]["properties"]

    def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    def schema_leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            nested = v.get("properties")
            out |= schema_leaves(nested, f"{prefix}{k}.") if nested else {prefix + k}
        return out

    assert leaves(values) == schema_leaves(saas)
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("  saas:\n") :]
    for leaf in leaves(values):
        name = leaf.rsplit(".", 1)[-1]
        line = next(i for i, x in enumerate(block.splitlines()) if x.strip().startswith(name + ":"))
        assert block.splitlines()[line - 1].strip().startswith("#"), f"{leaf} has no comment"


def test_saas_notes_name_the_store_and_warn_about_an_emptydir(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    text = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "notes-under-test" -}}\n' + text + "{{- end -}}\n"
    )
    (chart / "templates" / "notes-rendered.yaml").write_text(
        'notes: {{ include "notes-under-test" . | toJson }}\n'
    )

    def notes(*sets: str) -> str:
        args = ["template", "shop", str(chart), "--show-only", "templates/notes-rendered.yaml"]
        for s in (*SAAS, *sets):
            args += ["--set", s]
        return str(yaml.safe_load(helm(*args).stdout)["notes"])

    sqlite = notes()
    assert "ONE replica" in sqlite and "emptyDir" in sqlite and "/v1/customers/resolve" in sqlite
    assert "when entitled" not in sqlite  # nothing about RegisterUsage entitlement
    claim = notes("metering.saas.state.existingClaim=st")
    assert "ONE replica" in claim and "emptyDir" not in claim
    pg = notes(DB_SECRET)
    assert "PostgreSQL, URL from Secret app-metering-db (key url)" in pg and "emptyDir" not in pg


def saas_parent_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "example-saas"
    shutil.copytree(ROOT / "tests" / "charts" / "example-saas", chart)
    meta = chart / "Chart.yaml"
    meta.write_text(meta.read_text().replace("file://../../../helm", f"file://{CHART}"))
    helm("dependency", "build", str(chart))
    return chart


@pytest.mark.parametrize(("kube", "native"), [("1.28.0", False), ("1.30.0", True)])
def test_example_saas_backend_chart(tmp_path: Path, kube: str, native: bool) -> None:
    """A seller's SaaS backend: three replicas, each with its sidecar, one PostgreSQL store
    whose URL comes from the seller's Secret, and the registration endpoint routed to it."""
    chart = saas_parent_chart(tmp_path)
    docs = render_parent(chart, kube=kube)
    validate(docs, kube)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Ingress", "Service", "ServiceAccount"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    spec = pod_spec(docs)
    assert ("initContainers" in spec) is native
    c = sidecar(spec)
    assert c["image"] == f"marketplace-sidecar:{__version__}"  # not the backend's appVersion
    assert c["env"] == [
        {**e, "value": "api_calls,storage_gb"}
        if e["name"] == "MARKETPLACE_DIMENSIONS"
        else {
            **e,
            "valueFrom": {"secretKeyRef": {"name": "example-saas-metering-db", "key": "url"}},
        }
        if e["name"] == "MARKETPLACE_USAGE_DATABASE_URL"
        else e
        for e in SAAS_EXACT_ENV
    ]
    backend = next(x for x in spec["containers"] if x["name"] == "backend")
    assert env_of(backend)["MARKETPLACE_SIDECAR_URL"] == "http://127.0.0.1:8787"
    assert "MARKETPLACE_USAGE_DATABASE_URL" not in env_of(
        backend
    )  # the secret stays in the sidecar
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert (
        path["path"] == env_of(backend)["MARKETPLACE_REGISTRATION_PATH"] == "/marketplace/register"
    )
    service = next(d for d in docs if d["kind"] == "Service")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec_labels(deployment).items()
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert "role-arn" in str(sa["metadata"]["annotations"])
    assert token_holders(docs) == {}


def spec_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize(
    ("fleet", "deadline", "accepted"),
    [(7500, 3600, True), (7501, 3600, False), (43750, 21000, True), (1, 10, True), (1, 9, False)],
)
def test_a_fleet_size_the_deadline_cannot_hold_fails_at_render_not_in_a_crash_loop(
    tmp_path: Path, fleet: int, deadline: int, accepted: bool
) -> None:
    """The sidecar refuses 1.2 x fleetSize / 5 s (at least 5 s) above half the registration
    deadline and exits 2: rendered anyway, every pod of the release would crash-loop."""
    sets = [f"metering.fleetSize={fleet}", f"config.registerDeadlineSeconds={deadline}"]
    args = ["template", "x", str(CHART), "--set-string", f"product.publicKey={PEM}"]
    for s in (*BASE, *sets):
        args += ["--set", s]
    out = helm(*args, check=False)
    assert (out.returncode == 0) == accepted, out.stderr
    if not accepted:
        assert "metering.fleetSize" in out.stderr
        assert "config.registerDeadlineSeconds" in out.stderr
        return
    env = env_of(sidecar(pod_spec(render(*sets))))
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["MARKETPLACE_PRODUCT_CODE"] = "prod-abc"
    key_file = tmp_path / "public-key.pem"
    key_file.write_text(pem(new_key()))
    plain["MARKETPLACE_PUBLIC_KEY_FILE"] = str(key_file)
    plain["MARKETPLACE_STATE_DIR"] = str(tmp_path)
    assert sidecar_accepts(plain, "s.fleet_size") == [str(fleet)]


# -- The seller's own workload: replicas on SQLite, their own ServiceAccount, their container's
#    API token ---------------------------------------------------------------------------------

NO_DB = "marketplace-sidecar.metering.saas.database.existingSecret="


def render_parent_failure(chart: Path, *sets: str) -> str:
    args = ["template", "shop", str(chart), "--namespace", "shop", "--kube-version", "1.30.0"]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0, out.stdout[:300]
    return out.stderr


def test_a_sellers_own_deployment_on_sqlite_is_refused_above_one_replica(tmp_path: Path) -> None:
    """Issue: only the sample Deployment was guarded; a seller's 3 replicas on SQLite rendered
    without a word, and each replica sent its own count (AWS keeps the first)."""
    chart = saas_parent_chart(tmp_path)
    err = render_parent_failure(chart, NO_DB)  # the example's replicas: 3
    assert "replicas=3 in saas mode needs metering.saas.database.existingSecret" in err, err
    assert "ONE replica" in err
    # The autoscaler's ceiling is refused the same way, naming its own field.
    err = render_parent_failure(
        chart,
        NO_DB,
        "replicas=1",
        "autoscaling.enabled=true",
        "autoscaling.minReplicas=1",
        "autoscaling.maxReplicas=4",
    )
    assert "autoscaling.maxReplicas=4 in saas mode" in err, err
    # One replica on SQLite renders; many on PostgreSQL render, autoscaler included.
    one = render_parent(chart, NO_DB, "replicas=1")
    validate(one, "1.30.0")
    assert next(d for d in one if d["kind"] == "Deployment")["spec"]["replicas"] == 1
    many = render_parent(chart, "autoscaling.enabled=true", "autoscaling.maxReplicas=12")
    validate(many, "1.30.0")
    hpa = next(d for d in many if d["kind"] == "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    # Custom and hourly modes meter each pod on its own: no limit.
    product = parent_chart(tmp_path / "p", None)
    assert (
        next(d for d in render_parent(product) if d["kind"] == "Deployment")["spec"]["replicas"]
        == 2
    )


@pytest.mark.parametrize("kube", ["1.28.0", "1.33.0"])
def test_a_sellers_own_irsa_service_account(tmp_path: Path, kube: str) -> None:
    """serviceAccount.create=false + name: the pod runs as the seller's account (already
    annotated for IRSA), the chart creates none, and the gate's RoleBinding names it."""
    chart = parent_chart(tmp_path, None)
    docs = render_parent(
        chart,
        "marketplace-sidecar.serviceAccount.create=false",
        "marketplace-sidecar.serviceAccount.name=shop-app",
        "marketplace-sidecar.readinessGate.enabled=true",
        kube=kube,
    )
    validate(docs, kube)
    assert "ServiceAccount" not in [d["kind"] for d in docs]
    assert pod_spec(docs)["serviceAccountName"] == "shop-app"
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "shop-app", "namespace": "shop"}
    ]
    # Without a name the pod would reference an account nobody creates.
    err = render_parent_failure(chart, "marketplace-sidecar.serviceAccount.create=false")
    assert "serviceAccount.create=false needs serviceAccount.name" in err, err


@pytest.mark.parametrize("kube", ["1.28.0", "1.33.0"])
@pytest.mark.parametrize("gate", [False, True])
def test_the_product_container_can_keep_its_api_token(
    tmp_path: Path, kube: str, gate: bool
) -> None:
    """The pod never automounts a token; productToken.enabled mounts one into the seller's
    container (through the chart's named template) at the usual path, and the sidecar keeps its
    own projected volume: neither container gets the other's mount."""
    chart = parent_chart(tmp_path, None)
    sets = ["marketplace-sidecar.productToken.enabled=true"]
    if gate:
        sets.append("marketplace-sidecar.readinessGate.enabled=true")
    docs = render_parent(chart, *sets, kube=kube)
    validate(docs, kube)
    expected = {"product": [f"mount marketplace-sidecar-product-token at {SA_DIR}"]}
    if gate:
        expected["marketplace-sidecar"] = [f"mount marketplace-sidecar-kube-api at {SA_DIR}"]
    assert token_holders(docs) == expected
    spec = pod_spec(docs)
    assert spec["automountServiceAccountToken"] is False
    volume = next(v for v in spec["volumes"] if v["name"] == "marketplace-sidecar-product-token")
    sources = volume["projected"]["sources"]
    assert [next(iter(s)) for s in sources] == ["serviceAccountToken", "configMap", "downwardAPI"]
    # Off by default: the product container has no token and no mount.
    assert token_holders(render_parent(chart, kube=kube)) == {}


# -- docs/helm.md: each mode's values block, copied alone into a seller's chart -----------------

DOCS_HELM = ROOT / "docs" / "helm.md"
DIGEST = "sha256:" + "c" * 64


def doc_values_blocks() -> dict[str, dict[str, Any]]:
    """The ```yaml blocks of docs/helm.md that start `# values.yaml of your ... (<mode>)`."""
    import re

    blocks = re.findall(
        r"```yaml\n(# values\.yaml of your [^\n]*\((\w+)\)\n.*?)```", DOCS_HELM.read_text(), re.S
    )
    return {mode: yaml.safe_load(text.replace("sha256:...", DIGEST)) for text, mode in blocks}


@pytest.mark.parametrize("mode", ["hourly", "custom", "saas"])
def test_each_modes_values_block_is_complete_when_copied_alone(tmp_path: Path, mode: str) -> None:
    """Issue: snippets copied alone rendered the chart's sample Deployment and the unpinned
    `marketplace-sidecar:0.1.0` (a Docker Hub name) into the seller's chart."""
    blocks = doc_values_blocks()
    assert set(blocks) == {"hourly", "custom", "saas"}, sorted(blocks)
    ours = blocks[mode]["marketplace-sidecar"]
    chart = saas_parent_chart(tmp_path) if mode == "saas" else parent_chart(tmp_path, None)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["marketplace-sidecar"] = ours  # the block replaces the example's own
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    if "publicKey" in ours.get("product", {}):
        # Copied with its placeholder left in, the block fails at `helm template`, naming the
        # value, instead of a pod that crash-loops; with the seller's key it renders.
        assert "\n...\n" in ours["product"]["publicKey"]
        refused = helm("template", "shop", str(chart), "--kube-version", "1.33.0", check=False)
        assert refused.returncode != 0
        assert "marketplace-sidecar:\n- at '/product/publicKey'" in refused.stderr, refused.stderr
        ours["product"]["publicKey"] = PEM
        (chart / "values.yaml").write_text(yaml.safe_dump(values))
    for kube in ("1.28.0", "1.33.0"):
        docs = render_parent(chart, kube=kube)
        validate(docs, kube)
        deployments = [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"]
        assert len(deployments) == 1 and not deployments[0].endswith("-sample"), deployments
        c = sidecar(pod_spec(docs))
        assert c["image"] == f"{ours['image']['registry']}/marketplace-sidecar@{DIGEST}"
        assert "." in ours["image"]["registry"].split("/")[0]  # a registry host, not Docker Hub
        assert env_of(c).get("MARKETPLACE_MODE", "hourly") == mode


@pytest.mark.parametrize("limit", ["16Mi", "1Gi", "300000Ki"])
def test_custom_mode_tells_the_sidecar_its_volumes_size_limit(limit: str) -> None:
    """statvfs shows the node's disk, not the emptyDir's sizeLimit: the sidecar hears it from the
    same value, so it refuses usage (503) before the kubelet would evict the pod."""
    spec = pod_spec(render_custom(f"metering.stateSizeLimit={limit}"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["marketplace-sidecar-state"]["emptyDir"] == {"sizeLimit": limit}
    assert env_of(sidecar(spec))["MARKETPLACE_STATE_VOLUME_BYTES"] == limit


def test_custom_mode_refuses_a_volume_too_small_for_the_store() -> None:
    args = ["template", "shop", str(CHART), "--set", "metering.stateSizeLimit=8Mi"]
    for s in (*BASE, *CUSTOM):
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0
    assert "metering.stateSizeLimit=8Mi: custom mode needs at least 16Mi" in out.stderr


def test_saas_contract_dimensions_reach_the_env_only_when_set() -> None:
    """metering.saas.contractDimensions: MARKETPLACE_SAAS_CONTRACT_DIMENSIONS; a malformed value
    is refused at render, naming the value's path."""
    url = "https://sqs.us-east-1.amazonaws.com/111122223333/marketplace-saas-events"
    off = env_of(sidecar(pod_spec(render_saas(DB_SECRET))))
    assert "MARKETPLACE_SAAS_CONTRACT_DIMENSIONS" not in off
    docs = render_saas(
        DB_SECRET,
        f"metering.saas.events.queueUrl={url}",
        "metering.saas.contractDimensions=api_calls:term",
    )
    validate(docs, "1.33.0")
    env = env_of(sidecar(pod_spec(docs)))
    assert env["MARKETPLACE_SAAS_CONTRACT_DIMENSIONS"] == "api_calls:term"
    args = ["template", "x", str(CHART), "--set", DB_SECRET]
    for s in [*SAAS, "metering.saas.contractDimensions=api_calls:seat"]:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and "/metering/saas/contractDimensions" in out.stderr


def test_saas_events_queue_reaches_the_env_only_when_set() -> None:
    """metering.saas.events.queueUrl: the sidecar's MARKETPLACE_SAAS_EVENTS_QUEUE_URL, and only
    an https SQS queue URL (a typo or a plain-http endpoint is refused at render, naming the
    value's path)."""
    url = "https://sqs.us-east-1.amazonaws.com/111122223333/marketplace-saas-events"
    off = env_of(sidecar(pod_spec(render_saas(DB_SECRET))))
    assert "MARKETPLACE_SAAS_EVENTS_QUEUE_URL" not in off
    docs = render_saas(DB_SECRET, f"metering.saas.events.queueUrl={url}")
    validate(docs, "1.33.0")
    assert env_of(sidecar(pod_spec(docs)))["MARKETPLACE_SAAS_EVENTS_QUEUE_URL"] == url
    for bad in (
        "http://sqs.us-east-1.amazonaws.com/111122223333/q",
        "https://sqs.us-east-1.amazonaws.com/111122223333/q.fifo",
        "https://evil.example/111122223333/q",
        "sqs.us-east-1.amazonaws.com/111122223333/q",
    ):
        args = ["template", "x", str(CHART), "--set", DB_SECRET]
        for s in [*SAAS, f"metering.saas.events.queueUrl={bad}"]:
            args += ["--set", s]
        out = helm(*args, check=False)
        assert out.returncode != 0 and "/metering/saas/events/queueUrl" in out.stderr, bad
