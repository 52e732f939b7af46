#!/bin/bash
# export_snapshot.sh RUN_DIR SNAPSHOT OUTPUT: export RUN_DIR/snaps/SNAPSHOT.safetensors (from multi_ema.py) as a
# pipeline, through `diffdistill export` on a scratch run folder whose latest checkpoint carries it as its EMA.
set -euo pipefail
run=$(realpath "$1"); snap="$run/snaps/$2.safetensors"; out=$3
[ -f "$snap" ] || { echo "no snapshot $snap" >&2; exit 1; }
ckpt=$(ls -d "$run"/checkpoints/checkpoint-* | sort -t- -k2 -n | tail -1)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/checkpoints/$(basename "$ckpt")"
cp "$run/config.yaml" "$run/diffdistill.json" "$tmp/"
for f in "$ckpt"/*; do case $f in */ema.safetensors) ;; *) ln -s "$f" "$tmp/checkpoints/$(basename "$ckpt")/";; esac; done
ln -s "$snap" "$tmp/checkpoints/$(basename "$ckpt")/ema.safetensors"
"${PYTHON:-python}" -m diffdistill.cli export "$tmp" --output "$out"  # PYTHON: the interpreter with diffdistill
