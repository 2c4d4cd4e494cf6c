// Shortest augmenting path (Jonker-Volgenant / Crouse 2016) for the rectangular assignment problem.
//
// Rows are added one at a time; for each, a Dijkstra search over reduced costs
// c(i, j) - u[i] - v[j] >= 0 finds the cheapest path to a free column, the duals u, v are updated
// so the reduced costs stay non-negative, and the path is flipped. O(R^2 C) for R <= C rows.
//
// The search visits columns in the same order and breaks ties the same way as
// scipy.optimize.linear_sum_assignment (scipy >= 1.6), in float64, so the assignments are the same
// as scipy's, ties included. Float inputs are widened to double like scipy does.
#include "assignment.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace sam3fast {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Returns the free column that ends the shortest augmenting path from row `i`, or -1 when every
// remaining column is forbidden. On return remaining[num_remaining..C) lists the columns the
// search settled (their shortest path costs are final), and *min_val is the path length.
int64_t shortest_augmenting_path(int64_t C, LsaWorkspace& ws, int64_t i, int64_t* num_settled,
                                 double* min_val) {
  const double* cost = ws.cost.data();
  const double* u = ws.u.data();
  const double* v = ws.v.data();
  double* spc = ws.spc.data();
  int64_t* path = ws.path.data();
  const int64_t* row4col = ws.row4col.data();
  int64_t* remaining = ws.remaining.data();

  // Reverse order: a constant matrix gives the identity, as in scipy (scipy issue #11602).
  for (int64_t it = 0; it < C; ++it) remaining[it] = C - it - 1;
  std::fill(spc, spc + C, kInf);

  int64_t num_remaining = C;
  double dist = 0.0;
  while (true) {
    int64_t best = -1;
    double lowest = kInf;
    const double* crow = cost + i * C;
    const double ui = u[i];
    for (int64_t it = 0; it < num_remaining; ++it) {
      const int64_t j = remaining[it];
      const double r = dist + crow[j] - ui - v[j];
      if (r < spc[j]) {
        path[j] = i;
        spc[j] = r;
      }
      // Among equal costs prefer a free column: it ends the search (matters for small integers).
      if (spc[j] < lowest || (spc[j] == lowest && row4col[j] == -1)) {
        lowest = spc[j];
        best = it;
      }
    }
    dist = lowest;
    if (!(dist < kInf)) return -1;
    const int64_t j = remaining[best];
    // Swap rather than overwrite so the settled columns collect at the tail (for the dual update);
    // the unsettled prefix keeps scipy's order.
    remaining[best] = remaining[--num_remaining];
    remaining[num_remaining] = j;
    if (row4col[j] == -1) {
      *num_settled = C - num_remaining;
      *min_val = dist;
      return j;
    }
    i = row4col[j];
  }
}

}  // namespace

template <typename T>
LsaStatus linear_sum_assignment_cpu(const T* cost, int64_t n, int64_t m, int64_t* assignment,
                                    LsaWorkspace& ws) {
  std::fill(assignment, assignment + n, int64_t{-1});
  if (n == 0 || m == 0) return LsaStatus::kOk;

  // The search needs rows <= columns: solve the transpose of a tall matrix.
  const bool transpose = m < n;
  const int64_t R = transpose ? m : n;
  const int64_t C = transpose ? n : m;

  ws.cost.resize(R * C);
  double* c = ws.cost.data();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      const double x = static_cast<double>(cost[i * m + j]);
      if (std::isnan(x) || x == -kInf) return LsaStatus::kInvalid;
      c[transpose ? j * C + i : i * C + j] = x;
    }
  }

  ws.u.assign(R, 0.0);
  ws.v.assign(C, 0.0);
  ws.spc.resize(C);
  ws.path.assign(C, -1);
  ws.col4row.assign(R, -1);
  ws.row4col.assign(C, -1);
  ws.remaining.resize(C);
  double* u = ws.u.data();
  double* v = ws.v.data();
  const double* spc = ws.spc.data();
  int64_t* col4row = ws.col4row.data();
  int64_t* row4col = ws.row4col.data();

  for (int64_t cur = 0; cur < R; ++cur) {
    int64_t num_settled = 0;
    double min_val = 0.0;
    const int64_t sink = shortest_augmenting_path(C, ws, cur, &num_settled, &min_val);
    if (sink < 0) return LsaStatus::kInfeasible;

    // Dual update. Every settled column j other than the sink was reached through its matched
    // row row4col[j], so each visited row (except cur) gets exactly one update; same arithmetic
    // as scipy's row loop over SR.
    u[cur] += min_val;
    const int64_t* settled = ws.remaining.data() + (C - num_settled);
    for (int64_t k = 0; k < num_settled; ++k) {
      const int64_t j = settled[k];
      const double delta = min_val - spc[j];
      v[j] -= delta;
      if (row4col[j] != -1) u[row4col[j]] += delta;
    }

    // Flip the path: each column on it takes the row that reached it.
    int64_t j = sink;
    while (true) {
      const int64_t i = ws.path[j];
      row4col[j] = i;
      std::swap(col4row[i], j);
      if (i == cur) break;
    }
  }

  if (transpose) {
    // Algorithm rows are the original columns: column j of the transpose is original row j.
    for (int64_t j = 0; j < C; ++j) assignment[j] = row4col[j];
  } else {
    for (int64_t i = 0; i < R; ++i) assignment[i] = col4row[i];
  }
  return LsaStatus::kOk;
}

template <typename T>
void batched_linear_sum_assignment_cpu(const T* cost, int64_t begin, int64_t end, int64_t n,
                                       int64_t m, int64_t* assignment, bool* feasible) {
  LsaWorkspace ws;
  for (int64_t b = begin; b < end; ++b) {
    const LsaStatus s = linear_sum_assignment_cpu(cost + b * n * m, n, m, assignment + b * n, ws);
    feasible[b] = (s == LsaStatus::kOk);
  }
}

template LsaStatus linear_sum_assignment_cpu<float>(const float*, int64_t, int64_t, int64_t*,
                                                    LsaWorkspace&);
template LsaStatus linear_sum_assignment_cpu<double>(const double*, int64_t, int64_t, int64_t*,
                                                     LsaWorkspace&);
template void batched_linear_sum_assignment_cpu<float>(const float*, int64_t, int64_t, int64_t,
                                                       int64_t, int64_t*, bool*);
template void batched_linear_sum_assignment_cpu<double>(const double*, int64_t, int64_t, int64_t,
                                                        int64_t, int64_t*, bool*);

}  // namespace sam3fast
