#!/usr/bin/env bash
# Prepared GPU check of the vLLM plugin (not yet run: no GPU was available when written).
# Needs a CUDA machine with the CUDA `vllm` wheel installable (its own venv: vLLM pins
# transformers < 5.20). Usage: bash benchmarks/vllm_gpu_check.sh [VENV]
#   1. token parity of the plugin against mogu.generate (fp32, TP 1; TP 2 when 2 GPUs)
#      and the OpenAI server: tests/test_vllm.py (the Triton op runs the fused path);
#   2. the throughput row: a Llama-2-7B-shaped model (dummy weights), bf16, CUDA graphs
#      and torch.compile on (--no-eager), MoGU vs base.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/mogu-venv-vllm-gpu}"
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "vllm==0.32.*"
"$PY" -m pip install -q ninja setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e ".[test,vllm]"
"$PY" -c "import torch, vllm, mogu_kernels; print(torch.__version__, vllm.__version__, torch.cuda.get_device_name(0), mogu_kernels.available_backends())"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
SEL="not tensor_parallel"
[ "$GPUS" -ge 2 ] && SEL=""
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py ${SEL:+-k "$SEL"}
"$PY" benchmarks/vllm_throughput.py --shape llama-7b --dtype bfloat16 --prompts 256 --prompt-len 128 \
    --max-tokens 128 --no-eager --gpu-memory-utilization 0.85 --out runs/vllm_bench_gpu
