# Sourced by the GPU session scripts (gpu_session.sh, gpu_dmd2.sh) from the repository root: installs the wheels
# in .whl/ (e.g. diffusers, which the device image lacks) to /tmp/site, sets the environment (offline, unbuffered,
# this checkout first) and prints the device and the library versions.
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L 2>&1 || echo "no nvidia-smi"
"${PY:-python3}" -c "import torch, diffusers, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
