// fastdraft::small_batch_linear(x, w) = x @ w.T for the few rows of a decode or verify step (fp32, AVX2 + FMA).
//
// Why hand-written: on some CPUs (AMD EPYC here) MKL's sgemm costs about one full pass over the weight per row
// of x for 2..8 rows, so scoring 4 tokens costs ~1.8 decode steps although decoding is memory-bound; this kernel
// reads each weight row once for all rows of x (benchmarks/bench_verify_curve.py measures both side by side).
//
// Batch invariance: every output element is one FMA chain over k in 8-lane blocks, the same horizontal sum and
// the same scalar tail, whatever the number of rows, the row chunk or the thread split, so a token scored inside
// a k-token verify chunk gets bit-identical linear outputs to the same token decoded alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x per pass over the weight (8 accumulators + loads fit 16 registers)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] = sum_k x[m, k] * w[n, k] for m < M and n in [n0, n1).
template <int M>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K - K % 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      // With 4+ rows the FMAs no longer hide the weight stream's latency: fetch two weight rows ahead.
      if constexpr (M >= 4) _mm_prefetch(reinterpret_cast<const char*>(wr + 2 * K + k), _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[m]);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * wr[k];
      y[m * N + n] = s;
    }
  }
}

using RowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[kMaxRows] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

at::Tensor small_batch_linear(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "small_batch_linear: expected x of shape (M, K) and w of shape (N, K), got ", x_in.sizes(), " and ",
              w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
              "small_batch_linear: float32 tensors only");
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "small_batch_linear: CPU tensors only");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows_here = std::min(kMaxRows, M - m0);
    const RowsFn fn = kRows[rows_here - 1];
    const float* xm = xp + m0 * K;
    float* ym = yp + m0 * N;
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) { fn(xm, wp, ym, K, N, n0, n1); });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(fastdraft, m) { m.def("small_batch_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastdraft, CPU, m) { m.impl("small_batch_linear", small_batch_linear); }
