#!/usr/bin/env bash
# Build the sidecar image without Docker: buildah (vfs storage, chroot isolation) on a local
# Debian bookworm base, since base images cannot be pulled here. Then check the image:
# --version, non-root user, and `run` + `probe` inside it against the emulator on loopback.
#   scripts/build-image.sh [TAG]        (root; installs buildah and mmdebstrap from apt if missing)
#   EXTRAS=kubernetes scripts/build-image.sh TAG    (the readiness-gate variant)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/marketplace-sidecar:ci}
BASE=localhost/marketplace-sidecar-base:bookworm
CACHE=.tools/image
B() { buildah --storage-driver vfs "$@"; }

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq buildah mmdebstrap >/dev/null
fi
mkdir -p "$CACHE"
if ! B inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/rootfs.tar" ]; then
    # python3-venv brings ensurepip (the build stage needs pip); no compilers are included.
    mmdebstrap --quiet --variant=apt --include=python3-minimal,python3-venv,ca-certificates \
      bookworm "$CACHE/rootfs.tar" http://deb.debian.org/debian
  fi
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n' > "$CACHE/Containerfile"
  B bud --quiet --isolation chroot -t "$BASE" -f "$CACHE/Containerfile" "$CACHE" >/dev/null
fi
# Wheels are resolved on the host (its package index settings apply), then installed offline.
rm -f wheels/*.whl
EXTRAS=${EXTRAS:-}
python3 -m pip wheel --quiet --disable-pip-version-check -c constraints.txt -w wheels \
  ".${EXTRAS:+[$EXTRAS]}" \
  2> >(grep -v "^WARNING: Location" >&2)
B bud --quiet --format docker --isolation chroot --build-arg BASE_IMAGE="$BASE" \
  --build-arg EXTRAS="$EXTRAS" -t "$TAG" . >/dev/null
echo "built $TAG"
