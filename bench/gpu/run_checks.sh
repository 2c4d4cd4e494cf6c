#!/usr/bin/env bash
# A GPU session's checks in at most two device calls, most important first, inside a deadline:
#   run(command="bash bench/gpu/run_checks.sh 560 a", carry=[".gpu_carry"], timeout_s=600)
#   then at once, on the still-warm machine (the build and wheels stay there):
#   run(command="bash bench/gpu/run_checks.sh <seconds left - 20> b", carry=[".gpu_carry"], timeout_s=...)
# (prepare .gpu_carry with bench/gpu/prepare_carry.sh first). Writes to $OUT: checks.log (every
# step with its seconds), info.txt, junit XMLs, results.tgz (bench/results/*: JSON + markdown per
# benchmark, hardware named).
# Phase a (fits one call): wheels, build of sam3fast._C (CUDA, sm_90) in the background while the
#   boxRPB factor kernel is timed, the test that hung in the last run (alone, stacks on timeout),
#   every tracker row in one process (1, 5, 16 objects: the bank, the per-frame selection, the
#   prefetch switch, the step graphed per object count at 5 and 16), the concept ahead-stream
#   switch, the fixed-capacity bank against the per-frame selection (profiles at 5 objects), image
#   latency (side by side with the official package), the GPU tests that never passed on a GPU.
# Phase b: the assignment's knob and phase tables (split search), the image and 16-object tracker
#   profiles, dwconv_norm, the memory-attention module at 8
#   and 16 objects, the concept-loop profile, the other kernel benchmarks, 64 clicked objects, the
#   official compile baseline, the remaining GPU tests.
# Afterwards (no GPU needed): `python bench/gpu/summarize.py bench/results/*<suffix>.json` puts each
#   kernel case's default launch against its fastest row and the baselines.
set -uo pipefail
BUDGET=${1:-540}
PHASE=${2:-a}
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
echo "== phase $PHASE, budget $BUDGET s" >>"$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } >>"$LOG" 2>&1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 SAM3FAST_BUILD_CUDA=1
# (`pip install -e .` wants to fetch setuptools there, offline: build in place and import from the
# tree; sam3fast.kernels is the top-level kernels/ folder, which an install maps, so link it)
ln -sfn ../kernels sam3fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p bench/results
# first the GPU tests that never ran on a GPU: the decoder's float32 island (rpb kernel with bf16
# q/k/v and float32 bias factors), the float32 trunk stream (residual_norm with a float32 x), the
# tracker's bf16 backbone on float32 frames (failed every sam3fast tracker row of the H200 run of
# 2026-11-27), the memory attention's new SDPA thresholds; the 2026-11-27 run's first batch timed
# out after 43 passes (none failed; -q hid which ran: names are printed now), then the rest
# K and V through tensor descriptors (use_tma, off by default) passed on the H200 of 2026-11-27
TMA_TEST=tests/test_kernel_memory_attention.py::test_gpu_tma_loads_real_shape_bf16
STUCK_TEST="tests/test_linear_epilogues.py::test_cuda_relu_epilogue_bf16"
# (session 15: the ReLU FFNs' cuBLASLt epilogue, a default change on CUDA: test_linear_epilogues, first;
#  session 14: the CUDA assignment's reads and greedy pass, the NMS bit-matrix and scan kernels: test_assignment, test_mask_ops)
FIRST="tests/test_video_graphs.py::test_gpu_ahead_detection_stream_equals_one_stream
 tests/test_tracker_predictor.py::test_cuda_prefetch_backbone_equals_inline_and_makes_no_sync
 tests/test_linear_epilogues.py tests/test_assignment.py tests/test_mask_ops.py tests/test_kernel_rpb_attention.py tests/test_kernel_residual_norm.py tests/test_kernel_layer_norm2d.py
 tests/test_kernel_group_norm.py tests/test_kernel_rpb_factors.py tests/test_kernel_conv_norm_gelu.py
 tests/test_tracker_predictor.py
 tests/test_kernel_memory_attention.py tests/test_memory_attention_fold.py tests/test_kernel_rope_projection.py
 tests/test_memory_attention_fused.py
 tests/test_video_graphs.py tests/test_frame_masks.py tests/test_video_device_growth.py
 tests/test_video_parity.py::test_cuda_concept_frames_make_no_implicit_sync
 tests/test_video_parity.py::test_cuda_pipelined_outputs_ride_in_the_planning_copy tests/test_host_channel.py
 tests/test_vision.py::test_cuda_patch_embed_gemm_form_bf16 tests/test_kernel_fused_linear.py
 tests/test_vision.py::test_cuda_tanh_gelu_epilogue_bf16 tests/test_vision.py::test_cuda_trunk_sdpa_backend_pins_bf16
 tests/test_kernel_rope_attention.py
 tests/test_kernel_dwconv_norm.py tests/test_norms.py tests/test_kernel_two_way_attention.py
 tests/test_kernel_prompt_cross_attention.py tests/test_kernel_mask_postprocess.py tests/test_memory.py
 tests/test_graphed_call.py tests/test_kernel_table_memory.py tests/test_kernel_fold_projection.py"
if [[ $PHASE == a ]]; then
    # what the open issues' speed items are measured by, most important first, sized for a session's
    # 15 minutes of device time (start included): run 2 of 2026-11-27 (H200) spent 497 s on phase a
    # and never reached the rows it was for (the two-stream switches), so those come first now and
    # without the official rows (measured in that run; the decisions compare sam3fast with itself)
    if ls .gpu_carry/*.whl >/dev/null 2>&1; then
        step wheels 400 60 python3 -m pip install -q --no-index --no-deps .gpu_carry/*.whl
    fi
    t_build=$SECONDS
    ( timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "rc=$? in $((SECONDS - t_build)) s" >>"$OUT/build.log" ) &
    BUILD_PID=$!
    # (Triton only, while the build runs) the boxRPB factor kernel rewritten in session 17 after its
    # first form took 57 us a launch (run 2 of 2026-11-27): its rows and tiles against the PyTorch chain
    step bench_rpb 480 45 python3 bench/bench_rpb_attention.py --no-compile
    wait $BUILD_PID
    echo "== build (background): $(tail -1 "$OUT/build.log")" >>"$LOG"
    python3 -m sam3fast.info >"$OUT/info.txt" 2>&1
    # (session 18) the GPU tests of the new defaults the video rows below run on: the memory
    # attention's q/k projections with RoPE in the epilogue and its fused residual norms, the
    # CXBlock's tanh-GELU epilogue (if one fails, the rows after it time a wrong path)
    step new_default_tests 420 60 python3 -m pytest -v -p no:cacheprovider --timeout 50 --timeout-method thread -rfE \
        --durations 0 --junitxml "$OUT/gpu_tests_new_defaults.xml" -m gpu tests/test_kernel_rope_projection.py \
        tests/test_memory_attention_fused.py "tests/test_memory.py::test_cxblock_tanh_gelu_epilogue_on_cuda"
    # the test that hung in run 2 of 2026-11-27, alone: pytest-timeout's thread method prints every
    # thread's stack when it fires (the signal method cannot interrupt a C call)
    step relu_epilogue_test 380 70 python3 -m pytest -v -p no:cacheprovider --timeout 60 --timeout-method thread -rfE \
        --durations 0 --junitxml "$OUT/gpu_test_relu_epilogue.xml" "$STUCK_TEST"
    # One model build for every tracker row phase a needs (run 2 of 2026-11-27 spent its cap on two
    # builds): 1, 5 and 16 objects, e2e and cached (features precomputed), each with the per-frame
    # selection beside the bank;
    # - (session 16) tracker.prefetch_backbone, the next frame's backbone on a side stream beside this
    #   frame's step (60 frames/s at 1 object needs that overlap), e2e;
    # - (session 21) the step graphed at 5 and 16 objects with one capture per object count
    #   (step_buckets "exact"; "auto" runs it eagerly above 2 objects, and the power-of-two buckets
    #   padded 5 objects to 8: 38.8 against 25.2 ms on the H100 of 2026-11-26): does the graph close
    #   the bank's gap to the per-frame selection (cached 19.8 against 14.5 ms at 5 objects, H200)?
    # - (session 17) the memory encoder's fuser in NCHW against its channels-last default, e2e
    # - (session 21) no-fold (cached): "auto" now folds on the Triton kernel at 1-3 objects too
    step bench_video_tracker 330 170 python3 bench/bench_video.py --parts tracker --dtype bfloat16 --frames 24 \
        --objects 1,5,16 --iters 1 --no-compile --no-official --tracker-kinds e2e,cached --graphed-rows \
        --skip-variants eager-step,backbone-eager,fold --out bench/results/tracker
    # (session 16: model.ahead_detection_stream, the next detection on a side stream)
    step bench_video_concept 220 90 python3 bench/bench_video.py --parts concept --dtype bfloat16 --frames 24 \
        --iters 1 --no-compile --no-official --concept-variants ahead-stream --out bench/results/ahead
    # (Triton only) the memory attention's q/k projections with RoPE in the epilogue (session 18,
    # default on CUDA in bf16) against F.linear + the RoPE prepass (3.36 ms a frame at 16 objects in
    # run 2 of 2026-11-27): keep it or set RoPEAttention.fuse_rope_projection back to False
    step bench_rope_projection 170 40 python3 bench/bench_rope_projection.py --no-compile
    # why the official per-frame memory selection beats the fixed-capacity bank from 5 objects
    # (run 2 of 2026-11-27: cached 14.5 against 19.8 ms a frame; the extra keys are 15 %)
    step profile_perframe 150 80 python3 bench/profile_gpu.py --parts tracker --objects 5 \
        --tracker-variants default,perframe --out bench/results/perframe
    # image latency side by side with the official (graphed, batch 1; the trunk's new tanh-GELU
    # default against its exact GELU): 138 s with every row in the first H200 run of 2026-11-27
    step bench_image 80 110 python3 bench/bench_image.py --iters 10 --dtype bfloat16 --cuda-graphs on --batch 0 \
        --trunk-variants exact_gelu
    step gpu_tests_first 30 170 python3 -m pytest -m "gpu and not slow" -v -p no:cacheprovider --timeout 100 \
        --timeout-method thread -rfE --durations 15 --junitxml "$OUT/gpu_tests_first.xml" $FIRST \
        --deselect "$TMA_TEST" --deselect "$STUCK_TEST"
else
    # the rest, on the still-warm machine if device time is left. Measured in run 2 of 2026-11-27
    # (H200) and left out now: the compiled image path (20.5 ms, no gain over the graphs),
    # mask IoU/NMS, trunk attention by backend, fused linear epilogues, the fold profile, the norms.
    # The image and 16-object tracker profiles again: the rewritten rpb_factors, the dwconv_norm and
    # mask-downsampler convolutions at 16 objects (0.67 ms and 1.2 ms a frame in that run)
    # (session 20) the CUDA assignment's searches with their column state in registers and the
    # staged matrix on an odd row stride (one 200x128 problem: 125 us graphed in run 2 of 2026-11-27,
    # 29 K of its 221 K cycles staging through 32-way bank conflicts): the knob table and the phase
    # cycles, registers (the new default) against shared memory (SAM3FAST_LSA_REGS=0)
    # (+ the method table: torch-linear-assignment 0.1.0, carried since session 20, as the issue's baseline)
    step bench_assignment 70 60 python3 bench/bench_assignment.py --profile
    step profile 60 100 python3 bench/profile_gpu.py --parts image,tracker --objects 16
    # the memory-attention module (folded, unfolded; q/k projected with RoPE in the epilogue or with
    # the prepass) where the tracker runs it at 5, 8 and 16 objects: the op's 128x64 w8 tile beat its
    # SDPA path by 17 % at 8 objects in run 2 of 2026-11-27; and what the validity mask costs cuDNN
    # (the fixed bank passes one, the official per-frame memory none: 19.8 against 14.5 ms a frame
    # cached at 5 objects, with 15 % more keys)
    step bench_memory_attention_module 60 75 python3 bench/bench_memory_attention.py --objects 5,8,16 --no-compile \
        --only "module,op (,op fold,op rotated,cudnn" --out "bench/results/memory_attention_module_$(date +%F)"
    # the Triton path as the module calls it since session 18 (q and keys pre-rotated: ROPE_Q off, the
    # static build's spills gone) at 1 and 4 objects, each tile: is 128x64 w8 the better default now,
    # and does the fold pay on Triton at 1 object (255 -> 100 registers)?
    step bench_memory_attention_rotated 50 60 python3 bench/bench_memory_attention.py --objects 1,4 --no-compile \
        --only "rotated" --out "bench/results/memory_attention_rotated_$(date +%F)"
    # (session 20) where the 1-object step's 7.5 ms (H200, graphed; the memory attention's dense
    # work is ~3 ms of it) go: its kernels eagerly, graphs off, two-way kernels as in the capture
    step profile_ungraphed 50 60 python3 bench/profile_gpu.py --parts tracker --objects 1 --tracker-variants ungraphed \
        --out bench/results/ungraphed
    # (session 23) the object table's bookkeeping as 3 Triton kernels against its ~90 PyTorch
    # operations, eager and graphed, at 1, 8, 16 rows; the folded out-projection is one launch now
    # (both visible in the ungraphed profile above)
    step bench_table_memory 30 30 python3 bench/bench_table_memory.py
    # dwconv_norm: never timed (its bench failed its own check in the first H200 run of 2026-11-27)
    step bench_dwconv_norm 40 40 python3 bench/bench_dwconv_norm.py --no-compile
    # the mask downsampler's first two stages in one pass (sam3fast::conv_norm_gelu, session 17)
    # against cuDNN's convolution + the norm kernel (1.2 ms a frame for the 4 -> 16 conv at 16 objects)
    step bench_norms 40 40 python3 bench/bench_norms.py --no-compile
    # (session 18) the CXBlock's pwconv1 with cuBLASLt's tanh-GELU epilogue, 16 objects
    step bench_fused_linear 40 45 python3 bench/bench_fused_linear.py --no-compile
    # the concept loop's by-stage profile (cut at 44 s in run 2 of 2026-11-27)
    step profile_concept 45 90 python3 bench/profile_gpu.py --parts concept
    step bench_mask_postprocess 40 60 python3 bench/bench_mask_postprocess.py --no-compile
    # (+ the memory attention's add + norm at 1 and 16 objects: MemoryAttention.fuse_residual_norm)
    step bench_residual_norm 40 60 python3 bench/bench_residual_norm.py --no-compile
    # a fixed-capacity bank with 4 of 7 memory frames masked (a young or occluded track): SDPA
    # computes the masked keys, the Triton kernel skips their tiles
    step bench_memory_attention_pad4 40 60 python3 bench/bench_memory_attention.py --objects 5,16 --pad-frames 4 \
        --no-compile --no-fold --out "bench/results/memory_attention_pad4_$(date +%F)"
    step bench_two_way 40 60 python3 bench/bench_two_way_attention.py --no-compile
    step bench_prompt_ca 40 45 python3 bench/bench_prompt_cross_attention.py --no-compile
    step bench_video_tracker64 90 150 python3 bench/bench_video.py --parts tracker --dtype bfloat16 --frames 16 \
        --objects 64 --iters 1 --no-compile --out bench/results/n64
    # the official image model with its own compile option (torch.compile of its ViT and pixel
    # decoder; #6 asks for that baseline too), in its bf16 autocast
    step bench_image_official_compile 120 170 python3 bench/bench_image.py --iters 5 --official-compile --no-sam3fast
    step gpu_tests_rest 40 150 python3 -m pytest -m "gpu and not slow" -q -p no:cacheprovider --timeout 100 \
        --timeout-method thread -rfE --durations 15 --junitxml "$OUT/gpu_tests_rest.xml" tests \
        $(for f in $FIRST; do echo --deselect "$f"; done) --deselect "$STUCK_TEST"
fi
tar czf "$OUT/results.tgz" bench/results 2>>"$LOG"
echo "== phase $PHASE done in $((SECONDS - START)) s" >>"$LOG"
