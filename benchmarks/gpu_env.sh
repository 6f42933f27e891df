# Sourced by the GPU scripts (gpu_smoke.sh, gpu_bench.sh) with the modules they need, e.g.
#   source "$(dirname "$0")/gpu_env.sh" "hydra, torchdata"
# The GPU machine has no network: when those modules are missing, the wheels in .whl/ are installed
# into /tmp/site. Then: the repository root as working folder and on PYTHONPATH, W&B off, $OUT set
# (default /tmp), and the torch version and GPU printed.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python3 -c "import $1" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled OUT=${OUT:-/tmp}
python3 -c "import torch;print('torch', torch.__version__, torch.cuda.get_device_name())"
