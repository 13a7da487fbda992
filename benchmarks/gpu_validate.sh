#!/usr/bin/env bash
# On a CUDA machine without network (torch, triton, pytest already installed): install lorakern,
# run the whole test suite on CUDA, run the benchmark suite, and leave logs + results in OUT.
#   bash benchmarks/gpu_validate.sh OUT [bench shapes]
set -uo pipefail
out=${1:?usage: gpu_validate.sh OUT_DIR [shapes]}
shapes=${2:-llama3-8b}
mkdir -p "$out"
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/env.txt" 2>&1
# The native extension must build with its CUDA kernels here (nvcc present): fail loudly if not.
LORAKERN_REQUIRE_NATIVE=1 LORAKERN_CUDA=1 pip install --no-deps --no-build-isolation -v -e . > "$out/install.log" 2>&1
echo "install rc=$?" >> "$out/env.txt"
TRITON_INTERPRET=0 python -m pytest -q -x -m "not slow" > "$out/tests.log" 2>&1
echo "tests rc=$?" >> "$out/env.txt"
lorakern-bench --suite lora --shapes "$shapes" --modes fwd,fwd+bwd --out "$out" --no-progress > "$out/bench.log" 2>&1
echo "bench lora rc=$?" >> "$out/env.txt"
lorakern-bench --suite nf4 --out "$out" --no-progress >> "$out/bench.log" 2>&1
echo "bench nf4 rc=$?" >> "$out/env.txt"
lorakern-bench --suite lora --shapes "4096,4096,4096,16;8192,4096,4096,16" --dropout 0.1 --out "$out" --no-progress \
  >> "$out/bench.log" 2>&1
tail -n 3 "$out/tests.log"
tail -n 40 "$out/bench.log"
