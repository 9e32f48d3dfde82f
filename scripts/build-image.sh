#!/usr/bin/env bash
# Build the sidecar image without Docker: buildah (vfs storage, chroot isolation) on a local
# Debian bookworm base, since base images cannot be pulled here. Then check the image:
# --version, non-root user, and `run` + `probe` inside it against the emulator on loopback.
#   scripts/build-image.sh [TAG]        (root; installs buildah and mmdebstrap from apt if missing)
#   EXTRAS=kubernetes scripts/build-image.sh TAG    (the readiness-gate variant)
# Writes the image's SBOM (CycloneDX JSON) to $SBOM_OUT (default dist/marketplace-sidecar.cdx.json).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/marketplace-sidecar:ci}
# The equivalent of debian:bookworm-slim (Docker Hub cannot be reached here): Debian bookworm
# from the Debian archive, no Python. The Dockerfile installs Debian's python3 itself, exactly as
# it does on the default base, so CI builds the default path.
BASE=localhost/marketplace-sidecar-base:bookworm-slim
CACHE=.tools/image
B() { buildah --storage-driver vfs "$@"; }

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq buildah mmdebstrap >/dev/null
fi
mkdir -p "$CACHE"
if ! B inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/rootfs-slim.tar" ]; then
    mmdebstrap --quiet --variant=apt bookworm "$CACHE/rootfs-slim.tar" \
      http://deb.debian.org/debian
  fi
  printf 'FROM scratch\nADD rootfs-slim.tar /\nCMD ["bash"]\n' > "$CACHE/Containerfile"
  B bud --quiet --isolation chroot -t "$BASE" -f "$CACHE/Containerfile" "$CACHE" >/dev/null
fi
# Wheels are resolved on the host (its package index settings apply), then installed offline.
rm -f wheels/*.whl
EXTRAS=${EXTRAS:-}
python3 -m pip wheel --quiet --disable-pip-version-check -c constraints.txt -w wheels \
  ".${EXTRAS:+[$EXTRAS]}" \
  2> >(grep -v "^WARNING: Location" >&2)
# The SBOM generator's wheels, for the build stage only (never installed in the image).
rm -rf wheels/sbom
python3 -m pip wheel --quiet --disable-pip-version-check -w wheels/sbom \
  -r scripts/sbom-requirements.txt 2> >(grep -v "^WARNING: Location" >&2)
B bud --quiet --format docker --isolation chroot --build-arg BASE_IMAGE="$BASE" \
  --build-arg EXTRAS="$EXTRAS" -t "$TAG" . >/dev/null
echo "built $TAG"
# The SBOM beside the image: the very file the image carries, copied into the build output.
SBOM_OUT=${SBOM_OUT:-dist/marketplace-sidecar.cdx.json}
mkdir -p "$(dirname "$SBOM_OUT")"
ctr=$(B from --quiet "$TAG")
mnt=$(B mount "$ctr")
cp "$mnt/usr/share/doc/marketplace-sidecar/sbom.cdx.json" "$SBOM_OUT"
B umount "$ctr" >/dev/null
B rm "$ctr" >/dev/null
echo "SBOM (CycloneDX) $SBOM_OUT, also /usr/share/doc/marketplace-sidecar/sbom.cdx.json in the image"
