#!/usr/bin/env bash
# DMD2 on the GPU budget (issue #20), one device session of at most 8 minutes: trains the GPU presets named in
# PRESETS ("NAME:STEPS ...", train_scripts/digits/NAME_gpu.yaml; default dmd2_gpu.yaml at 1 step and
# dmd2_4step_gpu.yaml at 4, backward simulation) side by side on the one GPU, each capped at 4.0 minutes of
# training (--max-train-minutes); the teacher's cells (DPM-Solver++ trailing, 1/2/4/50 steps) are benchmarked
# meanwhile into the bench cache; then one `diffdistill bench` of the exports and the teacher as
# benchmarks/final/README.md does (N = 2,000, held-out seeds 100000.., the folders' own guidance: students 1.0,
# teacher 1.5; paired intervals: each student at its steps against the teacher at 50, and at every step count
# against the teacher at the same). OUT gets small files: report.json, report.md, one grid per student, each
# training log, the run summaries (one file) and session.log. Every step is bounded by `timeout`.
#   bash benchmarks/tools/gpu_dmd2.sh OUT            # on the GPU (wheels in .whl/ are installed first)
#   PRESETS="dmd:1 dmd2_4step_reg:4" bash benchmarks/tools/gpu_dmd2.sh OUT   # the recipes with the regression term
#   bash benchmarks/tools/gpu_dmd2.sh OUT --tiny     # the same plumbing on a CPU: 3 steps, batch 8, N = 100
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: gpu_dmd2.sh OUT [--tiny]}"
tiny="${2:-}"
PY=${PYTHON:-python3}
read -r -a presets <<< "${PRESETS:-dmd2:1 dmd2_4step:4}"
names=(); labels=""; pipes=(); compare=""
for p in "${presets[@]}"; do
  names+=("${p%%:*}"); labels+="${labels:+,}${p%%:*}"
  compare+="${compare:+,}${p%%:*}@${p##*:}:teacher@50,${p%%:*}:teacher"
done
W=${WORK:-/tmp/gpu_dmd2_runs}
rm -rf "$W"; mkdir -p "$W" "$out"
log="$W/session.log"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }
source benchmarks/tools/gpu_env.sh >> "$log" 2>&1
cat "$log"

if [ "$tiny" = "--tiny" ]; then
  N=100; DEVICE=cpu; BENCH_BATCH=50; TRAIN_S=600; BENCH_S=900
  train=(--max-train-steps 3 --batch-size 8 --validation-steps 0 --lr-warmup-steps 0 --max-train-minutes 4.0)
  cache=(--no-cache)
else
  N=2000; DEVICE=cuda; BENCH_BATCH=250; TRAIN_S=330; BENCH_S=100
  train=(--max-train-minutes 4.0)
  cache=()
fi
common=(--num-samples "$N" --seed 100000 --device "$DEVICE" --batch-size "$BENCH_BATCH" --no-progress "${cache[@]}")

# the teacher with its best training-free solver as its own scheduler (benchmarks/final/README.md)
timeout 60 "$PY" benchmarks/tools/teacher_with_solver.py assets/digits-sd "$W/teacher-dpmpp" \
  "dpmsolver++:timestep_spacing=trailing" >> "$log" 2>&1 || stamp "teacher copy failed"

stamp "training ${names[*]} (_gpu.yaml) side by side (4.0 minutes of training each)"
for name in "${names[@]}"; do
  pipes+=("$W/$name/pipeline")
  timeout "$TRAIN_S" "$PY" -m diffdistill.cli distill --config "train_scripts/digits/${name}_gpu.yaml" \
    --output "$W/$name" --benchmark-samples 0 --log-every 20 "${train[@]}" > "$W/$name.log" 2>&1 &
done
# the teacher's cells meanwhile, into the bench cache that the final bench reads (GPU only: on a CPU they
# would only slow the training down, and the tiny mode does not cache)
if [ -z "$tiny" ]; then
  timeout "$TRAIN_S" "$PY" -m diffdistill.cli bench "$W/teacher-dpmpp" --labels teacher --steps 1,2,4,50 \
    --output "$W/bench_teacher" "${common[@]}" > "$W/bench_teacher.log" 2>&1 &
fi
for job in $(jobs -p); do wait "$job"; echo "job $job rc=$?" >> "$log"; done
stamp "training done"
for name in "${names[@]}"; do
  { echo "$name:"; tr '\r' '\n' < "$W/$name.log" | grep "\[diffdistill\]\|rror" | tail -4; } | tee -a "$log"
done

stamp "bench: the students and the teacher, N = $N"
timeout "$BENCH_S" "$PY" -m diffdistill.cli bench "${pipes[@]}" "$W/teacher-dpmpp" \
  --labels "$labels,teacher" --steps 1,2,4,50 --output "$W/bench" "${common[@]}" --compare "$compare" \
  > "$W/bench.log" 2>&1
stamp "bench rc=$?"
tail -5 "$W/bench.log" | tee -a "$log"

cp "$W/bench/report.json" "$W/bench/report.md" "$out/" 2>/dev/null || stamp "no bench report"
for pair in "${presets[@]}"; do
  name=${pair%%:*} steps=${pair##*:}
  grid=$(ls "$W"/bench/grids/*_"${name}"_steps"${steps}".png 2>/dev/null | head -1)
  [ -n "$grid" ] && cp "$grid" "$out/grid_${name}_steps${steps}.png"
  cp "$W/$name/logs.csv" "$out/logs_${name}.csv" 2>/dev/null || stamp "no logs for $name"
done
"$PY" - "$W" "$out/summaries.json" "${names[@]}" <<'PYEOF' >> "$log" 2>&1
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
runs = {n: json.loads((w / n / "summary.json").read_text()) for n in sys.argv[3:] if (w / n / "summary.json").is_file()}
Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
for n, s in runs.items():
    print(n, "steps", s.get("train_steps"), "minutes", s.get("train_minutes"), "stopped by", s.get("stopped_by"),
          "peak MB", s.get("peak_memory_mb"))
PYEOF
stamp "total"
cp "$log" "$out/session.log"
