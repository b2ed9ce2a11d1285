#!/usr/bin/env bash
# One short GPU check: every method's CIFAR-10 preset (iCT, the EDM teacher, CD, ECT, sCT, sCD from it) through the real
# Trainer.fit with method_speed.py, float32 and bf16-mixed eager (about 3 minutes on one H200), then
# bf16-mixed with regional torch.compile (each residual block compiled, shared by blocks of one kind: the
# whole-network compile took over 110 s there) and the whole-network compile of EDM while time is left, then
# throughput.py's Lightning-against-plain-loop ratio and MFU for iCT in bf16, while time is left. Reports
# train images/s and peak memory, and sampling images/s per sampler in the float32 runs. Each run is
# bounded by `timeout` and none starts unless it ends within BUDGET seconds (default 470: the whole check
# stays under 8 minutes, so a rerun fits in a 15-minute GPU loan). Needs a CUDA GPU and the package's
# requirements (nothing is installed: the repository root goes on PYTHONPATH). Writes
# benchmarks/results/gpu_*.json (and, if $OUT is set, a tarball of them and the log there after every run).
#
#     bash benchmarks/gpu_check.sh [batch size, default 128] [budget in seconds, default 470]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BATCH="${1:-128}" BUDGET="${2:-470}" LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
save() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" benchmarks/results/gpu_*.json 2>/dev/null; fi; }
run() {  # run <limit s> <method> <precision> [--compile=whole|regional]
  local limit=$1 method=$2 precision=$3 compile=${4:-} sampling="" name
  if (( SECONDS + limit > BUDGET )); then echo "== skipped ${method} ${precision} ${compile}: would pass ${BUDGET} s"; return; fi
  [ "$precision" = 32-true ] || sampling=--no-sampling
  name="gpu_${method}_${precision}${compile:+_compiled_${compile#--compile=}}"
  # Output to a file, not a pipe: compilation workers would hold a pipe open after `timeout` kills the run.
  timeout -k 5 "$limit" python3 benchmarks/method_speed.py --config "configs/cifar10_${method}.yaml" --batch-size "$BATCH" \
    --precision "$precision" $compile $sampling --steps 30 --warmup 10 --repeats 2 --name "$name" > "/tmp/$name.log" 2>&1 \
    || echo "== ${method} ${precision} ${compile}: no result within ${limit} s (exit $?)"
  grep -E "^configs/|Error" "/tmp/$name.log"
  save
}
for method in ict edm cd ect sct scd; do for precision in 32-true bf16-mixed; do run 45 "$method" "$precision"; done; done
for method in edm ict cd ect; do run 150 "$method" bf16-mixed --compile=regional; done
run 240 edm bf16-mixed --compile=whole  # compiling the whole network took over 110 s on the H200
if (( SECONDS + 90 <= BUDGET )); then
  timeout -k 5 90 python3 benchmarks/throughput.py --config configs/cifar10_ict.yaml --device cuda --batch-size "$BATCH" \
    --precision bf16-mixed --steps 40 --warmup 10 --repeats 2 --name gpu_throughput_ict_bf16 > /tmp/throughput.log 2>&1
  grep -E "^configs|sampling:" /tmp/throughput.log
  save
fi
echo "gpu_check done in ${SECONDS} s"
