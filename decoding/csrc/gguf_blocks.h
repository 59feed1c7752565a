// The native target: linears that read a GGUF file's quantised blocks as stored (included by cpu_kernels.cpp
// inside its anonymous namespace, after the helpers it shares: quantise_row, Cursor, row_blocks).
//
// A weight is one or more parts of output rows, each part in one GGML block format, each row a run of that
// format's blocks over the K inputs: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 inputs) and Q4_K, Q5_K,
// Q6_K (256). For every group of 32 inputs a format unpacks its quantised values (inputs 0-15 and 16-31,
// each half with its own scale: the k-quants' 16-input sub-blocks) and gives the group's float scales,
// computed exactly as ggml dequantises (d * sc in float32), and its min where the format has one:
// w = scale * q + min. Inputs are quantised per row: for the 32-input formats to int16 with the row's absmax
// scale, a group's dot product an exact integer (|sum| < 2^24: exact in float32 too); for the k-quants to
// int8 per 256-input block with the block's absmax scale (llama.cpp's q8_K), a super-block's dot product an
// exact integer in one VPMADDUBSW pass. Each output is then one chain of float (double, for the k-quants)
// multiply-adds over the groups or blocks in order, the mins meeting the row's input sums: the same
// arithmetic whatever the other rows, the blocking or the chunking.

// The 32-input formats' int16 input limit: below 32767 since the k-quants once split these rows into bytes;
// kept, as changing it would change every output of the 32-input formats.
constexpr float kInt16Limit = 32639.f;

enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One group of 32 inputs: quantised values as int16 (lo: inputs 0-15, hi: 16-31), scales and mins per half.
struct Group {
  __m256i lo, hi;
  float scale_lo, scale_hi, min;
};

inline __m256i widen_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16 lanes each holding bit (lane + shift) of `bits`, as 0 or `value`.
inline __m256i bit_lanes(uint32_t bits, int shift, int16_t value) {
  const __m256i mask = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                         static_cast<int16_t>(-32768));
  const __m256i set = _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>((bits >> shift) & 0xFFFF)), mask);
  return _mm256_and_si256(_mm256_cmpeq_epi16(set, mask), _mm256_set1_epi16(value));
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Group g (0..7) of a k-quant super-block with 4-bit low parts in 64-input chunks (Q4_K, Q5_K).
inline void k_low_nibbles(const uint8_t* qs, int g, Group& out) {
  const __m128i count = _mm_cvtsi32_si128((g & 1) * 4);
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  const uint8_t* chunk = qs + 32 * (g / 2);
  out.lo = _mm256_and_si256(_mm256_srl_epi16(widen_u8(chunk), count), nibble);
  out.hi = _mm256_and_si256(_mm256_srl_epi16(widen_u8(chunk + 16), count), nibble);
}

template <int64_t Type>
struct Format;

template <>
struct Format<kQ4_0> {
  static constexpr int64_t kInputs = 32, kBytes = 18;
  static constexpr bool kMin = false, kSplit = false;
  static inline void group(const uint8_t* b, int, Group& out) {
    const __m256i v = widen_u8(b + 2), eight = _mm256_set1_epi16(8);
    out.lo = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), eight);
    out.hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
    out.scale_lo = out.scale_hi = fp16(b);
  }
};

template <>
struct Format<kQ4_1> {
  static constexpr int64_t kInputs = 32, kBytes = 20;
  static constexpr bool kMin = true, kSplit = false;
  static inline void group(const uint8_t* b, int, Group& out) {
    const __m256i v = widen_u8(b + 4);
    out.lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    out.hi = _mm256_srli_epi16(v, 4);
    out.scale_lo = out.scale_hi = fp16(b);
    out.min = fp16(b + 2);
  }
};

// Q5_0 (d, fifth bits, nibbles: w = d * (q - 16)) and Q5_1 (d, m, fifth bits, nibbles: w = d * q + m); the
// fifth bits of the 32 values in a uint32 (bit j: value j).
template <bool Min>
struct Q5Format {
  static constexpr int64_t kInputs = 32, kBytes = Min ? 24 : 22;
  static constexpr bool kMin = Min, kSplit = false;
  static inline void group(const uint8_t* b, int, Group& out) {
    constexpr int scales = Min ? 4 : 2;  // bytes of d (and m) before the fifth bits
    uint32_t qh;
    std::memcpy(&qh, b + scales, 4);
    const __m256i v = widen_u8(b + scales + 4);
    out.lo = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), bit_lanes(qh, 0, 16));
    out.hi = _mm256_or_si256(_mm256_srli_epi16(v, 4), bit_lanes(qh, 16, 16));
    if constexpr (!Min) {
      out.lo = _mm256_sub_epi16(out.lo, _mm256_set1_epi16(16));
      out.hi = _mm256_sub_epi16(out.hi, _mm256_set1_epi16(16));
    }
    out.scale_lo = out.scale_hi = fp16(b);
    if constexpr (Min) out.min = fp16(b + 2);
  }
};

template <>
struct Format<kQ5_0> : Q5Format<false> {};

template <>
struct Format<kQ5_1> : Q5Format<true> {};

template <>
struct Format<kQ8_0> {
  static constexpr int64_t kInputs = 32, kBytes = 34;
  static constexpr bool kMin = false, kSplit = false;
  static inline void group(const uint8_t* b, int, Group& out) {
    out.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
    out.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
    out.scale_lo = out.scale_hi = fp16(b);
  }
};

// The k-quants (256-input super-blocks) also give their values as unsigned bytes and their integer sub-block
// scales, so the linear can sum sc * q * x over a whole super-block in exact integers (kquant_block):
//   scales(b, s): s.sc[2g], s.sc[2g + 1] scale inputs 0-15 and 16-31 of group g, s.mins[g] is its min
//   (w = d * sc * (q - kOffset) - dmin * min); bytes(b, g): the group's 32 values q as unsigned bytes.
// group() (ggml's float dequantisation, for embedding rows) is built on the same two.
struct KScales {
  int16_t sc[16];   // Q6_K: the 16 sub-block scales
  uint8_t sc8[8];   // Q4_K, Q5_K: the 8 group scales
  uint8_t mins[8];  // Q4_K, Q5_K: the 8 group mins
  float d, dmin;
};

// Int16 lane g of each 128-bit half of `scales8` (group_scales8's layout) in all its lanes: one VPSHUFB.
inline __m256i lane_broadcast(__m256i scales8, int g) {
  const __m256i control = _mm256_set1_epi16(static_cast<int16_t>((2 * g) | ((2 * g + 1) << 8)));
  return _mm256_shuffle_epi8(scales8, control);
}

template <typename K>
inline void k_group(const uint8_t* b, int g, Group& out) {
  KScales s;
  K::scales(b, s);
  const __m256i q = K::bytes(b, g), offset = _mm256_set1_epi16(K::kOffset);
  out.lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), offset);
  out.hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)), offset);
  out.scale_lo = s.d * float(K::kSplit ? s.sc[2 * g] : s.sc8[g]);
  out.scale_hi = s.d * float(K::kSplit ? s.sc[2 * g + 1] : s.sc8[g]);
  out.min = K::kMin ? -(s.dmin * float(s.mins[g])) : 0.f;
}

// The eight 6-bit scales and mins of a Q4_K / Q5_K super-block at once (ggml's kmask unpacking).
inline void k4_scales(const uint8_t* b, KScales& s) {
  uint32_t u[4];
  std::memcpy(u, b + 4, 12);
  const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
  u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
  const uint32_t mins_low = u[1] & m1;
  u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
  u[2] = mins_low;
  u[0] &= m1;
  std::memcpy(s.sc8, u, 8);
  std::memcpy(s.mins, u + 2, 8);
  s.d = fp16(b);
  s.dmin = fp16(b + 2);
}

// Bytes of group g's nibbles in a k-quant's 64-input chunks of 32 bytes (low nibbles, then high).
inline __m256i k_nibbles(const uint8_t* qs, int g) {
  const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (g / 2)));
  return _mm256_and_si256(_mm256_srl_epi16(chunk, _mm_cvtsi32_si128((g & 1) * 4)), _mm256_set1_epi8(0x0F));
}

// Q4_K: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles; w = d*sc*q - dmin*m.
template <>
struct Format<kQ4_K> {
  static constexpr int64_t kInputs = 256, kBytes = 144, kOffset = 0;
  static constexpr bool kMin = true, kSplit = false;
  static inline void scales(const uint8_t* b, KScales& s) { k4_scales(b, s); }
  static inline __m256i bytes(const uint8_t* b, int g) { return k_nibbles(b + 16, g); }
  static inline void group(const uint8_t* b, int g, Group& out) { k_group<Format>(b, g, out); }
};

// Q5_K: as Q4_K, with a fifth bit per value in 32 bytes (bit g of byte l: value l of group g).
template <>
struct Format<kQ5_K> {
  static constexpr int64_t kInputs = 256, kBytes = 176, kOffset = 0;
  static constexpr bool kMin = true, kSplit = false;
  static inline void scales(const uint8_t* b, KScales& s) { k4_scales(b, s); }
  static inline __m256i bytes(const uint8_t* b, int g) {
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256i fifth = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(g)), _mm256_set1_epi8(1));
    return _mm256_or_si256(k_nibbles(b + 48, g), _mm256_slli_epi16(fifth, 4));
  }
  static inline void group(const uint8_t* b, int g, Group& out) { k_group<Format>(b, g, out); }
};

// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one per 16 values), d (fp16);
// w = d*sc*(q - 32). Group g = 4n + k of the two 128-value halves n (ggml's dequantize_row_q6_K).
template <>
struct Format<kQ6_K> {
  static constexpr int64_t kInputs = 256, kBytes = 210, kOffset = 32;
  static constexpr bool kMin = false, kSplit = true;
  static inline void scales(const uint8_t* b, KScales& s) {
    // group 4n + k: scales 8n + 2k, 8n + 2k + 1 = 2g, 2g + 1
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.sc),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    s.d = fp16(b + 208);
    s.dmin = 0.f;
  }
  static inline __m256i bytes(const uint8_t* b, int g) {
    const int n = g / 4, k = g % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * n + 32 * (k & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * n));
    const __m256i low = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128((k >> 1) * 4)),
                                         _mm256_set1_epi8(0x0F));
    const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
  }
  static inline void group(const uint8_t* b, int g, Group& out) { k_group<Format>(b, g, out); }
};

template <int64_t Type>
inline void unpack_group(const uint8_t* row, int64_t group, Group& out) {
  using F = Format<Type>;
  constexpr int64_t per_block = F::kInputs / 32;
  F::group(row + (group / per_block) * F::kBytes, static_cast<int>(group % per_block), out);
}

// Columns n..n+C-1 of input rows 0..R-1 (int16 rows x, their scales and 32-input sums).
template <int64_t Type, int R, int C>
void qblock_block(const int16_t* x, const float* group_sums, const double* x_scale, int64_t K, const uint8_t* w,
                  int64_t row_bytes, const float* bias, float* y, int64_t ldy, int64_t n, Cursor& cursor) {
  using F = Format<Type>;
  const int64_t G = K / 32;
  __m256 acc[R][C];
  float offset[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      acc[r][c] = _mm256_setzero_ps();
      offset[r][c] = 0.f;
    }
  for (int64_t g = 0; g < G; ++g) {
    cursor.tick(g * 32);
    Group grp[C];
    for (int c = 0; c < C; ++c) unpack_group<Type>(w + (n + c) * row_bytes, g, grp[c]);
    for (int r = 0; r < R; ++r) {
      const int16_t* xg = x + r * K + g * 32;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16));
      for (int c = 0; c < C; ++c) {
        const __m256i d0 = _mm256_madd_epi16(grp[c].lo, x0), d1 = _mm256_madd_epi16(grp[c].hi, x1);
        if constexpr (F::kSplit) {
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(grp[c].scale_lo), acc[r][c]);
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(grp[c].scale_hi), acc[r][c]);
        } else {
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)), _mm256_set1_ps(grp[c].scale_lo),
                                      acc[r][c]);
        }
        if constexpr (F::kMin) offset[r][c] = std::fma(grp[c].min, group_sums[r * G + g], offset[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const float out = float((horizontal_sum(acc[r][c]) + offset[r][c]) * x_scale[r]);
      y[r * ldy + n + c] = bias ? out + bias[n + c] : out;
    }
}

// Input rows for the k-quants: int8 per 256-input block with the block's absmax scale (|q| <= 127, as
// llama.cpp's q8_K), and the values' sums per 16 inputs (for Q6_K's offset and the Q4_K / Q5_K mins).
inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

struct KRows {
  std::vector<int8_t> q;
  std::vector<float> scale;      // per block of 256 inputs
  std::vector<int16_t> sums16;   // |sum| <= 16 * 127
  KRows(const float* x, int64_t M, int64_t K) : q(M * K), scale(M * K / 256), sums16(M * K / 16) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = 0; b < M * K / 256; ++b) {
      const float* xb = x + b * 256;
      __m256 vmax = _mm256_setzero_ps();
      for (int k = 0; k < 256; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + k)));
      const float amax = horizontal_max(vmax);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m256 inv = _mm256_set1_ps(1.f / s);
      int8_t* qb = q.data() + b * 256;
      for (int k = 0; k < 256; k += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8 * j), inv));
        const __m256i w16 = _mm256_packs_epi32(v[0], v[1]), x16 = _mm256_packs_epi32(v[2], v[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + k), _mm256_max_epi8(bytes, _mm256_set1_epi8(-127)));
      }
      scale[b] = s;
      for (int j = 0; j < 16; ++j) {
        int32_t total = 0;
        for (int i = 0; i < 16; ++i) total += qb[16 * j + i];
        sums16[b * 16 + j] = static_cast<int16_t>(total);
      }
    }
  }
};

// A super-block's scales as int16 lanes from which lane_broadcast(v, g) gives group g's: Q4_K, Q5_K the 8
// group scales in both 128-bit halves; Q6_K the scales of inputs 0-15 of each group (sc[2g]) in the low half
// and of inputs 16-31 (sc[2g + 1]) in the high half.
template <typename F>
inline __m256i group_scales8(const KScales& s) {
  if constexpr (F::kSplit) {
    const __m256i evens_odds = _mm256_shuffle_epi8(  // per half: its even-numbered scales, then its odd ones
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.sc)),
        _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)));
    return _mm256_permute4x64_epi64(evens_odds, 0xD8);
  } else {
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.sc8))));
  }
}

// Q6_K's 16 sub-block scales as int16 lanes, for its offset term (the other k-quants have none).
template <typename F>
inline __m256i sub_scales16(const KScales& s) {
  if constexpr (F::kSplit)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.sc));
  else
    return _mm256_setzero_si256();  // no offset term: never read
}

// Each group's min twice as int16 lanes (Q4_K / Q5_K), to meet the inputs' 16-value sums in one VPMADDWD.
inline __m256i paired_mins(const KScales& s) {
  const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.mins)));
  return _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
}

// The k-quant linear's blocks (kquant_block.h), compiled three times: for AVX2, with 64 inputs per instruction
// for AVX-512BW, and that with VNNI's VPDPWSSD, chosen per call (kVnni, kAvx512). All sum the same integers
// in the same lanes, so they give the same bits (KNN_SSD_AVX512=0 runs the AVX2 one; the tests compare them).
namespace narrow {
#define KQ_WIDE 0
#include "kquant_block.h"
#undef KQ_WIDE
}  // namespace narrow
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace wide {
#define KQ_WIDE 1
#define KQ_VNNI 0
#include "kquant_block.h"
#undef KQ_VNNI
#undef KQ_WIDE
}  // namespace wide
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace wide_vnni {
#define KQ_WIDE 1
#define KQ_VNNI 1
#include "kquant_block.h"
#undef KQ_VNNI
#undef KQ_WIDE
}  // namespace wide_vnni
#pragma GCC pop_options

template <int64_t Type>
constexpr bool is_kquant() { return Format<Type>::kInputs == 256; }

int64_t block_inputs(int64_t type) {
  switch (type) {
    case kQ4_K: case kQ5_K: case kQ6_K: return 256;
    case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: case kQ8_0: return 32;
    default: TORCH_CHECK(false, "qblock: unsupported GGML type ", type); return 0;
  }
}

int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ4_0: return Format<kQ4_0>::kBytes;
    case kQ4_1: return Format<kQ4_1>::kBytes;
    case kQ5_0: return Format<kQ5_0>::kBytes;
    case kQ5_1: return Format<kQ5_1>::kBytes;
    case kQ8_0: return Format<kQ8_0>::kBytes;
    case kQ4_K: return Format<kQ4_K>::kBytes;
    case kQ5_K: return Format<kQ5_K>::kBytes;
    case kQ6_K: return Format<kQ6_K>::kBytes;
    default: TORCH_CHECK(false, "qblock: unsupported GGML type ", type); return 0;
  }
}

// Calls f(std::integral_constant<int64_t, Type>{}) for a runtime GGML type.
template <typename F>
void with_type(int64_t type, F&& f) {
  switch (type) {
    case kQ4_0: return f(std::integral_constant<int64_t, kQ4_0>{});
    case kQ4_1: return f(std::integral_constant<int64_t, kQ4_1>{});
    case kQ5_0: return f(std::integral_constant<int64_t, kQ5_0>{});
    case kQ5_1: return f(std::integral_constant<int64_t, kQ5_1>{});
    case kQ8_0: return f(std::integral_constant<int64_t, kQ8_0>{});
    case kQ4_K: return f(std::integral_constant<int64_t, kQ4_K>{});
    case kQ5_K: return f(std::integral_constant<int64_t, kQ5_K>{});
    case kQ6_K: return f(std::integral_constant<int64_t, kQ6_K>{});
    default: TORCH_CHECK(false, "qblock: unsupported GGML type ", type);
  }
}

// One part's output columns [col0, col0 + rows) of every input row.
template <int64_t Type>
void qblock_part(const int16_t* xq, const float* sums, const KRows* krows, const double* xs, int64_t M,
                 int64_t K, const uint8_t* w, int64_t rows, const float* bias, float* y, int64_t ldy) {
  const int64_t row_bytes = K / Format<Type>::kInputs * Format<Type>::kBytes, G = K / 32;
  const int64_t passes = row_passes<4>(M);
  const bool vnni = kVnni && M > 2;  // 1-2 rows are bound by memory, where it gains nothing (as in int8_linear)
  const auto run = [&](auto columns_of, int64_t n, Cursor& cursor) {
    constexpr int C = decltype(columns_of)::value;
    row_blocks<4>(M, [&](auto R, int64_t m) {
      if constexpr (is_kquant<Type>()) {
        if (vnni)
          wide_vnni::kquant_block<Type, decltype(R)::value, C>(*krows, m, K, w, row_bytes, bias, y + m * ldy, ldy,
                                                               n, cursor);
        else if (kAvx512)
          wide::kquant_block<Type, decltype(R)::value, C>(*krows, m, K, w, row_bytes, bias, y + m * ldy, ldy, n,
                                                          cursor);
        else
          narrow::kquant_block<Type, decltype(R)::value, C>(*krows, m, K, w, row_bytes, bias, y + m * ldy, ldy, n,
                                                            cursor);
      }
      else
        qblock_block<Type, decltype(R)::value, C>(xq + m * K, sums + m * G, xs + m, K, w, row_bytes, bias,
                                                  y + m * ldy, ldy, n, cursor);
    });
  };
  at::parallel_for(0, rows, 64, [&](int64_t n0, int64_t n1) {
    // One prefetch burst per 256 inputs (a k-quant block; 8 blocks of the 32-input formats), as far ahead as
    // the columns in flight read meanwhile.
    Cursor cursor = Cursor::rows(w, row_bytes, n0, n1, 0);
    cursor.burst_mask = 256 - 1;
    const int64_t burst = std::max<int64_t>(64, row_bytes * 256 / K);
    int64_t n = n0;
    if (M == 1) {  // one row (a decode step): four weight rows in flight
      cursor.step = 4 * burst;
      for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, n, cursor);
    }
    cursor.step = std::max<int64_t>(64, 2 * burst / passes);
    for (; n + 2 <= n1; n += 2) run(std::integral_constant<int, 2>{}, n, cursor);
    cursor.step = std::max<int64_t>(64, burst / passes);
    if (n < n1) run(std::integral_constant<int, 1>{}, n, cursor);
  });
}

// qblock_linear: y = x @ W.T + bias for W in GGUF blocks. `w` holds the parts' rows back to back (uint8), `parts`
// is (P, 2) int64: each part's GGML type and row count, in output order.
at::Tensor qblock_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& parts,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qblock_linear: x must be float32 (M, K)");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "qblock_linear: w must be contiguous uint8");
  TORCH_CHECK(parts.scalar_type() == at::kLong && parts.dim() == 2 && parts.size(1) == 2 && parts.is_contiguous(),
              "qblock_linear: parts must be int64 (P, 2)");
  const int64_t M = x.size(0), K = x.size(1), P = parts.size(0);
  const int64_t* pp = parts.data_ptr<int64_t>();
  int64_t N = 0, bytes = 0;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(K % block_inputs(pp[2 * p]) == 0, "qblock_linear: K must be a multiple of the block size");
    N += pp[2 * p + 1];
    bytes += pp[2 * p + 1] * K / block_inputs(pp[2 * p]) * block_bytes(pp[2 * p]);
  }
  TORCH_CHECK(w.numel() == bytes, "qblock_linear: w holds ", w.numel(), " bytes, the parts need ", bytes);
  const float* bp = bias_data(bias, N, "qblock_linear");
  const at::Tensor xc = x.contiguous();
  bool kquants = false, groups32 = false;
  for (int64_t p = 0; p < P; ++p) (block_inputs(pp[2 * p]) == 256 ? kquants : groups32) = true;
  const std::unique_ptr<QuantisedRows> rows = groups32 ? std::make_unique<QuantisedRows>(xc, kInt16Limit) : nullptr;
  const std::unique_ptr<KRows> krows = kquants ? std::make_unique<KRows>(xc.data_ptr<float>(), M, K) : nullptr;
  const int16_t* xq = rows ? rows->q.data() : nullptr;
  const double* xs = rows ? rows->scale.data() : nullptr;
  const float* sums = rows ? rows->sums.data() : nullptr;
  at::Tensor y = at::empty({M, N}, xc.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int64_t col = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t type = pp[2 * p], part_rows = pp[2 * p + 1];
    with_type(type, [&](auto t) {
      qblock_part<decltype(t)::value>(xq, sums, krows.get(), xs, M, K, wp, part_rows, bp ? bp + col : nullptr,
                                      y.data_ptr<float>() + col, N);
    });
    wp += part_rows * K / block_inputs(type) * block_bytes(type);
    col += part_rows;
  }
  return y;
}

// qblock_rows: rows `ids` of a one-part weight in GGUF blocks, dequantised to float32 as ggml does
// (scale * q + min): the token embedding of a native target.
at::Tensor qblock_rows(const at::Tensor& w, int64_t type, int64_t K, const at::Tensor& ids) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && K % block_inputs(type) == 0,
              "qblock_rows: w must be contiguous uint8 rows of whole blocks");
  const at::Tensor idc = ids.to(at::kLong).contiguous();
  const int64_t T = idc.numel(), row_bytes = K / block_inputs(type) * block_bytes(type);
  TORCH_CHECK(w.numel() % row_bytes == 0, "qblock_rows: w is no whole number of rows");
  const int64_t rows = w.numel() / row_bytes;
  at::Tensor out = at::empty({T, K}, at::TensorOptions().dtype(at::kFloat));
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < rows, "qblock_rows: id out of range");
  with_type(type, [&](auto tc) {
    constexpr int64_t Type = decltype(tc)::value;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* row = w.data_ptr<uint8_t>() + ip[t] * row_bytes;
        float* o = out.data_ptr<float>() + t * K;
        for (int64_t g = 0; g < K / 32; ++g) {
          Group grp;
          unpack_group<Type>(row, g, grp);
          alignas(32) int16_t v[32];
          _mm256_store_si256(reinterpret_cast<__m256i*>(v), grp.lo);
          _mm256_store_si256(reinterpret_cast<__m256i*>(v + 16), grp.hi);
          for (int i = 0; i < 32; ++i) {
            const float value = (i < 16 ? grp.scale_lo : grp.scale_hi) * float(v[i]);
            o[g * 32 + i] = Format<Type>::kMin ? value + grp.min : value;
          }
        }
      }
    });
  });
  return out;
}
