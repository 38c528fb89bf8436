#!/usr/bin/env bash
# The test command of README.md: install, lint, run the test suite (unit tests on tiny models plus a
# few end-to-end tests on the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check svdzip tests benchmarks
.venv/bin/lint-imports --no-cache --no-logo  # the layering in pyproject.toml: imports only point down
.venv/bin/pytest -q -p no:cacheprovider "$@"
