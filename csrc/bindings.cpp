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
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/assignment.h"

#ifdef SAM3FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/assignment.h"
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
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(sam3fast, m) {
  m.def(
      "linear_sum_assignment(Tensor cost) -> (Tensor assignment, Tensor feasible)");
}

TORCH_LIBRARY_IMPL(sam3fast, CPU, m) { m.impl("linear_sum_assignment", &lsa_cpu); }

TORCH_LIBRARY_IMPL(sam3fast, Meta, m) { m.impl("linear_sum_assignment", &lsa_meta); }

#ifdef SAM3FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sam3fast, CUDA, m) { m.impl("linear_sum_assignment", &lsa_cuda); }
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
