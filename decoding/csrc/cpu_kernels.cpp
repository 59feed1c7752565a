// AVX2 kernels (and AVX512-BF16 ones for bfloat16 models) for the engine's forward on CPU; activations
// are float32 throughout. int8_linear and int4_linear serve the draft only (they may
// approximate: verification runs the original weights); rms_norm and silu_mul serve every
// forward, cached_attention drafts and the full model's decode/verify steps, and
// decoder_layers chains them over all layers in one call. Each computes a row (token) on its
// own in a fixed order, so results never depend on the batch.
//
// int8_linear: y = (x @ W_q.T) * scale + bias, with W_q int8 (N, K) per-output-channel and x
// float32 (M, K). Each input row is quantised to int16 with its own absmax scale
// (finer than the bf16 activations torch's packed int8 kernel uses) and multiplied
// with vpmaddwd, 16 multiply-adds per instruction in exact integer arithmetic (vpdpwssd,
// 32 per instruction, for 3+ rows on CPUs with AVX512-VNNI: the same integers), so a
// row's result does not depend on the other rows (batch invariance). Measured on a
// 2-core AVX2 EPYC: it streams int8 weights about twice as fast as
// aten::_weight_int8pack_mm with bf16 activations, which is compute-bound there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <memory>
#include <vector>

namespace {

// KNN_SSD_AVX512=0 keeps the AVX2 variant of every kernel that also has an AVX-512 one (int8 drafts of
// 3+ rows, linear_f32, the attention's value mix, the native target's k-quant linears): they give the same
// bits, which the tests check.
// Kernels that exist only on AVX-512 (linear_bf16) are not affected.
bool avx512_allowed() {
  const char* value = std::getenv("KNN_SSD_AVX512");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

constexpr int64_t kFlush = 2048;     // int32 sums go to double every kFlush inputs: no overflow
constexpr int64_t kLead = 16384;     // bytes the weight prefetch cursor runs ahead

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// The 8 lanes' sum in a fixed order (high half onto low, then two pairwise adds): every float
// reduction here uses it, so results never depend on which kernel summed.
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// One input row to int16 with its absmax scale (returned), values in [-limit, limit]; vectorised, rounding
// half to even like std::lrintf, so the result is the same as the scalar loop's.
inline double quantise_row(const float* x, int64_t K, int16_t* q, float limit = 32767.f) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t i = k; i < K; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax > 0.f ? amax / limit : 1.f;
  const float inv = 1.f / s;
  const __m256 vinv = _mm256_set1_ps(inv);
  k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));  // packs works per 128-bit lane
  }
  for (; k < K; ++k) q[k] = static_cast<int16_t>(std::lrintf(x[k] * inv));
  return s;
}

// Prefetch cursor: walks a thread's weight range ahead of the kernel at the rate the kernel
// consumes it, so DRAM keeps streaming while later row blocks reuse a block from L1.
// Full-precision weights (linear_f32, linear_bf16) are prefetched into L2 (`to_l2`): measured
// here (Zen 4, all the default model's linears, cold, medians of 10 interleaved rounds) that
// took a 1-row pass from 26.9 to 18.2 ms in float32 and 12.6 to 9.9 ms in bfloat16, 4 rows
// 29.1 -> 19.0 and 17.7 -> 10.0 ms, 12 rows 40.1 -> 34.2 and 23.1 -> 21.3 ms. The quantised
// drafts' kernels keep L1 prefetches (no gain from L2 ones there).
struct Cursor {
  const char* at;
  const char* end;
  int64_t step;
  int64_t burst_mask = 0;  // tick(k) advances only where (k & burst_mask) == 0
  bool to_l2 = false;      // prefetch into L2 instead of L1
  // Over weight rows [n0, n1) of `w` (rows of `row_bytes`), starting kLead ahead of the kernel.
  static Cursor rows(const void* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t step) {
    const char* base = static_cast<const char*>(w);
    return Cursor{base + n0 * row_bytes + kLead, base + n1 * row_bytes, step};
  }
  inline void advance() {
    const char* stop = std::min(at + step, end);
    if (to_l2)
      for (const char* p = at; p < stop; p += 64) _mm_prefetch(p, _MM_HINT_T1);
    else
      for (const char* p = at; p < stop; p += 64) _mm_prefetch(p, _MM_HINT_T0);
    at += step;
  }
  inline void tick(int64_t k) {
    if ((k & burst_mask) == 0) advance();
  }
};

// The float32 (N,) bias of op `op` checked against N output columns, or null where there is none.
inline const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op,
              ": bias must be float32 (N,)");
  return bias->data_ptr<float>();
}

// The outputs of an int8 block from its exact sums over the first K16 inputs: the last K % 16 inputs
// in scalar integers, then the row and column scales and the bias.
template <int R, int C>
inline void int8_outputs(const double (&total)[R][C], const int16_t* x, const double* x_scale, int64_t K,
                         int64_t K16, const int8_t* w, const float* scale, const float* bias, float* y, int64_t ldy,
                         int64_t n) {
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const int8_t* wr = w + (n + c) * K;
      int64_t tail = 0;
      for (int64_t k = K16; k < K; ++k) tail += int32_t(x[r * K + k]) * int32_t(wr[k]);
      const float out = float((total[r][c] + double(tail)) * x_scale[r]) * scale[n + c];
      y[r * ldy + n + c] = bias ? out + bias[n + c] : out;
    }
  }
}

// Calls chunk(c0, c1) for the kFlush-input chunks [c0, c1) of the first K & ~15 inputs: an int8 kernel sums a
// chunk in int32 (no overflow within one) and then adds it to its double totals.
template <typename F>
inline void flush_chunks(int64_t K, F&& chunk) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t c0 = 0; c0 < K16; c0 += kFlush) chunk(c0, std::min(K16, c0 + kFlush));
}

// Columns n..n+C-1 of input rows 0..R-1: R x C dot products sharing each load, in exact
// int32 (flushed to double every kFlush inputs), so results never depend on the blocking.
template <int R, int C>
void dot_block(const int16_t* x, const double* x_scale, int64_t K, const int8_t* w, const float* scale,
               const float* bias, float* y, int64_t ldy, int64_t n, Cursor& cursor) {
  double total[R][C] = {};
  flush_chunks(K, [&](int64_t c0, int64_t c1) {
    __m256i acc[R][C] = {};  // zeros
    for (int64_t k = c0; k < c1; k += 16) {
      cursor.advance();
      __m256i wv[C];
      for (int c = 0; c < C; ++c)
        wv[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + c) * K + k)));
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * K + k));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(wv[c], xv));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) total[r][c] += horizontal_sum(acc[r][c]);
  });
  int8_outputs<R, C>(total, x, x_scale, K, K & ~int64_t(15), w, scale, bias, y, ldy, n);
}

// Passes over a block of weight rows that row_blocks<MaxR> makes for M input rows.
template <int MaxR>
constexpr int64_t row_passes(int64_t M) { return (M + MaxR - 1) / MaxR; }

// Calls f(std::integral_constant<int, count>{}) for a runtime count in N..Max: templates by count.
template <int N, int Max, typename F>
inline void with_count(int64_t count, F&& f) {
  if constexpr (N <= Max) {
    if (count == N) return f(std::integral_constant<int, N>{});
    with_count<N + 1, Max>(count, f);
  }
}

// Calls f(std::integral_constant<int, R>{}, m) for row blocks m..m+R-1 covering 0..M-1: the fewest
// blocks of at most MaxR rows, balanced (9 rows in blocks of 4: 3 + 3 + 3, as a 1-row pass costs
// nearly what a full one does). Kernels run a block of C columns for all M rows with it, so those C
// weight rows stay in L1 while every input row passes over them (weights stream once per call).
template <int MaxR, typename F>
inline void row_blocks(int64_t M, F&& f) {
  const int64_t passes = row_passes<MaxR>(M);
  for (int64_t p = 0, m = 0; p < passes; ++p) {
    const int64_t rows = (M - m) / (passes - p);
    with_count<1, MaxR>(rows, [&](auto R) { f(R, m); });
    m += rows;
  }
}

// int8_linear on CPUs with AVX512-VNNI (and BW): VPDPWSSD multiplies 32 int16 pairs and adds them to
// int32 lanes in one instruction, where AVX2 needs VPMADDWD + VPADDD for 16. Integer sums are exact,
// so these blocks give the same bits as the AVX2 ones; they take fewer instructions, which is what
// bounds a batch of drafts. Measured here (all the default model's linears, cold, medians of 6
// interleaved rounds): 8 rows 20.7 -> 15.8 ms, 12 rows 32.2 -> 23.8 ms. (The
// same instruction in int4_linear's per-group dot products made it 1.5x slower there: not used.)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

bool vnni_supported() {
  return avx512_allowed() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

// The 16 lane sums of 16 int32 vectors at once (lane i: the sum of v[i]'s lanes), by halving
// transposes: a third of the instructions of 16 separate reductions. Integer sums are exact, so
// the order does not matter.
inline __m512i sum_lanes16(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: a[i] = [v[2i] lo + hi | v[2i+1] lo + hi]
    a[i] = _mm512_add_epi32(_mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0x44),
                            _mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit quarters: b[i] = [v[4i] | v[4i+1] | v[4i+2] | v[4i+3]], 4 lanes each
    b[i] = _mm512_add_epi32(_mm512_shuffle_i64x2(a[2 * i], a[2 * i + 1], 0x88),
                            _mm512_shuffle_i64x2(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs within each 128-bit lane
    c[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(b[2 * i], b[2 * i + 1]),
                            _mm512_unpackhi_epi32(b[2 * i], b[2 * i + 1]));
  // c[i] lane 4j + {0, 1, 2, 3}: partial sums of v[8i + j], v[8i + 4 + j], v[8i + j], v[8i + 4 + j]
  const __m512i d = _mm512_add_epi32(_mm512_unpacklo_epi64(c[0], c[1]), _mm512_unpackhi_epi64(c[0], c[1]));
  // d lane 4j + {0, 1, 2, 3}: v[j], v[4 + j], v[8 + j], v[12 + j]
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

// dot_block with 32 inputs per instruction: the same int32 sums per kFlush chunk (wrapping alike), so
// the same results bit for bit.
template <int R, int C>
void dot_block_vnni(const int16_t* x, const double* x_scale, int64_t K, const int8_t* w, const float* scale,
                    const float* bias, float* y, int64_t ldy, int64_t n, Cursor& cursor) {
  double total[R][C] = {};
  flush_chunks(K, [&](int64_t c0, int64_t c1) {
    int64_t k = c0;
    __m512i acc[R][C] = {};  // zeros
    for (; k + 32 <= c1; k += 32) {
      cursor.advance();
      cursor.advance();
      __m512i wv[C];
      for (int c = 0; c < C; ++c)
        wv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + c) * K + k)));
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(x + r * K + k);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], wv[c], xv);
      }
    }
    uint32_t sum[R][C];
    if constexpr (R * C == 16) {
      _mm512_storeu_si512(&sum[0][0], sum_lanes16(&acc[0][0]));
    } else {
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) sum[r][c] = uint32_t(_mm512_reduce_add_epi32(acc[r][c]));
    }
    if (k < c1) {  // 16 inputs left
      cursor.advance();
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * K + k));
        for (int c = 0; c < C; ++c) {
          const __m256i wv =
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + c) * K + k)));
          sum[r][c] += uint32_t(horizontal_sum(_mm256_madd_epi16(wv, xv)));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) total[r][c] += int32_t(sum[r][c]);
  });
  int8_outputs<R, C>(total, x, x_scale, K, K & ~int64_t(15), w, scale, bias, y, ldy, n);
}
#pragma GCC pop_options

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_linear: x must be float32 (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "int8_linear: w must be contiguous int8 (N, K)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "int8_linear: scale must be float32 (N,)");
  const float* bp = bias_data(bias, w.size(0), "int8_linear");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  std::vector<int16_t> xq(M * K);
  std::vector<double> xs(M);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) xs[m] = quantise_row(xp + m * K, K, xq.data() + m * K);
  at::Tensor y = at::empty({M, N}, xc.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t passes = row_passes<4>(M);
  static const bool has_vnni = vnni_supported();
  const bool vnni = has_vnni && M > 2;  // 1-2 rows are bound by memory: 1.03-1.13x the AVX2 time there
  // Columns n..n+C-1 of every row block, on the VNNI blocks where the CPU has them.
  const auto run = [&](auto columns_of, int64_t n, Cursor& cursor) {
    constexpr int C = decltype(columns_of)::value;
    row_blocks<4>(M, [&](auto R, int64_t m) {
      constexpr int kR = decltype(R)::value;
      const int16_t* xr = xq.data() + m * K;
      if (vnni)  // direct calls: through a function pointer the 1-row LM head was ~10% slower
        dot_block_vnni<kR, C>(xr, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n, cursor);
      else
        dot_block<kR, C>(xr, xs.data() + m, K, wp, sp, bp, yp + m * N, N, n, cursor);
    });
  };
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    Cursor cursor = Cursor::rows(wp, K, n0, n1, 0);
    int64_t n = n0;
    // Four weight rows per block for one row (a lone draft: four rows in flight, 0.83-0.91x the time of
    // two here) and on AVX-512 (registers for 4 x 4 accumulators); AVX2 takes more rows 2 at a time.
    if (M == 1 || vnni) {
      cursor.step = std::max<int64_t>(16, 4 * 16 / passes);
      for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, n, cursor);
    }
    cursor.step = std::max<int64_t>(16, 2 * 16 / passes);
    for (; n + 2 <= n1; n += 2) run(std::integral_constant<int, 2>{}, n, cursor);
    cursor.step = std::max<int64_t>(16, 16 / passes);
    if (n < n1) run(std::integral_constant<int, 1>{}, n, cursor);
  });
  return y;
}

// Input rows quantised to int16 for the integer kernels: each row's values (|q| <= limit), its scale, and the
// sums of its values per 32 inputs (where a weight format's mins or offsets meet them).
struct QuantisedRows {
  std::vector<int16_t> q;
  std::vector<double> scale;
  std::vector<float> sums;
  QuantisedRows(const at::Tensor& x, float limit = 32767.f)
      : q(x.numel()), scale(x.size(0)), sums(x.numel() / 32) {
    const int64_t M = x.size(0), K = x.size(1), G = K / 32;
    const float* xp = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      scale[m] = quantise_row(xp + m * K, K, q.data() + m * K, limit);
      for (int64_t g = 0; g < G; ++g) {
        int32_t total = 0;
        for (int64_t k = 0; k < 32; ++k) total += q[m * K + g * 32 + k];
        sums[m * G + g] = float(total);
      }
    }
  }
};

// int4_linear: the draft's 4-bit copy, y = x @ W.T + bias with W in groups of 32 inputs per output,
// w = scale * q + min for q in 0..15 (the layout of GGUF's Q4_1 and Q4_K blocks, so weights that came
// from such a file are held almost exactly). w packs group g of output n in 16 bytes, byte j holding
// q[j] in its low nibble and q[j + 16] in its high one; scales is (2, N, G) float16: scales, then mins.
// Input rows are quantised to int16 as for int8_linear; a group's dot product is exact in int32 (and
// in float32: |sum| < 2^24), then scaled; the mins meet each row's group sums in the epilogue.
constexpr int64_t kGroup = 32;

template <int R, int C>
void int4_block(const int16_t* x, const float* group_sums, const double* x_scale, int64_t K, const uint8_t* w,
                const uint16_t* scales, const uint16_t* mins, const float* bias, float* y, int64_t ldy, int64_t n,
                Cursor& cursor) {
  const int64_t G = K / kGroup;
  const __m256i low = _mm256_set1_epi16(0x0F);
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    cursor.tick(g * kGroup);
    __m256i lo[C], hi[C];
    __m256 scale[C];
    for (int c = 0; c < C; ++c) {
      const __m256i b = _mm256_cvtepu8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + ((n + c) * G + g) * (kGroup / 2))));
      lo[c] = _mm256_and_si256(b, low);
      hi[c] = _mm256_srli_epi16(b, 4);
      scale[c] = _mm256_set1_ps(_cvtsh_ss(scales[(n + c) * G + g]));
    }
    for (int r = 0; r < R; ++r) {
      const int16_t* xg = x + r * K + g * kGroup;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16));
      for (int c = 0; c < C; ++c) {
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo[c], x0), _mm256_madd_epi16(hi[c], x1));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const uint16_t* mn = mins + (n + c) * G;
      const float* sums = group_sums + r * G;
      __m256 offset = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= G; g += 8)
        offset = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g))),
                                 _mm256_loadu_ps(sums + g), offset);
      float out = horizontal_sum(_mm256_add_ps(acc[r][c], offset));
      for (; g < G; ++g) out += _cvtsh_ss(mn[g]) * sums[g];
      out = float(out * x_scale[r]);
      y[r * ldy + n + c] = bias ? out + bias[n + c] : out;
    }
}

template <int C>
void int4_columns(const int16_t* x, const float* group_sums, const double* xs, int64_t M, int64_t K,
                  const uint8_t* w, const uint16_t* scales, const uint16_t* mins, const float* bias, float* y,
                  int64_t N, int64_t n, Cursor& cursor) {
  const int64_t G = K / kGroup;
  row_blocks<4>(M, [&](auto R, int64_t m) {
    int4_block<decltype(R)::value, C>(x + m * K, group_sums + m * G, xs + m, K, w, scales, mins, bias, y + m * N,
                                      N, n, cursor);
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kGroup == 0,
              "int4_linear: x must be float32 (M, K) with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / kGroup;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == K / 2,
              "int4_linear: w must be contiguous uint8 (N, K / 2)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
              scales.size(0) == 2 && scales.size(1) == N && scales.size(2) == G,
              "int4_linear: scales must be contiguous float16 (2, N, K / 32)");
  const float* bp = bias_data(bias, N, "int4_linear");
  const at::Tensor xc = x.contiguous();
  QuantisedRows rows(xc);
  std::vector<int16_t>& xq = rows.q;
  std::vector<double>& xs = rows.scale;
  std::vector<float>& sums = rows.sums;
  at::Tensor y = at::empty({M, N}, xc.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mp = sp + N * G;
  float* yp = y.data_ptr<float>();
  const int64_t passes = row_passes<4>(M);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    // One prefetch burst of 4 groups (64 weight bytes per column) every 128 inputs.
    Cursor cursor = Cursor::rows(wp, K / 2, n0, n1, 0);
    cursor.burst_mask = 4 * kGroup - 1;
    int64_t n = n0;
    if (M == 1) {  // one row (a lone draft): four weight rows in flight
      cursor.step = 4 * 64;
      for (; n + 4 <= n1; n += 4) int4_columns<4>(xq.data(), sums.data(), xs.data(), M, K, wp, sp, mp, bp, yp, N, n,
                                                  cursor);
    }
    cursor.step = std::max<int64_t>(16, 2 * 64 / passes);
    for (; n + 2 <= n1; n += 2) int4_columns<2>(xq.data(), sums.data(), xs.data(), M, K, wp, sp, mp, bp, yp, N, n,
                                                cursor);
    cursor.step = std::max<int64_t>(16, 64 / passes);
    if (n < n1) int4_columns<1>(xq.data(), sums.data(), xs.data(), M, K, wp, sp, mp, bp, yp, N, n, cursor);
  });
  return y;
}

// Full-precision linears (linear_f32, linear_bf16) read a copy of the weights packed once at load
// (pack_f32, pack_bf16) in groups of 32 output columns: for each input (bf16: each pair of inputs),
// the group's 32 columns side by side, so one vector load holds 16 columns and a broadcast input
// times it adds to 16 outputs at once (an outer product: no reduction across lanes at the end, where
// the former dot-product layout spent a third of its time at K = 576). Each output is one chain of
// multiply-adds over the inputs in order, then the bias: the same arithmetic whatever the rows,
// the blocking or the vector width (AVX2 and AVX-512 give the same bits), so a k-token verify
// reproduces the 1-token results bit for bit and a prompt's entries do not depend on its chunks.
constexpr int64_t kGroupCols = 32;  // output columns per packed group
constexpr int64_t kGroupStepBytes = 128;  // bytes of a group per input step (32 floats, or 32 bf16 pairs)

bool avx512_supported() {
  return avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
const bool kAvx512 = avx512_supported();
const bool kVnni = kAvx512 && vnni_supported();

// (rows, K) weights zero-padded to whole groups and packed as (groups, K / P, kGroupCols, P) for inputs taken
// P at a time (float32: 1, bfloat16: 2), squeezed to (groups, K, kGroupCols) for P = 1.
at::Tensor pack_groups(const at::Tensor& w, int64_t P) {
  const int64_t N = w.size(0), K = w.size(1), G = (N + kGroupCols - 1) / kGroupCols;
  at::Tensor padded = at::zeros({G * kGroupCols, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  const at::Tensor packed = padded.view({G, kGroupCols, K / P, P}).transpose(1, 2).contiguous();
  return P == 1 ? packed.view({G, K, kGroupCols}) : packed;
}

// Runs group(R, m, g, cursor) for every group g of weights `w` and every row block m..m+R-1 of M rows:
// rows in chunks of `chunk` (their inputs stay in L2 while the weights pass once per chunk), each
// chunk's groups split between the threads. The first row block of a group streams it from memory and
// the others read it from L2; with more than one block the prefetch cursor runs a whole group ahead
// (measured here, bf16, the default model's linears, cold: 32 rows 27.3 -> 26.1 ms, 8 rows 13.9 ->
// 11.5 ms against the usual 16 KB lead).
template <int MaxR, typename Group>
void over_groups(int64_t M, int64_t G, int64_t K_steps, int64_t chunk, const void* w, Group&& group) {
  const int64_t group_bytes = K_steps * kGroupStepBytes;
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0), passes = row_passes<MaxR>(rows);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      Cursor cursor = Cursor::rows(w, group_bytes, g0, g1, std::max<int64_t>(64, 2 * kGroupStepBytes / passes));
      if (passes > 1) cursor.at += group_bytes;
      cursor.burst_mask = 1;  // a tick every two input steps
      cursor.to_l2 = true;
      for (int64_t g = g0; g < g1; ++g)
        row_blocks<MaxR>(rows, [&](auto R, int64_t m) { group(R, m0 + m, g, cursor); });
    });
  }
}

// Rows of a chunk whose inputs (row_bytes each) stay in L2.
inline int64_t l2_rows(int64_t row_bytes) { return std::max<int64_t>(16, (512 * 1024 / row_bytes) & ~int64_t(3)); }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// Input rows per AVX-512 block: 12 rows x 2 accumulators, the group's 2 weight vectors and a broadcast
// input fill 27 of the 32 registers, so a verify of up to 12 tokens reads each weight once. Measured
// here against groups of 64 columns and 6 rows (all the default model's linears, cold, interleaved):
// fp32 8 rows 0.86x, 12 rows 0.87x, bf16 0.86x and 0.93x; 1, 32 rows the same, 300 rows 1.03x.
constexpr int kGroupRows512 = 12;

// Stores R rows x 32 columns of accumulators (+ bias) at columns n.. of y; columns from N on are padding.
template <int R>
inline void store_group(const __m512 (&acc)[R][2], const float* bias, float* y, int64_t ldy, int64_t n, int64_t N) {
  for (int c = 0; c < 2 && n + 16 * c < N; ++c) {
    const int64_t col = n + 16 * c;
    const __mmask16 mask = N - col >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - col)) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * ldy + col, mask, bias ? _mm512_add_ps(acc[r][c], b) : acc[r][c]);
  }
}

// float32: R input rows (K each) x one packed group `wg` (K rows of 32 floats) on AVX-512.
template <int R>
void f32_group512(const float* x, int64_t K, const float* wg, const float* bias, float* y, int64_t ldy, int64_t n,
                  int64_t N, Cursor& cursor) {
  __m512 acc[R][2] = {};  // zeros
  for (int64_t k = 0; k < K; ++k) {
    cursor.tick(k);
    __m512 wv[2];
    for (int c = 0; c < 2; ++c) wv[c] = _mm512_loadu_ps(wg + k * kGroupCols + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int c = 0; c < 2; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  store_group<R>(acc, bias, y, ldy, n, N);
}

// bfloat16: R input rows given as K2 bf16 pairs each x one packed group `wg` (K2 rows of 32 column pairs):
// VDPBF16PS adds a broadcast input pair times 16 columns' pairs to 16 outputs.
template <int R>
void bf16_group(const int32_t* x, int64_t K2, const uint16_t* wg, const float* bias, float* y, int64_t ldy,
                int64_t n, int64_t N, Cursor& cursor) {
  __m512 acc[R][2] = {};  // zeros
  for (int64_t kp = 0; kp < K2; ++kp) {
    cursor.tick(kp);
    __m512bh wv[2];
    for (int c = 0; c < 2; ++c)
      wv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wg + kp * 2 * kGroupCols + 32 * c));
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[r * K2 + kp]));
      for (int c = 0; c < 2; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  store_group<R>(acc, bias, y, ldy, n, N);
}

// Rows of x (float32, M x K, K a multiple of 32) to bfloat16, rounding to nearest even.
void to_bf16_rows(const float* x, int64_t M, int64_t K, uint16_t* out) {
  for (int64_t i = 0; i < M * K; i += 32) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, reinterpret_cast<__m512i>(pair));
  }
}
#pragma GCC pop_options

// Input rows per AVX2 block: 3 rows x 4 accumulators (a group's 32 columns).
constexpr int kGroupRows256 = 3;

// float32 on AVX2: f32_group512's arithmetic (one FMA chain per output, in order) on 8-lane registers.
template <int R>
void f32_group256(const float* x, int64_t K, const float* wg, const float* bias, float* y, int64_t ldy, int64_t n,
                  int64_t N, Cursor& cursor) {
  __m256 acc[R][4] = {};  // zeros
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = wg + k * kGroupCols;
    cursor.tick(k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * K + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wk + 8 * c), acc[r][c]);
    }
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t col = n + 8 * c, count = std::min<int64_t>(8, N - col);
    if (count <= 0) break;
    alignas(32) float out[8];
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(out, acc[r][c]);
      for (int64_t i = 0; i < count; ++i) y[r * ldy + col + i] = bias ? out[i] + bias[col + i] : out[i];
    }
  }
}

// Checks x (M, K) float32 and weights packed by pack_f32 / pack_bf16 (P inputs per step) from (n, K).
void check_packed(const at::Tensor& x, const at::Tensor& w, int64_t n, at::ScalarType type, int64_t P,
                  const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % (P == 1 ? 1 : 32) == 0, op,
              ": x must be float32 (M, K)", P == 1 ? "" : " with K a multiple of 32");
  const bool layout = w.dim() == (P == 1 ? 3 : 4) && w.scalar_type() == type && w.is_contiguous() &&
                      w.size(1) * P == x.size(1) && w.size(2) == kGroupCols && (P == 1 || w.size(3) == P) &&
                      n > 0 && (n + kGroupCols - 1) / kGroupCols == w.size(0);
  TORCH_CHECK(layout, op, ": w must be ", P == 1 ? "pack_f32" : "pack_bf16", "'s layout of (n, K) weights");
}

// pack_f32: float32 weights (N, K) in linear_f32's layout, (ceil(N / 32), K, 32), zero-padded.
at::Tensor pack_f32(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_f32: w must be float32 (N, K)");
  return pack_groups(w, 1);
}

// linear_f32: x (M, K) float32 times weights packed by pack_f32 from (n, K), plus the bias: (M, n).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t n) {
  check_packed(x, w, n, at::kFloat, 1, "linear_f32");
  const float* bp = bias_data(bias, n, "linear_f32");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), G = w.size(0);
  at::Tensor y = at::empty({M, n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunk = l2_rows(K * 4);
  const auto group = [&](auto R, int64_t m, int64_t g, Cursor& cursor) {
    constexpr int kR = decltype(R)::value;
    if constexpr (kR <= kGroupRows256)
      if (!kAvx512) return f32_group256<kR>(xp + m * K, K, wp + g * K * kGroupCols, bp, yp + m * n, n, g * kGroupCols, n, cursor);
    f32_group512<kR>(xp + m * K, K, wp + g * K * kGroupCols, bp, yp + m * n, n, g * kGroupCols, n, cursor);
  };
  if (kAvx512) over_groups<kGroupRows512>(M, G, K, chunk, wp, group);
  else over_groups<kGroupRows256>(M, G, K, chunk, wp, group);
  return y;
}

// linear_bf16: the same for models held in bfloat16 on CPUs with AVX512-BF16 (callers check
// bf16_supported()): x stays float32 between layers and is rounded to bfloat16 per element (nearest
// even) on entry; VDPBF16PS sums each pair of products into the output's float32 chain.
bool bf16_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

// pack_bf16: bfloat16 weights (N, K) in linear_bf16's layout, (ceil(N / 32), K / 2, 32, 2), zero-padded.
at::Tensor pack_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % 32 == 0,
              "pack_bf16: w must be bfloat16 (N, K) with K a multiple of 32");
  return pack_groups(w, 2);
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(bf16_supported(), "linear_bf16: this CPU has no AVX512-BF16");
  check_packed(x, w, n, at::kBFloat16, 2, "linear_bf16");
  const float* bp = bias_data(bias, n, "linear_bf16");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), G = w.size(0), K2 = K / 2;
  std::vector<uint16_t> xb(M * K);
  to_bf16_rows(xc.data_ptr<float>(), M, K, xb.data());
  at::Tensor y = at::empty({M, n}, xc.options());
  const auto* xp = reinterpret_cast<const int32_t*>(xb.data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  over_groups<kGroupRows512>(M, G, K2, l2_rows(K * 2), wp, [&](auto R, int64_t m, int64_t g, Cursor& cursor) {
    bf16_group<decltype(R)::value>(xp + m * K2, K2, wp + g * K * kGroupCols, bp, yp + m * n, n, g * kGroupCols, n,
                                   cursor);
  });
  return y;
}

// huge_pages: contiguous copies of CPU tensors side by side in one block of 2 MiB pages, for the weights
// every step streams from memory. With 4 KiB pages each 4 KiB of the stream costs a TLB miss and its page
// walk, which stalls a core that is also busy computing: measured here (default model, fp32, interleaved
// in one process, against the same copies in 4 KiB pages), a 12-token verify 0.925-0.95x the time, a
// 1-token step 0.95-1.01x, an int4 draft step 0.95x. One block, so no
// tensor's tail falls outside whole pages (half of the default model's packed copy did, one tensor at a
// time). The madvise is advice: the kernel may still give 4 KiB pages.
std::vector<at::Tensor> huge_pages(at::TensorList ts) {
  constexpr int64_t kHugePage = int64_t(2) << 20, kAlign = 64;
  const auto padded = [](int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  int64_t total = 0;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "huge_pages: CPU tensors are expected");
    total += padded(t.numel() * t.element_size());
  }
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHugePage, std::max<int64_t>(total, kAlign)) == 0, "huge_pages: cannot allocate ",
              total, " bytes");
#ifdef MADV_HUGEPAGE
  madvise(p, total & ~(kHugePage - 1), MADV_HUGEPAGE);
#endif
  const at::Tensor block = at::from_blob(p, {total}, [](void* q) { std::free(q); }, at::TensorOptions(at::kByte));
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const at::Tensor& t : ts) {
    const int64_t bytes = t.numel() * t.element_size();
    out.push_back(block.narrow(0, offset, bytes).view(t.scalar_type()).view(t.sizes()).copy_(t));
    offset += padded(bytes);
  }
  return out;
}

// argmax_rows: the index of each row's maximum for float32 (M, N) rows, as torch.argmax gives it (the
// first index at ties, the first NaN where a row has one), at memory speed: torch's reads ~1 GB/s here
// (45 us for one 49,152-token row, 335 us for a 13-row verify), about 2% of a speculative step.
int64_t argmax_row(const float* x, int64_t N) {
  __m256 vmax[4], unordered = _mm256_setzero_ps();
  for (__m256& v : vmax) v = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 32 <= N; i += 32)
    for (int a = 0; a < 4; ++a) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * a);
      vmax[a] = _mm256_max_ps(vmax[a], v);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(vmax[0], vmax[1]), _mm256_max_ps(vmax[2], vmax[3])));
  float best = -INFINITY;
  for (float v : lanes) best = std::max(best, v);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t j = i; j < N; ++j) {
    nan = nan || std::isnan(x[j]);
    best = std::max(best, x[j]);
  }
  // The first position holding the maximum (or a NaN), eight at a time.
  const __m256 target = _mm256_set1_ps(best);
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const int hits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hits) return j + __builtin_ctz(hits);
  }
  for (; j < N; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == best) return j;
  return 0;  // N == 0 is rejected by the caller
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: x must be float32 (M, N > 0)");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = xc.size(1);
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) op[m] = argmax_row(xp + m * N, N);
  });
  return out;
}

// rms_norm: y = x / sqrt(mean(x^2) + eps) * w per row of a float32 (M, K) input, in one
// pass instead of torch's eight small ops (~55 us -> ~2 us per call for K = 576 here). The squares
// add up in double precision, four lanes times four accumulators (then a fixed tree), so a row's
// result depends only on that row: at 12 verify rows, 0.52 -> 0.20 ms per forward of the default model
// against one scalar chain.
inline double sum_squares(const float* x, int64_t K) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int i = 0; i < 4; ++i) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4 * i));
      acc[i] = _mm256_fmadd_pd(v, v, acc[i]);
    }
  const __m256d sum = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, sum);
  double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; k < K; ++k) total += double(x[k]) * x[k];
  return total;
}

// Rows m0..m1-1 of rms_norm.
inline void rms_norm_rows(const float* xp, const float* wp, float* yp, int64_t K, double eps, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = xp + m * K;
    const float inv = static_cast<float>(1.0 / std::sqrt(sum_squares(xr, K) / double(K) + eps));
    for (int64_t k = 0; k < K; ++k) yp[m * K + k] = xr[k] * inv * wp[k];
  }
}

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
  // rows are independent: batch-invariant
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { rms_norm_rows(xp, wp, yp, K, eps, m0, m1); });
  return y;
}

// KV entries are float32; bfloat16 (as uint16_t bits) for models held in bfloat16; float16 (Half16) for
// the native target, as llama.cpp keeps them: half the bytes that decode rows stream per step. Either
// way they are read as float32 lanes.
struct Half16 {
  uint16_t bits;
};
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const Half16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(Half16 v) { return _cvtsh_ss(v.bits); }
// Stores a float32 KV entry: as is, or rounded to bfloat16 / float16 (nearest even; NaN stays NaN, float16
// overflows to infinity) as torch rounds.
inline void store_entry(float v, float* out) { *out = v; }
inline void store_entry(float v, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  *out = (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((bits >> 16) | 0x40)
                                              : uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
inline void store_entry(float v, Half16* out) { out->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }

// Calls f with a null pointer of the KV entries' type: float, bfloat16 bits (uint16_t) or Half16.
template <typename F>
inline void with_kv_entries(at::ScalarType kv_type, F&& f) {
  if (kv_type == at::kBFloat16)
    f(static_cast<uint16_t*>(nullptr));
  else if (kv_type == at::kHalf)
    f(static_cast<Half16*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  float out = horizontal_sum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) out += a[i] * to_float(b[i]);
  return out;
}


// Scaled scores of H query heads (rows of q, length D, a multiple of 8) against 4 consecutive key rows,
// into out[h * stride + 0..3]: one accumulator per (head, key), each key row loaded once for all H
// heads, then a fixed hadd tree and the scaling, so each score depends only on its query and key.
template <int H, typename T>
inline void dot4_heads(const float* q, int64_t D, const T* k, float scaling, float* out, int64_t stride) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[H];
    for (int h = 0; h < H; ++h) qv[h] = _mm256_loadu_ps(q + h * D + d);
    for (int j = 0; j < 4; ++j) {
      const __m256 kv = load8(k + j * D + d);
      for (int h = 0; h < H; ++h) acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
    }
  }
  const __m128 scale = _mm_set1_ps(scaling);
  for (int h = 0; h < H; ++h) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
    _mm_storeu_ps(out + h * stride, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), scale));
  }
}

// scores[g * stride + j] = scaling * q_g . k_j for the `groups` query heads sharing these keys and keys
// first..last, three heads at a time (12 accumulators fill AVX2's registers); the last partial block
// of 4 keys is computed from a zero-padded copy, the same arithmetic as a full block.
template <typename T>
inline void key_scores(const float* q, int64_t groups, const T* keys, int64_t D, int64_t first, int64_t last,
                       float scaling, float* scores, int64_t stride, T* pad) {
  if (D % 8) {
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t j = first; j <= last; ++j) scores[g * stride + j] = dot(q + g * D, keys + j * D, D) * scaling;
    return;
  }
  float block[12];
  for (int64_t g0 = 0; g0 < groups; g0 += 3) {
    const int64_t heads = std::min<int64_t>(3, groups - g0);
    int64_t j = first;
    for (; j + 4 <= last + 1; j += 4)
      with_count<1, 3>(heads, [&](auto H) {
        dot4_heads<decltype(H)::value, T>(q + g0 * D, D, keys + j * D, scaling, scores + g0 * stride + j, stride);
      });
    if (j <= last) {
      const int64_t n = last + 1 - j;
      std::fill(pad, pad + 4 * D, T(0));
      std::copy(keys + j * D, keys + (j + n) * D, pad);
      with_count<1, 3>(heads, [&](auto H) { dot4_heads<decltype(H)::value, T>(q + g0 * D, D, pad, scaling, block, 4); });
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < n; ++i) scores[(g0 + h) * stride + j + i] = block[4 * h + i];
    }
  }
}

// exp of 8 floats (Cephes' polynomial, ~1 ulp on the range softmax uses: x <= 0).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// In-place exp(scores - max) over [first, last]; returns 1 / their sum.
inline float softmax_weights(float* scores, int64_t first, int64_t last) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);  // a maximum is exact in any order
  int64_t i = first;
  for (; i + 8 <= last + 1; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float mx = -INFINITY;
  for (float v : lanes) mx = std::max(mx, v);
  for (; i <= last; ++i) mx = std::max(mx, scores[i]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = first;
  for (; j + 8 <= last + 1; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vmx));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (j <= last) {  // the last < 8 scores: padded lanes are zeroed after the exp
    const int64_t rem = last + 1 - j;
    float buf[8];
    for (int64_t i = 0; i < 8; ++i) buf[i] = i < rem ? scores[j + i] - mx : -80.f;
    _mm256_storeu_ps(buf, exp8(_mm256_loadu_ps(buf)));
    for (int64_t i = 0; i < 8; ++i) {
      if (i < rem) scores[j + i] = buf[i]; else buf[i] = 0.f;
    }
    vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(buf));
  }
  return 1.f / horizontal_sum(vsum);
}


// out = inv * sum_j p[j] * v[j] over rows j in [first, last] of v (row length D), for head sizes that
// are not multiples of 32 (mix_group_values takes those): accumulated in registers for D = 16, else
// in memory.
template <int DV, typename T>
inline void mix_values_fixed(const float* p, int64_t first, int64_t last, const T* v, float inv, float* out) {
  __m256 acc[DV];
  for (int i = 0; i < DV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = first; j <= last; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const T* vr = v + j * DV * 8;
    for (int i = 0; i < DV; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(pj, load8(vr + 8 * i)));
  }
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int i = 0; i < DV; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], vinv));
}

template <typename T>
inline void mix_values(const float* p, int64_t first, int64_t last, const T* v, int64_t D, float inv, float* out) {
  switch (D) {
    case 16: return mix_values_fixed<2, T>(p, first, last, v, inv, out);
    default: break;  // multiples of 32 go to mix_group_values' shared-load path
  }
  std::fill(out, out + D, 0.f);
  for (int64_t j = first; j <= last; ++j)
    for (int64_t d = 0; d < D; ++d) out[d] += p[j] * to_float(v[j * D + d]);
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// mix_values for H heads sharing the value rows, over dims [d0, d0 + 32): each value row chunk is
// loaded once for all H heads; per element the same products and additions in the same order.
template <int H, typename T>
inline void mix_heads32(const float* p, int64_t stride, int64_t first, int64_t last, const T* v, int64_t D,
                        int64_t d0, const float* inv, float* out) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_setzero_ps();
  for (int64_t j = first; j <= last; ++j) {
    __m256 vv[4];
    for (int i = 0; i < 4; ++i) vv[i] = load8(v + j * D + d0 + 8 * i);
    for (int h = 0; h < H; ++h) {
      const __m256 pj = _mm256_set1_ps(p[h * stride + j]);
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_add_ps(acc[h][i], _mm256_mul_ps(pj, vv[i]));
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m256 vinv = _mm256_set1_ps(inv[h]);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + h * D + d0 + 8 * i, _mm256_mul_ps(acc[h][i], vinv));
  }
}

// mix_heads32 on AVX-512 registers, over dims [d0, d0 + 16 * W): each element gets the same products
// and additions in the same order (the arithmetic is per lane), so the same bits in half the
// instructions.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const Half16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int H, int W, typename T>
void mix_heads_wide(const float* p, int64_t stride, int64_t first, int64_t last, const T* v, int64_t D, int64_t d0,
                    const float* inv, float* out) {
  __m512 acc[H][W];
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < W; ++i) acc[h][i] = _mm512_setzero_ps();
  for (int64_t j = first; j <= last; ++j) {
    __m512 vv[W];
    for (int i = 0; i < W; ++i) vv[i] = load16(v + j * D + d0 + 16 * i);
    for (int h = 0; h < H; ++h) {
      const __m512 pj = _mm512_set1_ps(p[h * stride + j]);
      for (int i = 0; i < W; ++i) acc[h][i] = _mm512_add_ps(acc[h][i], _mm512_mul_ps(pj, vv[i]));
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m512 vinv = _mm512_set1_ps(inv[h]);
    for (int i = 0; i < W; ++i) _mm512_storeu_ps(out + h * D + d0 + 16 * i, _mm512_mul_ps(acc[h][i], vinv));
  }
}

// The value mix of up to three heads over a whole head of D dims (a multiple of 32), 64 dims at a time.
template <int H, typename T>
void mix_heads_512(const float* p, int64_t stride, int64_t first, int64_t last, const T* v, int64_t D,
                   const float* inv, float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) mix_heads_wide<H, 4, T>(p, stride, first, last, v, D, d0, inv, out);
  if (d0 < D) mix_heads_wide<H, 2, T>(p, stride, first, last, v, D, d0, inv, out);
}
#pragma GCC pop_options

// Attention outputs of the `groups` query heads sharing these values (weights p[g * stride + j], 1/sums
// inv[g]) into out[g * D ...]: three heads at a time over 32-dim chunks where D allows (on AVX-512
// registers where the CPU has them: the same bits), else head by head.
template <typename T>
inline void mix_group_values(const float* p, int64_t groups, int64_t stride, int64_t first, int64_t last,
                             const T* v, int64_t D, const float* inv, float* out) {
  if (D % 32) {
    for (int64_t g = 0; g < groups; ++g) mix_values(p + g * stride, first, last, v, D, inv[g], out + g * D);
    return;
  }
  for (int64_t g0 = 0; g0 < groups; g0 += 3) {
    const int64_t heads = std::min<int64_t>(3, groups - g0);
    with_count<1, 3>(heads, [&](auto H) {
      constexpr int kH = decltype(H)::value;
      if (kAvx512) return mix_heads_512<kH, T>(p + g0 * stride, stride, first, last, v, D, inv + g0, out + g0 * D);
      for (int64_t d0 = 0; d0 < D; d0 += 32)
        mix_heads32<kH, T>(p + g0 * stride, stride, first, last, v, D, d0, inv + g0, out + g0 * D);
    });
  }
}

// Rotary embedding of one head vector (HF's rotate_half convention).
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
  for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// The KV buffers of S sequences: contiguous (Hkv, capacity, D), float32, bfloat16 or float16, all of one type, with
// room for every new token.
void check_kv_buffers(at::TensorList keys, at::TensorList values, at::IntArrayRef starts, at::IntArrayRef lengths,
                      int64_t Hkv, int64_t D) {
  const auto kv_type = keys[0].scalar_type();
  for (size_t s = 0; s < keys.size(); ++s) {
    const at::Tensor& k = keys[s];
    TORCH_CHECK(k.is_contiguous() && values[s].is_contiguous() && k.scalar_type() == kv_type &&
                values[s].scalar_type() == kv_type &&
                (kv_type == at::kFloat || kv_type == at::kBFloat16 || kv_type == at::kHalf) &&
                k.sizes() == values[s].sizes() && k.size(0) == Hkv && k.size(2) == D && starts[s] >= 0 &&
                starts[s] + lengths[s] <= k.size(1),
                "cached_attention: contiguous float32, bfloat16 or float16 buffers, all of one type, with room for every "
                "new token");
  }
}

// The attention of cached_attention once its arguments are checked, for KV entries of type T: the new
// tokens' KV entries written (by token), then units of one token's query heads sharing one KV head (each
// key/value row read once for all of them), every unit computed alone: any split of either between
// threads gives the same bits.
template <typename T>
struct Attention {
  const float *xp, *cp, *sp;
  int64_t T_rows, width, D, Hq, Hkv;
  at::TensorList keys, values;
  const std::vector<int64_t>& row_seq;
  const std::vector<int64_t>& row_pos;
  double scaling;
  int64_t window;
  float* yp;

  static T* entries(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
  int64_t units() const { return T_rows * Hkv; }

  // Rotated keys and values of tokens r0..r1-1 into their sequences' buffers.
  void write_kv(int64_t r0, int64_t r1) const {
    std::vector<float> rotated(D);
    for (int64_t r = r0; r < r1; ++r) {
      T* kp = entries(keys[row_seq[r]]);
      T* vp = entries(values[row_seq[r]]);
      const int64_t cap = keys[row_seq[r]].size(1);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at = (h * cap + row_pos[r]) * D;
        const float* v = xp + (r * width + Hq + Hkv + h) * D;
        rotate(xp + (r * width + Hq + h) * D, cp + r * D, sp + r * D, rotated.data(), D);
        for (int64_t d = 0; d < D; ++d) {
          store_entry(rotated[d], kp + at + d);
          store_entry(v[d], vp + at + d);
        }
      }
    }
  }

  // Units b0..b1-1. Units run head-major, so a thread takes tokens of one KV head while its rows are in
  // cache, and within a head from both ends in turn (first, last, second, second to last, ...): a causal
  // prefill's later tokens attend to more keys, and the threads' equal shares of units then cost about the
  // same (in order, two threads split 5 : 7 over three KV heads).
  void run_units(int64_t b0, int64_t b1, int64_t longest) const {
    const int64_t groups = Hq / Hkv;
    std::vector<float> q(groups * D), scores(groups * longest);
    std::vector<T> pad(8 * D);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b % T_rows, kvh = b / T_rows, r = i % 2 ? T_rows - 1 - i / 2 : i / 2, last = row_pos[r];
      const int64_t cap = keys[row_seq[r]].size(1);
      const T* kp = entries(keys[row_seq[r]]) + kvh * cap * D;
      const T* vp = entries(values[row_seq[r]]) + kvh * cap * D;
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      for (int64_t g = 0; g < groups; ++g)
        rotate(xp + (r * width + kvh * groups + g) * D, cp + r * D, sp + r * D, q.data() + g * D, D);
      key_scores(q.data(), groups, kp, D, first, last, float(scaling), scores.data(), longest, pad.data());
      float inv[64];
      for (int64_t g = 0; g < groups; ++g) inv[g] = softmax_weights(scores.data() + g * longest, first, last);
      mix_group_values(scores.data(), groups, longest, first, last, vp, D, inv, yp + (r * Hq + kvh * groups) * D);
    }
  }
};

// The most keys any new token attends to (its position + 1): the length of a unit's score rows.
int64_t longest_row(const std::vector<int64_t>& row_pos) {
  int64_t most = 1;
  for (int64_t pos : row_pos) most = std::max(most, pos + 1);
  return most;
}

template <typename T>
void attend(const Attention<T>& a) {
  a.write_kv(0, a.T_rows);
  const int64_t longest = longest_row(a.row_pos);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (longest * a.D * (a.Hq / a.Hkv)));
  at::parallel_for(0, a.units(), grain, [&](int64_t b0, int64_t b1) { a.run_units(b0, b1, longest); });
}

// Each new token's sequence and position, from the sequences' starts and lengths (checked against T rows).
void token_rows(at::IntArrayRef starts, at::IntArrayRef lengths, int64_t T, std::vector<int64_t>& row_seq,
                std::vector<int64_t>& row_pos) {
  row_seq.assign(T, 0);
  row_pos.assign(T, 0);
  int64_t row = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(starts.size()); ++s)
    for (int64_t t = 0; t < lengths[s]; ++t, ++row) {
      TORCH_CHECK(row < T, "cached_attention: lengths add up to more than qkv's rows");
      row_seq[row] = s;
      row_pos[row] = starts[s] + t;
    }
  TORCH_CHECK(row == T, "cached_attention: lengths must add up to qkv's rows");
}

// cached_attention: the attention block between the qkv and output projections for the
// packed new tokens of several sequences: rotary on queries and keys, each sequence's
// keys/values written into its layer buffers (Hkv, capacity, D; float32, or bfloat16 for bf16
// models) at start..start+n-1, then causal (optionally sliding-window) attention of token t over
// positions [0, start + t]. Every (token, head) is computed alone in a fixed order, so a sequence's
// result does not depend on the others or on how many tokens it brings (batch invariance). Built with
// -ffp-contract=off, the rotary is bit-identical to torch's mul/add formulation.
at::Tensor cached_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            at::TensorList keys, at::TensorList values, at::IntArrayRef starts,
                            at::IntArrayRef lengths, int64_t q_heads, double scaling, int64_t window) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat, "cached_attention: qkv must be float32 (T, H, D)");
  const int64_t S = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(values.size()) == S && static_cast<int64_t>(starts.size()) == S &&
              static_cast<int64_t>(lengths.size()) == S, "cached_attention: one buffer, start and length per sequence");
  const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
  const int64_t T = x.size(0), D = x.size(2), Hq = q_heads;
  TORCH_CHECK(S > 0 && keys[0].dim() == 3 && keys[0].size(2) == D, "cached_attention: buffers must be (Hkv, capacity, D)");
  const int64_t Hkv = keys[0].size(0), width = Hq + 2 * Hkv;
  const auto kv_type = keys[0].scalar_type();
  TORCH_CHECK(x.size(1) == width && c.size(0) == T && c.size(1) == D && sn.sizes() == c.sizes(),
              "cached_attention: qkv (T, Hq + 2 Hkv, D) and cos/sin (T, D) expected");
  check_kv_buffers(keys, values, starts, lengths, Hkv, D);
  std::vector<int64_t> row_seq, row_pos;
  token_rows(starts, lengths, T, row_seq, row_pos);
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= 64, "cached_attention: query heads must be 1..64 times the KV heads");
  at::Tensor y = at::empty({T, Hq * D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  with_kv_entries(kv_type, [&](auto* entry) {
    using E = std::remove_pointer_t<decltype(entry)>;
    attend(Attention<E>{xp, cp, sp, T, width, D, Hq, Hkv, keys, values, row_seq, row_pos, scaling, window,
                        y.data_ptr<float>()});
  });
  return y;
}

// silu_mul's work in units of 256 outputs of a row (each element computed alone: any split gives the same bits).
constexpr int64_t kSiluBlock = 256;

// Units u0..u1-1 of silu_mul over gate_up rows of 2 * I (gate, then up) into rows of I.
inline void silu_units(const float* gp, float* yp, int64_t I, int64_t u0, int64_t u1) {
  const __m256 one = _mm256_set1_ps(1.f), top = _mm256_set1_ps(88.f);
  const int64_t blocks = (I + kSiluBlock - 1) / kSiluBlock;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t m = u / blocks, end = std::min(I, (u % blocks + 1) * kSiluBlock);
    const float* gate = gp + m * 2 * I;
    const float* up = gate + I;
    float* out = yp + m * I;
    int64_t i = (u % blocks) * kSiluBlock;
    for (; i + 8 <= end; i += 8) {
      const __m256 a = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), top));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < end; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
}

// silu_mul: silu(gate) * up for the fused gate_up projection's output (M, 2 * I).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be float32 (M, 2 * I)");
  const at::Tensor g = gate_up.contiguous();
  const int64_t M = g.size(0), I = g.size(1) / 2;
  at::Tensor y = at::empty({M, I}, g.options());
  // split between threads from 32 units on: a 12-row verify's 18K outputs, not a 1-token step's 1.5K
  at::parallel_for(0, M * ((I + kSiluBlock - 1) / kSiluBlock), 32, [&](int64_t u0, int64_t u1) {
    silu_units(g.data_ptr<float>(), y.data_ptr<float>(), I, u0, u1);
  });
  return y;
}

#include "gguf_blocks.h"
#include "native_stack.h"

// decoder_layers: a stack of decoder layers in one call, so the ~8 kernel calls per layer are
// not each a trip through Python (pre-norm Llama-style layers: RMS norms, fused qkv, rotary
// attention, SiLU-gated MLP). Serves decode/verify steps (float32 or bfloat16 weights: linear_f32
// or linear_bf16, by the weight's dtype) and quantised drafts (int8 weights with per-channel scales, or
// int4_linear's packed uint8 weights with group scales and mins; `scales` empty means full precision). Per layer
// i: norms[2i], norms[2i + 1] (attention, MLP); weights/scales/biases[4i + j] for j = qkv, o,
// gate_up, down; KV buffers keys/values[i * S + s] for sequence s. Skipped sub-layers are the
// identity. Returns the residual stream after the last layer; every kernel is the one the
// per-layer path calls, in the same order, so the results are identical to it.
at::Tensor decoder_layers(const at::Tensor& hidden, at::TensorList norms, at::TensorList weights,
                          at::TensorList scales, const c10::List<c10::optional<at::Tensor>>& biases,
                          at::IntArrayRef skip_attention, at::IntArrayRef skip_mlp, const at::Tensor& cos,
                          const at::Tensor& sin, at::TensorList keys, at::TensorList values, at::IntArrayRef starts,
                          at::IntArrayRef lengths, int64_t q_heads, double scaling, at::IntArrayRef windows,
                          double eps) {
  const int64_t L = static_cast<int64_t>(skip_attention.size()), S = static_cast<int64_t>(starts.size());
  TORCH_CHECK(static_cast<int64_t>(skip_mlp.size()) == L && static_cast<int64_t>(windows.size()) == L &&
              static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(weights.size()) == 4 * L &&
              (scales.empty() || static_cast<int64_t>(scales.size()) == 4 * L) &&
              static_cast<int64_t>(biases.size()) == 4 * L &&
              static_cast<int64_t>(keys.size()) == L * S && static_cast<int64_t>(values.size()) == L * S,
              "decoder_layers: 2 norms, 4 linears, one window and S KV buffers per layer");
  if (native_stack(scales, L))
    return native_layers(hidden, norms, weights, scales, biases, skip_attention, skip_mlp, cos, sin, keys, values,
                         starts, lengths, q_heads, scaling, windows, eps);
  at::Tensor h = hidden.contiguous().clone();
  const int64_t T = h.size(0), H = h.size(1);
  // n: the output width, which bf16 weights (packed in whole groups of columns) do not tell
  const auto linear = [&](const at::Tensor& x, int64_t i, int64_t n) {
    if (!scales.empty() && scales[i].scalar_type() == at::kLong)  // a native target's GGUF blocks
      return qblock_linear(x, weights[i], scales[i], biases.get(i));
    if (!scales.empty())
      return weights[i].scalar_type() == at::kByte ? int4_linear(x, weights[i], scales[i], biases.get(i))
                                                   : int8_linear(x, weights[i], scales[i], biases.get(i));
    return weights[i].scalar_type() == at::kBFloat16 ? linear_bf16(x, weights[i], biases.get(i), n)
                                                     : linear_f32(x, weights[i], biases.get(i), n);
  };
  for (int64_t i = 0; i < L; ++i) {
    if (!skip_attention[i]) {
      const int64_t D = keys[i * S].size(2), width = q_heads + 2 * keys[i * S].size(0);
      const at::Tensor qkv = linear(rms_norm(h, norms[2 * i], eps), 4 * i, width * D);
      const at::Tensor y = cached_attention(qkv.view({T, width, D}), cos, sin, keys.slice(i * S, S),
                                            values.slice(i * S, S), starts, lengths, q_heads, scaling,
                                            windows[i]);
      h.add_(linear(y, 4 * i + 1, H));
    }
    if (!skip_mlp[i]) {
      const at::Tensor& down = weights[4 * i + 3];
      // the MLP width, which only the full-precision kernels are told (bf16's packed layout: input pairs)
      const int64_t inner = down.dim() == 4 ? down.size(1) * 2 : down.dim() > 1 ? down.size(1) : 0;
      h.add_(linear(silu_mul(linear(rms_norm(h, norms[2 * i + 1], eps), 4 * i + 2, 2 * inner)), 4 * i + 3, H));
    }
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(knn_ssd, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("qblock_pack(Tensor w, Tensor parts, int K) -> (Tensor, Tensor)");
  m.def("qblock_linear(Tensor x, Tensor w, Tensor parts, Tensor? bias) -> Tensor");
  m.def("qblock_rows(Tensor w, int type, int K, Tensor ids) -> Tensor");
  m.def("huge_pages(Tensor[] ts) -> Tensor[]");
  m.def("pack_f32(Tensor w) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.def("bf16_supported", &bf16_supported);  // no tensor arguments: one kernel for every backend
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("cached_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!)[] keys, Tensor(b!)[] values, int[] starts, "
        "int[] lengths, int q_heads, float scaling, int window) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decoder_layers(Tensor hidden, Tensor[] norms, Tensor[] weights, Tensor[] scales, Tensor?[] biases, "
        "int[] skip_attention, int[] skip_mlp, Tensor cos, Tensor sin, Tensor(a!)[] keys, Tensor(b!)[] values, "
        "int[] starts, int[] lengths, int q_heads, float scaling, int[] windows, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(knn_ssd, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("qblock_pack", &qblock_pack);
  m.impl("qblock_linear", &qblock_linear);
  m.impl("qblock_rows", &qblock_rows);
  m.impl("huge_pages", &huge_pages);
  m.impl("pack_f32", &pack_f32);
  m.impl("linear_f32", &linear_f32);
  m.impl("pack_bf16", &pack_bf16);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("cached_attention", &cached_attention);
  m.impl("silu_mul", &silu_mul);
  m.impl("decoder_layers", &decoder_layers);
}
