// The CUDA assignment kernel (csrc/cuda/assignment.cu) against the CPU solver on a real device.
// Exit 0 = pass, 77 = no CUDA device (ctest SKIP_RETURN_CODE), 1 = failure.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/assignment.h"
#include "cuda/assignment.h"
#include "check.h"

namespace {

template <typename T>
double cost_of(const T* c, int n, int m, const int64_t* a) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    if (a[i] >= 0) s += double(c[i * m + a[i]]);
  }
  return s;
}

// B problems of (n, m); kind 0 uniform, 1 small-integer ties, 2 +inf entries.
template <typename T>
void run_case(int B, int n, int m, int kind, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uni(-10.0, 10.0);
  std::uniform_int_distribution<int> small(0, 2);
  std::uniform_real_distribution<double> p(0.0, 1.0);
  std::vector<T> cost(size_t(B) * n * m);
  for (auto& x : cost) {
    x = kind == 1 ? T(small(rng)) : T(uni(rng));
    if (kind == 2 && p(rng) < 0.5) x = std::numeric_limits<T>::infinity();
  }
  if (B > 3) cost[size_t(2) * n * m] = std::numeric_limits<T>::quiet_NaN();

  T* d_cost = nullptr;
  int64_t* d_a = nullptr;
  bool* d_f = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d_cost), cost.size() * sizeof(T) + 1));
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d_a), size_t(B) * n * sizeof(int64_t) + 1));
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d_f), size_t(B) + 1));
  CUDA_OK(cudaMemcpy(d_cost, cost.data(), cost.size() * sizeof(T), cudaMemcpyHostToDevice));
  CUDA_OK(sam3fast::linear_sum_assignment_cuda(d_cost, B, n, m, d_a, d_f, nullptr));
  std::vector<int64_t> a(size_t(B) * n);
  std::vector<char> f(B);
  CUDA_OK(cudaMemcpy(a.data(), d_a, a.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(f.data(), d_f, f.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(d_cost));
  CUDA_OK(cudaFree(d_a));
  CUDA_OK(cudaFree(d_f));

  std::vector<int64_t> ref(n);
  sam3fast::LsaWorkspace ws;
  for (int b = 0; b < B; ++b) {
    const T* c = cost.data() + size_t(b) * n * m;
    const bool ok = sam3fast::linear_sum_assignment_cpu(c, n, m, ref.data(), ws) == sam3fast::LsaStatus::kOk;
    const int64_t* got = a.data() + size_t(b) * n;
    CHECK(bool(f[b]) == ok, "%dx%d kind %d problem %d: feasible %d, cpu %d", n, m, kind, b, int(f[b]), int(ok));
    if (!ok) {
      for (int i = 0; i < n; ++i) CHECK(got[i] == -1, "infeasible problem %d has a[%d]=%lld", b, i, (long long)got[i]);
      continue;
    }
    std::vector<int> used(m, 0);
    int count = 0;
    for (int i = 0; i < n; ++i) {
      if (got[i] < 0) continue;
      CHECK(got[i] < m && !used[got[i]]++, "problem %d: bad or repeated column %lld", b, (long long)got[i]);
      ++count;
    }
    CHECK(count == (n < m ? n : m), "problem %d: %d pairs", b, count);
    const double want = cost_of(c, n, m, ref.data()), have = cost_of(c, n, m, got);
    CHECK(std::fabs(have - want) <= 1e-9 * (1.0 + std::fabs(want)), "%dx%d kind %d problem %d: cost %.17g, cpu %.17g",
          n, m, kind, b, have, want);
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  const int shapes[][2] = {{1, 1}, {5, 5}, {7, 3}, {3, 7}, {32, 32}, {33, 40}, {64, 64}, {100, 60},
                           {256, 256}, {200, 256}, {256, 100}, {700, 500}};
  unsigned seed = 1;
  for (const auto& s : shapes) {
    for (int kind = 0; kind < 3; ++kind) {
      const int B = s[0] * s[1] > 10000 ? 3 : 64;
      run_case<float>(B, s[0], s[1], kind, seed++);
      run_case<double>(B, s[0], s[1], kind, seed++);
    }
  }
  run_case<float>(5000, 8, 12, 0, seed++);
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("assignment cuda: all checks passed\n");
  return 0;
}
