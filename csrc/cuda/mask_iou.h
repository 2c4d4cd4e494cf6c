// Mask areas, pairwise mask IoU and greedy mask NMS on bit-packed masks, on a CUDA stream (no torch
// headers). Same layout and semantics as csrc/cpu/mask_iou.h; results are bit-identical to the CPU
// kernels. Nothing here synchronises with the host, and every output has a fixed shape.
//
// Masks are row-major (count, K) uint32 words, K = H * WP, bits past the image width 0. Every
// function returns cudaErrorInvalidValue for sizes it cannot launch (K * 32 >= 2**31, more than
// 4 M masks, or NMS over more masks than its scan's shared memory holds), else the launch status.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace sam3fast {

// areas (N) int64 = set bits per mask.
cudaError_t mask_areas_cuda(const uint32_t* masks, int64_t N, int64_t K, int64_t* areas,
                            cudaStream_t stream);

// Scratch bytes mask_iou_cuda needs (256-byte aligned base).
size_t mask_iou_cuda_workspace_bytes(int64_t N, int64_t M);

// iou (N, M) float32, row-major.
cudaError_t mask_iou_cuda(const uint32_t* a, const uint32_t* b, int64_t N, int64_t M, int64_t K,
                          float* iou, void* workspace, cudaStream_t stream);

// Scratch bytes mask_nms_cuda needs (256-byte aligned base).
size_t mask_nms_cuda_workspace_bytes(int64_t N);

// keep (N) bool. scores (N) float32; valid (N) bool or null (all valid).
cudaError_t mask_nms_cuda(const uint32_t* masks, const float* scores, const bool* valid, int64_t N,
                          int64_t K, float iou_threshold, bool* keep, void* workspace,
                          cudaStream_t stream);

}  // namespace sam3fast
