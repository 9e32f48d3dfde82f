#!/usr/bin/env bash
# Regenerate manifests/kubernetes/ (plain YAML for non-Helm users) from the chart.
# A test fails when the committed files drift from what the chart renders.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/get-helm.sh >/dev/null
render() {
  .tools/bin/helm template marketplace-sidecar helm --namespace my-product --kube-version 1.29.0 \
    --set image.registry=709825985650.dkr.ecr.us-east-1.amazonaws.com/replace-with-your-seller-prefix \
    --set product.code=REPLACE_WITH_PRODUCT_CODE \
    --set-string 'product.publicKey=-----BEGIN PUBLIC KEY-----
REPLACE_WITH_THE_PEM_PUBLIC_KEY_FROM_YOUR_AMMP_PRODUCT_PAGE
-----END PUBLIC KEY-----' \
    --set 'serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::111122223333:role/REPLACE_WITH_IRSA_ROLE' \
    "$@"
}
{
  echo "# Generated from the Helm chart by scripts/render-manifests.sh; do not edit by hand."
  echo "# Native sidecar (Kubernetes >= 1.29). Replace the REPLACE_WITH_* values and the namespace my-product;"
  echo "# in the image, replace the registry and replace-with-your-seller-prefix with your Marketplace"
  echo "# repository and pin the digest you pushed: <repository URI>@sha256:... (docs/image.md)."
  render | grep -v '^# Source:'
} > manifests/kubernetes/marketplace-sidecar.yaml
