#!/usr/bin/env bash
# The GPU check of issue 16, prepared for a lent CUDA machine: the CUDA tests, then the
# benchmark with --device cuda (throughput section included), in about 8 minutes.
#
#   bash scripts/device_check.sh prepare   # here, with PyPI reachable: wheels the GPU image
#                                          # lacks (nnsight and the packages it needs), in .whl/
#   bash scripts/device_check.sh           # there: install .whl/, test, benchmark
#
# Through the device tool: run(command="bash scripts/device_check.sh", carry=[".whl"],
# timeout_s=600). Everything it writes goes under $OUT (default runs/device_check):
#   env.txt        GPU, driver, torch and CUDA versions
#   tests.log      pytest -rs on the CUDA, sparse and prefetch tests; a CUDA test that is
#                  SKIPPED on a GPU machine fails the check (a skip is not a pass)
#   benchmark.json / benchmark.txt / benchmark.log   the results, the table, the log
# Exit status: 0 when every stage passed; otherwise the number of stages that failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# The GPU image (Python 3.12) has torch, transformers, accelerate, safetensors, tokenizers;
# these are what it lacks. Versions: the ones this project's environment was checked with.
WHEELS=(nnsight==0.8.1 zstandard==0.25.0 greenlet==3.5.6 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        websocket-client==1.9.2 einops==0.8.2)

if [ "${1:-run}" = prepare ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for spec in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$spec" || { echo "could not fetch $spec" >&2; exit 1; }
  done
  ls .whl
  exit 0
fi

OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
failed=0

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, nnsight; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available()); print('nnsight', nnsight.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device (or torch/nnsight missing: see $OUT/env.txt); this check is for a GPU" >&2
  exit 2
fi

# 1. Tests (about 2 minutes): the CUDA paths, and the sparse/prefetch tests on this machine.
timeout 150 "$PY" -m pytest tests/test_cuda.py tests/test_sparse.py tests/test_prefetch.py \
  -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "TESTS FAILED" >&2; failed=$((failed + 1)); }
if grep -q "^SKIPPED.*test_cuda.py" "$OUT/tests.log"; then
  echo "CUDA TESTS WERE SKIPPED ON A GPU MACHINE" >&2; failed=$((failed + 1))
fi

# 2. Benchmark (about 5 minutes): steps against the matmul rate, TopK against ReLU, the
# guard, and the throughput section (two model shapes, widths 8192 / 32768 / 131072).
timeout 300 "$PY" scripts/benchmark.py --device cuda \
  --sections train_step,topk_step,guard,throughput --json "$OUT/benchmark.json" \
  > "$OUT/benchmark.txt" 2> "$OUT/benchmark.log"
[ $? -eq 0 ] || { echo "BENCHMARK FAILED (see benchmark.log)" >&2; failed=$((failed + 1)); }
cat "$OUT/benchmark.txt"
tail -5 "$OUT/benchmark.log"
echo "device check: $failed stage(s) failed"
exit "$failed"
