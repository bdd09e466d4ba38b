#!/usr/bin/env bash
# The GPU check, in one go (< 8 min) on a machine with CUDA, torch and transformers but no network:
# installs the wheels scripts/gpu/prepare.sh put in .whl/, then compares evalfleet's hf backend with
# lm-eval's on a random-weight ~1B Llama built on the GPU in bf16 (MC, HellaSwag/MMLU-shaped and
# generation tasks): per-sample agreement, tokens/s for both, MFU against the bf16 matmul peak; then
# the dtype decision: a rank on the GPU asked `auto` by a driver that sees no GPU loads bf16.
#     scripts/gpu/check.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch, transformers, lm_eval, evalfleet; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" scripts/gpu/check_vs_lmeval.py "${1:-gpu_check.json}"
