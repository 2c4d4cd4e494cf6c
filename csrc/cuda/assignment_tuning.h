// Tuning knobs of the CUDA assignment launcher (csrc/cuda/assignment.cu), for benchmarks and tests.
//
// linear_sum_assignment_cuda (cuda/assignment.h) uses lsa_cuda_options(), which reads the
// environment at every call (five getenv, well under a microsecond next to the launch), so a
// benchmark or test can switch them between calls in one process; a CUDA graph keeps the choice
// made when it was captured:
//   SAM3FAST_LSA_THREADS  0 (default): about two columns per thread, 32..256 threads;
//                         32, 64, ..., 256: that many threads per block, whatever the size.
//                         A 32-thread block synchronises with __syncwarp and takes its argmin
//                         from register shuffles alone.
//   SAM3FAST_LSA_INIT     2 (default): row reduction, greedy matching and reduction transfer
//                         before the searches; 1: without the transfer; 0: none (every row is
//                         searched for). All give an optimal assignment (on ties maybe another).
//   SAM3FAST_LSA_STAGE    2 (default): as 1 when there are no more problems than SMs (each block
//                         has an SM to itself, so the larger shared memory costs no occupancy), else
//                         as 0; 0: stage the cost matrix in shared memory when the search state and
//                         it fit 48 KiB; 1: whenever they fit the device's opt-in limit (227 KiB on
//                         H100; then fewer blocks share an SM). A staged row is read in ~30 cycles by
//                         each Dijkstra step instead of from L2 (one 200x128 float32 problem, 102 KB,
//                         stages only with the opt-in).
//   SAM3FAST_LSA_REGS     1 (default): the searches keep each thread's column state (v, the
//                         shortest-path estimate, settled flag, matched row) in registers when
//                         the thread owns at most 8 columns (a Dijkstra step then loads only the
//                         costs from shared memory); 0: that state in shared memory (any size).
//   SAM3FAST_LSA_SPLIT    2 (default): in a block of more than one warp whose problem has at most
//                         256 columns, the whole block initialises (reads and stages the matrix,
//                         row minima, greedy matching) and then warp 0 runs the searches alone
//                         (each lane up to 8 columns, register-shuffle argmins, no __syncthreads)
//                         while the other warps exit, when there are no more problems than SMs;
//                         1: wherever possible; 0: never (every warp searches; each Dijkstra step
//                         then ends with a shared-memory argmin across warps and a barrier). Untimed
//                         on a GPU when it was written (session 21).
//   SAM3FAST_LSA_PROFILE  0 (default); 1: the kernel built with phase timing, whose block 0 prints
//                         (device printf, on the process's stdout at the next sync) its cycles in
//                         reading the matrix, the row minima, the greedy matching and the searches
//                         (the Dijkstra loops and the dual update + path flip), and its number of
//                         searches and Dijkstra steps. Same results; for bench/bench_assignment.py.
// An unparsable or out-of-range value is reported once on stderr and the default used. These are
// tuning switches for measurements, not settings: every combination gives an optimal assignment.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace sam3fast {

struct LsaCudaOptions {
  int threads = 0;  // 0 = the size rule, else a multiple of 32 in [32, 256]
  int init = 2;     // lsa_block::kLsaInitOff / kLsaInitRows / kLsaInitTransfer
  int stage = 2;    // 0 = up to 48 KiB of shared memory, 1 = up to the opt-in limit, 2 = 1 if B <= SMs
  int profile = 0;  // 1 = the phase-timing kernel (block 0 prints its cycles)
  int regs = 1;     // 1 = column state in registers where a thread owns <= 8 columns, 0 = shared memory
  int split = 2;    // 0 = the whole block searches, 1 = warp 0 alone where possible, 2 = that when B <= SMs
};

// The options the environment sets now.
LsaCudaOptions lsa_cuda_options();

// linear_sum_assignment_cuda with explicit options (cudaErrorInvalidValue for invalid ones).
template <typename T>
cudaError_t linear_sum_assignment_cuda(const T* cost, int64_t B, int64_t n, int64_t m,
                                       int64_t* assignment, bool* feasible, cudaStream_t stream,
                                       const LsaCudaOptions& options);

}  // namespace sam3fast
