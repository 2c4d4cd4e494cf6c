// One linear assignment problem solved by one thread block (no torch, no CUDA runtime calls).
//
// The algorithm is the CPU one (csrc/cpu/assignment.cpp): rows are added one at a time, a
// Dijkstra search over reduced costs finds the shortest augmenting path, duals are updated, the
// path is flipped. The block splits the columns among its threads (column j belongs to thread
// j % nthreads) and each Dijkstra step is one parallel relax + one block-wide argmin. The searches'
// per-column state (dual v, shortest-path estimate, settled flag, matched row) lives in shared
// memory (ColsShared: any size) or in its owner's registers (ColsRegisters<K>: up to K columns a
// thread), with the same arithmetic: a register step loads only the costs.
//
// Initialisation (init >= kLsaInitRows, Jonker-Volgenant style; exact): every row i gets
// u[i] = min_j c(i, j) (v = 0) and its first cheapest column; each column then goes to the first
// row (in row order) that chose it, the serial greedy's matching, found with one atomic minimum per
// row instead of a serial pass. The duals are feasible (c - u - v >= 0, exactly so
// in floating point: c - min c >= 0) and every matched edge is tight, so the matching is optimal
// for the rows it covers and the searches run only for the rows left unmatched. kLsaInitTransfer
// also moves each matched row's slack to its column (reduction transfer, computed with v = 0):
// u[i] = the row's second-smallest cost c2, v[j] = c1 - c2 <= 0. Still feasible: for k != j,
// c(i, k) - c2 - v[k] >= c(i, k) - c2 >= 0 as every v <= 0; for k = j the edge stays tight
// (exactly: (c1 - c2) + fl(c2 - c1) = 0). Free columns keep v = 0 and matched ones v <= 0, the
// rectangular problem's optimality conditions, which the searches preserve (they lower only the
// v of settled columns, and the one free column they settle, the sink, by 0). Cheaper columns for
// the other rows' searches are matched ones made dearer, so fewer Dijkstra steps (about 128x200
// uniform: 220 steps over 128 searches without init, ~110 over ~31 with rows, ~80 with transfer).
//
// Synchronisation design (checked on the host under ThreadSanitizer by tests/cpp, which runs this
// header with std::threads standing in for CUDA threads):
//   - v[j], spc[j], path[j], settled[j] are written only by the owner of column j, so a Dijkstra
//     step shares nothing through memory: its only cross-thread exchange is the argmin (during
//     initialisation row i's scan by thread i % nthreads, the owner of column i, uses spc[i] for
//     the row's second-smallest cost; the greedy matching takes atomic minima on path[], then,
//     after a barrier, the one row that won column j writes row4col[j] and v[j], then a barrier);
//   - u[], row4col[] and col4row[] are read by every thread during a search and written only
//     between searches (dual update, path flip, initialisation), each fenced by a barrier;
//   - the argmin result is the same on every thread, so all control flow is block-uniform.
// Ties: smaller cost, then a free column, then the smaller column index (deterministic; scipy
// breaks ties by its own visiting order, so tied problems may get a different optimum, and so may
// the initialisation levels among themselves).
//
// The Block policy supplies tid(), size(), sync() (barrier), any(bool) (a barrier that ORs a
// flag), argmin(LsaCand) (the block-wide minimum, returned to every thread; a one-warp block
// does it with register shuffles, which order no memory accesses) and argmin_fences() (true when
// argmin is also a barrier, as a shared-memory argmin across warps is: then the search needs no
// barrier of its own before the dual update), atomic_min(int*, int) (on shared memory; ordered
// with the other threads' accesses by the barriers around it) and clock() (a cycle counter, read
// by the kProfile instantiation only).
//
// Reading the cost matrix from global memory (validation and staging, and row minima when it is
// not staged) keeps several loads in flight per thread (read_matrix, row_minima): the block has
// few warps to hide memory latency with.
#pragma once

#include <stdint.h>

#include <type_traits>

#if defined(__CUDACC__)
#define SAM3FAST_HD __device__ __forceinline__
#define SAM3FAST_HOST_HD __host__ __device__ inline
#else
#define SAM3FAST_HD inline
#define SAM3FAST_HOST_HD inline
#endif

namespace sam3fast {
namespace lsa_block {

// Candidate column of a Dijkstra step. key = column | kBusy when the column is matched, so
// comparing keys prefers a free column, then the smaller index.
struct LsaCand {
  double value;
  int key;
};

constexpr int kBusy = 1 << 30;
constexpr int kKeyNone = 0x7fffffff;

// Initialisation levels (see the header comment).
constexpr int kLsaInitOff = 0;       // every row is searched for, from u = v = 0
constexpr int kLsaInitRows = 1;      // row reduction + greedy matching of each row's cheapest column
constexpr int kLsaInitTransfer = 2;  // ... + reduction transfer to the matched columns

SAM3FAST_HD double inf() { return __builtin_huge_val(); }

// Bitwise, not short-circuit: the same answer without the branches (and their reconvergence
// barriers) nvcc emitted for `||` / `&&` in every round of the argmin butterfly.
SAM3FAST_HD bool cand_less(const LsaCand& a, const LsaCand& b) {
  return (a.value < b.value) | ((a.value == b.value) & (a.key < b.key));
}

SAM3FAST_HOST_HD int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Row stride of the staged R x C cost matrix: C rounded up to an odd number of elements, so
// that shared-memory accesses which walk down a column (the transposed staging's stores, one row per
// lane of a warp; the row minima, one row per thread) hit 32 different banks, and those along a row
// (a Dijkstra step) stay consecutive. With the stride C (a multiple of 32 for 128 or 256 columns)
// every lane of the transposed staging's stores hit one bank: a 200x128 float32 problem spent
// 29 K cycles staging against 5.5 K to read the matrix unstaged (H200 profile, 2026-11-27).
SAM3FAST_HOST_HD int64_t stage_stride(int64_t C) { return C | 1; }

// Shared memory carve-up for R <= C (optionally with the cost matrix staged as T[R*stage_stride(C)]).
struct LsaSmemLayout {
  int64_t u, v, spc, path, row4col, col4row, settled, cost, total;
};

SAM3FAST_HOST_HD LsaSmemLayout lsa_smem_layout(int64_t R, int64_t C, int64_t staged_elem_bytes) {
  LsaSmemLayout L;
  int64_t off = 0;
  L.u = off;       off += 8 * R;
  L.v = off;       off += 8 * C;
  L.spc = off;     off += 8 * C;
  L.cost = off;    off = align_up(off + staged_elem_bytes * R * stage_stride(C), 8);
  L.path = off;    off += 4 * C;
  L.row4col = off; off += 4 * C;
  L.col4row = off; off += 4 * R;
  L.settled = off; off += C;
  L.total = align_up(off, 16);
  return L;
}

template <typename T>
SAM3FAST_HD bool lsa_invalid(T x) {
  return x != x || x == -static_cast<T>(inf());
}

// Loads in flight per thread when reading a matrix from global memory. A block has a few warps
// on one SM, so a loop issuing one load at a time per thread would wait a full memory round trip
// per element: for a 200 x 128 float32 problem (128 threads) that is ~200 round trips in a row,
// the order of 100 us, more than the searches themselves. Here each thread first issues
// kVecInFlight 16-byte loads (4 floats or 2 doubles each), then consumes them.
constexpr int kVecInFlight = 8;
constexpr int kScalarInFlight = 8;

template <typename T>
struct alignas(16) LsaVec16 {
  T x[16 / sizeof(T)];
};

// Calls acc = visit(e, a[e], acc) for every e in [0, nm) with e % nt == tid's share (every
// element exactly once over the block's threads; in no particular order) and returns acc.
// 16-byte loads when a is 16-byte aligned, then scalar loads for the rest, several in flight.
template <typename T, typename Visit>
SAM3FAST_HD bool read_matrix(const T* __restrict__ a, int64_t nm, int tid, int nt, bool acc, Visit& visit) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0;
  const int64_t nvec = aligned ? nm / V : 0;
  const LsaVec16<T>* av = reinterpret_cast<const LsaVec16<T>*>(a);
  int64_t q = tid;
  for (; q + static_cast<int64_t>(kVecInFlight - 1) * nt < nvec; q += static_cast<int64_t>(kVecInFlight) * nt) {
    LsaVec16<T> r[kVecInFlight];
#pragma unroll
    for (int k = 0; k < kVecInFlight; ++k) r[k] = av[q + static_cast<int64_t>(k) * nt];
#pragma unroll
    for (int k = 0; k < kVecInFlight; ++k) {
#pragma unroll
      for (int l = 0; l < V; ++l) acc = visit((q + static_cast<int64_t>(k) * nt) * V + l, r[k].x[l], acc);
    }
  }
  for (; q < nvec; q += nt) {
    const LsaVec16<T> r = av[q];
#pragma unroll
    for (int l = 0; l < V; ++l) acc = visit(q * V + l, r.x[l], acc);
  }
  int64_t e = nvec * V + tid;
  for (; e + static_cast<int64_t>(kScalarInFlight - 1) * nt < nm; e += static_cast<int64_t>(kScalarInFlight) * nt) {
    T r[kScalarInFlight];
#pragma unroll
    for (int k = 0; k < kScalarInFlight; ++k) r[k] = a[e + static_cast<int64_t>(k) * nt];
#pragma unroll
    for (int k = 0; k < kScalarInFlight; ++k) acc = visit(e + static_cast<int64_t>(k) * nt, r[k], acc);
  }
  for (; e < nm; e += nt) acc = visit(e, a[e], acc);
  return acc;
}

// Row i's smallest cost c1 (+inf when the whole row is forbidden), its first column (-1 then)
// and the second-smallest cost c2 (c1 again when the minimum repeats, +inf with one finite entry).
// Row elements sit at row[j * stride], visited in ascending columns (a staged row's threads read
// different banks through its odd stride; a transposed global row is coalesced that way). The
// comparisons run in T: its conversion to double is exact and monotone, so c1, c2 and the column
// are those a double comparison would give, without a float64 compare per element.
template <typename T>
SAM3FAST_HD void row_minima(const T* row, int64_t stride, int C, double* c1, double* c2, int* arg) {
  const T tinf = static_cast<T>(inf());
  T a = tinf, b = tinf;
  int aj = -1;
  // The result does not depend on the visiting order (ties go to the smaller column), so the
  // loads go in chunks of kScalarInFlight, issued before they are compared (see read_matrix).
  auto take = [&](T x, int col) {
    if (x < a || (x == a && col < aj)) {
      b = a;
      a = x;
      aj = col;
    } else if (x < b) {
      b = x;
    }
  };
  int j = 0;
  for (; j + kScalarInFlight <= C; j += kScalarInFlight) {
    T r[kScalarInFlight];
#pragma unroll
    for (int t = 0; t < kScalarInFlight; ++t) r[t] = row[(j + t) * stride];
#pragma unroll
    for (int t = 0; t < kScalarInFlight; ++t) take(r[t], j + t);
  }
  for (; j < C; ++j) take(row[j * stride], j);
  *c1 = static_cast<double>(a);
  *c2 = static_cast<double>(b);
  *arg = a < tinf ? aj : -1;
}

// The searches' per-column state. A Dijkstra step relaxes the columns a thread owns and returns
// its best candidate (relax), the owner of the chosen column marks it settled (settle), a finished
// search moves the duals of the settled columns and resets them (update) and, after the path flip,
// the owners re-read the matched rows (reload_rows). Both forms give the same answers (the same
// arithmetic in the same order); only where the state lives differs.
//
// ColsShared: arrays in shared memory, column j owned by thread j % nt (any number per thread).
// Every relax re-reads v[j], spc[j], settled[j] and row4col[j]: four dependent shared loads per
// column next to the cost's.
struct ColsShared {
  int tid, nt, C;
  double* v;
  double* spc;
  int* row4col;
  unsigned char* settled;

  SAM3FAST_HD ColsShared(int tid_, int nt_, int C_, double* v_, double* spc_, int* row4col_,
                         unsigned char* settled_)
      : tid(tid_), nt(nt_), C(C_), v(v_), spc(spc_), row4col(row4col_), settled(settled_) {}

  // After the initialisation (its last barrier orders v[] and row4col[]): the search state.
  SAM3FAST_HD void load() {
    for (int j = tid; j < C; j += nt) {
      spc[j] = inf();
      settled[j] = 0;
    }
  }

  template <typename T>
  SAM3FAST_HD LsaCand relax(int i, double dist, double ui, const T* base, int64_t stride, int* path) {
    LsaCand best{inf(), kKeyNone};
    for (int j = tid; j < C; j += nt) {
      if (settled[j]) continue;
      const double r = dist + static_cast<double>(base[j * stride]) - ui - v[j];
      double s = spc[j];
      if (r < s) {
        path[j] = i;
        spc[j] = r;
        s = r;
      }
      const LsaCand cand{s, row4col[j] == -1 ? j : (j | kBusy)};
      if (cand_less(cand, best)) best = cand;
    }
    return best;
  }

  SAM3FAST_HD void settle(int j) {
    if (j % nt == tid) settled[j] = 1;
  }

  SAM3FAST_HD void update(double dist, double* u) {
    for (int j = tid; j < C; j += nt) {
      if (settled[j]) {
        const double delta = dist - spc[j];
        v[j] -= delta;
        if (row4col[j] != -1) u[row4col[j]] += delta;
        settled[j] = 0;
      }
      spc[j] = inf();
    }
  }

  SAM3FAST_HD void reload_rows() {}
};

// ColsRegisters<K>: thread tid owns columns tid + k * nt (k < K, K * nt >= C) and keeps their v,
// spc, settled flag and matched row in registers (every index a compile-time constant: unrolled
// loops), so a relax loads only the K costs; v[] and row4col[] in shared memory are read once
// after the initialisation, path[] is still written there (the flip reads it) and row4col[] stays
// the shared truth between searches (the flip writes it; the step reads the next row from it).
template <int K>
struct ColsRegisters {
  int tid, nt, C;
  double* v_init;
  int* row4col;
  double vr[K], spr[K];
  int rowr[K];
  bool setr[K];

  SAM3FAST_HD ColsRegisters(int tid_, int nt_, int C_, double* v_, double* /*spc*/, int* row4col_,
                            unsigned char* /*settled*/)
      : tid(tid_), nt(nt_), C(C_), v_init(v_), row4col(row4col_) {}

  SAM3FAST_HD void load() {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = tid + k * nt;
      vr[k] = j < C ? v_init[j] : 0.0;
      rowr[k] = j < C ? row4col[j] : -1;
      spr[k] = inf();
      setr[k] = false;
    }
  }

  template <typename T>
  SAM3FAST_HD LsaCand relax(int i, double dist, double ui, const T* base, int64_t stride, int* path) {
    LsaCand best{inf(), kKeyNone};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = tid + k * nt;
      if (j < C && !setr[k]) {
        const double r = dist + static_cast<double>(base[j * stride]) - ui - vr[k];
        if (r < spr[k]) {
          path[j] = i;
          spr[k] = r;
        }
        const LsaCand cand{spr[k], rowr[k] == -1 ? j : (j | kBusy)};
        if (cand_less(cand, best)) best = cand;
      }
    }
    return best;
  }

  SAM3FAST_HD void settle(int j) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (tid + k * nt == j) setr[k] = true;
    }
  }

  SAM3FAST_HD void update(double dist, double* u) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (setr[k]) {
        const double delta = dist - spr[k];
        vr[k] -= delta;
        if (rowr[k] != -1) u[rowr[k]] += delta;
        setr[k] = false;
      }
      spr[k] = inf();
    }
  }

  SAM3FAST_HD void reload_rows() {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = tid + k * nt;
      if (j < C) rowr[k] = row4col[j];
    }
  }
};

// Where one block's time goes (the kProfile instantiation of solve_block; thread 0's clock, in
// cycles of its SM): the phase ends, and the searches' Dijkstra loops and their dual update + path
// flip summed. For benchmarks (SAM3FAST_LSA_PROFILE, assignment_tuning.h); the normal kernels
// compile none of it.
struct LsaProfile {
  long long start, read, rows, greedy, end;  // clock at the start and after each phase
  long long dijkstra, update;                // summed over the searches
  int searches, steps;
};

// What the initialisation leaves for the searches: the R x C problem's addressing and the shared
// arrays (see solve_block).
template <typename T>
struct LsaProblem {
  const T* cost;    // the global matrix: element (i, j) at cost[i * row_stride + j * col_stride]
  const T* scost;   // the staged matrix (row stride P), when staged
  int64_t row_stride, col_stride;
  int P, R, C, n;
  bool transpose;
  double *u, *v, *spc;
  int *path, *row4col, *col4row;
  unsigned char* settled;
};

// The searches (one per row the initialisation left unmatched), then the outputs, by the threads
// of blk: the whole block, or (solve_block's search group) its first warp alone.
template <typename T, bool kStage, typename Block, bool kProfile, int kRegCols>
SAM3FAST_HD void search_rows(Block& blk, const LsaProblem<T>& pb, bool ok, int64_t* __restrict__ out,
                             bool* __restrict__ feasible, LsaProfile* prof) {
  const int tid = blk.tid();
  const int nt = blk.size();
  const bool timing = kProfile && tid == 0 && prof != nullptr;
  const int R = pb.R, C = pb.C, n = pb.n;
  double* u = pb.u;
  int* path = pb.path;
  int* row4col = pb.row4col;
  int* col4row = pb.col4row;
  using Cols = typename std::conditional<(kRegCols > 0), ColsRegisters<kRegCols>, ColsShared>::type;

  // The searches' column state (v, spc, settled, matched row): in shared memory or the owners'
  // registers (ColsShared / ColsRegisters), filled from the initialisation's shared arrays.
  Cols cols(tid, nt, C, pb.v, pb.spc, row4col, pb.settled);
  if (ok) cols.load();
  // Row i's costs: the staged row, or the global matrix at its strides.
  auto cost_row = [&](int i, const T** base, int64_t* stride) {
    if (kStage) {
      *base = pb.scost + static_cast<int64_t>(i) * pb.P;
      *stride = 1;
    } else {
      *base = pb.cost + i * pb.row_stride;
      *stride = pb.col_stride;
    }
  };

  for (int cur = 0; ok && cur < R; ++cur) {
    if (col4row[cur] != -1) continue;  // matched by the initialisation (block-uniform read)
    int i = cur;
    double dist = 0.0;
    int sink = -1;
    long long t_search = 0;
    if (timing) {
      t_search = blk.clock();
      ++prof->searches;
    }
    while (sink < 0) {
      if (timing) ++prof->steps;
      const T* base;
      int64_t stride;
      cost_row(i, &base, &stride);
      const LsaCand best = blk.argmin(cols.relax(i, dist, u[i], base, stride, path));
      if (!(best.value < inf())) {
        ok = false;  // every remaining column is forbidden: infeasible
        break;
      }
      dist = best.value;
      const int j = best.key & (kBusy - 1);
      cols.settle(j);
      if (best.key & kBusy) {
        i = row4col[j];
      } else {
        sink = j;
      }
    }
    if (!ok) break;
    long long t_update = 0;
    if (timing) {
      t_update = blk.clock();
      prof->dijkstra += t_update - t_search;
    }
    // Order the search's reads of u[] before the dual update's writes. A shared-memory argmin
    // already did (nothing reads u[] after it); a register one (one warp) orders nothing.
    if (!blk.argmin_fences()) blk.sync();

    // Dual update, owner-computes: the settled non-sink column j was reached through its matched
    // row, the only update that row gets (rows are distinct, and cur is unmatched). The same pass
    // resets the column for the next search.
    cols.update(dist, u);
    if (tid == 0) u[cur] += dist;
    blk.sync();  // path[] and the u[] writes become visible

    // The path is at most R long: one thread flips it.
    if (tid == 0) {
      int j = sink;
      while (true) {
        const int r = path[j];
        row4col[j] = r;
        const int prev = col4row[r];
        col4row[r] = j;
        j = prev;
        if (r == cur) break;
      }
    }
    blk.sync();
    cols.reload_rows();  // the flipped path's columns have new rows (read after the barrier)
    if (timing) prof->update += blk.clock() - t_update;
  }

  if (!ok) {
    for (int i = tid; i < n; i += nt) out[i] = -1;
  } else if (pb.transpose) {
    // Column j of the transpose is original row j; its matched algorithm row is an original column.
    for (int j = tid; j < C; j += nt) out[j] = row4col[j];
  } else {
    for (int i = tid; i < R; i += nt) out[i] = col4row[i];
  }
  if (tid == 0) *feasible = ok;
  if (timing) prof->end = blk.clock();
}

// Solves cost (n, m) row-major; writes out[n] (column per row or -1) and *feasible.
// smem must hold lsa_smem_layout(min(n,m), max(n,m), kStage ? sizeof(T) : 0).total bytes.
// kStage: copy the cost matrix into shared memory first (small problems: the search re-reads it).
// init: kLsaInitOff / kLsaInitRows / kLsaInitTransfer (the same on every thread; any level gives
// an optimal assignment, on ties possibly a different one).
// kProfile: thread 0 fills *prof (Block::clock(): a cycle counter).
// kRegCols: 0 keeps the searches' column state in shared memory (any C); K > 0 keeps each thread's
// columns j = tid + k * nt (k < K) in its registers, which needs K * nt >= C (the launcher's choice),
// nt being the searching threads' count.
// search (split): nullptr, the whole block searches; else a policy for the block's first
// search->size() threads (one warp on the GPU: WarpBlock), which search alone after the
// initialisation while the other threads return. The initialisation (staging, row minima,
// greedy matching: parallel work) keeps the whole block; a Dijkstra step of one warp then takes
// its argmin from register shuffles and needs no barrier. The initialisation's last barrier orders
// everything the searches read; the threads that leave write nothing after it.
template <typename T, bool kStage, typename Block, bool kProfile = false, int kRegCols = 0,
          typename SearchBlock = Block>
SAM3FAST_HD void solve_block(Block& blk, const T* __restrict__ cost, int n, int m,
                             int64_t* __restrict__ out, bool* __restrict__ feasible,
                             unsigned char* smem, int init = kLsaInitTransfer, LsaProfile* prof = nullptr,
                             SearchBlock* search = nullptr) {
  const int tid = blk.tid();
  const bool timing = kProfile && tid == 0 && prof != nullptr;
  if (timing) *prof = LsaProfile{blk.clock(), 0, 0, 0, 0, 0, 0, 0, 0};
  const int nt = blk.size();
  const bool transpose = m < n;
  const int R = transpose ? m : n;
  const int C = transpose ? n : m;
  // Element (i, j) of the R x C problem is cost[i * row_stride + j * col_stride] (or scost[i*P+j]).
  const int64_t row_stride = transpose ? 1 : m;
  const int64_t col_stride = transpose ? m : 1;
  const int P = static_cast<int>(stage_stride(C));

  const LsaSmemLayout L = lsa_smem_layout(R, C, kStage ? sizeof(T) : 0);
  double* u = reinterpret_cast<double*>(smem + L.u);
  double* v = reinterpret_cast<double*>(smem + L.v);
  double* spc = reinterpret_cast<double*>(smem + L.spc);
  T* scost = reinterpret_cast<T*>(smem + L.cost);
  int* path = reinterpret_cast<int*>(smem + L.path);
  int* row4col = reinterpret_cast<int*>(smem + L.row4col);
  int* col4row = reinterpret_cast<int*>(smem + L.col4row);
  unsigned char* settled = smem + L.settled;

  // Validate (and stage, transposed into row-major R x C, row stride P) in one coalesced pass.
  const int64_t nm = static_cast<int64_t>(n) * m;
  auto visit = [&](int64_t e, T x, bool b) {
    if (kStage) {
      // Staged means R * P fits in shared memory: 32-bit division, several times cheaper.
      const int ei = static_cast<int>(e);
      const int i = ei / m, j = ei - i * m;
      scost[transpose ? j * P + i : i * P + j] = x;
    }
    return b || lsa_invalid(x);
  };
  bool bad = read_matrix<T>(cost, nm, tid, nt, false, visit);
  for (int j = tid; j < C; j += nt) {
    v[j] = 0.0;
    row4col[j] = -1;
    path[j] = kKeyNone;  // the greedy matching's per-column minimum (rows offering column j)
  }
  for (int i = tid; i < R; i += nt) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  bool ok = !blk.any(bad);  // also the barrier after initialisation (and staging)
  if (timing) prof->read = prof->rows = prof->greedy = blk.clock();

  if (ok && init != kLsaInitOff) {
    // Row reduction: the owner of column i scans row i (R <= C); spc[i] holds c2 until the greedy
    // pass. Two barriers and one O(R) serial pass replace up to R searches.
    bool forbidden = false;
    for (int i = tid; i < R; i += nt) {
      double c1, c2;
      int arg;
      if (kStage) {
        row_minima<T>(scost + static_cast<int64_t>(i) * P, 1, C, &c1, &c2, &arg);
      } else {
        row_minima<T>(cost + i * row_stride, col_stride, C, &c1, &c2, &arg);
      }
      forbidden = forbidden || arg < 0;  // a row with no allowed column: infeasible
      u[i] = c1;
      spc[i] = c2;
      col4row[i] = arg;
    }
    ok = !blk.any(forbidden);  // also orders the path[] fill below before the atomics
    if (timing) prof->rows = prof->greedy = blk.clock();
    if (ok) {
      // Greedy matching in row order (each row takes its cheapest column when no earlier row
      // took it). Each row offers one column, so the row that gets column j is the smallest row
      // offering it: an atomic minimum per column (path[], free until the searches) instead of a
      // serial pass over the rows; the same matching as the serial greedy.
      for (int i = tid; i < R; i += nt) blk.atomic_min(&path[col4row[i]], i);
      blk.sync();
      for (int i = tid; i < R; i += nt) {
        const int j = col4row[i];
        if (path[j] != i) {
          col4row[i] = -1;
          continue;
        }
        row4col[j] = i;  // one writer per column: its winner
        if (init >= kLsaInitTransfer) {
          const double d = spc[i] - u[i];  // c2 - c1 >= 0; +inf (one finite entry): keep
          if (d > 0.0 && d < inf()) {
            u[i] = spc[i];
            v[j] = -d;
          }
        }
      }
      blk.sync();
      if (timing) prof->greedy = blk.clock();
    }
  }
  const LsaProblem<T> pb{cost, scost, row_stride, col_stride, P, R, C, n, transpose,
                         u, v, spc, path, row4col, col4row, settled};
  if (search == nullptr) {
    search_rows<T, kStage, Block, kProfile, kRegCols>(blk, pb, ok, out, feasible, prof);
  } else if (tid < search->size()) {
    search_rows<T, kStage, SearchBlock, kProfile, kRegCols>(*search, pb, ok, out, feasible, prof);
  }
}

}  // namespace lsa_block
}  // namespace sam3fast
