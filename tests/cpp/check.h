// Shared harness of the C++ tests: CHECK(cond, printf-args) counts a failure in g_failures and
// prints the first 20; CUDA_OK(expr) (when the CUDA runtime API is included first) exits on a
// CUDA error.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace {
int g_failures = 0;
}  // namespace

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      if (++g_failures <= 20) {                                   \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                        \
        std::fprintf(stderr, "\n");                               \
      }                                                           \
    }                                                             \
  } while (0)

#ifdef CUDART_VERSION
#define CUDA_OK(expr)                                                                             \
  do {                                                                                            \
    const cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)
#endif
