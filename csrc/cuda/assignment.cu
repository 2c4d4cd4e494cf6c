// Batched exact linear sum assignment: one thread block per problem (see assignment_block.cuh).
//
// Grid: B blocks. Block: 32..256 threads, about two columns per thread; problems up to 32 columns
// run in one warp, whose argmin is a register butterfly with no __syncthreads. When the cost
// matrix fits in 48 KiB of shared memory alongside the search state it is staged there, since
// each Dijkstra step re-reads one row of it with a dependent (latency-bound) load.
#include "assignment.h"
#include "assignment_block.cuh"

namespace sam3fast {
namespace {

using lsa_block::LsaCand;

constexpr int kMaxThreads = 256;
constexpr int kColsPerThread = 2;
constexpr int64_t kDefaultSmem = 48 * 1024;

struct CudaBlock {
  LsaCand* scratch;  // 2 x 32 warp minima; alternating halves make back-to-back argmins safe
  int parity;

  __device__ int tid() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() { __syncthreads(); }
  __device__ bool any(bool p) { return __syncthreads_or(p) != 0; }

  __device__ LsaCand argmin(LsaCand c) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const LsaCand o{__shfl_xor_sync(0xffffffffu, c.value, off),
                      __shfl_xor_sync(0xffffffffu, c.key, off)};
      if (lsa_block::cand_less(o, c)) c = o;
    }
    const int nw = blockDim.x >> 5;
    if (nw == 1) return c;
    LsaCand* buf = scratch + parity * 32;
    parity ^= 1;
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = c;
    __syncthreads();
    c = buf[0];
    for (int w = 1; w < nw; ++w) {
      if (lsa_block::cand_less(buf[w], c)) c = buf[w];
    }
    return c;
  }
};

template <typename T, bool kStage>
__global__ void __launch_bounds__(kMaxThreads)
    lsa_kernel(const T* __restrict__ cost, int n, int m, int64_t* __restrict__ assignment,
               bool* __restrict__ feasible) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ LsaCand scratch[64];
  CudaBlock blk{scratch, 0};
  const int64_t b = blockIdx.x;
  lsa_block::solve_block<T, kStage>(blk, cost + b * n * m, n, m, assignment + b * n,
                                    feasible + b, smem);
}

}  // namespace

template <typename T>
cudaError_t linear_sum_assignment_cuda(const T* cost, int64_t B, int64_t n, int64_t m,
                                       int64_t* assignment, bool* feasible, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > 0x7fffffff || n > (1 << 24) || m > (1 << 24)) return cudaErrorInvalidValue;
  const int64_t R = n < m ? n : m;
  const int64_t C = n < m ? m : n;
  int threads = static_cast<int>((C + kColsPerThread - 1) / kColsPerThread);
  threads = (threads + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);

  const int64_t staged = lsa_block::lsa_smem_layout(R, C, sizeof(T)).total;
  if (staged <= kDefaultSmem) {
    lsa_kernel<T, true><<<static_cast<unsigned>(B), threads, staged, stream>>>(
        cost, static_cast<int>(n), static_cast<int>(m), assignment, feasible);
    return cudaGetLastError();
  }
  const int64_t plain = lsa_block::lsa_smem_layout(R, C, 0).total;
  if (plain > kDefaultSmem) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err != cudaSuccess) return err;
    if (plain + static_cast<int64_t>(sizeof(LsaCand)) * 64 > optin) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(lsa_kernel<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plain));
    if (err != cudaSuccess) return err;
  }
  lsa_kernel<T, false><<<static_cast<unsigned>(B), threads, plain, stream>>>(
      cost, static_cast<int>(n), static_cast<int>(m), assignment, feasible);
  return cudaGetLastError();
}

template cudaError_t linear_sum_assignment_cuda<float>(const float*, int64_t, int64_t, int64_t,
                                                       int64_t*, bool*, cudaStream_t);
template cudaError_t linear_sum_assignment_cuda<double>(const double*, int64_t, int64_t, int64_t,
                                                        int64_t*, bool*, cudaStream_t);

}  // namespace sam3fast
