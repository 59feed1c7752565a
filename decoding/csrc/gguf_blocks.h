// The native target: linears that read a GGUF file's quantised blocks as stored (included by cpu_kernels.cpp
// inside its anonymous namespace, after the helpers it shares: quantise_row, Cursor, row_blocks).
//
// A weight is one or more parts of output rows, each part in one GGML block format, each row a run of that
// format's blocks over the K inputs: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 inputs) and Q4_K, Q5_K,
// Q6_K (256). The 32-input formats are read as stored: each group of 32 inputs unpacks its quantised values
// and gives its float scale (and min: w = scale * q + min), inputs quantised to int16 per row, a group's dot
// product an exact integer (|sum| < 2^24: exact in float32 too), each output one chain of float multiply-adds
// over the groups in order, the mins meeting the row's input sums. The k-quants are re-laid at load in tiles
// of 16 output columns (qblock_pack; the same values and scales) for ktile_block.h's kernel: inputs quantised
// to int8 per 256-input block with the block's absmax scale (llama.cpp's q8_K), each super-block's sum exact
// in int32, each output one float chain over the blocks. Either way a row's arithmetic is the same whatever
// the other rows, the blocking or the chunking.

// The 32-input formats' int16 input limit: below 32767 since the k-quants once split these rows into bytes;
// kept, as changing it would change every output of the 32-input formats.
constexpr float kInt16Limit = 32639.f;

enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One group of 32 inputs of a 32-input format: quantised values as int16 (lo: inputs 0-15, hi: 16-31), its
// scale and min.
struct Group {
  __m256i lo, hi;
  float scale, min;
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

template <int64_t Type>
struct Format;

template <>
struct Format<kQ4_0> {
  static constexpr int64_t kInputs = 32, kBytes = 18;
  static constexpr bool kMin = false;
  static inline void group(const uint8_t* b, Group& out) {
    const __m256i v = widen_u8(b + 2), eight = _mm256_set1_epi16(8);
    out.lo = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), eight);
    out.hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
    out.scale = fp16(b);
  }
};

template <>
struct Format<kQ4_1> {
  static constexpr int64_t kInputs = 32, kBytes = 20;
  static constexpr bool kMin = true;
  static inline void group(const uint8_t* b, Group& out) {
    const __m256i v = widen_u8(b + 4);
    out.lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    out.hi = _mm256_srli_epi16(v, 4);
    out.scale = fp16(b);
    out.min = fp16(b + 2);
  }
};

// Q5_0 (d, fifth bits, nibbles: w = d * (q - 16)) and Q5_1 (d, m, fifth bits, nibbles: w = d * q + m); the
// fifth bits of the 32 values in a uint32 (bit j: value j).
template <bool Min>
struct Q5Format {
  static constexpr int64_t kInputs = 32, kBytes = Min ? 24 : 22;
  static constexpr bool kMin = Min;
  static inline void group(const uint8_t* b, Group& out) {
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
    out.scale = fp16(b);
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
  static constexpr bool kMin = false;
  static inline void group(const uint8_t* b, Group& out) {
    out.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
    out.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
    out.scale = fp16(b);
  }
};

// The k-quants (256-input super-blocks): their sizes here; decode_kblock reads a block's integers, the
// linear reads them tiled (Tile<Type>).
template <>
struct Format<kQ4_K> {
  static constexpr int64_t kInputs = 256, kBytes = 144;
};

template <>
struct Format<kQ5_K> {
  static constexpr int64_t kInputs = 256, kBytes = 176;
};

template <>
struct Format<kQ6_K> {
  static constexpr int64_t kInputs = 256, kBytes = 210;
};

template <int64_t Type>
inline void unpack_group(const uint8_t* row, int64_t group, Group& out) {
  Format<Type>::group(row + group * Format<Type>::kBytes, out);
}

// Input rows for the k-quants: int8 per 256-input block with the block's absmax scale (|q| <= 127, as
// llama.cpp's q8_K), and the values' sums per 16 inputs (Q6_K's offset) and per 32 (the Q4_K / Q5_K mins).
inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

struct KRows {
  std::vector<int8_t> q;
  std::vector<float> scale;      // per block of 256 inputs
  std::vector<int16_t> sums16;   // |sum| <= 16 * 127
  std::vector<int16_t> sums32;   // per 32 inputs (the Q4_K / Q5_K mins' sub-blocks)
  KRows(const float* x, int64_t M, int64_t K)
      : q(M * K), scale(M * K / 256), sums16(M * K / 16), sums32(M * K / 32) {
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
      for (int j = 0; j < 8; ++j)
        sums32[b * 8 + j] = static_cast<int16_t>(sums16[b * 16 + 2 * j] + sums16[b * 16 + 2 * j + 1]);
    }
  }
};

// The k-quants as the linear reads them: tiled by kTileCols output columns, so a vector lane is a column
// (ktile_block.h). A tile holds, per super-block of 256 inputs, one tile-block of the 16 columns' blocks
// re-laid: the same quantised values and fp16 scales, bit for bit, in the order the kernel reads them;
// Q4_K / Q5_K's 6-bit sub-block scales and mins unpacked to bytes (+64 bytes per 2304: 2.8%). Sub-blocks
// (32 inputs; Q6_K 16) pair up, 2p and 2p + 1; step i of pair p is inputs 4i..4i+3 of both. Arrays are
// [...][column][element]:
//   kD: d (fp16) [16];  kDmin: dmin [16];  kSc: Q4_K / Q5_K sub-block scales [8][16] (uint8), Q6_K scale
//   pairs [8][16][2] (int8);  kMinPairs: Q4_K / Q5_K min pairs [4][16][2];  from kQs, pair after pair
//   (kPairBytes each, so a tile-block reads front to back): its values [step][16][4] bytes, the low nibble a
//   value of sub-block 2p, the high nibble the same input of 2p + 1 (4 low bits of Q5_K, Q6_K), then its high
//   bits: Q5_K's fifth bits [2][16][4] (bit k of a byte: step 4 * half + k of sub-block 2p, bit 4 + k: of
//   2p + 1), Q6_K's two high bits [2][16][4] (bits 4k, 4k + 2: step 2k + half of 2p, 2p + 1).
constexpr int kTileCols = 16;
// How far ahead of a tile-block its thread prefetches the weights, into L2: measured here (the 1.5B model's
// native forward, interleaved, medians of 4 rounds) 1 token 32.5 ms against 38.3 without software prefetch
// and 40.5-42.0 prefetching into L1 (4-16 KB ahead); 8 tokens 49.0 against 79.0 and 69.1-77.8.
constexpr int64_t kTileLead = 8192;




template <int64_t Type>
struct Tile;

template <>
struct Tile<kQ4_K> {
  static constexpr int kPairs = 4, kSteps = 8, kSubInputs = 32, kHighBits = 0;
  static constexpr bool kMins = true, kSignedScales = false;
  static constexpr int kD = 0, kDmin = 32, kSc = 64, kMinPairs = 192, kQs = 320, kPairBytes = 512, kBytes = 2368;
};

template <>
struct Tile<kQ5_K> : Tile<kQ4_K> {
  static constexpr int kHighBits = 1, kPairBytes = 640, kBytes = 2880;
};

template <>
struct Tile<kQ6_K> {
  static constexpr int kPairs = 8, kSteps = 4, kSubInputs = 16, kHighBits = 2;
  static constexpr bool kMins = false, kSignedScales = true;
  static constexpr int kD = 0, kDmin = 0, kSc = 32, kMinPairs = 0, kQs = 288, kPairBytes = 384, kBytes = 3360;
};

// Where pair p's values of step i start in a tile-block, and its high bits' vector h (0 or 1).
template <typename T>
constexpr int qs_offset(int p, int i) {
  return T::kQs + p * T::kPairBytes + i * kTileCols * 4;
}
template <typename T>
constexpr int qh_offset(int p, int h) {
  return qs_offset<T>(p, T::kSteps + h);
}

// A k-quant block's integer contents: values q (0..2^bits - 1), sub-block scales and mins, d and dmin as stored.
struct KBlock {
  uint8_t q[256];
  int sc[16], mins[8];
  uint16_t d = 0, dmin = 0;
};

template <int64_t Type>
void decode_kblock(const uint8_t* b, KBlock& out) {
  std::memcpy(&out.d, b + (Type == kQ6_K ? 208 : 0), 2);
  if constexpr (Type == kQ6_K) {
    for (int j = 0; j < 16; ++j) out.sc[j] = static_cast<int8_t>(b[192 + j]);
    for (int n = 0; n < 2; ++n) {  // ggml's dequantize_row_q6_K, one 128-value half at a time
      const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
      for (int l = 0; l < 32; ++l) {
        out.q[128 * n + l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
        out.q[128 * n + l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
        out.q[128 * n + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        out.q[128 * n + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
  } else {
    std::memcpy(&out.dmin, b + 2, 2);
    for (int j = 0; j < 8; ++j) scale_min_k4(j, b + 4, out.sc[j], out.mins[j]);
    const uint8_t* qs = b + (Type == kQ5_K ? 48 : 16);
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        int low = qs[32 * j + l] & 0xF, high = qs[32 * j + l] >> 4;
        if constexpr (Type == kQ5_K) {
          low |= ((b[16 + l] >> (2 * j)) & 1) << 4;
          high |= ((b[16 + l] >> (2 * j + 1)) & 1) << 4;
        }
        out.q[64 * j + l] = static_cast<uint8_t>(low);
        out.q[64 * j + 32 + l] = static_cast<uint8_t>(high);
      }
  }
}

// One tile-block from the blocks of its columns (`block[c]` null past a part's last row: zeros).
template <int64_t Type>
void pack_tile_block(const uint8_t* const* block, uint8_t* dst) {
  using T = Tile<Type>;
  std::memset(dst, 0, T::kBytes);
  for (int c = 0; c < kTileCols; ++c) {
    if (!block[c]) continue;
    KBlock k;
    decode_kblock<Type>(block[c], k);
    std::memcpy(dst + T::kD + 2 * c, &k.d, 2);
    if constexpr (T::kMins) {
      std::memcpy(dst + T::kDmin + 2 * c, &k.dmin, 2);
      for (int j = 0; j < 8; ++j) dst[T::kSc + j * kTileCols + c] = static_cast<uint8_t>(k.sc[j]);
      for (int j = 0; j < 8; ++j) dst[T::kMinPairs + ((j / 2) * kTileCols + c) * 2 + j % 2] = k.mins[j];
    } else {
      for (int j = 0; j < 16; ++j)
        dst[T::kSc + ((j / 2) * kTileCols + c) * 2 + j % 2] = static_cast<uint8_t>(static_cast<int8_t>(k.sc[j]));
    }
    for (int p = 0; p < T::kPairs; ++p)
      for (int i = 0; i < T::kSteps; ++i)
        for (int b = 0; b < 4; ++b) {
          const int a = 2 * p * T::kSubInputs + 4 * i + b, z = a + T::kSubInputs;
          dst[qs_offset<T>(p, i) + c * 4 + b] =
              static_cast<uint8_t>((k.q[a] & 0xF) | ((k.q[z] & 0xF) << 4));
          if constexpr (T::kHighBits == 1) {
            uint8_t& h = dst[qh_offset<T>(p, i / 4) + c * 4 + b];
            h |= static_cast<uint8_t>(((k.q[a] >> 4) << (i % 4)) | ((k.q[z] >> 4) << (4 + i % 4)));
          } else if constexpr (T::kHighBits == 2) {
            uint8_t& h = dst[qh_offset<T>(p, i % 2) + c * 4 + b];
            h |= static_cast<uint8_t>(((k.q[a] >> 4) << (4 * (i / 2))) | ((k.q[z] >> 4) << (4 * (i / 2) + 2)));
          }
        }
  }
}

// The 32-input formats tiled alike (Tile32<Type>): per group of 32 inputs, one tile-group of its 16 columns:
//   kD: d [16] (fp16);  kM: Q4_1 / Q5_1's m [16];  kQs: Q8_0 [16 steps][16][2] int8, the others [8][16][2]
//   bytes, the low nibble of (s, c, j) input 2s + j, the high nibble input 16 + 2s + j;  kQh: Q5_0 / Q5_1's
//   fifth bits as [16] 32-bit masks over the lanes (c, j): mask 2s of the low nibbles' inputs, 2s + 1 the high.
// The same bytes as stored (16 columns' blocks), re-laid.
template <int64_t Type>
struct Tile32;

template <int Bits, int Offset, bool Min>
struct Tile32Layout {
  static constexpr int kBits = Bits, kOffset = Offset;
  static constexpr bool kMin = Min;
  static constexpr int kD = 0, kM = 32, kQs = Min ? 64 : 32, kQh = kQs + (Bits == 8 ? 512 : 256);
  static constexpr int kBytes = kQh + (Bits == 5 ? 64 : 0);
  static constexpr int kPrefetchEvery = Bits == 8 ? 4 : 8;  // tile-groups per prefetch burst (~2 KB)
};

template <>
struct Tile32<kQ4_0> : Tile32Layout<4, 8, false> {};
template <>
struct Tile32<kQ4_1> : Tile32Layout<4, 0, true> {};
template <>
struct Tile32<kQ5_0> : Tile32Layout<5, 16, false> {};
template <>
struct Tile32<kQ5_1> : Tile32Layout<5, 0, true> {};
template <>
struct Tile32<kQ8_0> : Tile32Layout<8, 0, false> {};

// One tile-group from the blocks of its columns (`block[c]` null past a part's last row: zeros).
template <int64_t Type>
void pack_tile_group(const uint8_t* const* block, uint8_t* dst) {
  using T = Tile32<Type>;
  std::memset(dst, 0, T::kBytes);
  for (int c = 0; c < kTileCols; ++c) {
    if (!block[c]) continue;
    std::memcpy(dst + T::kD + 2 * c, block[c], 2);
    if constexpr (T::kMin) std::memcpy(dst + T::kM + 2 * c, block[c] + 2, 2);
    Group grp;
    Format<Type>::group(block[c], grp);
    alignas(32) int16_t v[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), grp.lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(v + 16), grp.hi);
    for (int s = 0; s < 8; ++s)
      for (int j = 0; j < 2; ++j) {
        const int low = v[2 * s + j] + T::kOffset, high = v[16 + 2 * s + j] + T::kOffset;  // stored values
        if constexpr (T::kBits == 8) {
          dst[T::kQs + (s * kTileCols + c) * 2 + j] = static_cast<uint8_t>(static_cast<int8_t>(low));
          dst[T::kQs + ((s + 8) * kTileCols + c) * 2 + j] = static_cast<uint8_t>(static_cast<int8_t>(high));
        } else {
          dst[T::kQs + (s * kTileCols + c) * 2 + j] = static_cast<uint8_t>((low & 0xF) | ((high & 0xF) << 4));
          if constexpr (T::kBits == 5) {
            const int lane = 2 * c + j;
            dst[T::kQh + (2 * s) * 4 + lane / 8] |= static_cast<uint8_t>((low >> 4) << (lane % 8));
            dst[T::kQh + (2 * s + 1) * 4 + lane / 8] |= static_cast<uint8_t>((high >> 4) << (lane % 8));
          }
        }
      }
  }
}

// The tiled k-quant kernel (ktile_block.h), compiled three times: AVX2, AVX-512BW, and AVX-512 with VNNI's
// VPDPBUSD / VPDPWSSD, chosen per call (kVnni, kAvx512). All sum the same integers and take the same float
// steps per output, so they give the same bits (KNN_SSD_AVX512=0 runs the AVX2 one; the tests compare them).
namespace narrow {
#define KT_WIDE 0
#define KT_VNNI 0
#include "ktile_block.h"
#undef KT_VNNI
#undef KT_WIDE
}  // namespace narrow
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace wide {
#define KT_WIDE 1
#define KT_VNNI 0
#include "ktile_block.h"
#undef KT_VNNI
#undef KT_WIDE
}  // namespace wide
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace wide_vnni {
#define KT_WIDE 1
#define KT_VNNI 1
#include "ktile_block.h"
#undef KT_VNNI
#undef KT_WIDE
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

int64_t block_bytes(int64_t type) {
  int64_t bytes = 0;
  with_type(type, [&](auto t) { bytes = Format<decltype(t)::value>::kBytes; });
  return bytes;
}

// The tile layout of GGML type Type: a tile-block per 256 inputs (k-quants) or a tile-group per 32.
template <int64_t Type>
struct TileOf {
  using T = std::conditional_t<is_kquant<Type>(), Tile<Type>, Tile32<Type>>;
  static constexpr int64_t kInputs = Format<Type>::kInputs;
};

// Bytes of a part of `rows` output rows over K inputs as the linear reads it (whole tiles).
int64_t part_bytes(int64_t type, int64_t rows, int64_t K) {
  int64_t bytes = 0;
  with_type(type, [&](auto t) {
    using L = TileOf<decltype(t)::value>;
    bytes = (rows + kTileCols - 1) / kTileCols * (K / L::kInputs) * L::T::kBytes;
  });
  return bytes;
}

// Input rows per pass over a tile: AVX-512 keeps 4 vectors per row (float sums, and block sums and two
// sub-block sums, or two group sums and the mins' chain) in its 32 registers for 6 rows. AVX2 takes 4 (its
// 16 registers hold a k-quant row's two int16 sums; the float sums spill once per block): 1.1-1.2x 3 rows'
// speed at 4-16 rows, and 5 or 6 rows no faster (the 1.5B's Q4_K / Q6_K shapes, measured here).
constexpr int kTileRows512 = 6, kTileRows256 = 4;

// Input rows up to which an AVX2 pass covers both halves of a tile (H = 2), in blocks of up to kTileRows256 rows;
// more rows take a pass per half. A pass over both halves uses every cache line a step reads whole while it
// streams in, where a pass per half leaves the memory idle through the second; with many rows the passes are
// bound by compute, and a half's fewer live sums fit AVX2's 16 registers better. In-process A/B from memory on
// the 2-core AVX2 EPYC (docs/measurements.md): Q4_K 1.05-1.20x at 2 rows, 0.94-0.99x at 4-8; Q6_K 1.17-1.26x at
// 2, 1.14-1.19x at 4-8, 0.91-0.97x at 16-32 (its high bits' unpacking shared by both halves' rows); Q4_1 1.18x
// at 2, 1.02-1.03x at 4-8.
template <int64_t Type>
constexpr int64_t whole_tile_rows() {
  if constexpr (is_kquant<Type>())
    if constexpr (Tile<Type>::kHighBits != 0) return 2 * kTileRows256;
  return kTileRows256 - 1;
}

// Rows m..m+R-1 of one tile (H vectors of lanes from lane0) on the given ISA's instance of the kernel.
template <int64_t Type, int R, int H, typename Ns>
inline void tile_pass(Ns, const KRows* krows, const QuantisedRows* rows, int64_t m, int64_t K, const uint8_t* tile,
                      int lane0, const float* bias, float* y, int64_t ldy, int cols, bool prefetch) {
  if constexpr (is_kquant<Type>())
    Ns::template kquant<Tile<Type>, R, H>(*krows, m, K, tile, lane0, bias, y, ldy, cols, prefetch);
  else
    Ns::template groups32<Tile32<Type>, R, H>(*rows, m, K, tile, lane0, bias, y, ldy, cols, prefetch);
}

// The three instances of the kernels, as types for tile_pass.
struct Narrow {
  template <typename T, int R, int H, typename... A> static void kquant(A&&... a) {
    narrow::tile_rows<T, R, H>(a...);
  }
  template <typename T, int R, int H, typename... A> static void groups32(A&&... a) {
    narrow::tile32_rows<T, R, H>(a...);
  }
};
struct Wide {
  template <typename T, int R, int H, typename... A> static void kquant(A&&... a) { wide::tile_rows<T, R, H>(a...); }
  template <typename T, int R, int H, typename... A> static void groups32(A&&... a) {
    wide::tile32_rows<T, R, H>(a...);
  }
};
struct WideVnni {
  template <typename T, int R, int H, typename... A> static void kquant(A&&... a) {
    wide_vnni::tile_rows<T, R, H>(a...);
  }
  template <typename T, int R, int H, typename... A> static void groups32(A&&... a) {
    wide_vnni::tile32_rows<T, R, H>(a...);
  }
};

// A linear's input rows, quantised as its parts' kernels read them (null where no part needs them).
struct TileInputs {
  std::unique_ptr<KRows> krows;          // the k-quants: int8 per 256 inputs
  std::unique_ptr<QuantisedRows> rows;   // the 32-input formats: int16 per row
};

// Input rows a pass over the tiles takes at once (tile_range): their quantised inputs stay in L2.
inline int64_t input_chunk_rows(int64_t K) {
  return std::max<int64_t>(kTileRows512, (512 * 1024 / (2 * K)) / kTileRows512 * kTileRows512);
}

// Tiles t0..t1-1 of one part (tiled) for every input row: rows in chunks whose quantised inputs stay in L2
// while the chunk passes over the tiles, each tile read once per chunk.
template <int64_t Type>
void tile_range(const TileInputs& in, int64_t M, int64_t K, const uint8_t* w, int64_t rows, const float* bias,
                float* y, int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t tile_bytes = part_bytes(Type, kTileCols, K);
  const int64_t chunk = input_chunk_rows(K);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t rows_here = std::min(chunk, M - c0);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = w + t * tile_bytes;
      const int64_t n = t * kTileCols;
      const int cols = static_cast<int>(std::min<int64_t>(kTileCols, rows - n));
      const auto pass = [&](auto ns, auto R, auto H, int64_t m, int lane0, int lanes) {
        tile_pass<Type, decltype(R)::value, decltype(H)::value>(
            ns, in.krows.get(), in.rows.get(), c0 + m, K, tile, lane0, bias ? bias + n + lane0 : nullptr,
            y + (c0 + m) * ldy + n + lane0, ldy, lanes, m == 0);
      };
      using One = std::integral_constant<int, 1>;
      if (kVnni)
        row_blocks<kTileRows512>(rows_here, [&](auto R, int64_t m) { pass(WideVnni{}, R, One{}, m, 0, cols); });
      else if (kAvx512)
        row_blocks<kTileRows512>(rows_here, [&](auto R, int64_t m) { pass(Wide{}, R, One{}, m, 0, cols); });
      else if (rows_here <= whole_tile_rows<Type>())
        row_blocks<kTileRows256>(rows_here, [&](auto R, int64_t m) {
          pass(Narrow{}, R, std::integral_constant<int, 2>{}, m, 0, cols);
        });
      else
        for (int lane0 = 0; lane0 < cols; lane0 += 8)
          row_blocks<kTileRows256>(rows_here, [&](auto R, int64_t m) {
            pass(Narrow{}, R, One{}, m, lane0, std::min(8, cols - lane0));
          });
    }
  }
}

// Checks qblock_pack's (P, 3) parts against K and the weight's bytes; returns the output width.
int64_t check_parts(const at::Tensor& w, const at::Tensor& parts, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "qblock_linear: w must be contiguous uint8");
  TORCH_CHECK(parts.scalar_type() == at::kLong && parts.dim() == 2 && parts.size(1) == 3 && parts.is_contiguous(),
              "qblock_linear: parts must be qblock_pack's int64 (P, 3)");
  const int64_t* pp = parts.data_ptr<int64_t>();
  int64_t N = 0, bytes = 0;
  for (int64_t p = 0; p < parts.size(0); ++p) {
    const int64_t type = pp[3 * p];
    TORCH_CHECK(K % block_inputs(type) == 0, "qblock_linear: K must be a multiple of the block size");
    TORCH_CHECK(pp[3 * p + 2] == 1, "qblock_linear: part ", p, " is not laid out by qblock_pack");
    N += pp[3 * p + 1];
    bytes += part_bytes(type, pp[3 * p + 1], K);
  }
  TORCH_CHECK(w.numel() == bytes, "qblock_linear: w holds ", w.numel(), " bytes, the parts need ", bytes);
  return N;
}

// The input rows `x` (M, K), contiguous float32, quantised for the parts' block types.
TileInputs tile_inputs(const at::Tensor& x, const at::Tensor& parts) {
  bool kquants = false, groups32 = false;
  const int64_t* pp = parts.data_ptr<int64_t>();
  for (int64_t p = 0; p < parts.size(0); ++p) (block_inputs(pp[3 * p]) == 256 ? kquants : groups32) = true;
  TileInputs in;
  if (groups32) in.rows = std::make_unique<QuantisedRows>(x, kInt16Limit);
  if (kquants) in.krows = std::make_unique<KRows>(x.data_ptr<float>(), x.size(0), x.size(1));
  return in;
}

// A linear's tiles shared out to the threads, part by part: each thread walks its own contiguous share of a
// part's tiles in claims of ~kClaimBytes, then claims what is left of the others' shares before the next part.
// Decoding and verifying are bound by memory, which serves the two cores unevenly: with fixed shares each
// linear waited for the slower one (~10% of a 1.5B step's samples in libgomp's barrier). Prompts' rows (more
// than one input chunk, bound by compute) keep fixed shares: one claim each. Which thread computes a tile
// never changes its bits.
class TileClaims {
 public:
  static constexpr int64_t kClaimBytes = 64 * 1024;
  explicit TileClaims(int64_t threads) : threads_(threads) {}

  // Starts a linear (w, parts over K inputs) for M rows; from one thread, before any claims.
  void reset(const at::Tensor& w, const at::Tensor& parts, int64_t M, int64_t K) {
    const int64_t P = parts.size(0);
    const int64_t* pp = parts.data_ptr<int64_t>();
    if (static_cast<int64_t>(next_.size()) < P * threads_) next_ = std::vector<Counter>(P * threads_);
    end_.resize(P * threads_);
    per_claim_.resize(P);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t type = pp[3 * p], tiles = (pp[3 * p + 1] + kTileCols - 1) / kTileCols;
      per_claim_[p] = M > input_chunk_rows(K) ? tiles
                                              : std::max<int64_t>(1, kClaimBytes / part_bytes(type, kTileCols, K));
      for (int64_t t = 0; t < threads_; ++t) {
        next_[p * threads_ + t].v.store(tiles * t / threads_, std::memory_order_relaxed);
        end_[p * threads_ + t] = tiles * (t + 1) / threads_;
      }
    }
  }

  // Calls f(t0, t1) for the ranges of part p's tiles that `thread` claims, its own share first.
  template <typename F>
  void run(int64_t p, int64_t thread, F&& f) {
    for (int64_t k = 0; k < threads_; ++k) {
      const int64_t share = p * threads_ + (thread + k) % threads_;
      for (;;) {
        const int64_t t0 = next_[share].v.fetch_add(per_claim_[p], std::memory_order_relaxed);
        if (t0 >= end_[share]) break;
        f(t0, std::min(t0 + per_claim_[p], end_[share]));
      }
    }
  }

 private:
  struct alignas(64) Counter {  // a cache line each: a thread's own claims never contend
    std::atomic<int64_t> v{0};
  };
  int64_t threads_;
  std::vector<Counter> next_;
  std::vector<int64_t> end_, per_claim_;
};

// The tiles `thread` claims of a linear (claims reset for it), written into y (M, N).
void qblock_share(const TileInputs& in, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& parts,
                  const float* bias, float* y, int64_t N, int64_t thread, TileClaims& claims) {
  const int64_t* pp = parts.data_ptr<int64_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int64_t col = 0;
  for (int64_t p = 0; p < parts.size(0); ++p) {
    const int64_t type = pp[3 * p], rows = pp[3 * p + 1];
    with_type(type, [&](auto t) {
      claims.run(p, thread, [&](int64_t t0, int64_t t1) {
        tile_range<decltype(t)::value>(in, M, K, wp, rows, bias ? bias + col : nullptr, y + col, N, t0, t1);
      });
    });
    wp += part_bytes(type, rows, K);
    col += rows;
  }
}

// qblock_pack: a weight's parts (rows back to back in GGUF blocks, `parts` (P, 2) int64: GGML type and rows) in
// the layout qblock_linear reads, tiles of 16 output columns (the last one zero-padded). Returns the bytes and
// (P, 3) parts: type, rows, and 1 (tiled).
std::tuple<at::Tensor, at::Tensor> qblock_pack(const at::Tensor& w, const at::Tensor& parts, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "qblock_pack: w must be contiguous uint8");
  TORCH_CHECK(parts.scalar_type() == at::kLong && parts.dim() == 2 && parts.size(1) == 2 && parts.is_contiguous(),
              "qblock_pack: parts must be int64 (P, 2)");
  const int64_t P = parts.size(0);
  const int64_t* pp = parts.data_ptr<int64_t>();
  int64_t in_bytes = 0, out_bytes = 0;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(K % block_inputs(pp[2 * p]) == 0, "qblock_pack: K must be a multiple of the block size");
    in_bytes += pp[2 * p + 1] * K / block_inputs(pp[2 * p]) * block_bytes(pp[2 * p]);
    out_bytes += part_bytes(pp[2 * p], pp[2 * p + 1], K);
  }
  TORCH_CHECK(w.numel() == in_bytes, "qblock_pack: w holds ", w.numel(), " bytes, the parts need ", in_bytes);
  at::Tensor out = at::empty({out_bytes}, w.options());
  at::Tensor layout = at::empty({P, 3}, parts.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t type = pp[2 * p], rows = pp[2 * p + 1], row_bytes = K / block_inputs(type) * block_bytes(type);
    with_type(type, [&](auto t) {
      constexpr int64_t Type = decltype(t)::value;
      using L = TileOf<Type>;
      const int64_t B = K / L::kInputs, tiles = (rows + kTileCols - 1) / kTileCols;
      at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t tile = t0; tile < t1; ++tile)
          for (int64_t blk = 0; blk < B; ++blk) {
            const uint8_t* block[kTileCols];
            for (int c = 0; c < kTileCols; ++c) {
              const int64_t n = tile * kTileCols + c;
              block[c] = n < rows ? src + n * row_bytes + blk * Format<Type>::kBytes : nullptr;
            }
            uint8_t* to = dst + (tile * B + blk) * L::T::kBytes;
            if constexpr (is_kquant<Type>())
              pack_tile_block<Type>(block, to);
            else
              pack_tile_group<Type>(block, to);
          }
      });
    });
    layout.data_ptr<int64_t>()[3 * p] = type;
    layout.data_ptr<int64_t>()[3 * p + 1] = rows;
    layout.data_ptr<int64_t>()[3 * p + 2] = 1;
    src += rows * row_bytes;
    dst += part_bytes(type, rows, K);
  }
  return {out, layout};
}

// qblock_linear: y = x @ W.T + bias for W in GGUF blocks as qblock_pack lays them out: `w` holds the parts
// back to back (uint8), `parts` is qblock_pack's (P, 3): each part's GGML type, rows and layout, in output order.
at::Tensor qblock_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& parts,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qblock_linear: x must be float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = check_parts(w, parts, K);
  const float* bp = bias_data(bias, N, "qblock_linear");
  const at::Tensor xc = x.contiguous();
  const TileInputs in = tile_inputs(xc, parts);
  at::Tensor y = at::empty({M, N}, xc.options());
  const int64_t threads = at::get_num_threads();
  TileClaims claims(threads);
  claims.reset(w, parts, M, K);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) qblock_share(in, M, K, w, parts, bp, y.data_ptr<float>(), N, t, claims);
  });
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
        if constexpr (is_kquant<Type>()) {
          for (int64_t blk = 0; blk < K / 256; ++blk) {  // ggml: (d * sc) * q - dmin * m, Q6_K's q less 32
            KBlock k;
            decode_kblock<Type>(row + blk * Format<Type>::kBytes, k);
            const float d = _cvtsh_ss(k.d), dmin = _cvtsh_ss(k.dmin);
            for (int i = 0; i < 256; ++i) {
              if constexpr (Type == kQ6_K)
                o[blk * 256 + i] = (d * float(k.sc[i / 16])) * float(int(k.q[i]) - 32);
              else
                o[blk * 256 + i] = (d * float(k.sc[i / 32])) * float(k.q[i]) - dmin * float(k.mins[i / 32]);
            }
          }
        } else {
          for (int64_t g = 0; g < K / 32; ++g) {
            Group grp;
            unpack_group<Type>(row, g, grp);
            alignas(32) int16_t v[32];
            _mm256_store_si256(reinterpret_cast<__m256i*>(v), grp.lo);
            _mm256_store_si256(reinterpret_cast<__m256i*>(v + 16), grp.hi);
            for (int i = 0; i < 32; ++i) {
              const float value = grp.scale * float(v[i]);
              o[g * 32 + i] = Format<Type>::kMin ? value + grp.min : value;
            }
          }
        }
      }
    });
  });
  return out;
}
