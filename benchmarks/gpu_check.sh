#!/usr/bin/env bash
# The GPU check of issue #6, one command on a machine with an NVIDIA GPU (target: <= 5 minutes after the install):
# installs the GPU stack into .venv (CUDA torch + fbgemm-gpu 1.8.0, scripts/setup_env.sh gpu), then runs the trainer
# on 1 GPU (nccl, row-wise sharding, fused Adam on the tables) next to the same model in one process on the same GPU
# (benchmarks/gpu_check.py), and writes benchmarks/results/gpu_check.json. Extra arguments go to gpu_check.py,
# e.g. `bash benchmarks/gpu_check.sh --rows 2000000 --batch-size 16384`.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash scripts/setup_env.sh gpu
.venv/bin/python -c "import torch, fbgemm_gpu; assert torch.cuda.is_available(), 'CUDA torch sees no GPU'; \
print('[gpu_check] torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
exec timeout 600 .venv/bin/python benchmarks/gpu_check.py --reps 3 --json benchmarks/results/gpu_check.json "$@"
