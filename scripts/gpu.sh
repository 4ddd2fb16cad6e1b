#!/usr/bin/env bash
# The GPU pass, for a machine with a CUDA GPU and a CUDA build of torch: builds memkernels._C with
# its CUDA kernels in place (skipped when one is already there, e.g. carried from an earlier run),
# then runs the stages named, in order, each logged to $LOGS/<stage>.log:
#   test [pytest args]   the whole pytest suite, on cpu and cuda (the `device` fixture takes both)
#   test-cuda-cpp [args] the kernel tests again on cuda with MEMKERNELS_BACKEND=cuda: the CUDA C++
#                        kernels where an op has them (Triton otherwise)
#   smoke                every bench with --quick: a crash test of the bench scripts on cuda
#   bench                bench/activations.py, linear.py and feedback.py (each with --pick-backends),
#                        host_overhead.py, checkpoint.py: result files under bench/results,
#                        cuda_backends.json
# Usage: bash scripts/gpu.sh test -n 16 ; bash scripts/gpu.sh smoke bench
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-build/gpu-logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

# The GPU image's CC/CXX (/opt/gcc) are a wrapper that links libstdc++ statically, which setup.py
# refuses (see check_shared_libstdcxx): the system's GCC, where there is one, links it as torch does.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
if ! ls memkernels/_C*.so >/dev/null 2>&1; then
  echo "== build (CUDA, sm ${TORCH_CUDA_ARCH_LIST:-9.0})"
  start=$SECONDS
  MEMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc --all) \
    $PY setup.py build_ext --inplace >"$LOGS/build.log" 2>&1 || { tail -60 "$LOGS/build.log"; exit 1; }
  echo "built in $((SECONDS - start)) s"
fi
$PY -c "import torch, triton, memkernels._C as C
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print('torch', torch.__version__, 'triton', triton.__version__, gpu, 'CUDA C++:', C.with_cuda)"

status=0
# A stage's arguments run up to the next stage's name.
is_stage() { [[ $1 == test || $1 == test-cuda-cpp || $1 == smoke || $1 == bench ]]; }
stage_ok() { local rc=$1 name=$2; echo "== $name: exit $rc"; [ "$rc" = 0 ] || status=1; }
while [ $# -gt 0 ]; do
  stage=$1; shift
  case $stage in
    test)
      args=()
      while [ $# -gt 0 ] && ! is_stage "$1"; do args+=("$1"); shift; done
      $PY -m pytest -q -rfE -p no:cacheprovider "${args[@]}" 2>&1 | tee "$LOGS/test.log" | tail -n 60
      stage_ok "${PIPESTATUS[0]}" test ;;
    test-cuda-cpp)
      args=()
      while [ $# -gt 0 ] && ! is_stage "$1"; do args+=("$1"); shift; done
      MEMKERNELS_BACKEND=cuda $PY -m pytest -q -rfE -p no:cacheprovider "${args[@]}" tests/test_ops.py \
        tests/test_functional.py tests/test_gated.py tests/test_compress.py \
        tests/test_feedback_ops.py 2>&1 | tee "$LOGS/test_cuda_cpp.log" | tail -n 40
      stage_ok "${PIPESTATUS[0]}" test-cuda-cpp ;;
    smoke)
      # --quick: linear, host_overhead and checkpoint write no result files; the other two write
      # theirs in $LOGS.
      for bench in activations linear feedback host_overhead checkpoint; do
        out=(); [[ $bench == activations || $bench == feedback ]] && out=(--out "$LOGS/smoke")
        $PY bench/$bench.py --quick "${out[@]}" >"$LOGS/smoke_$bench.log" 2>&1
        rc=$?; tail -n 5 "$LOGS/smoke_$bench.log"; stage_ok $rc "smoke $bench"
      done ;;
    bench)
      $PY bench/activations.py --no-compile --pick-backends 2>&1 | tee "$LOGS/bench_activations.log" | tail -n 30
      stage_ok "${PIPESTATUS[0]}" "bench activations"
      for bench in linear feedback host_overhead checkpoint; do
        pick=(); [[ $bench == linear || $bench == feedback ]] && pick=(--pick-backends)
        $PY bench/$bench.py "${pick[@]}" 2>&1 | tee "$LOGS/bench_$bench.log" | tail -n 30
        stage_ok "${PIPESTATUS[0]}" "bench $bench"
      done ;;
    *) echo "unknown stage $stage (test, test-cuda-cpp, smoke, bench)"; exit 2 ;;
  esac
done
exit $status
