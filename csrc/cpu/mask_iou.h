// Mask areas, pairwise mask IoU and greedy mask NMS on bit-packed masks, on the CPU (no torch
// headers: the standalone CMake build links it too).
//
// A mask is K = H * WP 32-bit words (the (H, WP) rows of sam3fast's packed layout, bit j of word k
// of row y = pixel (y, 32 k + j)) and the bits past the image width must be 0. Only the words
// matter here, so a mask set is a row-major (count, K) array of uint32.
//
// IoU is computed exactly as the official sam3.perflib.masks_ops.mask_iou:
//   iou = float(inter) / max(float(union), 1)   (float32; 0 when both masks are empty)
// NMS is the official sam3.perflib.nms.nms_masks after its score prefilter: visit the valid masks in
// descending score order (NaN first, ties by lower index), keep one unless a kept mask has
// iou > float(iou_threshold) with it (compared in float32).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SAM3FAST_HOST_DEVICE __host__ __device__
#else
#define SAM3FAST_HOST_DEVICE
#endif

namespace sam3fast {

// areas[n] = number of set bits of mask n, for n in [begin, end).
void mask_areas_cpu(const uint32_t* masks, int64_t begin, int64_t end, int64_t K, int64_t* areas);

// iou[i, j] (row-major (N, M)) for rows i in [row_begin, row_end), all M columns.
// areas_a (N) and areas_b (M) are mask_areas_cpu of a and b.
void mask_iou_cpu(const uint32_t* a, const uint32_t* b, int64_t row_begin, int64_t row_end,
                  int64_t M, int64_t K, const int64_t* areas_a, const int64_t* areas_b,
                  float* iou);

// keep[n] (N) for the greedy NMS described above. valid may be null (all valid).
void mask_nms_cpu(const uint32_t* masks, const float* scores, const bool* valid, int64_t N,
                  int64_t K, float iou_threshold, bool* keep);

// The IoU formula shared by every kernel, so that CPU and CUDA results are bit-identical (IEEE
// float32 division on both; the counts are exact integers, rounded to float32 like the official).
SAM3FAST_HOST_DEVICE inline float iou_from_counts(int64_t inter, int64_t area_a, int64_t area_b) {
  const float uni = static_cast<float>(area_a + area_b - inter);
  return static_cast<float>(inter) / (uni < 1.0f ? 1.0f : uni);
}

}  // namespace sam3fast
