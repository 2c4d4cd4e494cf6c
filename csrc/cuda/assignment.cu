// Batched exact linear sum assignment: one thread block per problem (see assignment_block.cuh).
//
// Grid: B blocks. Block: 32..256 threads, about two columns per thread; problems up to 64 columns
// run in one warp, which synchronises with __syncwarp and takes its argmin from a register
// butterfly (no shared memory, no __syncthreads). When the cost matrix fits in shared memory
// alongside the search state it is staged there, since each Dijkstra step re-reads one row of it
// with a dependent (latency-bound) load: within 48 KiB always, within the device's opt-in limit
// when there are no more problems than SMs (no occupancy to lose; one 200x128 float32 problem).
// The matrix is read from global memory with several 16-byte loads in flight per thread: one
// block alone on an SM has too few warps to hide the latency of one load at a time (H200: one
// 200x128 float32 problem took 154 us in a CUDA graph with the one-at-a-time copy, which by the
// count of its ~200 round trips per thread is most of it; not yet measured since). Before the
// searches, row reduction, a greedy matching (one atomic minimum per row) and reduction transfer
// (assignment_block.cuh) leave only the conflicting rows to search for: with few problems the time
// is then about the number of searches and Dijkstra steps, each a few barriers, not the
// arithmetic. The searches keep each thread's columns' state in registers where a thread owns at
// most 8 columns (a Dijkstra step then reads only the costs from shared memory; H200 profile of run
// 2 of 2026-11-27, state in shared memory: ~2070 cycles a step for one 200x128 problem; the
// register form is untimed). With no more problems than SMs, a block of several warps initialises
// together and then leaves the searches to warp 0 alone (the split search: a Dijkstra step of one
// warp takes its argmin from register shuffles, with no barrier; untimed). The block size, the
// initialisation, the staging limit, the state's place and the split can be forced
// (SAM3FAST_LSA_THREADS / _INIT / _STAGE / _REGS / _SPLIT, read at every call: see
// assignment_tuning.h) for benchmarks (bench/bench_assignment.py) and tests. The kernels declare
// a minimum number of resident blocks per SM: 1 for the one-warp kernels (registers never limit
// their occupancy), 2 for the larger blocks (at most 128 registers a thread, so a batch of more
// problems than SMs keeps at least the occupancy the shared-memory kernel had). Without a
// minimum, CUDA 13's ptxas held several instantiations to 64 registers and spilled; with these,
// none spills (static sm_90 build).
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "assignment.h"
#include "assignment_block.cuh"
#include "assignment_tuning.h"

namespace sam3fast {
namespace {

using lsa_block::LsaCand;

constexpr int kMaxThreads = 256;
constexpr int kColsPerThread = 2;
// Columns per thread of the register-resident search state (SAM3FAST_LSA_REGS=1): the size rule's
// two, or up to eight (one warp for up to 256 columns, or a forced block size); more columns per
// thread than that keep the state in shared memory.
constexpr int kRegColsSmall = 2;
constexpr int kRegColsLarge = 8;
constexpr int64_t kDefaultSmem = 48 * 1024;
constexpr int64_t kScratchBytes = sizeof(LsaCand) * 64;  // CudaBlock's static shared memory

// The warp's minimum candidate, returned to every lane (register shuffles: no memory ordering).
__device__ __forceinline__ LsaCand warp_argmin(LsaCand c) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const LsaCand o{__shfl_xor_sync(0xffffffffu, c.value, off), __shfl_xor_sync(0xffffffffu, c.key, off)};
    if (lsa_block::cand_less(o, c)) c = o;
  }
  return c;
}

// Two or more warps: barriers are __syncthreads, the argmin goes through shared memory.
struct CudaBlock {
  LsaCand* scratch;  // 2 x 32 warp minima; alternating halves make back-to-back argmins safe
  int parity;

  __device__ int tid() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() { __syncthreads(); }
  __device__ bool any(bool p) { return __syncthreads_or(p) != 0; }
  __device__ bool argmin_fences() const { return blockDim.x > 32; }
  __device__ void atomic_min(int* p, int v) { atomicMin(p, v); }
  __device__ long long clock() const { return clock64(); }

  __device__ LsaCand argmin(LsaCand c) {
    c = warp_argmin(c);
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

// Exactly one warp: __syncwarp orders shared memory among its lanes at a fraction of the cost of
// __syncthreads; size() is a constant, so the column ownership test j % 32 is a mask.
struct WarpBlock {
  __device__ int tid() const { return threadIdx.x; }
  __device__ int size() const { return 32; }
  __device__ void sync() { __syncwarp(); }
  __device__ bool any(bool p) {
    __syncwarp();  // the vote alone orders no memory accesses
    return __any_sync(0xffffffffu, p) != 0;
  }
  __device__ bool argmin_fences() const { return false; }
  __device__ void atomic_min(int* p, int v) { atomicMin(p, v); }
  __device__ long long clock() const { return clock64(); }

  __device__ LsaCand argmin(LsaCand c) { return warp_argmin(c); }
};

// kProfile (SAM3FAST_LSA_PROFILE): block 0 prints where its cycles went (lsa_block::LsaProfile).
// kRegCols: the searches' column state in registers, kRegCols columns per searching thread (0: in
// shared memory; lsa_block::solve_block).
// kSplit (a block of several warps, SAM3FAST_LSA_SPLIT): the whole block initialises, then warp 0
// searches alone (WarpBlock: register-shuffle argmins, __syncwarp) and the other warps return.
template <typename T, bool kStage, bool kWarp, bool kProfile, int kRegCols, bool kSplit = false>
__global__ void __launch_bounds__(kWarp ? 32 : kMaxThreads, kWarp ? 1 : 2)
    lsa_kernel(const T* __restrict__ cost, int n, int m, int64_t* __restrict__ assignment,
               bool* __restrict__ feasible, int init) {
  static_assert(!(kWarp && kSplit), "a one-warp block has no warp to split off");
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  lsa_block::LsaProfile prof{};
  if constexpr (kWarp) {
    WarpBlock blk;
    lsa_block::solve_block<T, kStage, WarpBlock, kProfile, kRegCols>(
        blk, cost + b * n * m, n, m, assignment + b * n, feasible + b, smem, init, &prof);
  } else if constexpr (kSplit) {
    __shared__ LsaCand scratch[64];
    CudaBlock blk{scratch, 0};
    WarpBlock search;
    lsa_block::solve_block<T, kStage, CudaBlock, kProfile, kRegCols, WarpBlock>(
        blk, cost + b * n * m, n, m, assignment + b * n, feasible + b, smem, init, &prof, &search);
  } else {
    __shared__ LsaCand scratch[64];
    CudaBlock blk{scratch, 0};
    lsa_block::solve_block<T, kStage, CudaBlock, kProfile, kRegCols>(
        blk, cost + b * n * m, n, m, assignment + b * n, feasible + b, smem, init, &prof);
  }
  if constexpr (kProfile) {
    if (b == 0 && threadIdx.x == 0) {
      printf("sam3fast lsa profile: %dx%d %s threads=%d staged=%d init=%d regs=%d split=%d; cycles: read %lld, "
             "row minima %lld, greedy %lld, searches %lld (dijkstra %lld, update+flip %lld), total %lld; "
             "searches %d, steps %d\n",
             n, m, sizeof(T) == 4 ? "f32" : "f64", static_cast<int>(blockDim.x), int(kStage), init, kRegCols,
             int(kSplit),
             prof.read - prof.start, prof.rows - prof.read, prof.greedy - prof.rows, prof.end - prof.greedy,
             prof.dijkstra, prof.update, prof.end - prof.start, prof.searches, prof.steps);
    }
  }
}

// The template arguments of one launch, chosen at run time.
struct LaunchArgs {
  int threads;
  int64_t smem;  // dynamic shared memory bytes
  int init;
  bool profile;
  int reg_cols;  // 0, 2 or 8 (kRegColsSmall / kRegColsLarge), per searching thread
  bool split;    // warp 0 searches alone after the block's initialisation (threads > 32)
};

// Launches lsa_kernel<T, kStage, kWarp, kProfile, kRegCols, kSplit> with a.smem bytes of dynamic
// shared memory, raising the kernel's limit first when that and the static scratch are over the
// default 48 KiB (the caller checked the opt-in limit).
template <typename T, bool kStage, bool kWarp, bool kProfile, int kRegCols, bool kSplit>
cudaError_t launch(const T* cost, int64_t B, int64_t n, int64_t m, int64_t* assignment, bool* feasible,
                   cudaStream_t stream, const LaunchArgs& a) {
  auto* kernel = lsa_kernel<T, kStage, kWarp, kProfile, kRegCols, kSplit>;
  if (a.smem + (kWarp ? 0 : kScratchBytes) > kDefaultSmem) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(a.smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(B), a.threads, a.smem, stream>>>(cost, static_cast<int>(n), static_cast<int>(m),
                                                                   assignment, feasible, a.init);
  return cudaGetLastError();
}

template <typename T, bool kStage, bool kWarp, bool kProfile>
cudaError_t launch(const T* cost, int64_t B, int64_t n, int64_t m, int64_t* assignment, bool* feasible,
                   cudaStream_t stream, const LaunchArgs& a) {
  if constexpr (!kWarp) {
    if (a.split) {  // one searching warp: up to kRegColsLarge columns a lane in registers, or shared
      return a.reg_cols == kRegColsLarge
                 ? launch<T, kStage, false, kProfile, kRegColsLarge, true>(cost, B, n, m, assignment, feasible,
                                                                           stream, a)
                 : launch<T, kStage, false, kProfile, 0, true>(cost, B, n, m, assignment, feasible, stream, a);
    }
  }
  switch (a.reg_cols) {
    case kRegColsSmall:
      return launch<T, kStage, kWarp, kProfile, kRegColsSmall, false>(cost, B, n, m, assignment, feasible, stream,
                                                                      a);
    case kRegColsLarge:
      return launch<T, kStage, kWarp, kProfile, kRegColsLarge, false>(cost, B, n, m, assignment, feasible, stream,
                                                                      a);
    default:
      return launch<T, kStage, kWarp, kProfile, 0, false>(cost, B, n, m, assignment, feasible, stream, a);
  }
}

template <typename T, bool kStage>
cudaError_t launch(const T* cost, int64_t B, int64_t n, int64_t m, int64_t* assignment, bool* feasible,
                   cudaStream_t stream, const LaunchArgs& a) {
  if (a.threads == 32) {
    return a.profile ? launch<T, kStage, true, true>(cost, B, n, m, assignment, feasible, stream, a)
                     : launch<T, kStage, true, false>(cost, B, n, m, assignment, feasible, stream, a);
  }
  return a.profile ? launch<T, kStage, false, true>(cost, B, n, m, assignment, feasible, stream, a)
                   : launch<T, kStage, false, false>(cost, B, n, m, assignment, feasible, stream, a);
}

bool valid_threads(long t) { return t == 0 || (t >= 32 && t <= kMaxThreads && t % 32 == 0); }

// One knob: its value when set and valid, else the default (an invalid value is reported once).
int env_knob(const char* name, int fallback, bool (*valid)(long), std::atomic<bool>* warned) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(s, &end, 10);
  if (*end != '\0' || !valid(x)) {
    if (!warned->exchange(true)) {
      std::fprintf(stderr, "sam3fast: ignoring %s=%s (see csrc/cuda/assignment_tuning.h)\n", name, s);
    }
    return fallback;
  }
  return static_cast<int>(x);
}

}  // namespace

LsaCudaOptions lsa_cuda_options() {
  static std::atomic<bool> warned[6];
  LsaCudaOptions o;
  o.threads = env_knob("SAM3FAST_LSA_THREADS", o.threads, valid_threads, &warned[0]);
  o.init = env_knob("SAM3FAST_LSA_INIT", o.init, [](long x) { return x >= 0 && x <= 2; }, &warned[1]);
  o.stage = env_knob("SAM3FAST_LSA_STAGE", o.stage, [](long x) { return x >= 0 && x <= 2; }, &warned[2]);
  o.profile = env_knob("SAM3FAST_LSA_PROFILE", o.profile, [](long x) { return x == 0 || x == 1; }, &warned[3]);
  o.regs = env_knob("SAM3FAST_LSA_REGS", o.regs, [](long x) { return x == 0 || x == 1; }, &warned[4]);
  o.split = env_knob("SAM3FAST_LSA_SPLIT", o.split, [](long x) { return x >= 0 && x <= 2; }, &warned[5]);
  return o;
}

template <typename T>
cudaError_t linear_sum_assignment_cuda(const T* cost, int64_t B, int64_t n, int64_t m,
                                       int64_t* assignment, bool* feasible, cudaStream_t stream,
                                       const LsaCudaOptions& options) {
  if (!valid_threads(options.threads) || options.init < 0 || options.init > 2 || options.stage < 0 ||
      options.stage > 2 || options.profile < 0 || options.profile > 1 || options.regs < 0 || options.regs > 1 ||
      options.split < 0 || options.split > 2) {
    return cudaErrorInvalidValue;
  }
  if (B == 0) return cudaSuccess;
  if (B > 0x7fffffff || n > (1 << 24) || m > (1 << 24)) return cudaErrorInvalidValue;
  const int64_t R = n < m ? n : m;
  const int64_t C = n < m ? m : n;
  int threads = options.threads;
  if (threads == 0) {
    threads = static_cast<int>((C + kColsPerThread - 1) / kColsPerThread);
    threads = (threads + 31) / 32 * 32;
    threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  }

  const int64_t staged = lsa_block::lsa_smem_layout(R, C, sizeof(T)).total;
  const int64_t plain = lsa_block::lsa_smem_layout(R, C, 0).total;
  int64_t optin = kDefaultSmem;
  bool wide_stage = options.stage == 1;
  // The split search (SAM3FAST_LSA_SPLIT): possible with more than one warp and at most
  // kRegColsLarge columns a lane; 1 = wherever possible, 2 = there when no more problems than SMs
  // (a block per SM: the idle warps cost no other block its place), 0 = never.
  const bool can_split = options.split != 0 && threads > 32 && C <= 32 * kRegColsLarge;
  int sms = 0;
  cudaError_t err = cudaSuccess;
  const bool need_sms = (options.stage == 2 && (plain > kDefaultSmem || staged > kDefaultSmem)) ||
                        (can_split && options.split == 2);
  if (plain > kDefaultSmem || (options.stage != 0 && staged > kDefaultSmem) || need_sms) {
    int device = 0, limit = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err == cudaSuccess && need_sms) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    // (stage 2: a block per SM at most, so the opt-in shared memory costs no occupancy)
    if (options.stage == 2) wide_stage = B <= sms;
    optin = limit - kScratchBytes;
  }
  const bool stage = staged <= kDefaultSmem || (wide_stage && staged <= optin);
  const bool split = can_split && (options.split == 1 || B <= sms);
  const int searchers = split ? 32 : threads;
  const int64_t per_thread = (C + searchers - 1) / searchers;
  // (a split search has one instantiation in registers: kRegColsLarge a lane)
  const int reg_cols = options.regs == 0 ? 0
                       : per_thread <= kRegColsSmall && !split ? kRegColsSmall
                       : per_thread <= kRegColsLarge ? kRegColsLarge
                                                     : 0;
  const LaunchArgs args{threads, stage ? staged : plain, options.init, options.profile != 0, reg_cols, split};
  if (stage) return launch<T, true>(cost, B, n, m, assignment, feasible, stream, args);
  if (plain > optin) return cudaErrorInvalidValue;
  return launch<T, false>(cost, B, n, m, assignment, feasible, stream, args);
}

template <typename T>
cudaError_t linear_sum_assignment_cuda(const T* cost, int64_t B, int64_t n, int64_t m,
                                       int64_t* assignment, bool* feasible, cudaStream_t stream) {
  return linear_sum_assignment_cuda(cost, B, n, m, assignment, feasible, stream, lsa_cuda_options());
}

template cudaError_t linear_sum_assignment_cuda<float>(const float*, int64_t, int64_t, int64_t,
                                                       int64_t*, bool*, cudaStream_t);
template cudaError_t linear_sum_assignment_cuda<double>(const double*, int64_t, int64_t, int64_t,
                                                        int64_t*, bool*, cudaStream_t);
template cudaError_t linear_sum_assignment_cuda<float>(const float*, int64_t, int64_t, int64_t,
                                                       int64_t*, bool*, cudaStream_t,
                                                       const LsaCudaOptions&);
template cudaError_t linear_sum_assignment_cuda<double>(const double*, int64_t, int64_t, int64_t,
                                                        int64_t*, bool*, cudaStream_t,
                                                        const LsaCudaOptions&);

}  // namespace sam3fast
