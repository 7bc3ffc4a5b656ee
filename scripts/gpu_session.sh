#!/usr/bin/env bash
# On a machine with a CUDA GPU (e.g. a lent device machine, from the repository root):
#   scripts/gpu_session.sh check    the CUDA tests, the throughput of one run alone against several at once,
#                                   and the benchmarks (GPU figures of the performance page)
#   scripts/gpu_session.sh study    the GPU study, resumable: run it again until it says "complete"; with
#                                   STOP_AFTER=MINUTES it starts no new run after that time (for calls with a limit)
# Fashion-MNIST comes from /usr/share/datasets/fashion-mnist, or from .devdata/fashion-mnist (copied there).
# Results land in $OUT (or ./gpu-out): results_gpu_study.json, results_cuda.json, the study's export as a tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-out}
mkdir -p "$out"
if [[ ! -d /usr/share/datasets/fashion-mnist && -d .devdata/fashion-mnist ]]; then
  mkdir -p /usr/share/datasets && cp -r .devdata/fashion-mnist /usr/share/datasets/
fi
python3 -c "import aace" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
case ${1:-} in
  check)
    python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_amp.py tests/test_step.py \
      tests/test_sam.py 2>&1 | tee "$out/cuda_tests.log"
    python3 -m benchmarks.gpu_study --out "$out/results_gpu_study.json"
    python3 -m benchmarks --device cuda --out "$out/results_cuda.json" ;;
  study)
    python3 -m aace study --profile gpu --workers "${WORKERS:-6}" --runs-dir runs-gpu \
      ${STOP_AFTER:+--stop-after "$STOP_AFTER"} --export results/gpu-fashion-mnist || status=$?
    [[ -d results/gpu-fashion-mnist ]] && tar -czf "$out/gpu-fashion-mnist.tgz" results/gpu-fashion-mnist
    exit "${status:-0}" ;;
  *) echo "usage: scripts/gpu_session.sh check|study" >&2; exit 2 ;;
esac
