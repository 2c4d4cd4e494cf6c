// Exact linear sum assignment on the CPU (no torch headers: the standalone CMake test links it).
//
// cost is a row-major (n, m) matrix, +inf = forbidden pair. The solver assigns min(n, m) pairs
// with the minimum total cost and writes assignment[i] = column of row i, or -1 (n > m).
#pragma once

#include <cstdint>
#include <vector>

namespace sam3fast {

enum class LsaStatus : int {
  kOk = 0,
  kInfeasible = 1,  // no complete assignment avoids +inf
  kInvalid = 2,     // the matrix holds NaN or -inf
};

// Buffers reused across the problems of one batch chunk (sized on first use).
struct LsaWorkspace {
  std::vector<double> cost, u, v, spc;
  std::vector<int64_t> path, col4row, row4col, remaining;
};

// One problem. On any status but kOk, assignment is all -1.
template <typename T>
LsaStatus linear_sum_assignment_cpu(const T* cost, int64_t n, int64_t m, int64_t* assignment,
                                    LsaWorkspace& ws);

// Problems [begin, end) of a contiguous (B, n, m) batch; feasible[b] = (status == kOk).
template <typename T>
void batched_linear_sum_assignment_cpu(const T* cost, int64_t begin, int64_t end, int64_t n,
                                       int64_t m, int64_t* assignment, bool* feasible);

}  // namespace sam3fast
