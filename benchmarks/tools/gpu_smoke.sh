#!/usr/bin/env bash
# GPU smoke test (at most ~8 minutes, no downloads): ~50 LCM steps of an SD-1.5-sized UNet on 64x64x4 latents
# with fp16 + SDPA (xformers if present), then a 4-step export, reloaded and sampled.
#   bash benchmarks/tools/gpu_smoke.sh [OUT]        # GPU
#   bash benchmarks/tools/gpu_smoke.sh OUT --tiny   # CPU, tiny sizes (tested in tests/test_scripts.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-/tmp/diffdistill-gpu-smoke}"
shift || true
PYTHONUNBUFFERED=1 exec timeout 480 "${PYTHON:-python}" benchmarks/tools/gpu_smoke.py --output "$out" "$@"
