// Standalone checks of the assignment solvers against brute force (no torch, no GPU).
//
// 1. csrc/cpu/assignment.cpp on random small problems (uniform, small-integer ties, +inf
//    entries, infeasible, rectangular both ways, empty), NaN/-inf rejection.
// 2. The CUDA block algorithm (csrc/cuda/assignment_block.cuh) run on the host: std::threads
//    stand in for the CUDA threads of one block. "Warp" mode exchanges the argmin candidates
//    through relaxed atomics only (like __shfl_xor_sync: values, no memory ordering), "block" mode
//    through a mutex barrier (like __syncthreads). Built with -fsanitize=thread, any shared-memory
//    access the algorithm's barriers do not order is reported as a data race. Every initialisation
//    level (none, row reduction + greedy, + reduction transfer) at 1, 4 and 32 threads (and odd
//    counts), on random, tied, degenerate (constant, separable, one column every row wants),
//    rectangular both ways, empty, forbidden (+inf, infeasible) and invalid (NaN/-inf) inputs:
//    small ones against brute force, larger ones (long augmenting paths, many columns per thread)
//    against the CPU solver, the levels' costs and feasibility against each other. The searches'
//    column state in registers (K = 2 and 8 columns per thread) as in shared memory, and the two
//    giving the same assignments, search counts and Dijkstra steps.
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

// kind 0 uniform, 1 small-integer ties, 2/3 +inf entries (30% / 70%: some infeasible), 4 constant,
// 5 separable a[i] + b[j] (square: every assignment is optimal), 6 uniform but one column is every
// row's cheapest (the greedy initialisation matches one row, the rest conflict), 7 rows whose two
// cheapest entries tie, with +inf entries.
template <typename T>
std::vector<T> random_problem(std::mt19937& rng, int n, int m, int kind) {
  std::vector<T> c(size_t(n) * m);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<double> p(0.0, 1.0);
  const double inf_rate = kind == 2 || kind == 7 ? 0.3 : (kind == 3 ? 0.7 : 0.0);
  const double constant = std::round(uni(rng) * 10.0);
  std::vector<double> a(n), b(m);
  for (auto& x : a) x = std::round(uni(rng) * 50.0);
  for (auto& x : b) x = std::round(uni(rng) * 50.0);
  const int cheap = m > 0 ? std::uniform_int_distribution<int>(0, m - 1)(rng) : 0;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < m; ++j) {
      T& x = c[size_t(i) * m + j];
      x = kind == 1 ? T(small(rng)) : T(uni(rng) * 100.0);
      if (kind == 4) x = T(constant);
      if (kind == 5) x = T(a[i] + b[j]);
      if (kind == 6 && j == cheap) x = T(-1000.0 + uni(rng));
      if (p(rng) < inf_rate) x = std::numeric_limits<T>::infinity();
    }
    if (kind == 7 && m >= 2) {  // the row's two cheapest: equal, at random columns
      const int j1 = std::uniform_int_distribution<int>(0, m - 1)(rng);
      const int j2 = (j1 + 1 + std::uniform_int_distribution<int>(0, m - 2)(rng)) % m;
      c[size_t(i) * m + j1] = c[size_t(i) * m + j2] = T(-200.0);
    }
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
  std::vector<char> flags[2];
  // Warp mode: one slot per thread and buffer; key_gen = (step << 32) | key.
  struct Slot {
    std::atomic<uint64_t> value_bits{0};
    std::atomic<uint64_t> key_gen{~uint64_t{0}};
  };
  std::vector<Slot> slots[2];

  EmuShared(int nt_, bool warp) : nt(nt_), warp_mode(warp) {
    for (int p = 0; p < 2; ++p) {
      flags[p].resize(nt_);
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
  int any_parity = 0;
  uint64_t step = 0;

  int tid() const { return t; }
  int size() const { return s->nt; }
  void sync() { s->barrier(); }
  bool argmin_fences() const { return !s->warp_mode; }
  long long clock() const { return 0; }  // (the phase-timing instantiation: counts only)
  void atomic_min(int* p, int v) {
    int cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
  bool any(bool p) {
    // Two flag buffers, alternating: a thread leaving one any() may enter the next (the
    // initialisation has two back to back) while another still reads the first one's flags.
    std::vector<char>& flags = s->flags[any_parity];
    any_parity ^= 1;
    flags[t] = p;
    s->barrier();
    bool r = false;
    for (int i = 0; i < s->nt; ++i) r = r || flags[i];
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

// offset > 0: the matrix starts offset elements into a copy (16-byte misaligned for offset 1),
// so the block reads it with scalar loads only instead of 16-byte ones (read_matrix).
// K > 0: the searches' column state in registers, K columns per thread (needs K * nt >= max(n, m)).
// prof: run the phase-timing instantiation, which fills it (its clock reads 0 here: counts only).
// split > 0: the block's first split threads search alone after the initialisation (a group of
// their own with a one-warp argmin, as the GPU's search warp), the others return.
template <typename T, bool kStage, int K = 0>
bool run_block(const std::vector<T>& c0, int n, int m, int nt, bool warp, int init, int64_t* out, int offset = 0,
               sam3fast::lsa_block::LsaProfile* prof = nullptr, int split = 0) {
  std::vector<T> shifted;
  if (offset > 0) {
    shifted.assign(offset, T(0));
    shifted.insert(shifted.end(), c0.begin(), c0.end());
  }
  const T* cost = offset > 0 ? shifted.data() + offset : c0.data();
  const int R = std::min(n, m), C = std::max(n, m);
  const int64_t bytes = sam3fast::lsa_block::lsa_smem_layout(R, C, kStage ? sizeof(T) : 0).total;
  std::vector<double> smem(bytes / 8 + 1, std::nan(""));
  EmuShared shared(nt, warp);
  EmuShared search_shared(split > 0 ? split : 1, true);
  bool feasible = false;
  std::vector<std::thread> threads;
  for (int t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      EmuBlock blk{&shared, t};
      EmuBlock sblk{&search_shared, t};
      EmuBlock* search = split > 0 ? &sblk : nullptr;
      unsigned char* sm = reinterpret_cast<unsigned char*>(smem.data());
      if (prof != nullptr) {
        sam3fast::lsa_block::solve_block<T, kStage, EmuBlock, true, K>(blk, cost, n, m, out, &feasible, sm, init, prof,
                                                                       search);
      } else {
        sam3fast::lsa_block::solve_block<T, kStage, EmuBlock, false, K>(blk, cost, n, m, out, &feasible, sm, init,
                                                                        nullptr, search);
      }
    });
  }
  for (auto& th : threads) th.join();
  return feasible;
}

struct BlockConfig {
  int nt;
  bool warp;
  int init;
  int split = 0;  // > 0: that many threads search alone after the initialisation (run_block)
};

// K > 0 (register column state) solves problems of at most K * (searching threads) columns: larger
// sizes of the cases below are clamped to that.
template <typename T, bool kStage, int K = 0>
void test_block(int problems, BlockConfig cfg) {
  const int nt = cfg.nt, init = cfg.init, split = cfg.split;
  const bool warp = cfg.warp;
  const int cap = K > 0 ? K * (split > 0 ? split : nt) : std::numeric_limits<int>::max();
  std::mt19937 rng(99 + nt + 7 * warp + 13 * kStage + sizeof(T) + 101 * init + 1009 * K + 10007 * split);
  std::uniform_int_distribution<int> dim(0, 6);
  char what[128];
  std::snprintf(what, sizeof(what), "block(nt=%d,%s,%s,%s,init=%d,regs=%d,split=%d)", nt, warp ? "warp" : "barrier",
                kStage ? "staged" : "global", sizeof(T) == 4 ? "f32" : "f64", init, K, split);
  auto run = [&](const std::vector<T>& c, int n, int m, int64_t* a, int offset = 0) {
    return run_block<T, kStage, K>(c, n, m, nt, warp, init, a, offset, nullptr, split);
  };
  // 32 host threads on a few cores make every barrier slow: a quarter of the problems there.
  const int small_problems = nt >= 32 ? std::max(8, problems / 4) : problems;
  for (int k = 0; k < small_problems; ++k) {
    const int n = std::min(dim(rng), cap), m = std::min(dim(rng), cap);
    const auto c = random_problem<T>(rng, n, m, k % 8);
    std::vector<int64_t> a(n, 7);
    const bool ok = run(c, n, m, a.data(), k % 3 == 1);
    check_answer(c, n, m, a.data(), ok, what);
  }
  // One row, one column (the transpose), no rows / no columns, all constant: the answer is the
  // identity at every level, as scipy's (the initialisation's ties go to the smaller column, the
  // searches' to a free one, then the smaller).
  for (const auto& nm : {std::pair<int, int>{1, 6}, {6, 1}, {1, 1}, {4, 4}, {3, 5}, {5, 3}, {0, 3}, {3, 0}}) {
    const int n = std::min(nm.first, cap), m = std::min(nm.second, cap);
    const auto c = random_problem<T>(rng, n, m, 4);
    std::vector<int64_t> a(n, 7);
    const bool ok = run(c, n, m, a.data());
    check_answer(c, n, m, a.data(), ok, what);
    for (int i = 0; i < n; ++i) {
      CHECK(a[i] == (i < m ? i : -1), "%s %dx%d constant: a[%d]=%lld, not the identity", what, n, m, i,
            (long long)a[i]);
    }
  }
  // Larger problems (several columns per thread, long augmenting paths) against the CPU solver,
  // wide and tall, every kind; every other one read from a misaligned address (scalar loads).
  sam3fast::LsaWorkspace ws;
  for (int k = 0; k < 8; k += nt >= 32 ? 3 : 1) {  // 32 threads: 20x75, 47x51, 74x27
    const int n = std::min(20 + 9 * k, cap), m = std::min(75 - 8 * k, cap);
    const auto c = random_problem<T>(rng, n, m, k == 3 ? 2 : k);  // kind 3 is almost never feasible here
    std::vector<int64_t> a(n, 7), ref(n);
    const bool ok = run(c, n, m, a.data(), k % 2);
    const bool ref_ok =
        sam3fast::linear_sum_assignment_cpu(c.data(), n, m, ref.data(), ws) == LsaStatus::kOk;
    CHECK(ok == ref_ok, "%s %dx%d kind %d: feasible %d, cpu %d", what, n, m, k, int(ok), int(ref_ok));
    if (!ok || !ref_ok) {
      for (int i = 0; i < n; ++i) CHECK(a[i] == -1, "%s: infeasible problem with a[%d]=%lld", what, i, (long long)a[i]);
      continue;
    }
    const double got = assignment_cost(c, n, m, a.data(), what);
    const double want = assignment_cost(c, n, m, ref.data(), "cpu");
    CHECK(std::fabs(got - want) <= 1e-9 * (1.0 + std::fabs(want)), "%s %dx%d kind %d: cost %.17g, cpu %.17g",
          what, n, m, k, got, want);
  }
  // An infeasible problem whose every row has an allowed column (the initialisation passes it,
  // a search finds it): rows 0-2 may only use column 0.
  if (cap >= 5) {
    std::vector<T> c(4 * 5, std::numeric_limits<T>::infinity());
    for (int i = 0; i < 3; ++i) c[i * 5] = T(i);
    for (int j = 0; j < 5; ++j) c[3 * 5 + j] = T(j);
    std::vector<int64_t> a(4, 7);
    const bool ok = run(c, 4, 5, a.data());
    check_answer(c, 4, 5, a.data(), ok, what);
    CHECK(!ok, "%s: infeasible problem accepted", what);
  }
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), -std::numeric_limits<T>::infinity()}) {
    for (const auto& nm : {std::pair<int, int>{2, 3}, {3, 2}}) {
      if (cap < 3) continue;
      std::vector<T> c = {T(1), T(2), T(3), bad, T(4), T(5)};
      std::vector<int64_t> a(nm.first, 7);
      const bool ok = run(c, nm.first, nm.second, a.data());
      bool all_unset = true;
      for (int64_t x : a) all_unset = all_unset && x == -1;
      CHECK(!ok && all_unset, "%s %dx%d: NaN/-inf not rejected", what, nm.first, nm.second);
    }
  }
}

// The initialisation levels on the same problems: the same feasibility and optimal cost (tied
// problems may get different optimal assignments), at the largest block.
template <typename T>
void test_init_levels_agree(int problems) {
  std::mt19937 rng(4242 + sizeof(T));
  std::uniform_int_distribution<int> dim(1, 40);
  for (int k = 0; k < problems; ++k) {
    const int n = dim(rng), m = dim(rng), kind = k % 8;
    const auto c = random_problem<T>(rng, n, m, kind == 3 ? 2 : kind);
    double cost[3];
    bool ok[3];
    for (int init = 0; init < 3; ++init) {
      std::vector<int64_t> a(n, 7);
      ok[init] = run_block<T, true>(c, n, m, 4, false, init, a.data());
      cost[init] = ok[init] ? assignment_cost(c, n, m, a.data(), "init levels") : kInf;
    }
    for (int init = 1; init < 3; ++init) {
      CHECK(ok[init] == ok[0], "init %d vs 0 on %dx%d kind %d: feasible %d vs %d", init, n, m, kind,
            int(ok[init]), int(ok[0]));
      CHECK(!ok[0] || std::fabs(cost[init] - cost[0]) <= 1e-9 * (1.0 + std::fabs(cost[0])),
            "init %d vs 0 on %dx%d kind %d: cost %.17g vs %.17g", init, n, m, kind, cost[init], cost[0]);
    }
  }
}

// The register column state gives the very assignment and feasibility of the shared one (the same
// arithmetic in the same order: ties included), at K = 2 and 8 columns per thread, staged and not,
// every initialisation level, with the same number of searches and Dijkstra steps.
template <typename T, bool kStage, int K>
void test_registers_match_shared(int problems, int nt, bool warp) {
  std::mt19937 rng(515 + sizeof(T) + 3 * K + 7 * nt + 11 * kStage);
  std::uniform_int_distribution<int> dim(1, K * nt);
  for (int k = 0; k < problems; ++k) {
    const int n = dim(rng), m = dim(rng), kind = k % 8, init = k % 3;
    const auto c = random_problem<T>(rng, n, m, kind == 3 ? 2 : kind);
    std::vector<int64_t> a(n, 7), b(n, 7);
    const bool ok_regs = run_block<T, kStage, K>(c, n, m, nt, warp, init, a.data(), k % 2);
    const bool ok_shared = run_block<T, kStage, 0>(c, n, m, nt, warp, init, b.data(), k % 2);
    CHECK(ok_regs == ok_shared, "regs=%d nt=%d %dx%d kind %d init %d: feasible %d, shared %d", K, nt, n, m, kind,
          init, int(ok_regs), int(ok_shared));
    for (int i = 0; i < n; ++i) {
      CHECK(a[i] == b[i], "regs=%d nt=%d %dx%d kind %d init %d: a[%d]=%lld, shared %lld", K, nt, n, m, kind, init,
            i, (long long)a[i], (long long)b[i]);
    }
  }
}

// The split block (its first `split` threads search alone after the whole block's
// initialisation) gives the very assignment, feasibility and search counts of the whole block
// searching (the same arithmetic in the same order, ties included): register (K) and shared (0)
// column state, staged and not, every initialisation level.
template <typename T, bool kStage, int K>
void test_split_matches_block(int problems, int nt, int split, bool warp) {
  std::mt19937 rng(8181 + sizeof(T) + 3 * K + 7 * nt + 11 * kStage + 13 * split);
  std::uniform_int_distribution<int> dim(1, K > 0 ? K * split : 40);
  for (int k = 0; k < problems; ++k) {
    const int n = dim(rng), m = dim(rng), kind = k % 8, init = k % 3;
    const auto c = random_problem<T>(rng, n, m, kind == 3 ? 2 : kind);
    std::vector<int64_t> a(n, 7), b(n, 7);
    sam3fast::lsa_block::LsaProfile pa{}, pb{};
    // the whole block searching, with K columns per thread when they cover the problem
    const bool ok_split = run_block<T, kStage, K>(c, n, m, nt, warp, init, a.data(), k % 2, &pa, split);
    const bool ok_block = run_block<T, kStage, 0>(c, n, m, nt, warp, init, b.data(), k % 2, &pb);
    CHECK(ok_split == ok_block, "split=%d/%d regs=%d %dx%d kind %d init %d: feasible %d, block %d", split, nt, K, n,
          m, kind, init, int(ok_split), int(ok_block));
    for (int i = 0; i < n; ++i) {
      CHECK(a[i] == b[i], "split=%d/%d regs=%d %dx%d kind %d init %d: a[%d]=%lld, block %lld", split, nt, K, n, m,
            kind, init, i, (long long)a[i], (long long)b[i]);
    }
    CHECK(pa.searches == pb.searches && pa.steps == pb.steps,
          "split=%d/%d regs=%d %dx%d init %d: %d searches / %d steps, block %d / %d", split, nt, K, n, m, init,
          pa.searches, pa.steps, pb.searches, pb.steps);
  }
}

// The phase-timing instantiation (SAM3FAST_LSA_PROFILE on the GPU) gives the same answer and counts
// its searches and Dijkstra steps (on host threads the clock reads 0: the counts are what is checked).
void test_profile_counts() {
  std::mt19937 rng(77);
  sam3fast::LsaWorkspace ws;
  for (const auto& nm : {std::pair<int, int>{30, 40}, {40, 30}, {25, 25}}) {
    const int n = nm.first, m = nm.second, R = std::min(n, m);
    const auto c = random_problem<double>(rng, n, m, 0);
    for (int init = 0; init < 3; ++init) {
      const int nt = 5;  // 8 register columns per thread cover the 40 columns
      std::vector<int64_t> a(n, 7), a_regs(n, 7), ref(n);
      sam3fast::lsa_block::LsaProfile prof{}, prof_regs{};
      const bool feasible = run_block<double, true, 0>(c, n, m, nt, false, init, a.data(), 0, &prof);
      const bool feasible_regs = run_block<double, true, 8>(c, n, m, nt, false, init, a_regs.data(), 0, &prof_regs);
      CHECK(feasible && feasible_regs, "profile %dx%d init %d: infeasible", n, m, init);
      CHECK(sam3fast::linear_sum_assignment_cpu(c.data(), n, m, ref.data(), ws) == LsaStatus::kOk, "cpu");
      CHECK(std::fabs(assignment_cost(c, n, m, a.data(), "profile") - assignment_cost(c, n, m, ref.data(), "cpu")) <=
                1e-9, "profile %dx%d init %d: not optimal", n, m, init);
      CHECK(a == a_regs, "profile %dx%d init %d: the register state's assignment differs", n, m, init);
      // without initialisation every row is searched for; with it fewer; a search takes >= 1 step
      CHECK(prof.searches >= 1 && prof.searches <= R && prof.steps >= prof.searches,
            "profile %dx%d init %d: %d searches, %d steps", n, m, init, prof.searches, prof.steps);
      CHECK(init != 0 || prof.searches == R, "profile %dx%d without init: %d searches of %d rows", n, m,
            prof.searches, R);
      CHECK(prof_regs.searches == prof.searches && prof_regs.steps == prof.steps,
            "profile %dx%d init %d: registers %d searches / %d steps, shared %d / %d", n, m, init,
            prof_regs.searches, prof_regs.steps, prof.searches, prof.steps);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int problems = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int block_problems = std::max(1, problems / 20);
  test_cpu<double>(problems);
  test_cpu<float>(problems);
  for (int init = 0; init < 3; ++init) {
    // "warp": argmin through relaxed atomics (a one-warp block, shuffles); "barrier": __syncthreads.
    // 32 threads (slow on the host: one dtype and layout per mode) stand in for one warp and
    // for a block with fewer columns than threads.
    for (int nt : {1, 3, 4}) {
      test_block<double, true>(block_problems, {nt, true, init});
      test_block<float, false>(block_problems, {nt, true, init});
    }
    test_block<float, true>(block_problems, {32, true, init});
    for (int nt : {4, 5}) {
      test_block<double, false>(block_problems, {nt, false, init});
      test_block<float, true>(block_problems, {nt, false, init});
    }
    test_block<double, false>(block_problems, {32, false, init});
    // The register column state: the launcher's K = 2 (the size rule) and K = 8 (one warp or a
    // forced block size), with one and several columns per thread and padding columns (j >= C).
    test_block<double, true, 8>(block_problems, {1, true, init});
    test_block<float, false, 8>(block_problems, {3, true, init});
    test_block<float, true, 2>(block_problems, {4, false, init});
    test_block<double, false, 2>(block_problems, {5, true, init});
    test_block<float, true, 8>(block_problems, {32, true, init});
    test_block<double, false, 2>(block_problems, {38, false, init});
    // The split block (the GPU's search warp after a larger block's initialisation): a group of
    // 1, 2 or 3 threads searching after 4 or 5, register and shared column state.
    test_block<double, true, 8>(block_problems, {5, false, init, 2});
    test_block<float, false, 8>(block_problems, {4, false, init, 3});
    test_block<float, true, 0>(block_problems, {5, false, init, 2});
    test_block<double, false, 0>(block_problems, {4, false, init, 1});
  }
  test_registers_match_shared<double, true, 8>(block_problems, 5, false);
  test_registers_match_shared<float, false, 8>(block_problems, 3, true);
  test_registers_match_shared<float, true, 2>(block_problems, 7, false);
  test_registers_match_shared<double, false, 2>(block_problems, 4, true);
  test_split_matches_block<double, true, 8>(block_problems, 5, 2, false);
  test_split_matches_block<float, false, 8>(block_problems, 4, 3, false);
  test_split_matches_block<float, true, 0>(block_problems, 5, 2, false);
  test_init_levels_agree<double>(block_problems);
  test_init_levels_agree<float>(block_problems);
  test_profile_counts();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("assignment: all checks passed (%d cpu problems per dtype, %d per block config)\n",
              problems, block_problems);
  return 0;
}
