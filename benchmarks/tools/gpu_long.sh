#!/usr/bin/env bash
# Longer training of the digits-SD presets on one GPU, side by side, then `diffdistill bench` of every
# student and of the teacher's own solvers (same seeds, same GPU), packed into $OUT (collect.py).
# Each job trains for MINUTES of wall time (--max-train-minutes) at a larger batch than the CPU presets.
#   OUT=/tmp/gpu_long bash benchmarks/tools/gpu_long.sh            # every method, 9 jobs (about 8 minutes)
#   OUT=/tmp/gpu_long SET=lcm MINUTES=3 bash benchmarks/tools/gpu_long.sh   # LCM with a slow student EMA
#   OUT=/tmp/x DEVICE=cpu MINUTES=0.2 SAMPLES=20 PROG_ITERS=2 BATCH=8 bash benchmarks/tools/gpu_long.sh  # plumbing
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT}; DEVICE=${DEVICE:-cuda}; MINUTES=${MINUTES:-4.5}; SAMPLES=${SAMPLES:-1000}; SET=${SET:-all}
PROG_ITERS=${PROG_ITERS:-800}; BATCH=${BATCH:-256}; BENCH_BATCH=${BENCH_BATCH:-250}
W=${WORK:-/tmp/gpu_long_runs}; rm -rf "$W"; mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python}  # the interpreter that has diffdistill installed (tests pass their own)
DD=("$PY" -m diffdistill.cli)
(nvidia-smi || true; "$PY" -c "import torch,diffusers,transformers,peft,accelerate;print(torch.__version__,diffusers.__version__,transformers.__version__,peft.__version__,accelerate.__version__)") > "$W/env.txt" 2>&1
common="--benchmark-samples 0 --checkpointing-steps 1000 --validation-steps 1000 --log-every 20 --max-train-minutes $MINUTES"
job() {  # name, preset, extra flags...
  local name=$1 preset=$2; shift 2
  "${DD[@]}" distill --config "train_scripts/digits/$preset.yaml" --output "$W/$name" $common "$@" > "$W/$name.log" 2>&1
  echo "$name distill rc=$?" >> "$W/status.txt"
}
bench() {  # name, flags..., folders...
  local name=$1; shift
  "${DD[@]}" bench --output "$W/bench_$name" --num-samples $SAMPLES --device $DEVICE --batch-size $BENCH_BATCH --no-progress "$@" \
    > "$W/bench_$name.log" 2>&1
  echo "bench $name rc=$?" >> "$W/status.txt"
}
smoke() {  # SD-1.5-sized fp16 LCM smoke test of the CUDA path, 10 steps
  [ "$DEVICE" = cuda ] || return 0
  timeout 200 "$PY" benchmarks/tools/gpu_smoke.py --output "$W/smoke" --steps 10 > "$W/smoke.log" 2>&1
  echo "smoke rc=$?" >> "$W/status.txt"
}

t0=$(date +%s)
if [ "$SET" = lcm ]; then
  job lcm_ema_b256 lcm --batch-size 256 --max-train-steps 100000 --w-max 3 --student-ema-decay 0.999 &
  job lcm_ema_b64 lcm --batch-size 64 --max-train-steps 100000 --w-max 3 --student-ema-decay 0.999 &
  smoke &
else
  job lcm_w1-8 lcm --batch-size $BATCH --max-train-steps 100000 &
  job lcm_w1-3 lcm --batch-size $BATCH --max-train-steps 100000 --w-max 3 &
  job lcm_lora lcm_lora --batch-size $BATCH --max-train-steps 100000 &
  job progressive progressive --batch-size $BATCH --guidance-iters $PROG_ITERS --iters-per-stage $PROG_ITERS \
    --max-train-minutes $("$PY" -c "print($MINUTES * 1.3)") &
  job add add --batch-size 128 --max-train-steps 100000 &
  job add_ema add --batch-size 128 --max-train-steps 100000 --student-ema-decay 0.999 &
  job dmd dmd --batch-size 128 --max-train-steps 100000 &
  job dmd_ema_reg dmd --batch-size 128 --max-train-steps 100000 --student-ema-decay 0.999 --regression-weight 0.25 &
  job sds sds --batch-size 128 --max-train-steps 100000 &
fi
wait
echo "training wall s: $(( $(date +%s) - t0 ))" >> "$W/status.txt"

t1=$(date +%s)
if [ "$SET" = lcm ]; then
  bench lcm_ema --steps 1,2,4,8 --guidance 1.5,7.5 "$W/lcm_ema_b256/pipeline" "$W/lcm_ema_b64/pipeline" \
    --labels lcm_ema_b256,lcm_ema_b64 &
  wait
  "$PY" benchmarks/tools/gpu_long_collect.py "$W" "$OUT" lcm_ema_b256 lcm_ema_b64
  exit
fi
bench teacher assets/digits-sd --steps 1,2,4,8,50 --guidance 1.5 \
  --schedulers "ddim:timestep_spacing=trailing,dpmsolver++:timestep_spacing=trailing" &
bench lcm --steps 1,2,4,8 --guidance 1.5 "$W/lcm_w1-8/pipeline" "$W/lcm_w1-3/pipeline" --labels lcm_w1-8,lcm_w1-3 &
bench lcm_lora --steps 1,2,4,8 --guidance 1 "$W/lcm_lora/pipeline" --labels lcm_lora &
prog=(); labels=()
for d in "$W"/progressive/stages/*_steps; do [ -d "$d" ] && prog+=("$d") && labels+=("$(basename "$d")"); done
[ ${#prog[@]} -gt 0 ] && bench progressive --steps 1,2,4,8 --guidance 1.5 "${prog[@]}" --labels "$(IFS=,; echo "${labels[*]}")" &
bench add --steps 1,2,4 --guidance 1 "$W/add/pipeline" "$W/add_ema/pipeline" --labels add,add_ema &
bench dmd --steps 1 --guidance 1 "$W/dmd/pipeline" "$W/dmd_ema_reg/pipeline" "$W/sds/pipeline" \
  --labels dmd,dmd_ema_reg,sds &
smoke &
wait
echo "bench wall s: $(( $(date +%s) - t1 ))" >> "$W/status.txt"
"$PY" benchmarks/tools/gpu_long_collect.py "$W" "$OUT"
