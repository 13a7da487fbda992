#!/usr/bin/env bash
# First contact with a CUDA machine (no network; torch, triton, pytest, pybind11 and ninja already
# installed; bitsandbytes not needed): build lorakern._C with nvcc, run the CUDA tests and the Triton
# kernel tests on the GPU, then only the benchmark points README's GPU targets name. Logs, env.txt
# (device, versions, commit) and results.jsonl go to OUT.
#   bash benchmarks/gpu_validate.sh OUT             # at most ~8 minutes of wall time
#   bash benchmarks/gpu_validate.sh OUT --dry-run   # every step on the CPU, tiny (CI runs this)
# Each step has its own time limit (timeout kills the step's whole process group), and a failing
# step does not stop the ones after it; the exit status is that of the first failing step.
set -uo pipefail
out=${1:?usage: gpu_validate.sh OUT_DIR [--dry-run]}
dry=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
status=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ($((SECONDS - t0)) s of $limit)" | tee -a "$out/env.txt"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse HEAD 2>/dev/null)"
} > "$out/env.txt" 2>&1

if [ "$dry" = "--dry-run" ]; then
  # The same steps at toy sizes on the CPU: the extension already built, the kernels interpreted.
  export TRITON_INTERPRET=1
  step build 60 python -c "import lorakern._C as C; print('lorakern._C with_cuda', C.with_cuda)"
  step tests_cuda 120 python -m pytest -q -p no:cacheprovider tests/test_nf4_native.py -k "errors"
  step tests_triton 120 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "forward_backward_ranks and 8-torch"
  step bench_lora 120 lorakern-bench --device cpu --suite lora --shapes "64,64,64,16" --providers base,unfused,fused \
    --modes fwd,fwd+bwd --quick --out "$out" --no-progress
  step bench_dropout 120 lorakern-bench --device cpu --suite lora --shapes "64,64,64,16" --providers fused \
    --modes fwd+bwd --dropout 0.1 --quick --out "$out" --no-progress
  step bench_nf4 120 lorakern-bench --device cpu --suite nf4 --shapes "1,128,128,16" --providers fp32,nf4 --quick \
    --out "$out" --no-progress
  step bench_model 120 lorakern-bench --device cpu --suite model --providers peft,fused --quick --out "$out" \
    --no-progress
else
  export TRITON_INTERPRET=0
  # The extension must build with its CUDA kernels here (nvcc present): LORAKERN_CUDA=1 fails loudly if not.
  step build 240 env LORAKERN_REQUIRE_NATIVE=1 LORAKERN_CUDA=1 pip install --no-deps --no-build-isolation -e .
  step tests_cuda 120 python -m pytest -q -p no:cacheprovider -m gpu
  step tests_triton 150 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_qlora.py
  # README's GPU targets: fused fwd vs base, fwd+bwd vs unfused at M=8192, 4096x4096, r=16, bf16;
  # peak memory with dropout 0.1 against 0; NF4 at M=1 on 4096x4096.
  step bench_lora 90 lorakern-bench --suite lora --shapes "8192,4096,4096,16" --providers base,unfused,fused,fused-det \
    --modes fwd,fwd+bwd --out "$out" --no-progress
  step bench_dropout 60 lorakern-bench --suite lora --shapes "8192,4096,4096,16" --providers fused --modes fwd+bwd \
    --dropout 0.1 --out "$out" --no-progress
  step bench_nf4 60 lorakern-bench --suite nf4 --shapes "1,4096,4096,16" --providers bf16,nf4,nf4-dq --out "$out" \
    --no-progress
  # Two Llama-3-8B decoder layers, 4 x 1024 tokens (no bitsandbytes on the GPU machine: dense only).
  step bench_model 90 lorakern-bench --suite model --providers peft,fused --out "$out" --no-progress
fi
tail -n 3 "$out"/tests_*.log
cat "$out/env.txt"
exit $status
