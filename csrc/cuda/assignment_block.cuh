// One linear assignment problem solved by one thread block (no torch, no CUDA runtime calls).
//
// The algorithm is the CPU one (csrc/cpu/assignment.cpp): rows are added one at a time, a
// Dijkstra search over reduced costs finds the shortest augmenting path, duals are updated, the
// path is flipped. The block splits the columns among its threads (column j belongs to thread
// j % nthreads) and each Dijkstra step is one parallel relax + one block-wide argmin.
//
// Synchronisation design (checked on the host under ThreadSanitizer by tests/cpp, which runs this
// header with std::threads standing in for CUDA threads):
//   - v[j], spc[j], path[j], settled[j] are written only by the owner of column j, so a Dijkstra
//     step shares nothing through memory: its only cross-thread exchange is the argmin;
//   - u[] and row4col[] are read by every thread during a search and written only between
//     searches (dual update, path flip), each fenced by a barrier;
//   - the argmin result is the same on every thread, so all control flow is block-uniform.
// Ties: smaller cost, then a free column, then the smaller column index (deterministic; scipy
// breaks ties by its own visiting order, so tied problems may get a different optimum).
//
// The Block policy supplies tid(), size(), sync() (barrier), any(bool) (a barrier that ORs a
// flag) and argmin(LsaCand) (the block-wide minimum, returned to every thread; a one-warp block
// does it with register shuffles, which order no memory accesses).
#pragma once

#include <stdint.h>

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

SAM3FAST_HD double inf() { return __builtin_huge_val(); }

SAM3FAST_HD bool cand_less(const LsaCand& a, const LsaCand& b) {
  return a.value < b.value || (a.value == b.value && a.key < b.key);
}

SAM3FAST_HOST_HD int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Shared memory carve-up for R <= C (optionally with the cost matrix staged as T[R*C]).
struct LsaSmemLayout {
  int64_t u, v, spc, path, row4col, col4row, settled, cost, total;
};

SAM3FAST_HOST_HD LsaSmemLayout lsa_smem_layout(int64_t R, int64_t C, int64_t staged_elem_bytes) {
  LsaSmemLayout L;
  int64_t off = 0;
  L.u = off;       off += 8 * R;
  L.v = off;       off += 8 * C;
  L.spc = off;     off += 8 * C;
  L.cost = off;    off = align_up(off + staged_elem_bytes * R * C, 8);
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

// Solves cost (n, m) row-major; writes out[n] (column per row or -1) and *feasible.
// smem must hold lsa_smem_layout(min(n,m), max(n,m), kStage ? sizeof(T) : 0).total bytes.
// kStage: copy the cost matrix into shared memory first (small problems: the search re-reads it).
template <typename T, bool kStage, typename Block>
SAM3FAST_HD void solve_block(Block& blk, const T* __restrict__ cost, int n, int m,
                             int64_t* __restrict__ out, bool* __restrict__ feasible,
                             unsigned char* smem) {
  const int tid = blk.tid();
  const int nt = blk.size();
  const bool transpose = m < n;
  const int R = transpose ? m : n;
  const int C = transpose ? n : m;

  const LsaSmemLayout L = lsa_smem_layout(R, C, kStage ? sizeof(T) : 0);
  double* u = reinterpret_cast<double*>(smem + L.u);
  double* v = reinterpret_cast<double*>(smem + L.v);
  double* spc = reinterpret_cast<double*>(smem + L.spc);
  T* scost = reinterpret_cast<T*>(smem + L.cost);
  int* path = reinterpret_cast<int*>(smem + L.path);
  int* row4col = reinterpret_cast<int*>(smem + L.row4col);
  int* col4row = reinterpret_cast<int*>(smem + L.col4row);
  unsigned char* settled = smem + L.settled;

  // Validate (and stage, transposed into row-major R x C) in one coalesced pass.
  bool bad = false;
  const int64_t nm = static_cast<int64_t>(n) * m;
  for (int64_t e = tid; e < nm; e += nt) {
    const T x = cost[e];
    bad = bad || lsa_invalid(x);
    if (kStage) {
      const int64_t i = e / m, j = e - i * m;
      scost[transpose ? j * C + i : e] = x;
    }
  }
  for (int j = tid; j < C; j += nt) {
    v[j] = 0.0;
    row4col[j] = -1;
  }
  for (int i = tid; i < R; i += nt) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  bool ok = !blk.any(bad);  // also the barrier after initialisation

  for (int cur = 0; ok && cur < R; ++cur) {
    for (int j = tid; j < C; j += nt) {
      spc[j] = inf();
      settled[j] = 0;
    }
    int i = cur;
    double dist = 0.0;
    int sink = -1;
    while (sink < 0) {
      const double ui = u[i];
      const int64_t row_off = static_cast<int64_t>(i) * (transpose ? 1 : m);
      const int64_t col_stride = transpose ? m : 1;
      LsaCand best{inf(), kKeyNone};
      for (int j = tid; j < C; j += nt) {
        if (settled[j]) continue;
        const double c = static_cast<double>(
            kStage ? scost[static_cast<int64_t>(i) * C + j] : cost[row_off + j * col_stride]);
        const double r = dist + c - ui - v[j];
        double s = spc[j];
        if (r < s) {
          path[j] = i;
          spc[j] = r;
          s = r;
        }
        const LsaCand cand{s, row4col[j] == -1 ? j : (j | kBusy)};
        if (cand_less(cand, best)) best = cand;
      }
      best = blk.argmin(best);
      if (!(best.value < inf())) {
        ok = false;  // every remaining column is forbidden: infeasible
        break;
      }
      dist = best.value;
      const int j = best.key & (kBusy - 1);
      if (j % nt == tid) settled[j] = 1;
      if (best.key & kBusy) {
        i = row4col[j];
      } else {
        sink = j;
      }
    }
    if (!ok) break;
    // In a one-warp block the argmin is a register exchange with no memory ordering: order the
    // search's reads of u[] before the dual update's writes (once per row, not per step).
    blk.sync();

    // Dual update, owner-computes: the settled non-sink column j was reached through its matched
    // row, the only update that row gets (rows are distinct, and cur is unmatched).
    for (int j = tid; j < C; j += nt) {
      if (!settled[j]) continue;
      const double delta = dist - spc[j];
      v[j] -= delta;
      if (row4col[j] != -1) u[row4col[j]] += delta;
    }
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
  }

  if (!ok) {
    for (int i = tid; i < n; i += nt) out[i] = -1;
  } else if (transpose) {
    // Column j of the transpose is original row j; its matched algorithm row is an original column.
    for (int j = tid; j < C; j += nt) out[j] = row4col[j];
  } else {
    for (int i = tid; i < R; i += nt) out[i] = col4row[i];
  }
  if (tid == 0) *feasible = ok;
}

}  // namespace lsa_block
}  // namespace sam3fast
