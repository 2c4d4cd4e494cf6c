// The CPU mask kernels (csrc/cpu/mask_iou.cpp) against bit-by-bit brute force: areas, IoU (exact
// float32 equality) and greedy NMS, on random masks with empty, full and duplicated ones, odd K.
// Usage: test_mask_iou [cases]. Exit 0 = pass, 1 = failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/mask_iou.h"
#include "check.h"

namespace {

int64_t bits_of(const uint32_t* m, int64_t K) {
  int64_t c = 0;
  for (int64_t k = 0; k < K; ++k)
    for (int t = 0; t < 32; ++t) c += (m[k] >> t) & 1u;
  return c;
}

int64_t common_bits(const uint32_t* a, const uint32_t* b, int64_t K) {
  int64_t c = 0;
  for (int64_t k = 0; k < K; ++k)
    for (int t = 0; t < 32; ++t) c += ((a[k] & b[k]) >> t) & 1u;
  return c;
}

std::vector<uint32_t> random_masks(std::mt19937& rng, int64_t n, int64_t K) {
  std::vector<uint32_t> m(n * K);
  std::uniform_int_distribution<uint32_t> word;
  std::uniform_int_distribution<int> kind(0, 9);
  for (int64_t i = 0; i < n; ++i) {
    const int k = kind(rng);
    for (int64_t w = 0; w < K; ++w) {
      uint32_t v = word(rng);
      if (k == 0) v = 0;                          // empty
      else if (k == 1) v = 0xffffffffu;           // full
      else if (k < 5) v &= word(rng) & word(rng);  // sparse
      m[i * K + w] = v;
    }
    if (k == 2 && i > 0) {
      for (int64_t w = 0; w < K; ++w) m[i * K + w] = m[(i - 1) * K + w];  // duplicate
    }
  }
  return m;
}

void check_case(std::mt19937& rng, int64_t N, int64_t M, int64_t K) {
  const std::vector<uint32_t> a = random_masks(rng, N, K), b = random_masks(rng, M, K);
  std::vector<int64_t> area_a(N), area_b(M);
  sam3fast::mask_areas_cpu(a.data(), 0, N, K, area_a.data());
  sam3fast::mask_areas_cpu(b.data(), 0, M, K, area_b.data());
  for (int64_t i = 0; i < N; ++i) CHECK(area_a[i] == bits_of(&a[i * K], K), "area %lld", (long long)i);
  std::vector<float> iou(N * M, NAN);
  // Two row ranges, so a range that does not start at a multiple of 4 is covered.
  const int64_t split = N / 3;
  sam3fast::mask_iou_cpu(a.data(), b.data(), 0, split, M, K, area_a.data(), area_b.data(), iou.data());
  sam3fast::mask_iou_cpu(a.data(), b.data(), split, N, M, K, area_a.data(), area_b.data(), iou.data());
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < M; ++j) {
      const int64_t inter = common_bits(&a[i * K], &b[j * K], K);
      const int64_t uni = bits_of(&a[i * K], K) + bits_of(&b[j * K], K) - inter;
      const float want = static_cast<float>(static_cast<double>(inter) / (uni > 0 ? uni : 1));
      CHECK(iou[i * M + j] == want, "iou (%lld, %lld) of (%lld x %lld, K=%lld): %g vs %g",
            (long long)i, (long long)j, (long long)N, (long long)M, (long long)K, iou[i * M + j], want);
    }
  }
  // NMS: brute force greedy on descending score (ties by index), strict > threshold.
  std::vector<float> scores(N);
  std::vector<char> valid(N);
  std::uniform_int_distribution<int> level(0, 5);
  for (int64_t i = 0; i < N; ++i) {
    scores[i] = level(rng) / 5.0f;  // many ties
    valid[i] = level(rng) != 0;
  }
  for (const float thr : {0.0f, 0.1f, 0.5f, 1.0f}) {
    std::vector<char> keep(N, 2);
    sam3fast::mask_nms_cpu(a.data(), scores.data(), reinterpret_cast<const bool*>(valid.data()), N, K,
                           thr, reinterpret_cast<bool*>(keep.data()));
    std::vector<char> want(N, 0), done(N, 0);
    for (int64_t step = 0; step < N; ++step) {
      int64_t best = -1;
      for (int64_t i = 0; i < N; ++i)
        if (!done[i] && (best < 0 || scores[i] > scores[best])) best = i;
      done[best] = 1;
      if (!valid[best]) continue;
      bool suppressed = false;
      for (int64_t j = 0; j < N; ++j) {
        if (!want[j]) continue;
        const int64_t inter = common_bits(&a[j * K], &a[best * K], K);
        suppressed |= sam3fast::iou_from_counts(inter, area_a[j], area_a[best]) > thr;
      }
      want[best] = !suppressed;
    }
    for (int64_t i = 0; i < N; ++i)
      CHECK(keep[i] == want[i], "nms keep[%lld] (N=%lld, K=%lld, thr=%g): %d vs %d", (long long)i,
            (long long)N, (long long)K, thr, keep[i], want[i]);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int64_t> count(0, 13), words(0, 11);
  for (int c = 0; c < cases; ++c) check_case(rng, count(rng), count(rng), words(rng));
  check_case(rng, 17, 9, 301);  // long masks: the 64-bit loop plus a tail word
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("mask_iou: %d cases passed\n", cases + 1);
  return 0;
}
