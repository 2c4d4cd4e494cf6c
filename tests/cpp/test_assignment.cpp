// Standalone checks of the assignment solvers against brute force (no torch, no GPU).
//
// 1. csrc/cpu/assignment.cpp on random small problems (uniform, small-integer ties, +inf
//    entries, infeasible, rectangular both ways, empty), NaN/-inf rejection.
// 2. The CUDA block algorithm (csrc/cuda/assignment_block.cuh) run on the host: std::threads
//    stand in for the CUDA threads of one block. "Warp" mode exchanges the argmin candidates
//    through relaxed atomics only (like __shfl_xor_sync: values, no memory ordering), "block" mode
//    through a mutex barrier (like __syncthreads). Built with -fsanitize=thread, any shared-memory
//    access the algorithm's barriers do not order is reported as a data race.
//
// Usage: sam3fast_test_assignment [problems_per_case]   (exit 0 = pass)
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "cpu/assignment.h"
#include "cuda/assignment_block.cuh"
#include "check.h"

namespace {

using sam3fast::LsaStatus;
using sam3fast::lsa_block::LsaCand;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Minimum over all injective maps of the shorter side into the longer one; +inf if none avoids inf.
template <typename T>
double brute_force(const std::vector<T>& cost, int n, int m) {
  if (n == 0 || m == 0) return 0.0;
  const bool tr = m < n;
  const int R = tr ? m : n, C = tr ? n : m;
  auto at = [&](int r, int c) { return tr ? double(cost[c * m + r]) : double(cost[r * m + c]); };
  std::vector<int> cols(C);
  double best = kInf;
  // Enumerate R-permutations of C: permute all C and take the first R, skipping repeats of the
  // tail order by only counting sorted tails.
  for (int j = 0; j < C; ++j) cols[j] = j;
  do {
    if (!std::is_sorted(cols.begin() + R, cols.end())) continue;
    double s = 0.0;
    for (int r = 0; r < R; ++r) s += at(r, cols[r]);
    best = std::min(best, s);
  } while (std::next_permutation(cols.begin(), cols.end()));
  return best;
}

// Validates an assignment and returns its total cost (+inf if it uses a forbidden pair).
template <typename T>
double assignment_cost(const std::vector<T>& cost, int n, int m, const int64_t* a,
                       const char* what) {
  std::vector<int> used(m, 0);
  int count = 0;
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    if (a[i] == -1) continue;
    CHECK(a[i] >= 0 && a[i] < m, "%s: row %d -> column %lld out of range", what, i, (long long)a[i]);
    if (a[i] < 0 || a[i] >= m) return kInf;
    CHECK(!used[a[i]]++, "%s: column %lld used twice", what, (long long)a[i]);
    s += double(cost[i * m + a[i]]);
    ++count;
  }
  CHECK(count == std::min(n, m), "%s: %d pairs for a %dx%d problem", what, count, n, m);
  return s;
}

template <typename T>
std::vector<T> random_problem(std::mt19937& rng, int n, int m, int kind) {
  std::vector<T> c(size_t(n) * m);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<double> p(0.0, 1.0);
  const double inf_rate = kind == 2 ? 0.3 : (kind == 3 ? 0.7 : 0.0);
  for (auto& x : c) {
    x = kind == 1 ? T(small(rng)) : T(uni(rng) * 100.0);
    if (p(rng) < inf_rate) x = std::numeric_limits<T>::infinity();
  }
  return c;
}

// Checks one solver answer against brute force.
template <typename T>
void check_answer(const std::vector<T>& c, int n, int m, const int64_t* a, bool ok,
                  const char* what) {
  const double best = brute_force(c, n, m);
  CHECK(ok == (best < kInf), "%s %dx%d: feasible=%d but brute force %g", what, n, m, int(ok), best);
  if (!ok) {
    for (int i = 0; i < n; ++i) CHECK(a[i] == -1, "%s: infeasible problem with a[%d]=%lld", what, i, (long long)a[i]);
    return;
  }
  const double got = assignment_cost(c, n, m, a, what);
  const double tol = 1e-9 * (1.0 + std::fabs(best));
  CHECK(std::fabs(got - best) <= tol, "%s %dx%d: cost %.17g, optimum %.17g", what, n, m, got, best);
}

template <typename T>
void test_cpu(int problems) {
  std::mt19937 rng(1234 + sizeof(T));
  std::uniform_int_distribution<int> dim(0, 6);
  sam3fast::LsaWorkspace ws;
  for (int k = 0; k < problems; ++k) {
    const int n = dim(rng), m = dim(rng), kind = k % 4;
    const auto c = random_problem<T>(rng, n, m, kind);
    std::vector<int64_t> a(n, 7);
    const LsaStatus s = sam3fast::linear_sum_assignment_cpu(c.data(), n, m, a.data(), ws);
    CHECK(s != LsaStatus::kInvalid, "cpu: finite matrix reported invalid");
    check_answer(c, n, m, a.data(), s == LsaStatus::kOk, "cpu");
  }
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), -std::numeric_limits<T>::infinity()}) {
    std::vector<T> c = {T(1), T(2), bad, T(4)};
    std::vector<int64_t> a(2, 7);
    CHECK(sam3fast::linear_sum_assignment_cpu(c.data(), 2, 2, a.data(), ws) == LsaStatus::kInvalid,
          "cpu: NaN/-inf not reported invalid");
    CHECK(a[0] == -1 && a[1] == -1, "cpu: invalid problem left assignments");
  }
}

// ---- the CUDA block algorithm on host threads ----

struct EmuShared {
  int nt;
  bool warp_mode;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<LsaCand> buf[2];
  std::vector<char> flags;
  // Warp mode: one slot per thread and buffer; key_gen = (step << 32) | key.
  struct Slot {
    std::atomic<uint64_t> value_bits{0};
    std::atomic<uint64_t> key_gen{~uint64_t{0}};
  };
  std::vector<Slot> slots[2];

  EmuShared(int nt_, bool warp) : nt(nt_), warp_mode(warp), flags(nt_) {
    for (int p = 0; p < 2; ++p) {
      buf[p].resize(nt_);
      slots[p] = std::vector<Slot>(nt_);
    }
  }

  void barrier() {
    std::unique_lock<std::mutex> lk(mu);
    const uint64_t g = generation;
    if (++arrived == nt) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lk, [&] { return generation != g; });
    }
  }
};

struct EmuBlock {
  EmuShared* s;
  int t;
  int parity = 0;
  uint64_t step = 0;

  int tid() const { return t; }
  int size() const { return s->nt; }
  void sync() { s->barrier(); }
  bool any(bool p) {
    s->flags[t] = p;
    s->barrier();
    bool r = false;
    for (int i = 0; i < s->nt; ++i) r = r || s->flags[i];
    return r;
  }
  LsaCand argmin(LsaCand c) {
    const int p = parity;
    parity ^= 1;
    LsaCand best = c;
    if (s->warp_mode) {
      const uint64_t g = step++;
      uint64_t bits;
      std::memcpy(&bits, &c.value, 8);
      s->slots[p][t].value_bits.store(bits, std::memory_order_relaxed);
      s->slots[p][t].key_gen.store((g << 32) | uint32_t(c.key), std::memory_order_relaxed);
      for (int i = 0; i < s->nt; ++i) {
        uint64_t kg;
        while (((kg = s->slots[p][i].key_gen.load(std::memory_order_relaxed)) >> 32) != g) {
          std::this_thread::yield();
        }
        const uint64_t vb = s->slots[p][i].value_bits.load(std::memory_order_relaxed);
        LsaCand o;
        std::memcpy(&o.value, &vb, 8);
        o.key = int(uint32_t(kg));
        if (sam3fast::lsa_block::cand_less(o, best)) best = o;
      }
      return best;
    }
    s->buf[p][t] = c;
    s->barrier();
    best = s->buf[p][0];
    for (int i = 1; i < s->nt; ++i) {
      if (sam3fast::lsa_block::cand_less(s->buf[p][i], best)) best = s->buf[p][i];
    }
    return best;
  }
};

template <typename T, bool kStage>
bool run_block(const std::vector<T>& c, int n, int m, int nt, bool warp, int64_t* out) {
  const int R = std::min(n, m), C = std::max(n, m);
  const int64_t bytes = sam3fast::lsa_block::lsa_smem_layout(R, C, kStage ? sizeof(T) : 0).total;
  std::vector<double> smem(bytes / 8 + 1, std::nan(""));
  EmuShared shared(nt, warp);
  bool feasible = false;
  std::vector<std::thread> threads;
  for (int t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      EmuBlock blk{&shared, t};
      sam3fast::lsa_block::solve_block<T, kStage>(blk, c.data(), n, m, out, &feasible,
                                                  reinterpret_cast<unsigned char*>(smem.data()));
    });
  }
  for (auto& th : threads) th.join();
  return feasible;
}

template <typename T, bool kStage>
void test_block(int problems, int nt, bool warp) {
  std::mt19937 rng(99 + nt + 7 * warp + 13 * kStage + sizeof(T));
  std::uniform_int_distribution<int> dim(0, 6);
  char what[64];
  std::snprintf(what, sizeof(what), "block(nt=%d,%s,%s,%s)", nt, warp ? "warp" : "barrier",
                kStage ? "staged" : "global", sizeof(T) == 4 ? "f32" : "f64");
  for (int k = 0; k < problems; ++k) {
    const int n = dim(rng), m = dim(rng);
    const auto c = random_problem<T>(rng, n, m, k % 4);
    std::vector<int64_t> a(n, 7);
    const bool ok = run_block<T, kStage>(c, n, m, nt, warp, a.data());
    check_answer(c, n, m, a.data(), ok, what);
  }
  // Larger problems (several columns per thread, long augmenting paths) against the CPU solver.
  sam3fast::LsaWorkspace ws;
  for (int k = 0; k < 6; ++k) {
    const int n = 20 + 11 * k, m = 75 - 9 * k;
    const auto c = random_problem<T>(rng, n, m, k % 2);
    std::vector<int64_t> a(n, 7), ref(n);
    const bool ok = run_block<T, kStage>(c, n, m, nt, warp, a.data());
    const bool ref_ok =
        sam3fast::linear_sum_assignment_cpu(c.data(), n, m, ref.data(), ws) == LsaStatus::kOk;
    CHECK(ok && ref_ok, "%s %dx%d: feasible %d, cpu %d", what, n, m, int(ok), int(ref_ok));
    const double got = assignment_cost(c, n, m, a.data(), what);
    const double want = assignment_cost(c, n, m, ref.data(), "cpu");
    CHECK(std::fabs(got - want) <= 1e-9 * (1.0 + std::fabs(want)), "%s %dx%d: cost %.17g, cpu %.17g",
          what, n, m, got, want);
  }
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), -std::numeric_limits<T>::infinity()}) {
    std::vector<T> c = {T(1), T(2), T(3), bad, T(4), T(5)};
    std::vector<int64_t> a(2, 7);
    const bool ok = run_block<T, kStage>(c, 2, 3, nt, warp, a.data());
    CHECK(!ok && a[0] == -1 && a[1] == -1, "%s: NaN/-inf not rejected", what);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int problems = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int block_problems = std::max(1, problems / 10);
  test_cpu<double>(problems);
  test_cpu<float>(problems);
  for (int nt : {1, 3, 8}) {
    test_block<double, true>(block_problems, nt, true);
    test_block<float, false>(block_problems, nt, true);
  }
  for (int nt : {2, 5, 8}) {
    test_block<double, false>(block_problems, nt, false);
    test_block<float, true>(block_problems, nt, false);
  }
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("assignment: all checks passed (%d cpu problems per dtype, %d per block config)\n",
              problems, block_problems);
  return 0;
}
