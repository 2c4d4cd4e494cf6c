// Mask areas, IoU and NMS on bit-packed masks (see mask_iou.h for the exact semantics).
//
// IoU: a 4 x 4 register tile of (row, column) pairs walks the K words 64 bits at a time, so each
// loaded word feeds four popcounts. On x86-64 the hot loops are compiled twice (with and without
// the POPCNT instruction, picked at load time): a build for the generic x86-64 target would
// otherwise turn every popcount into a bit-twiddling sequence, ~4x slower.
#include "mask_iou.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SAM3FAST_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define SAM3FAST_POPCNT_CLONES
#endif

namespace sam3fast {
namespace {

inline uint64_t load64(const uint32_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

SAM3FAST_POPCNT_CLONES
int64_t count_bits(const uint32_t* m, int64_t K) {
  int64_t c = 0;
  int64_t k = 0;
  for (; k + 1 < K; k += 2) c += __builtin_popcountll(load64(m + k));
  if (k < K) c += __builtin_popcount(m[k]);
  return c;
}

SAM3FAST_POPCNT_CLONES
int64_t count_common_bits(const uint32_t* a, const uint32_t* b, int64_t K) {
  int64_t c = 0;
  int64_t k = 0;
  for (; k + 1 < K; k += 2) c += __builtin_popcountll(load64(a + k) & load64(b + k));
  if (k < K) c += __builtin_popcount(a[k] & b[k]);
  return c;
}

// inter[r * 4 + c] = common bits of a[r] and b[c] for an R x C tile (R, C <= 4); rows/columns past
// R, C point at row 0 / column 0 and their counts are ignored by the caller.
template <int R, int C>
SAM3FAST_POPCNT_CLONES void tile_counts(const uint32_t* const* a, const uint32_t* const* b,
                                        int64_t K, int64_t* inter) {
  int64_t acc[R][C] = {};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    uint64_t av[R], bv[C];
    for (int r = 0; r < R; ++r) av[r] = load64(a[r] + k);
    for (int c = 0; c < C; ++c) bv[c] = load64(b[c] + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += __builtin_popcountll(av[r] & bv[c]);
  }
  if (k < K) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += __builtin_popcount(a[r][k] & b[c][k]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) inter[r * 4 + c] = acc[r][c];
}

}  // namespace

void mask_areas_cpu(const uint32_t* masks, int64_t begin, int64_t end, int64_t K, int64_t* areas) {
  for (int64_t n = begin; n < end; ++n) areas[n] = count_bits(masks + n * K, K);
}

void mask_iou_cpu(const uint32_t* a, const uint32_t* b, int64_t row_begin, int64_t row_end,
                  int64_t M, int64_t K, const int64_t* areas_a, const int64_t* areas_b,
                  float* iou) {
  for (int64_t i0 = row_begin; i0 < row_end; i0 += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, row_end - i0));
    const uint32_t* ap[4];
    for (int r = 0; r < 4; ++r) ap[r] = a + (i0 + (r < rows ? r : 0)) * K;
    for (int64_t j0 = 0; j0 < M; j0 += 4) {
      const int cols = static_cast<int>(std::min<int64_t>(4, M - j0));
      const uint32_t* bp[4];
      for (int c = 0; c < 4; ++c) bp[c] = b + (j0 + (c < cols ? c : 0)) * K;
      int64_t inter[16];
      if (rows == 4 && cols == 4) {
        tile_counts<4, 4>(ap, bp, K, inter);
      } else {
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) inter[r * 4 + c] = count_common_bits(ap[r], bp[c], K);
      }
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
          iou[(i0 + r) * M + j0 + c] =
              iou_from_counts(inter[r * 4 + c], areas_a[i0 + r], areas_b[j0 + c]);
        }
      }
    }
  }
}

void mask_nms_cpu(const uint32_t* masks, const float* scores, const bool* valid, int64_t N,
                  int64_t K, float iou_threshold, bool* keep) {
  std::vector<int64_t> order;
  order.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    keep[n] = false;
    if (valid == nullptr || valid[n]) order.push_back(n);
  }
  // Descending score, NaN first (as torch.sort(descending=True) and the official numpy argsort
  // reversed), ties by lower index: a stable sort on "a goes before b".
  std::stable_sort(order.begin(), order.end(), [scores](int64_t x, int64_t y) {
    const float sx = scores[x], sy = scores[y];
    const bool nx = std::isnan(sx), ny = std::isnan(sy);
    if (nx || ny) return nx && !ny;
    return sx > sy;
  });
  std::vector<int64_t> areas(N);
  mask_areas_cpu(masks, 0, N, K, areas.data());
  // Candidates still alive after the current one, compacted in place as masks get suppressed, so
  // that only pairs (kept mask, live candidate) are ever counted.
  std::vector<int64_t> live(order);
  size_t head = 0;
  while (head < live.size()) {
    const int64_t i = live[head++];
    keep[i] = true;
    const uint32_t* mi = masks + i * K;
    size_t out = head;
    for (size_t t = head; t < live.size(); ++t) {
      const int64_t j = live[t];
      const int64_t inter = count_common_bits(mi, masks + j * K, K);
      if (!(iou_from_counts(inter, areas[i], areas[j]) > iou_threshold)) live[out++] = j;
    }
    live.resize(out);
  }
}

}  // namespace sam3fast
