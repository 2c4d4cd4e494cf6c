// Mask areas, IoU and NMS on bit-packed masks (semantics: csrc/cpu/mask_iou.h).
//
// Intersections: one 256-thread block per 64 x 64 tile of (row mask, column mask) pairs; the K
// words are walked in chunks of 32, staged in shared memory (a warp loads 128 contiguous bytes of
// one mask), and each thread accumulates a 4 x 4 register tile with __popc(a & b), so every shared
// load feeds four popcounts. Rows of the thread tile are 16 apart, which keeps the shared reads
// free of bank conflicts (row stride 33 words). When there are fewer tiles than about two blocks per
// SM (200 x 200 masks are only 16 tiles) the K range is split over gridDim.z and the partial counts
// are added atomically. IoU then follows from the counts and the areas (union = A + B - inter), so
// a pair needs one popcount per word, not two.
//
// NMS (after the torchvision CUDA nms): intersections of the upper triangle of tiles only (the
// matrix is symmetric); each mask's position in descending-score order from a rank count; a bit
// matrix over sorted positions, bit q of row p = (q > p and IoU > threshold), a word per warp
// ballot; then one warp scans the rows in order (staged in shared memory when they fit), OR-ing
// the row of every kept mask into a "removed" bit set in shared memory.
// All on the stream: no host sync, fixed-size output.
#include "mask_iou.h"

#include <algorithm>

#include "cpu/mask_iou.h"  // iou_from_counts, the formula shared with the CPU kernels

namespace sam3fast {
namespace {

constexpr int kTile = 64;     // masks per tile side
constexpr int kChunk = 32;    // words per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 pairs each
constexpr int64_t kMaxMasks = int64_t(65535) * kTile;  // gridDim.y limit

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

__device__ __forceinline__ unsigned popc(uint32_t v) { return __popc(v); }

__global__ void __launch_bounds__(kThreads)
    areas_kernel(const uint32_t* __restrict__ masks, int64_t K, int64_t* __restrict__ areas) {
  __shared__ unsigned partial[kThreads / 32];
  const uint32_t* m = masks + static_cast<int64_t>(blockIdx.x) * K;
  unsigned c = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) c += popc(m[k]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned s = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += partial[w];
    areas[blockIdx.x] = s;
  }
}

// inter[i * M + j] (+)= common bits of a[i] and b[j] over the chunks of blockIdx.z. With
// upper_only (a == b), tiles below the diagonal are skipped: only i <= j (and some i > j inside
// diagonal tiles) are written. Counts fit in 32 bits because K * 32 < 2**31.
__global__ void __launch_bounds__(kThreads)
    inter_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, int64_t N,
                 int64_t M, int64_t K, int64_t chunks_per_split, bool upper_only,
                 unsigned* __restrict__ inter) {
  if (upper_only && blockIdx.y > blockIdx.x) return;
  __shared__ uint32_t as[kTile][kChunk + 1];
  __shared__ uint32_t bs[kTile][kChunk + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t total_chunks = (K + kChunk - 1) / kChunk;
  const int64_t c_begin = blockIdx.z * chunks_per_split;
  const int64_t c_end = min(total_chunks, c_begin + chunks_per_split);

  unsigned acc[4][4] = {};
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t k0 = c * kChunk;
#pragma unroll
    for (int s = 0; s < kTile * kChunk / kThreads; ++s) {
      const int idx = threadIdx.x + s * kThreads;
      const int r = idx / kChunk, kk = idx % kChunk;
      const int64_t k = k0 + kk;
      as[r][kk] = (row0 + r < N && k < K) ? a[(row0 + r) * K + k] : 0u;
      bs[r][kk] = (col0 + r < M && k < K) ? b[(col0 + r) * K + k] : 0u;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kChunk; ++kk) {
      uint32_t av[4], bv[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        av[t] = as[ty + 16 * t][kk];
        bv[t] = bs[tx + 16 * t][kk];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += popc(av[r] & bv[q]);
    }
    __syncthreads();
  }
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = row0 + ty + 16 * r;
    if (i >= N) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = col0 + tx + 16 * q;
      if (j >= M) continue;
      if (split) {
        atomicAdd(inter + i * M + j, acc[r][q]);
      } else {
        inter[i * M + j] = acc[r][q];
      }
    }
  }
}

__global__ void iou_kernel(const unsigned* __restrict__ inter, const int64_t* __restrict__ areas_a,
                           const int64_t* __restrict__ areas_b, int64_t N, int64_t M,
                           float* __restrict__ iou) {
  const int64_t total = N * M;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / M, j = idx - i * M;
    iou[idx] = iou_from_counts(inter[idx], areas_a[i], areas_b[j]);
  }
}

// order[position] = mask index, descending score, NaN first, ties by lower index (a strict total
// order, so the positions are a permutation).
__global__ void rank_kernel(const float* __restrict__ scores, int64_t N, int* __restrict__ order) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const float si = scores[i];
  const bool ni = isnan(si);
  int64_t pos = 0;
  for (int64_t j = 0; j < N; ++j) {
    const float sj = scores[j];
    const bool nj = isnan(sj);
    bool before;
    if (ni || nj) {
      before = nj && (!ni || j < i);
    } else {
      before = sj > si || (sj == si && j < i);
    }
    pos += before;
  }
  order[pos] = static_cast<int>(i);
}

// bits[p * NW + w], bit t = (q = 32 w + t) > p and IoU(order[p], order[q]) > threshold. Words left
// of p's own word are never read by the scan and not written. One warp per word: lane t tests
// q = 32 w + t and the warp's ballot is the word, so each thread makes one chain of three
// dependent loads instead of up to 32 in a row (grid-stride over words, warp-uniform).
__global__ void suppress_bits_kernel(const unsigned* __restrict__ inter,
                                     const int64_t* __restrict__ areas,
                                     const int* __restrict__ order, int64_t N, int64_t NW,
                                     float threshold, uint32_t* __restrict__ bits) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t word = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; word < N * NW;
       word += warps) {
    const int64_t p = word / NW, w = word - p * NW;
    if (w < (p >> 5)) continue;
    const int64_t q = w * 32 + lane;
    bool over = false;
    if (q > p && q < N) {
      const int64_t i = order[p], j = order[q];
      const unsigned c = i <= j ? inter[i * N + j] : inter[j * N + i];
      over = iou_from_counts(c, areas[i], areas[j]) > threshold;
    }
    const uint32_t bitword = __ballot_sync(0xffffffffu, over);
    if (lane == 0) bits[word] = bitword;
  }
}

// One warp: positions in order; a kept mask ORs its row into `removed`. The order (with the
// validity folded into its sign) is staged in shared memory when it fits, so an iteration that
// keeps nothing costs two shared loads and a __syncwarp; with kStageBits the rows of `bits` are
// staged too (read with kInFlight loads per lane outstanding), so a kept mask's OR reads shared
// memory instead of making a global round trip per kept mask.
template <bool kStage, bool kStageBits>
__global__ void __launch_bounds__(32)
    scan_kernel(const uint32_t* __restrict__ bits, const int* __restrict__ order,
                const bool* __restrict__ valid, int64_t N, int64_t NW, bool* __restrict__ keep) {
  static_assert(kStage || !kStageBits, "the bits are staged behind the staged order");
  constexpr int kInFlight = 8;
  extern __shared__ uint32_t smem[];
  uint32_t* removed = smem;
  int* staged = reinterpret_cast<int*>(smem + NW);
  uint32_t* sbits = smem + NW + N;
  const int lane = threadIdx.x;
  for (int64_t w = lane; w < NW; w += 32) removed[w] = 0u;
  if (kStage) {
    for (int64_t p = lane; p < N; p += 32) {
      const int i = order[p];
      staged[p] = (valid == nullptr || valid[i]) ? i : -1 - i;
    }
  }
  if (kStageBits) {
    const int64_t total = N * NW;
    int64_t e = lane;
    for (; e + (kInFlight - 1) * 32 < total; e += kInFlight * 32) {
      uint32_t r[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) r[k] = bits[e + k * 32];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) sbits[e + k * 32] = r[k];
    }
    for (; e < total; e += 32) sbits[e] = bits[e];
  }
  const uint32_t* rows = kStageBits ? sbits : bits;
  __syncwarp();
  for (int64_t p = 0; p < N; ++p) {
    int i;
    bool ok;
    if (kStage) {
      const int e = staged[p];
      i = e >= 0 ? e : -1 - e;
      ok = e >= 0;
    } else {
      i = order[p];
      ok = valid == nullptr || valid[i];
    }
    const bool kept = ok && !((removed[p >> 5] >> (p & 31)) & 1u);
    __syncwarp();
    if (kept) {
      for (int64_t w = (p >> 5) + lane; w < NW; w += 32) removed[w] |= rows[p * NW + w];
    }
    if (lane == 0) keep[i] = kept;
    __syncwarp();
  }
}

struct IouWorkspace {
  int64_t* areas_a;
  int64_t* areas_b;
  unsigned* inter;
};

IouWorkspace iou_workspace(void* base, int64_t N, int64_t M) {
  char* p = static_cast<char*>(base);
  IouWorkspace ws;
  ws.areas_a = reinterpret_cast<int64_t*>(p);
  p += align256(sizeof(int64_t) * N);
  ws.areas_b = reinterpret_cast<int64_t*>(p);
  p += align256(sizeof(int64_t) * M);
  ws.inter = reinterpret_cast<unsigned*>(p);
  return ws;
}

struct NmsWorkspace {
  int64_t* areas;
  unsigned* inter;
  int* order;
  uint32_t* bits;
};

NmsWorkspace nms_workspace(void* base, int64_t N) {
  char* p = static_cast<char*>(base);
  NmsWorkspace ws;
  ws.areas = reinterpret_cast<int64_t*>(p);
  p += align256(sizeof(int64_t) * N);
  ws.inter = reinterpret_cast<unsigned*>(p);
  p += align256(sizeof(unsigned) * N * N);
  ws.order = reinterpret_cast<int*>(p);
  p += align256(sizeof(int) * N);
  ws.bits = reinterpret_cast<uint32_t*>(p);
  return ws;
}

bool sizes_ok(int64_t count, int64_t K) {
  return count >= 0 && count <= kMaxMasks && K >= 0 && K < (int64_t(1) << 26);
}

// Launches the intersection tiles, splitting K when there are too few tiles to fill the GPU.
cudaError_t launch_inter(const uint32_t* a, const uint32_t* b, int64_t N, int64_t M, int64_t K,
                         bool upper_only, unsigned* inter, cudaStream_t stream) {
  const int64_t tn = (N + kTile - 1) / kTile, tm = (M + kTile - 1) / kTile;
  const int64_t tiles = upper_only ? tn * (tn + 1) / 2 : tn * tm;
  const int64_t total_chunks = (K + kChunk - 1) / kChunk;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // About two blocks per SM, each with at least 8 chunks (256 words) of work.
  int64_t splits = (2 * static_cast<int64_t>(sms) + tiles - 1) / tiles;
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, total_chunks / 8));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  const int64_t per = std::max<int64_t>(1, (total_chunks + splits - 1) / splits);
  splits = std::max<int64_t>(1, (total_chunks + per - 1) / per);
  if (splits > 1) {
    err = cudaMemsetAsync(inter, 0, sizeof(unsigned) * N * M, stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(tm), static_cast<unsigned>(tn),
                  static_cast<unsigned>(splits));
  inter_kernel<<<grid, kThreads, 0, stream>>>(a, b, N, M, K, per, upper_only, inter);
  return cudaGetLastError();
}

// Enough blocks for one thread per item (callers keep n well below 2**31 blocks).
unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, (n + threads - 1) / threads));
}

}  // namespace

cudaError_t mask_areas_cuda(const uint32_t* masks, int64_t N, int64_t K, int64_t* areas,
                            cudaStream_t stream) {
  if (!sizes_ok(N, K)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  areas_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(masks, K, areas);
  return cudaGetLastError();
}

size_t mask_iou_cuda_workspace_bytes(int64_t N, int64_t M) {
  return align256(sizeof(int64_t) * N) + align256(sizeof(int64_t) * M) +
         align256(sizeof(unsigned) * N * M);
}

cudaError_t mask_iou_cuda(const uint32_t* a, const uint32_t* b, int64_t N, int64_t M, int64_t K,
                          float* iou, void* workspace, cudaStream_t stream) {
  if (!sizes_ok(N, K) || !sizes_ok(M, K)) return cudaErrorInvalidValue;
  if (N == 0 || M == 0) return cudaSuccess;
  const IouWorkspace ws = iou_workspace(workspace, N, M);
  cudaError_t err = mask_areas_cuda(a, N, K, ws.areas_a, stream);
  if (err == cudaSuccess) err = mask_areas_cuda(b, M, K, ws.areas_b, stream);
  if (err == cudaSuccess) err = launch_inter(a, b, N, M, K, false, ws.inter, stream);
  if (err != cudaSuccess) return err;
  // Grid-stride: a few waves of blocks are enough for an elementwise pass.
  iou_kernel<<<static_cast<unsigned>(std::min<int64_t>(blocks_for(N * M, 256), 65536)), 256, 0, stream>>>(ws.inter, ws.areas_a, ws.areas_b, N, M,
                                                        iou);
  return cudaGetLastError();
}

size_t mask_nms_cuda_workspace_bytes(int64_t N) {
  const int64_t NW = (N + 31) / 32;
  return align256(sizeof(int64_t) * N) + align256(sizeof(unsigned) * N * N) +
         align256(sizeof(int) * N) + align256(sizeof(uint32_t) * N * NW);
}

cudaError_t mask_nms_cuda(const uint32_t* masks, const float* scores, const bool* valid, int64_t N,
                          int64_t K, float iou_threshold, bool* keep, void* workspace,
                          cudaStream_t stream) {
  if (!sizes_ok(N, K) || N > (int64_t(1) << 30)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const int64_t NW = (N + 31) / 32;
  const size_t removed_bytes = sizeof(uint32_t) * NW;
  if (removed_bytes > 48 * 1024) return cudaErrorInvalidValue;
  const NmsWorkspace ws = nms_workspace(workspace, N);
  cudaError_t err = mask_areas_cuda(masks, N, K, ws.areas, stream);
  if (err == cudaSuccess) err = launch_inter(masks, masks, N, N, K, true, ws.inter, stream);
  if (err != cudaSuccess) return err;
  rank_kernel<<<blocks_for(N, 128), 128, 0, stream>>>(scores, N, ws.order);
  // A warp per word of bits (grid-stride past 65536 blocks of 8 warps).
  const unsigned sb_blocks = static_cast<unsigned>(std::min<int64_t>(blocks_for(N * NW, 8), 65536));
  suppress_bits_kernel<<<sb_blocks, 256, 0, stream>>>(ws.inter, ws.areas, ws.order, N, NW, iou_threshold,
                                                      ws.bits);
  const size_t staged_bytes = removed_bytes + sizeof(int) * N;
  const size_t staged_bits_bytes = staged_bytes + sizeof(uint32_t) * N * NW;
  if (staged_bits_bytes <= 48 * 1024) {  // up to ~380 masks
    scan_kernel<true, true><<<1, 32, staged_bits_bytes, stream>>>(ws.bits, ws.order, valid, N, NW, keep);
  } else if (staged_bytes <= 48 * 1024) {
    scan_kernel<true, false><<<1, 32, staged_bytes, stream>>>(ws.bits, ws.order, valid, N, NW, keep);
  } else {
    scan_kernel<false, false><<<1, 32, removed_bytes, stream>>>(ws.bits, ws.order, valid, N, NW, keep);
  }
  return cudaGetLastError();
}

}  // namespace sam3fast
