#!/usr/bin/env bash
# The Python environment of a product image: a fresh virtualenv holding only the client package
# (client/) and what it declares (PyJWT, cryptography), installed from the package index with the
# repository's constraints, exactly as docs/client.md tells a product to. Used by the tests.
#   scripts/client-venv.sh DIR [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: scripts/client-venv.sh DIR [PYTHON]}
"${2:-python3}" -m venv "$DIR"
"$DIR/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt ./client
