#!/usr/bin/env bash
# One device session's checks (about 8 minutes on one H100/H200, no downloads): the host-sync cost of the
# training loop (benchmarks/tools/host_sync.py: digits-SD LCM and DMD, an SD-1.5-sized LCM) and the GPU smoke
# test (benchmarks/tools/gpu_smoke.sh). Wheels in .whl/ (e.g. diffusers, which that machine's image lacks) are
# installed to /tmp/site first.
#   bash benchmarks/tools/gpu_session.sh OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: gpu_session.sh OUT}"
mkdir -p "$out"
source benchmarks/tools/gpu_env.sh
timeout 300 python3 benchmarks/tools/host_sync.py --output "$out" --sd15 --repeats 2 2>&1 | grep -v "it/s\]" | tail -60
PYTHON=python3 timeout 220 bash benchmarks/tools/gpu_smoke.sh /tmp/smoke 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -40
cp /tmp/smoke/results.json "$out/smoke_results.json" 2>/dev/null || echo "no smoke results"
