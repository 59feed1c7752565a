// AVX2 kernels for the draft forward on CPU (the draft may approximate: verification
// runs torch's own kernels on the original weights).
//
// int8_linear: y = (x @ W_q.T) * scale + bias, with W_q int8 (N, K) per-output-channel and x
// float32 (M, K). Each input row is quantised to int16 with its own absmax scale
// (finer than the bf16 activations torch's packed int8 kernel uses) and multiplied
// with vpmaddwd, 16 multiply-adds per instruction in exact integer arithmetic, so a
// row's result does not depend on the other rows (batch invariance). Measured on a
// 2-core AVX2 EPYC: it streams int8 weights about twice as fast as
// aten::_weight_int8pack_mm with bf16 activations, which is compute-bound there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kFlush = 2048;     // int32 sums go to double every kFlush inputs: no overflow
constexpr int64_t kPrefetch = 4096;  // bytes ahead in the weight stream

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Output columns [n0, n1) of R input rows.
template <int R>
void rows_block(const int16_t* x, const double* x_scale, int64_t K, const int8_t* w, const float* scale,
                const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    double total[R] = {};
    for (int64_t c0 = 0; c0 < K16; c0 += kFlush) {
      const int64_t c1 = std::min(K16, c0 + kFlush);
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t k = c0; k < c1; k += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetch), _MM_HINT_T0);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * K + k));
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, xv));
        }
      }
      for (int r = 0; r < R; ++r) total[r] += horizontal_sum(acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      int64_t tail = 0;
      for (int64_t k = K16; k < K; ++k) tail += int32_t(x[r * K + k]) * int32_t(wr[k]);
      float out = float((total[r] + double(tail)) * x_scale[r]) * scale[n];
      y[r * ldy + n] = bias ? out + bias[n] : out;
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_linear: x must be float32 (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "int8_linear: w must be contiguous int8 (N, K)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "int8_linear: scale must be float32 (N,)");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == w.size(0)),
              "int8_linear: bias must be float32 (N,)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  std::vector<int16_t> xq(M * K);
  std::vector<double> xs(M);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
    const float s = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / s;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::lrintf(xp[m * K + k] * inv));
    xs[m] = s;
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_block<4>(xq.data() + m * K, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n0, n1);
    const int16_t* xr = xq.data() + m * K;
    switch (M - m) {
      case 3: rows_block<3>(xr, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n0, n1); break;
      case 2: rows_block<2>(xr, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n0, n1); break;
      case 1: rows_block<1>(xr, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n0, n1); break;
      default: break;
    }
  });
  return y;
}

// rms_norm: y = x / sqrt(mean(x^2) + eps) * w per row of a float32 (M, K) input, in one
// pass instead of torch's eight small ops (~55 us -> ~2 us per call for K = 576 here).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "rms_norm: x must be float32 (M, K)");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm: w must be float32 (K,)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * K;
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += double(xr[k]) * xr[k];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / double(K) + eps));
    for (int64_t k = 0; k < K; ++k) yp[m * K + k] = xr[k] * inv * wp[k];
  }
  return y;
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float out = _mm_cvtss_f32(s);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// Rotary embedding of one head vector (HF's rotate_half convention).
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// draft_attention: the attention block of a draft forward between the qkv and output
// projections, for T new tokens of one sequence at positions start..start+T-1: rotary on
// queries and keys, keys/values written into the sequence's layer buffers (Hkv, capacity, D),
// then causal (optionally sliding-window) attention over positions [0, start + t].
at::Tensor draft_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
                           const at::Tensor& values, int64_t start, int64_t q_heads, double scaling, int64_t window) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat, "draft_attention: qkv must be float32 (T, H, D)");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == at::kFloat &&
              values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat,
              "draft_attention: keys/values must be contiguous float32 (Hkv, capacity, D)");
  const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
  const int64_t T = x.size(0), D = x.size(2), Hkv = keys.size(0), cap = keys.size(1), Hq = q_heads;
  TORCH_CHECK(x.size(1) == Hq + 2 * Hkv && keys.size(2) == D && start + T <= cap, "draft_attention: shapes");
  TORCH_CHECK(c.size(0) == T && c.size(1) == D && sn.sizes() == c.sizes(), "draft_attention: cos/sin must be (T, D)");
  const float* xp = x.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xp + t * (Hq + 2 * Hkv) * D;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t pos = (h * cap + start + t) * D;
      rotate(row + (Hq + h) * D, c.data_ptr<float>() + t * D, sn.data_ptr<float>() + t * D, kp + pos, D);
      std::copy(row + (Hq + Hkv + h) * D, row + (Hq + Hkv + h + 1) * D, vp + pos);
    }
  }
  at::Tensor y = at::empty({T, Hq * D}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t groups = Hq / Hkv;
  const int64_t span = start + T;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, span * D));
  at::parallel_for(0, T * Hq, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> q(D), scores(span), acc(D);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b / Hq, h = b % Hq, kvh = h / groups, last = start + t;
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      rotate(xp + (t * (Hq + 2 * Hkv) + h) * D, c.data_ptr<float>() + t * D, sn.data_ptr<float>() + t * D, q.data(), D);
      float mx = -INFINITY;
      for (int64_t j = first; j <= last; ++j) {
        scores[j] = dot(q.data(), kp + (kvh * cap + j) * D, D) * float(scaling);
        mx = std::max(mx, scores[j]);
      }
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = first; j <= last; ++j) {
        const float p = std::exp(scores[j] - mx);
        sum += p;
        const float* vr = vp + (kvh * cap + j) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
      }
      const float inv = float(1.0 / sum);
      for (int64_t d = 0; d < D; ++d) yp[t * Hq * D + h * D + d] = acc[d] * inv;
    }
  });
  return y;
}

// silu_mul: silu(gate) * up for the fused gate_up projection's output (M, 2 * I).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be float32 (M, 2 * I)");
  const at::Tensor g = gate_up.contiguous();
  const int64_t M = g.size(0), I = g.size(1) / 2;
  at::Tensor y = at::empty({M, I}, g.options());
  const float* gp = g.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) {
      const float a = gp[m * 2 * I + i];
      yp[m * I + i] = a / (1.f + std::exp(-a)) * gp[m * 2 * I + I + i];
    }
  return y;
}

}  // namespace

TORCH_LIBRARY(knn_ssd, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("draft_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, int start, "
        "int q_heads, float scaling, int window) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}
TORCH_LIBRARY_IMPL(knn_ssd, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("draft_attention", &draft_attention);
  m.impl("silu_mul", &silu_mul);
}
