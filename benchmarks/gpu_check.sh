#!/usr/bin/env bash
# One short GPU check (meant to finish within 8 minutes on one recent GPU; not yet run on one): the CIFAR-10 preset network trained for a few
# hundred steps in float32 and bf16-mixed, each eager and with torch.compile, printing images/s against
# a plain PyTorch loop, FLOPs/MFU and one- and two-step sampling images/s. Needs a CUDA GPU and the
# package's requirements installed (pip install -e .); writes benchmarks/results/gpu_*.json.
#
#     bash benchmarks/gpu_check.sh [batch size per GPU, default 128]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
BATCH="${1:-128}"
for precision in 32-true bf16-mixed; do
  for compile in "" "--compile"; do
    name="gpu_cifar10_${precision}${compile:+_compiled}"
    echo "== CIFAR-10 preset net, batch ${BATCH}, ${precision}${compile:+, torch.compile}"
    python benchmarks/throughput.py --config configs/cifar10_ict.yaml --device cuda --batch-size "${BATCH}" \
      --precision "${precision}" ${compile} --steps 100 --warmup 25 --repeats 1 --name "${name}"
  done
done
