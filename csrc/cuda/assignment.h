// Batched exact linear sum assignment on a CUDA stream (no torch headers).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace sam3fast {

// Solves B independent problems of a contiguous (B, n, m) cost batch (+inf = forbidden), one
// thread block each. Writes assignment (B, n): the column of each row or -1, and feasible (B,):
// false when the problem holds NaN or -inf or admits no complete assignment (its row is all -1).
// Returns cudaErrorInvalidValue when max(n, m) exceeds what the device's shared memory holds
// (25 bytes per column + 12 per row), else the launch status. Costs are accumulated in double.
template <typename T>
cudaError_t linear_sum_assignment_cuda(const T* cost, int64_t B, int64_t n, int64_t m,
                                       int64_t* assignment, bool* feasible, cudaStream_t stream);

}  // namespace sam3fast
