#!/usr/bin/env bash
# One device call that does a GPU session's checks, most important first, inside a deadline:
#   run(command="bash bench/gpu/run_checks.sh 540", carry=[".gpu_carry"], timeout_s=600)
# (prepare .gpu_carry with bench/gpu/prepare_carry.sh first). Writes to $OUT (at most 8 files
# come back): checks.log (everything, step by step with seconds), info.txt, gpu_tests.xml,
# gpu_tests_first.xml, results.tgz (bench/results/*: JSON + markdown per benchmark, hardware named).
# Steps: install carried wheels, build sam3fast._C with CUDA for sm_90, `python -m sam3fast.info`,
# the GPU tests (pytest -m gpu: kernels at real shapes in bf16, CUDA-graph replays, sync-free
# video steps, flat device memory), then benchmarks while time is left.
set -uo pipefail
BUDGET=${1:-540}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/checks.log"
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
step() {  # step NAME MIN_SECONDS_LEFT CAP_SECONDS CMD...
    local name=$1 need=$2 cap=$3; shift 3
    local l; l=$(left)
    if (( l < need )); then echo "== $name: skipped ($l s left, needs $need)" >>"$LOG"; return 0; fi
    (( cap > l - 5 )) && cap=$((l - 5))
    echo "== $name (cap ${cap}s, ${l}s left)" >>"$LOG"
    local t0=$SECONDS
    timeout -k 5 "$cap" "$@" >>"$LOG" 2>&1
    echo "== $name: rc=$? in $((SECONDS - t0)) s" >>"$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } >>"$LOG" 2>&1
if ls .gpu_carry/*.whl >/dev/null 2>&1; then
    step wheels 400 60 python3 -m pip install --no-index --no-deps .gpu_carry/*.whl
fi
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 SAM3FAST_BUILD_CUDA=1
# (`pip install -e .` wants to fetch setuptools there, offline: build in place and import from the
# tree; sam3fast.kernels is the top-level kernels/ folder, which an install maps, so link it)
step build 380 240 python3 setup.py build_ext --inplace
ln -sfn ../kernels sam3fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m sam3fast.info >"$OUT/info.txt" 2>&1
# first the GPU tests that have never passed on a GPU (CUDA C++ ops, flat memory and sync-free video
# steps, image graphs, the two kernel tests whose rule changed after the 2026-11-25 H200 run), then
# the rest (Triton kernels at real shapes: 39 of 42 passed there)
FIRST="tests/test_assignment.py tests/test_mask_ops.py tests/test_video_graphs.py tests/test_video_parity.py tests/test_tracker_predictor.py
 tests/test_video_io.py tests/test_image_graphs.py tests/test_memory.py tests/test_kernel_mask_postprocess.py
 tests/test_kernel_two_way_attention.py"
step gpu_tests_first 300 240 python3 -m pytest -m "gpu and not slow" -q -p no:cacheprovider --timeout 150 -rfE \
    --junitxml "$OUT/gpu_tests_first.xml" $FIRST
step gpu_tests_rest 200 180 python3 -m pytest -m "gpu and not slow" -q -p no:cacheprovider --timeout 150 -rfE \
    --junitxml "$OUT/gpu_tests.xml" tests $(for f in $FIRST; do echo --deselect "$f"; done)
mkdir -p bench/results
step bench_memory_attention 120 100 python3 bench/bench_memory_attention.py
step bench_video_tracker 150 140 python3 bench/bench_video.py --parts tracker --dtype bfloat16
step bench_scaling 100 90 python3 bench/bench_scaling.py --frames 32 --iters 2
step bench_two_way 60 60 python3 bench/bench_two_way_attention.py
step bench_rpb 60 60 python3 bench/bench_rpb_attention.py
step bench_prompt_ca 60 60 python3 bench/bench_prompt_cross_attention.py
step bench_mask_postprocess 60 60 python3 bench/bench_mask_postprocess.py
step bench_mask_for_memory 50 50 python3 bench/bench_mask_for_memory.py
step bench_image 90 90 python3 bench/bench_image.py
tar czf "$OUT/results.tgz" bench/results 2>>"$LOG"
echo "== done in $((SECONDS - START)) s" >>"$LOG"
