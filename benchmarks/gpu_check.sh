#!/usr/bin/env bash
# One prepared GPU session for issue #22 (about 8 minutes on an H200), run from the repository
# root on a machine whose python3 has a CUDA torch. It needs no install of diffplan: the repository
# root goes on PYTHONPATH, with envs/ linked as diffplan.envs (as the wheel installs it). Wheels in
# .whl/ (gymnasium and what it needs, when the machine lacks them) are installed to /tmp/site.
# Writes the log and benchmarks/RESULTS.md to $OUT (default: runs/gpu_check).
#   DIFFPLAN_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# It loads seven checkpoints (pointmaze-umaze/{diffuser,anchored,trajectory_diffuser}, walker2d-medium/diffuser, hopper-medium/{diffuser,
# critic,anchored}): where the tree must be small to travel, a copy with just those will do (the
# 2026-12-04 run used a throwaway branch without the others: 12 MB, plus 36 MB of wheels).
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -e diffplan/envs ] || ln -s ../envs diffplan/envs
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MUJOCO_GL=egl
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_graphs.py tests/test_train_trainer.py \
      tests/test_data_windows.py 2>&1 | tail -25
  echo "== benchmark"
  timeout 420 python3 benchmarks/cuda_graphs.py --replans 100 --train-steps 200 --compile
} 2>&1 | tee "$OUT/gpu_check.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
