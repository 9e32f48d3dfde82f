#!/usr/bin/env bash
# Security scanners, offline: checkov over the rendered Helm chart (every switch that adds
# objects on), the plain Kubernetes manifests, the Dockerfile and the CloudFormation templates;
# bandit over sidecar/ and the client package (client/). Any finding fails. Each accepted
# finding is suppressed inline, next to what it is about, with a one-line reason (checkov.io/skipN annotations, checkov:skip comments,
# template Metadata, `# nosec BXXX # reason`).
#   scripts/scan.sh SCANNER_BIN_DIR     (the Makefile passes its own venv: .tools/scan-venv/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.tools/scan-venv/bin}
scripts/get-helm.sh >/dev/null
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
# A stand-in RSA-2048 public key (its private half was never kept): the chart's schema refuses
# anything the sidecar would refuse at start.
PEM='-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAo+lrnrwJ1GKi4VZtJB6x
qD0wuxYV2vMyPDzeDCKBlYbCD8J7KW/sWrOINt1bORCnUa1d72LYmNecKeK6+SLc
YjVzQBs1izQ303QoZYxaivGu7odQ1hQi2NtBlrA68SdUklXVUBW4U2hkwQBGMeOY
06OzCfIFEaWrNNcIk30YEKVzUBjLrsb1k8H20f+DUq+Nba6B/Dv+C+ZuQUdY/pVV
1eqnEWIcvvkCs3DGluMbwf3p3vykXIW9raVuEMdcild4xXVZNfrqTGbi9QwvHJ+U
eOwUS/lk/Sc/ZmgaVz1Xoswcp2RHMVcYTJNT+2VR+OuEh5LpVMDSClCbPBqbvZuJ
2QIDAQAB
-----END PUBLIC KEY-----'
render() {  # name, then extra --set flags
  local name=$1; shift
  .tools/bin/helm template shop helm --namespace shop --kube-version 1.30.0 \
    --set product.code=scan --set-string "product.publicKey=$PEM" "$@" > "$OUT/$name.yaml"
}
render native
render gate-events --set readinessGate.enabled=true --set events.enabled=true \
  --set metrics.podMonitor.enabled=true
render classic --set mode=classic --set readinessGate.enabled=true
render saas --set metering.mode=saas --set 'metering.dimensions={users}' \
  --set metering.saas.database.existingSecret=metering-db
render contract --set metering.mode=contract --set product.code= --set-string product.publicKey= \
  --set metering.contract.productSku=scan --set 'metering.contract.entitlements[0].name=Tier' \
  --set 'metering.contract.entitlements[0].unit=None' \
  --set metering.contract.anywhere.existingSecret=aws-marketplace-license-config
# One run (checkov's start-up is most of its time); --skip-download: no network, no platform.
"$BIN/checkov" --quiet --compact --skip-download \
  --framework kubernetes dockerfile cloudformation \
  -f "$OUT/native.yaml" -f "$OUT/gate-events.yaml" -f "$OUT/classic.yaml" -f "$OUT/saas.yaml" \
  -f "$OUT/contract.yaml" \
  -f manifests/kubernetes/marketplace-sidecar.yaml \
  -f Dockerfile -f manifests/ecs/cloudformation.json -f manifests/saas-events/cloudformation.json
"$BIN/bandit" --quiet --recursive sidecar/ client/marketplace_sidecar_client/
echo "scan: checkov and bandit found nothing unsuppressed"
