#!/usr/bin/env bash
# Regenerate manifests/kubernetes/ (plain YAML for non-Helm users) from the chart.
# A test fails when the committed files drift from what the chart renders.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/get-helm.sh >/dev/null
# The chart's schema refuses what the sidecar would refuse at start, a placeholder included: render
# with a stand-in RSA-2048 public key (its private half was never kept), then print the
# placeholder the seller replaces in its place.
STAND_IN_KEY='-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAo+lrnrwJ1GKi4VZtJB6x
qD0wuxYV2vMyPDzeDCKBlYbCD8J7KW/sWrOINt1bORCnUa1d72LYmNecKeK6+SLc
YjVzQBs1izQ303QoZYxaivGu7odQ1hQi2NtBlrA68SdUklXVUBW4U2hkwQBGMeOY
06OzCfIFEaWrNNcIk30YEKVzUBjLrsb1k8H20f+DUq+Nba6B/Dv+C+ZuQUdY/pVV
1eqnEWIcvvkCs3DGluMbwf3p3vykXIW9raVuEMdcild4xXVZNfrqTGbi9QwvHJ+U
eOwUS/lk/Sc/ZmgaVz1Xoswcp2RHMVcYTJNT+2VR+OuEh5LpVMDSClCbPBqbvZuJ
2QIDAQAB
-----END PUBLIC KEY-----'
placeholder() {
  awk '/-----BEGIN PUBLIC KEY-----/ { print; inkey = 1; next }
       inkey && /-----END PUBLIC KEY-----/ { match($0, /^ */)
         print substr($0, 1, RLENGTH) "REPLACE_WITH_THE_PEM_PUBLIC_KEY_FROM_YOUR_AMMP_PRODUCT_PAGE"
         print; inkey = 0; next }
       inkey { next }
       { print }'
}
render() {
  .tools/bin/helm template marketplace-sidecar helm --namespace my-product --kube-version 1.29.0 \
    --set image.registry=709825985650.dkr.ecr.us-east-1.amazonaws.com/replace-with-your-seller-prefix \
    --set product.code=REPLACE_WITH_PRODUCT_CODE \
    --set-string "product.publicKey=$STAND_IN_KEY" \
    --set 'serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::111122223333:role/REPLACE_WITH_IRSA_ROLE' \
    "$@"
}
{
  echo "# Generated from the Helm chart by scripts/render-manifests.sh; do not edit by hand."
  echo "# Native sidecar (Kubernetes >= 1.29). Replace the REPLACE_WITH_* values and the namespace my-product;"
  echo "# in the image, replace the registry and replace-with-your-seller-prefix with your Marketplace"
  echo "# repository and pin the digest you pushed: <repository URI>@sha256:... (docs/image.md)."
  render | grep -v '^# Source:' | placeholder
} > manifests/kubernetes/marketplace-sidecar.yaml
