#!/usr/bin/env bash
# Show that the image build has no architecture-specific step on the Python side: everything the
# image installs (the sidecar with EXTRAS=kubernetes, at the versions in constraints.txt, and the
# SBOM generator its build stage runs, scripts/sbom-requirements.txt) resolves
# to *wheels* for both linux/amd64 (x86_64) and linux/arm64 (aarch64), for the image's CPython
# 3.11 on Debian bookworm's glibc 2.36. No sdist is allowed, so nothing is ever compiled, on
# either architecture. The rest of the Dockerfile is apt (Debian's python3 exists for both) and
# file copies. Asks PyPI (pip download), so it is a script, not a unit test.
#   scripts/check-platforms.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=$(mktemp -d); trap 'rm -rf "$SCRATCH"' EXIT
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# The sidecar (its wheel carries the client package too) and the client's own distribution, both
# from this repository: nothing of ours is looked up on the package index.
quiet python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$SCRATCH/own" . ./client
WHEEL=$(ls "$SCRATCH"/own/marketplace_sidecar-*.whl)
for arch in x86_64 aarch64; do
  # pip does not widen a manylinux_2_36 tag to older glibc tags itself: list them all.
  platforms=(--platform "manylinux2014_$arch")
  for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_$arch"); done
  quiet python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
    --find-links "$SCRATCH/own" -c constraints.txt -d "$SCRATCH/$arch" "$WHEEL[kubernetes]"
  # The SBOM generator runs in the build stage of the same platform (Dockerfile).
  quiet python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
    -d "$SCRATCH/$arch" -r scripts/sbom-requirements.txt
  # name-version of every distribution; compiled ones also listed with their platform tag
  (cd "$SCRATCH/$arch" && ls -1 ./*.whl) | sed 's|^\./||' | sort > "$SCRATCH/$arch.txt"
  cut -d- -f1,2 "$SCRATCH/$arch.txt" > "$SCRATCH/$arch.names"
done
if ! diff -u "$SCRATCH/x86_64.names" "$SCRATCH/aarch64.names"; then
  echo "check-platforms: the two architectures resolve to different distributions" >&2
  exit 1
fi
echo "check-platforms: $(wc -l < "$SCRATCH/x86_64.names") distributions, wheels for both architectures"
echo "compiled wheels (the only architecture-specific files, each present for both):"
grep -v -- '-none-any\.whl$' "$SCRATCH/x86_64.txt" "$SCRATCH/aarch64.txt" | sed 's|^.*/||; s|^|  |'
