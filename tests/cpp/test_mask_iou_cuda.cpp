// The CUDA mask kernels (csrc/cuda/mask_iou.cu) against the CPU ones on a real device: areas, IoU
// and NMS must be bit-identical. Sizes cover one tile, split-K (few tiles, long masks), many tiles
// and the staged / unstaged NMS scan. Exit 0 = pass, 77 = no CUDA device (ctest skip), 1 = failure.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/mask_iou.h"
#include "cuda/mask_iou.h"
#include "check.h"

namespace {

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d), sizeof(T) * (v.empty() ? 1 : v.size())));
  if (!v.empty()) CUDA_OK(cudaMemcpy(d, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  if (n) CUDA_OK(cudaMemcpy(v.data(), d, sizeof(T) * n, cudaMemcpyDeviceToHost));
  return v;
}

std::vector<uint32_t> random_masks(std::mt19937& rng, int64_t n, int64_t K) {
  std::vector<uint32_t> m(n * K);
  std::uniform_int_distribution<uint32_t> word;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t density = i % 7;  // 0: empty ... sparse ... dense
    for (int64_t w = 0; w < K; ++w) {
      uint32_t v = density == 0 ? 0u : word(rng);
      for (uint32_t d = 1; d < density && d < 4; ++d) v &= word(rng);
      m[i * K + w] = v;
    }
  }
  return m;
}

void check(int64_t N, int64_t M, int64_t K, std::mt19937& rng) {
  const auto a = random_masks(rng, N, K), b = random_masks(rng, M, K);
  std::vector<int64_t> area_a(N), area_b(M);
  sam3fast::mask_areas_cpu(a.data(), 0, N, K, area_a.data());
  sam3fast::mask_areas_cpu(b.data(), 0, M, K, area_b.data());
  std::vector<float> want(N * M);
  sam3fast::mask_iou_cpu(a.data(), b.data(), 0, N, M, K, area_a.data(), area_b.data(), want.data());

  uint32_t *da = to_device(a), *db = to_device(b);
  float* diou = to_device(std::vector<float>(N * M, -1.0f));
  int64_t* dareas = to_device(std::vector<int64_t>(N, -1));
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&ws, sam3fast::mask_iou_cuda_workspace_bytes(N, M) + 1));
  CUDA_OK(sam3fast::mask_areas_cuda(da, N, K, dareas, nullptr));
  CUDA_OK(sam3fast::mask_iou_cuda(da, db, N, M, K, diou, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(diou, N * M);
  const auto got_areas = to_host(dareas, N);
  for (int64_t i = 0; i < N; ++i) g_failures += got_areas[i] != area_a[i];
  int64_t bad = 0;
  for (int64_t t = 0; t < N * M; ++t) bad += got[t] != want[t];
  if (bad) std::fprintf(stderr, "FAIL iou %lld x %lld, K=%lld: %lld entries differ\n", (long long)N, (long long)M, (long long)K, (long long)bad);
  g_failures += bad > 0;

  std::vector<float> scores(N);
  std::vector<char> valid(N);
  std::uniform_int_distribution<int> level(0, 9);
  for (int64_t i = 0; i < N; ++i) {
    scores[i] = level(rng) / 9.0f;  // ties
    valid[i] = level(rng) != 0;
  }
  float* dscores = to_device(scores);
  bool* dvalid = reinterpret_cast<bool*>(to_device(valid));
  bool* dkeep = reinterpret_cast<bool*>(to_device(std::vector<char>(N, 2)));
  void* nws = nullptr;
  CUDA_OK(cudaMalloc(&nws, sam3fast::mask_nms_cuda_workspace_bytes(N) + 1));
  for (const float thr : {0.0f, 0.05f, 0.3f, 1.0f}) {
    std::vector<char> keep(N);
    sam3fast::mask_nms_cpu(a.data(), scores.data(), reinterpret_cast<const bool*>(valid.data()), N, K,
                           thr, reinterpret_cast<bool*>(keep.data()));
    CUDA_OK(sam3fast::mask_nms_cuda(da, dscores, dvalid, N, K, thr, dkeep, nws, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const auto gk = to_host(reinterpret_cast<char*>(dkeep), N);
    int64_t diff = 0;
    for (int64_t i = 0; i < N; ++i) diff += gk[i] != keep[i];
    if (diff) std::fprintf(stderr, "FAIL nms N=%lld K=%lld thr=%g: %lld differ\n", (long long)N, (long long)K, thr, (long long)diff);
    g_failures += diff > 0;
  }
  for (void* p : {(void*)da, (void*)db, (void*)diou, (void*)dareas, ws, (void*)dscores, (void*)dvalid, (void*)dkeep, nws})
    CUDA_OK(cudaFree(p));
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(7);
  const int64_t cases[][3] = {{1, 1, 1}, {5, 3, 7}, {64, 64, 33}, {65, 130, 9}, {200, 200, 2592},
                              {16, 16, 64800}, {300, 40, 100}, {3000, 8, 5}, {12500, 2, 3}};
  for (const auto& c : cases) check(c[0], c[1], c[2], rng);
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("mask_iou_cuda: all cases passed\n");
  return 0;
}
