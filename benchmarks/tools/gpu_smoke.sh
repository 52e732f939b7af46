#!/usr/bin/env bash
# GPU smoke test (no downloads): ~50 LCM steps of an SD-1.5-sized UNet on 64x64x4 latents with fp16 + SDPA
# (xformers if present), then a 4-step export, reloaded and sampled; then the same on an SDXL-sized and an
# SD3-medium-sized random pipeline (bf16, gradient checkpointing, 1024 px) into OUT/sdxl and OUT/sd3, each run
# at most ~8 minutes. SMOKE_FAMILIES="sd15" (or any subset of "sd15 sdxl sd3") runs fewer.
#   bash benchmarks/tools/gpu_smoke.sh [OUT]        # GPU
#   bash benchmarks/tools/gpu_smoke.sh OUT --tiny   # CPU, tiny sizes (tested in tests/test_scripts.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-/tmp/diffdistill-gpu-smoke}"
shift || true
for family in ${SMOKE_FAMILIES:-sd15 sdxl sd3}; do
  dest="$out"; [ "$family" = sd15 ] || dest="$out/$family"
  PYTHONUNBUFFERED=1 timeout 480 "${PYTHON:-python}" benchmarks/tools/gpu_smoke.py --family "$family" --output "$dest" "$@"
done
