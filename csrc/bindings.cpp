// Registers the native ops of sam3fast under torch.ops.sam3fast and makes this library importable
// as sam3fast._C (importing it runs the registrations). The kernels themselves live in torch-free
// files (csrc/cpu/*.cpp, csrc/cuda/*.cu); this file only checks arguments, allocates, dispatches.
//
// Light headers on purpose: <torch/extension.h> costs 30+ s of compile time, these ~8 s.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/assignment.h"
#include "cpu/mask_iou.h"

#ifdef SAM3FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/assignment.h"
#include "cuda/mask_iou.h"
#endif

// Why the CUDA kernels were left out, decided by setup.py (sam3fast/info.py spells the codes out).
#ifndef SAM3FAST_CUDA_SKIP
#define SAM3FAST_CUDA_SKIP 0
#endif

namespace {

void check_cost(const at::Tensor& cost) {
  TORCH_CHECK(cost.dim() == 3, "sam3fast::linear_sum_assignment: cost must be (B, n, m), got ",
              cost.dim(), " dims");
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "sam3fast::linear_sum_assignment: cost must be float32 or float64, got ",
              cost.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lsa_meta(const at::Tensor& cost) {
  check_cost(cost);
  auto assignment = at::empty_symint({cost.sym_size(0), cost.sym_size(1)},
                                     cost.options().dtype(at::kLong));
  auto feasible = at::empty_symint({cost.sym_size(0)}, cost.options().dtype(at::kBool));
  return {assignment, feasible};
}

// Splits the problems over at::get_num_threads() std::threads. Not at::parallel_for: with an
// OpenMP build of torch it is an inline `#pragma omp parallel`, serial unless this file is built
// with -fopenmp, which would load a second OpenMP runtime next to torch's bundled one.
template <typename F>
void parallel_over_batch(int64_t B, int64_t n, int64_t m, const F& solve) {
  // Each chunk gets >= ~2e5 inner steps (a problem is ~min^2 * max / 2), so that a thread's
  // start-up (~30 us) stays small next to its work.
  const int64_t r = std::min(n, m), c = std::max(n, m);
  const int64_t grain = std::max<int64_t>(1, 200000 / std::max<int64_t>(1, r * r * c / 2));
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (B + grain - 1) / grain);
  if (chunks <= 1 || at::in_parallel_region()) {
    solve(0, B);
    return;
  }
  const int64_t per = (B + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t k = 1; k < chunks; ++k) {
    workers.emplace_back(solve, k * per, std::min(B, (k + 1) * per));
  }
  solve(0, std::min(B, per));
  for (auto& w : workers) w.join();
}

std::tuple<at::Tensor, at::Tensor> lsa_cpu(const at::Tensor& cost_in) {
  check_cost(cost_in);
  const at::Tensor cost = cost_in.contiguous();
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  at::Tensor assignment = at::empty({B, n}, cost.options().dtype(at::kLong));
  at::Tensor feasible = at::empty({B}, cost.options().dtype(at::kBool));
  int64_t* a = assignment.data_ptr<int64_t>();
  bool* f = feasible.data_ptr<bool>();
  if (cost.scalar_type() == at::kDouble) {
    const double* p = cost.const_data_ptr<double>();
    parallel_over_batch(B, n, m, [=](int64_t b0, int64_t b1) {
      sam3fast::batched_linear_sum_assignment_cpu(p, b0, b1, n, m, a, f);
    });
  } else {
    const float* p = cost.const_data_ptr<float>();
    parallel_over_batch(B, n, m, [=](int64_t b0, int64_t b1) {
      sam3fast::batched_linear_sum_assignment_cpu(p, b0, b1, n, m, a, f);
    });
  }
  return {assignment, feasible};
}


// ---- mask areas / IoU / NMS on bit-packed masks (csrc/cpu/mask_iou.h, csrc/cuda/mask_iou.h) ----

// Sizes are only checked on real tensors (`concrete`): the Meta kernels also see symbolic ones.
void check_packed(const char* op, const char* name, const at::Tensor& t, bool concrete = true) {
  TORCH_CHECK(t.dim() == 3, "sam3fast::", op, ": ", name, " must be bit-packed masks (N, H, WP), got ",
              t.dim(), " dims");
  TORCH_CHECK(t.scalar_type() == at::kInt, "sam3fast::", op, ": ", name,
              " must be int32 bit-packed masks, got ", t.scalar_type());
  if (!concrete) return;
  // Counts are accumulated in 32 bits on the GPU: every mask holds fewer than 2**31 pixels.
  TORCH_CHECK(t.size(1) * t.size(2) < (int64_t(1) << 26), "sam3fast::", op, ": ", name,
              " masks of ", t.size(1), " x ", t.size(2), " words exceed 2**31 pixels");
}

void check_pair(const at::Tensor& a, const at::Tensor& b, bool concrete = true) {
  check_packed("mask_iou", "a", a, concrete);
  check_packed("mask_iou", "b", b, concrete);
  TORCH_CHECK(a.device() == b.device(), "sam3fast::mask_iou: a and b must be on one device, got ",
              a.device(), " and ", b.device());
  if (!concrete) return;
  TORCH_CHECK(a.size(1) == b.size(1) && a.size(2) == b.size(2),
              "sam3fast::mask_iou: a and b must have the same (H, WP), got (", a.size(1), ", ",
              a.size(2), ") and (", b.size(1), ", ", b.size(2), ")");
}

void check_nms(const at::Tensor& masks, const at::Tensor& scores, double iou_threshold,
               const std::optional<at::Tensor>& valid, bool concrete = true) {
  check_packed("mask_nms", "masks", masks, concrete);
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat,
              "sam3fast::mask_nms: scores must be a float32 (N,) tensor, got ", scores.scalar_type(),
              " with ", scores.dim(), " dims");
  TORCH_CHECK(scores.device() == masks.device(),
              "sam3fast::mask_nms: scores must be on the device of masks");
  TORCH_CHECK(!std::isnan(iou_threshold), "sam3fast::mask_nms: iou_threshold is NaN");
  if (valid.has_value()) {
    TORCH_CHECK(valid->dim() == 1 && valid->scalar_type() == at::kBool,
                "sam3fast::mask_nms: valid must be a bool (N,) tensor, got ", valid->scalar_type(),
                " with ", valid->dim(), " dims");
    TORCH_CHECK(valid->device() == masks.device(),
                "sam3fast::mask_nms: valid must be on the device of masks");
  }
  if (!concrete) return;
  const int64_t N = masks.size(0);
  TORCH_CHECK(scores.size(0) == N, "sam3fast::mask_nms: scores must have ", N, " entries, got ",
              scores.size(0));
  TORCH_CHECK(!valid.has_value() || valid->size(0) == N, "sam3fast::mask_nms: valid must have ", N,
              " entries, got ", valid.has_value() ? valid->size(0) : 0);
}

const uint32_t* words(const at::Tensor& t) {
  return reinterpret_cast<const uint32_t*>(t.const_data_ptr<int32_t>());
}

// Runs fn(begin, end) over [0, count) on up to at::get_num_threads() std::threads (see
// parallel_over_batch for why not at::parallel_for), each chunk >= ~2e5 popcounts of work.
template <typename F>
void parallel_over_items(int64_t count, int64_t work_per_item, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 200000 / std::max<int64_t>(1, work_per_item));
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (count + grain - 1) / grain);
  if (chunks <= 1 || at::in_parallel_region()) {
    fn(0, count);
    return;
  }
  const int64_t per = (count + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t k = 1; k < chunks; ++k) {
    workers.emplace_back(fn, k * per, std::min(count, (k + 1) * per));
  }
  fn(0, std::min(count, per));
  for (auto& w : workers) w.join();
}

at::Tensor mask_areas_meta(const at::Tensor& masks) {
  check_packed("mask_areas", "masks", masks, false);
  return at::empty_symint({masks.sym_size(0)}, masks.options().dtype(at::kLong));
}

at::Tensor mask_iou_meta(const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, false);
  return at::empty_symint({a.sym_size(0), b.sym_size(0)}, a.options().dtype(at::kFloat));
}

at::Tensor mask_nms_meta(const at::Tensor& masks, const at::Tensor& scores, double iou_threshold,
                         const std::optional<at::Tensor>& valid) {
  check_nms(masks, scores, iou_threshold, valid, false);
  return at::empty_symint({masks.sym_size(0)}, masks.options().dtype(at::kBool));
}

at::Tensor mask_areas_cpu(const at::Tensor& masks_in) {
  check_packed("mask_areas", "masks", masks_in);
  const at::Tensor masks = masks_in.contiguous();
  const int64_t N = masks.size(0), K = masks.size(1) * masks.size(2);
  at::Tensor areas = at::empty({N}, masks.options().dtype(at::kLong));
  const uint32_t* m = words(masks);
  int64_t* out = areas.data_ptr<int64_t>();
  parallel_over_items(N, K / 2 + 1, [=](int64_t b0, int64_t b1) {
    sam3fast::mask_areas_cpu(m, b0, b1, K, out);
  });
  return areas;
}

at::Tensor mask_iou_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), M = b.size(0), K = a.size(1) * a.size(2);
  at::Tensor iou = at::empty({N, M}, a.options().dtype(at::kFloat));
  const at::Tensor areas_a = mask_areas_cpu(a), areas_b = mask_areas_cpu(b);
  const uint32_t *pa = words(a), *pb = words(b);
  const int64_t *qa = areas_a.const_data_ptr<int64_t>(), *qb = areas_b.const_data_ptr<int64_t>();
  float* out = iou.data_ptr<float>();
  // Chunks of whole 4-row tiles, so each thread runs the full register tile.
  const int64_t tiles = (N + 3) / 4;
  parallel_over_items(tiles, 2 * M * (K / 2 + 1), [=](int64_t t0, int64_t t1) {
    sam3fast::mask_iou_cpu(pa, pb, t0 * 4, std::min(N, t1 * 4), M, K, qa, qb, out);
  });
  return iou;
}

at::Tensor mask_nms_cpu(const at::Tensor& masks_in, const at::Tensor& scores_in,
                        double iou_threshold, const std::optional<at::Tensor>& valid_in) {
  check_nms(masks_in, scores_in, iou_threshold, valid_in);
  const at::Tensor masks = masks_in.contiguous(), scores = scores_in.contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) valid = valid_in->contiguous();
  const int64_t N = masks.size(0), K = masks.size(1) * masks.size(2);
  at::Tensor keep = at::empty({N}, masks.options().dtype(at::kBool));
  sam3fast::mask_nms_cpu(words(masks), scores.const_data_ptr<float>(),
                         valid.defined() ? valid.const_data_ptr<bool>() : nullptr, N, K,
                         static_cast<float>(iou_threshold), keep.data_ptr<bool>());
  return keep;
}

#ifdef SAM3FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> lsa_cuda(const at::Tensor& cost_in) {
  check_cost(cost_in);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const at::Tensor cost = cost_in.contiguous();
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  at::Tensor assignment = at::empty({B, n}, cost.options().dtype(at::kLong));
  at::Tensor feasible = at::empty({B}, cost.options().dtype(at::kBool));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cost.device().index()).stream();
  cudaError_t err;
  if (cost.scalar_type() == at::kDouble) {
    err = sam3fast::linear_sum_assignment_cuda(cost.const_data_ptr<double>(), B, n, m,
                                               assignment.data_ptr<int64_t>(),
                                               feasible.data_ptr<bool>(), stream);
  } else {
    err = sam3fast::linear_sum_assignment_cuda(cost.const_data_ptr<float>(), B, n, m,
                                               assignment.data_ptr<int64_t>(),
                                               feasible.data_ptr<bool>(), stream);
  }
  TORCH_CHECK(err != cudaErrorInvalidValue,
              "sam3fast::linear_sum_assignment: a (", n, " x ", m,
              ") problem does not fit one thread block's shared memory on this GPU (it needs 25 "
              "bytes per column and 12 per row of the transposed-if-tall matrix); solve it on "
              "the CPU");
  TORCH_CHECK(err == cudaSuccess, "sam3fast::linear_sum_assignment: CUDA launch failed: ",
              cudaGetErrorString(err));
  return {assignment, feasible};
}

void check_mask_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err != cudaErrorInvalidValue, "sam3fast::", op,
              ": sizes beyond what the CUDA kernel launches (more than 4 M masks, or for mask_nms "
              "more than 393216 masks); run it on the CPU");
  TORCH_CHECK(err == cudaSuccess, "sam3fast::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor mask_areas_cuda(const at::Tensor& masks_in) {
  check_packed("mask_areas", "masks", masks_in);
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const at::Tensor masks = masks_in.contiguous();
  const int64_t N = masks.size(0), K = masks.size(1) * masks.size(2);
  at::Tensor areas = at::empty({N}, masks.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(masks.device().index()).stream();
  check_mask_launch("mask_areas",
                    sam3fast::mask_areas_cuda(words(masks), N, K, areas.data_ptr<int64_t>(), stream));
  return areas;
}

at::Tensor mask_iou_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), M = b.size(0), K = a.size(1) * a.size(2);
  at::Tensor iou = at::empty({N, M}, a.options().dtype(at::kFloat));
  at::Tensor ws = workspace(a, sam3fast::mask_iou_cuda_workspace_bytes(N, M));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  check_mask_launch("mask_iou", sam3fast::mask_iou_cuda(words(a), words(b), N, M, K,
                                                        iou.data_ptr<float>(), ws.data_ptr(),
                                                        stream));
  return iou;
}

at::Tensor mask_nms_cuda(const at::Tensor& masks_in, const at::Tensor& scores_in,
                         double iou_threshold, const std::optional<at::Tensor>& valid_in) {
  check_nms(masks_in, scores_in, iou_threshold, valid_in);
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const at::Tensor masks = masks_in.contiguous(), scores = scores_in.contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) valid = valid_in->contiguous();
  const int64_t N = masks.size(0), K = masks.size(1) * masks.size(2);
  at::Tensor keep = at::empty({N}, masks.options().dtype(at::kBool));
  at::Tensor ws = workspace(masks, sam3fast::mask_nms_cuda_workspace_bytes(N));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(masks.device().index()).stream();
  check_mask_launch("mask_nms",
                    sam3fast::mask_nms_cuda(words(masks), scores.const_data_ptr<float>(),
                                            valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
                                            N, K, static_cast<float>(iou_threshold),
                                            keep.data_ptr<bool>(), ws.data_ptr(), stream));
  return keep;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(sam3fast, m) {
  m.def(
      "linear_sum_assignment(Tensor cost) -> (Tensor assignment, Tensor feasible)");
  m.def("mask_areas(Tensor masks) -> Tensor");
  m.def("mask_iou(Tensor a, Tensor b) -> Tensor");
  m.def("mask_nms(Tensor masks, Tensor scores, float iou_threshold, Tensor? valid=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sam3fast, CPU, m) {
  m.impl("linear_sum_assignment", &lsa_cpu);
  m.impl("mask_areas", &mask_areas_cpu);
  m.impl("mask_iou", &mask_iou_cpu);
  m.impl("mask_nms", &mask_nms_cpu);
}

TORCH_LIBRARY_IMPL(sam3fast, Meta, m) {
  m.impl("linear_sum_assignment", &lsa_meta);
  m.impl("mask_areas", &mask_areas_meta);
  m.impl("mask_iou", &mask_iou_meta);
  m.impl("mask_nms", &mask_nms_meta);
}

#ifdef SAM3FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sam3fast, CUDA, m) {
  m.impl("linear_sum_assignment", &lsa_cuda);
  m.impl("mask_areas", &mask_areas_cuda);
  m.impl("mask_iou", &mask_iou_cuda);
  m.impl("mask_nms", &mask_nms_cuda);
}
#endif

// A plain Python module so that `import sam3fast._C` loads the library (and its registrations);
// its attributes say what was built, for `python -m sam3fast.info`.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "sam3fast native ops", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef SAM3FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddIntConstant(mod, "CUDA_SKIP", SAM3FAST_CUDA_SKIP) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
