// omni_kernels::int8_gemv: one row of fp32 activations times int8 weights, for decoding on a CPU
// with AVX2 (omni/model/quant.py builds it with torch.utils.cpp_extension and falls back to
// aten._weight_int8pack_mm where it cannot).
//
//   y (..., N) = x (..., K) @ (w (N, K) int8 * scale (N))^T, x holding one row, K a multiple of 32.
//
// Decoding reads every weight once per token, so the product is as fast as the weights stream in.
// x is quantised to int16 with one scale (15 bits against bf16's 8, which aten's kernel rounds it
// to), so the products are integer: vpmaddwd multiplies 16 int16 pairs and adds neighbours. The
// weights are loaded 32 bytes at a time and split into their even and odd bytes by shifts; x is
// stored in the matching order (per 32 columns, the 16 even then the 16 odd). Four output rows share
// each x load; the int32 sums go to fp32 every 256 columns, before any could overflow; the rows
// 16 blocks ahead are prefetched (the hardware prefetcher alone left it at ~10 GB/s, half of
// what a read reaches).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kPrefetchBlocks = 16;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 int8 weights against x's 16 even and 16 odd int16 -> 8 int32 partial sums.
inline __m256i dot32(__m256i x_even, __m256i x_odd, const int8_t* w) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm256_add_epi32(_mm256_madd_epi16(x_even, _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8)),
                          _mm256_madd_epi16(x_odd, _mm256_srai_epi16(v, 8)));
}

inline int64_t dot_scalar(const int16_t* xq, const int8_t* w, int64_t K) {
  int64_t s = 0;
  for (int64_t k = 0; k < K; k += 32)
    for (int64_t i = 0; i < 16; ++i)
      s += int32_t(xq[k + i]) * w[k + 2 * i] + int32_t(xq[k + 16 + i]) * w[k + 2 * i + 1];
  return s;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == K, "int8_gemv: x must be one fp32 row");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(1) == K && w.is_contiguous(),
              "int8_gemv: w must be contiguous int8 (N, K)");
  TORCH_CHECK(K % 32 == 0, "int8_gemv: K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "int8_gemv: scale must be contiguous fp32 (N)");
  const auto xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xp[k]));
  const float xs = amax > 0.f ? amax / 32767.f : 1.f;
  std::vector<int16_t> xq(K);
  for (int64_t k = 0; k < K; k += 32)
    for (int64_t i = 0; i < 16; ++i) {
      xq[k + i] = static_cast<int16_t>(std::nearbyint(xp[k + 2 * i] / xs));
      xq[k + 16 + i] = static_cast<int16_t>(std::nearbyint(xp[k + 2 * i + 1] / xs));
    }
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int16_t* xqp = xq.data();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      if (n0 + 4 > N) {
        for (int64_t n = n0; n < N; ++n) yp[n] = float(dot_scalar(xqp, wp + n * K, K)) * xs * sp[n];
        continue;
      }
      const int8_t* r = wp + n0 * K;
      __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
      for (int64_t c = 0; c < K; c += 256) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = c; k < std::min(K, c + 256); k += 32) {
          const char* ahead = reinterpret_cast<const char*>(r + kPrefetchBlocks * 4 * K + 4 * k);
          _mm_prefetch(ahead, _MM_HINT_T0);
          _mm_prefetch(ahead + 64, _MM_HINT_T0);
          const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + k));
          const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + k + 16));
          a0 = _mm256_add_epi32(a0, dot32(xe, xo, r + k));
          a1 = _mm256_add_epi32(a1, dot32(xe, xo, r + K + k));
          a2 = _mm256_add_epi32(a2, dot32(xe, xo, r + 2 * K + k));
          a3 = _mm256_add_epi32(a3, dot32(xe, xo, r + 3 * K + k));
        }
        f0 = _mm256_add_ps(f0, _mm256_cvtepi32_ps(a0));
        f1 = _mm256_add_ps(f1, _mm256_cvtepi32_ps(a1));
        f2 = _mm256_add_ps(f2, _mm256_cvtepi32_ps(a2));
        f3 = _mm256_add_ps(f3, _mm256_cvtepi32_ps(a3));
      }
      yp[n0] = hsum(f0) * xs * sp[n0];
      yp[n0 + 1] = hsum(f1) * xs * sp[n0 + 1];
      yp[n0 + 2] = hsum(f2) * xs * sp[n0 + 2];
      yp[n0 + 3] = hsum(f3) * xs * sp[n0 + 3];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(omni_kernels, m) { m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(omni_kernels, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
