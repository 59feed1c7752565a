// The k-quant linear over weights tiled by 16 output columns (gguf_blocks.h's Tile<Type> layout), included by
// gguf_blocks.h three times: AVX2 (KT_WIDE 0, a tile as two halves of 8 columns), AVX-512BW (KT_WIDE 1) and
// AVX-512 VNNI (KT_VNNI 1), each in its own namespace. A vector lane is an output column: lane c of a value
// vector holds 4 consecutive quantised values of column c, so one VPDPBUSD (without VNNI: VPMADDUBSW, its
// int16 pair sums added up over a few steps) adds 4 products of a broadcast group of 4 int8 inputs to every
// column at once. A row's sub-block dot products are exact int32, times the column's integer sub-block
// scale, summed over the super-block in int32 (Q6_K's offset and the Q4_K / Q5_K mins meet the inputs' sums
// in VPMADDWD pairs); then one float chain per output, block after block: acc += float(sum) * (d * xs)
// (- float(mins) * (dmin * xs)). Every step is the same for a row alone, in any batch, in any row block and
// on either ISA: the same bits.

#if KT_WIDE
using VI = __m512i;
using VF = __m512;
constexpr int kLanes = 16;
inline VI vload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VI vset8(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
inline VI vand(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI vor(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI vadd(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI vsub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
inline VI times32(VI v) { return _mm512_slli_epi32(v, 5); }
inline VI shift16(VI v, int s) {  // 16-bit lanes shifted left by s (right by -s)
  return s >= 0 ? _mm512_slli_epi16(v, s) : _mm512_srli_epi16(v, -s);
}
inline VI bcast32(const void* p) {  // 4 bytes (4 int8 inputs, or a pair of int16) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
#if KT_VNNI
// u8 x s8 step sums (see kGroupSteps): the 4 products of each 32-bit lane added to it, in int32
inline VI step4(VI acc, VI u, VI s) { return _mm512_dpbusd_epi32(acc, u, s); }
inline VI scale_operand(VI scale) { return scale; }
inline VI add_scaled(VI total, VI sums, VI scale) { return vadd(total, _mm512_mullo_epi32(sums, scale)); }
#else
// u8 x s8 step sums: the products of each int16 lane's byte pair added to it, in int16 (VPMADDUBSW saturates
// at +-32767; kGroupSteps keeps every partial sum under it)
inline VI step4(VI acc, VI u, VI s) { return _mm512_add_epi16(acc, _mm512_maddubs_epi16(u, s)); }
inline VI scale_operand(VI scale) {  // a 32-bit lane's low int16 in both of its halves
  return _mm512_or_si512(_mm512_and_si512(scale, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(scale, 16));
}
inline VI add_scaled(VI total, VI sums, VI scale16) {
  return _mm512_add_epi32(total, _mm512_madd_epi16(sums, scale16));
}
#endif
inline VI dot2(VI acc, VI a, VI b) {  // int16 pairs
#if KT_VNNI
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
inline VI u8_i32(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI u8_i16(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VI i8_i16(const uint8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VI low_i16(VI pairs) { return _mm512_srai_epi32(_mm512_slli_epi32(pairs, 16), 16); }
inline VI high_i16(VI pairs) { return _mm512_srai_epi32(pairs, 16); }
inline VF half_f32(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF vmul(VF a, float b) { return _mm512_mul_ps(a, _mm512_set1_ps(b)); }
inline VF cvt(VI v) { return _mm512_cvtepi32_ps(v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF fnmadd(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }
inline VF fzero() { return _mm512_setzero_ps(); }
inline VI izero() { return _mm512_setzero_si512(); }
inline void fstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF fload(const float* p) { return _mm512_loadu_ps(p); }
inline VF fadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF fset1(float v) { return _mm512_set1_ps(v); }
inline VI sub16(VI v, int k) { return _mm512_sub_epi16(v, _mm512_set1_epi16(static_cast<int16_t>(k))); }
// v plus 16 in the int16 lanes whose bit is set in the 32-bit mask at p (bits from lane0 * 2 on)
inline VI or_bits(VI v, const uint8_t* p, int lane0) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm512_mask_add_epi16(v, static_cast<__mmask32>(bits >> (2 * lane0)), v, _mm512_set1_epi16(16));
}
#else
using VI = __m256i;
using VF = __m256;
constexpr int kLanes = 8;
inline VI vload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VI vset8(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
inline VI vand(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI vor(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI vadd(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI vsub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
inline VI times32(VI v) { return _mm256_slli_epi32(v, 5); }
inline VI shift16(VI v, int s) { return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s); }
inline VI bcast32(const void* p) {  // 4 bytes (4 int8 inputs, or a pair of int16) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline VI step4(VI acc, VI u, VI s) {
  VI sum = _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s));
  // Ties the sum to this step: integer adds reassociate, and GCC rebuilt a row's chain of steps as a tree
  // whose partial sums spill out of AVX2's 16 registers (1.25x slower at 4-16 rows, measured here).
  asm("" : "+x"(sum));
  return sum;
}
inline VI scale_operand(VI scale) {
  return _mm256_or_si256(_mm256_and_si256(scale, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(scale, 16));
}
inline VI add_scaled(VI total, VI sums, VI scale16) {
  return _mm256_add_epi32(total, _mm256_madd_epi16(sums, scale16));
}
inline VI dot2(VI acc, VI a, VI b) {
  VI sum = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  asm("" : "+x"(sum));  // a chain, as step4's: else GCC sums a group's products as a tree of spilled registers
  return sum;
}
inline VI u8_i32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline VI u8_i16(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI i8_i16(const uint8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI low_i16(VI pairs) { return _mm256_srai_epi32(_mm256_slli_epi32(pairs, 16), 16); }
inline VI high_i16(VI pairs) { return _mm256_srai_epi32(pairs, 16); }
inline VF half_f32(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VF vmul(VF a, float b) { return _mm256_mul_ps(a, _mm256_set1_ps(b)); }
inline VF cvt(VI v) { return _mm256_cvtepi32_ps(v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF fnmadd(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }
inline VF fzero() { return _mm256_setzero_ps(); }
inline VI izero() { return _mm256_setzero_si256(); }
inline void fstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF fload(const float* p) { return _mm256_loadu_ps(p); }
inline VF fadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF fset1(float v) { return _mm256_set1_ps(v); }
inline VI sub16(VI v, int k) { return _mm256_sub_epi16(v, _mm256_set1_epi16(static_cast<int16_t>(k))); }
inline VI or_bits(VI v, const uint8_t* p, int lane0) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm256_or_si256(v, bit_lanes(bits, 2 * lane0, 16));
}
#endif

// Steps of a pair summed by step4 before add_scaled multiplies the sums by the sub-block scale. VNNI's sums are
// int32: all of a pair's. Without VNNI a 4-product dot would take VPMADDUBSW, VPMADDWD by ones and VPADDD a step
// (and a VPMULLD a sub-block): instead the VPMADDUBSW pair sums add up in int16 while they stay within it, then
// one VPMADDWD by the scale (in both int16 halves of its lane) adds scale * (the 4-product sums) to the int32
// total; exact, so the same bits, and 1.1x faster at 8-16 rows on the 2-core AVX2 EPYC (docs/measurements.md).
// A step adds at most 2 * (2^bits - 1) * 127 per int16 lane (inputs are clamped to +-127): 8 steps of 4-bit
// values (30480), 4 of 5-bit (31496), 2 of 6-bit (32004).
template <typename T>
constexpr int kGroupSteps = KT_VNNI ? T::kSteps : T::kHighBits == 0 ? 8 : T::kHighBits == 1 ? 4 : 2;

// Whether a pass prefetches its tile-blocks kTileLead ahead (on top of the hardware prefetcher). On the 2-core
// AVX2 EPYC (Zen 3), in-process A/B from memory (docs/measurements.md): Q4_K streams faster without it, 1.33x
// at one row and 1.06-1.11x at 4-16; so do Q6_K's passes over whole tiles (H = 2) since its tile-blocks read
// front to back (pair after pair), 1.07-1.15x at one row; its passes over half a tile need it (0.76x without).
// AVX-512 keeps it everywhere, as measured on its machine (kTileLead).
template <typename T, int H>
constexpr bool kSoftwarePrefetch = KT_WIDE || (T::kHighBits != 0 && H == 1);

// Value vectors A and B of pair p, step i (T::kSteps per pair): lane l's 4 values of sub-blocks 2p and
// 2p + 1 at inputs 4i..4i+3, as unsigned bytes. `tb` is the tile-block, `lane0` the first lane (column).
template <typename T>
inline void tile_values(const uint8_t* tb, int p, int I, int lane0, VI& a, VI& b) {
  const VI low4 = vset8(0x0F);
  const VI v = vload(tb + qs_offset<T>(p, I) + lane0 * 4);
  a = vand(v, low4);
  b = vand(shift16(v, -4), low4);
  if constexpr (T::kHighBits == 1) {  // Q5_K: bits I of the low nibbles' and 4 + I of the high ones' bytes
    const VI h = vload(tb + qh_offset<T>(p, I / 4) + lane0 * 4);
    const VI bit4 = vset8(0x10);
    a = vor(a, vand(shift16(h, 4 - I % 4), bit4));
    b = vor(b, vand(shift16(h, -(I % 4)), bit4));
  } else if constexpr (T::kHighBits == 2) {  // Q6_K: bit pairs 4k, 4k + 2 for step I = 2k + (I % 2)
    const VI h = vload(tb + qh_offset<T>(p, I % 2) + lane0 * 4);
    const VI bits45 = vset8(0x30);
    a = vor(a, vand(shift16(h, 4 - 4 * (I / 2)), bits45));
    b = vor(b, vand(shift16(h, 2 - 4 * (I / 2)), bits45));
  }
}

// Rows m0..m0+R-1 times H vectors of one tile's lanes from lane0 (lanes lane0 + h * kLanes ... of vector h;
// all K inputs): `tile` is the tile's first tile-block, `y` row m0's output at lane0's column, `bias` at it
// too (or null), `cols` the lanes from lane0 that are real columns (a part's last tile may be short), `prefetch`
// whether the pass prefetches later tile-blocks: the first pass over a tile does, the passes of the rows after it
// find the tile in cache (a prefill's Q4_1 linears 1.12x faster without their prefetches, measured on the 2-core
// AVX2 EPYC). AVX2 passes over few rows cover both halves of a tile (H = 2; gguf_blocks.h, whole_tile_rows).
template <typename T, int R, int H>
void tile_rows(const KRows& x, int64_t m0, int64_t K, const uint8_t* tile, int lane0, const float* bias, float* y,
               int64_t ldy, int cols, bool prefetch) {
  const int64_t B = K / 256;
  VF acc[R][H];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) acc[r][h] = fzero();
  for (int64_t blk = 0; blk < B; ++blk) {
    const uint8_t* tb = tile + blk * T::kBytes;
    const int8_t* xb[R];
    for (int r = 0; r < R; ++r) xb[r] = x.q.data() + (m0 + r) * K + blk * 256;
    VI total[R][H];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h) total[r][h] = izero();
    for (int p = 0; p < T::kPairs; ++p) {
      if (kSoftwarePrefetch<T, H> && prefetch)
        for (int64_t line = 0; line < T::kBytes; line += 64 * T::kPairs)  // a later block's lines, over the pairs
          _mm_prefetch(reinterpret_cast<const char*>(tb + kTileLead + line + 64 * p), _MM_HINT_T1);
      VI scale_a[H], scale_b[H];  // the columns' sub-block scales, one per 32-bit lane, as add_scaled takes them
      for (int h = 0; h < H; ++h) {
        const int l = lane0 + h * kLanes;
        if constexpr (T::kSignedScales) {  // Q6_K: int8 scale pairs
          const VI pairs = i8_i16(tb + T::kSc + (p * kTileCols + l) * 2);
          scale_a[h] = scale_operand(low_i16(pairs));
          scale_b[h] = scale_operand(high_i16(pairs));
        } else {
          scale_a[h] = scale_operand(u8_i32(tb + T::kSc + (2 * p) * kTileCols + l));
          scale_b[h] = scale_operand(u8_i32(tb + T::kSc + (2 * p + 1) * kTileCols + l));
        }
      }
      const int in_a = 2 * p * T::kSubInputs, in_b = in_a + T::kSubInputs;
      constexpr int G = kGroupSteps<T>;
#pragma GCC unroll 8
      for (int g = 0; g < T::kSteps; g += G) {
        VI sa[R][H], sb[R][H];
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < H; ++h) sa[r][h] = sb[r][h] = izero();
#pragma GCC unroll 8
        for (int i = g; i < g + G; ++i) {  // unrolled: the shifts and offsets become constants
          VI a[H], b[H];
          for (int h = 0; h < H; ++h) tile_values<T>(tb, p, i, lane0 + h * kLanes, a[h], b[h]);
          for (int r = 0; r < R; ++r)
            for (int h = 0; h < H; ++h) {
              sa[r][h] = step4(sa[r][h], a[h], bcast32(xb[r] + in_a + 4 * i));
              sb[r][h] = step4(sb[r][h], b[h], bcast32(xb[r] + in_b + 4 * i));
            }
        }
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < H; ++h)
            total[r][h] = add_scaled(add_scaled(total[r][h], sa[r][h], scale_a[h]), sb[r][h], scale_b[h]);
      }
    }
    for (int h = 0; h < H; ++h) {
      const int l = lane0 + h * kLanes;
      const VF d = half_f32(tb + T::kD + l * 2);
      for (int r = 0; r < R; ++r) {
        const int16_t* sums = x.sums16.data() + ((m0 + r) * K + blk * 256) / 16;
        const float xs = x.scale[(m0 + r) * B + blk];
        if constexpr (T::kSignedScales) {  // Q6_K's offset: 32 * sum of sc * (the inputs' 16-value sums)
          VI offset = izero();
          for (int p = 0; p < T::kPairs; ++p)
            offset = dot2(offset, i8_i16(tb + T::kSc + (p * kTileCols + l) * 2), bcast32(sums + 2 * p));
          total[r][h] = vsub(total[r][h], times32(offset));
        }
        acc[r][h] = fmadd(cvt(total[r][h]), vmul(d, xs), acc[r][h]);
        if constexpr (T::kMins) {  // Q4_K / Q5_K: the mins times the inputs' 32-value sums
          const int16_t* sums32 = x.sums32.data() + ((m0 + r) * K + blk * 256) / 32;
          VI mins = izero();
          for (int p = 0; p < T::kPairs; ++p)
            mins = dot2(mins, u8_i16(tb + T::kMinPairs + (p * kTileCols + l) * 2), bcast32(sums32 + 2 * p));
          acc[r][h] = fnmadd(cvt(mins), vmul(half_f32(tb + T::kDmin + l * 2), xs), acc[r][h]);
        }
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    const int c0 = h * kLanes, n = std::min(cols - c0, kLanes);
    for (int r = 0; r < R; ++r) {
      VF out = acc[r][h];
      if (n == kLanes) {
        if (bias) out = fadd(out, fload(bias + c0));
        fstore(y + r * ldy + c0, out);
      } else {
        alignas(64) float tmp[kLanes];
        fstore(tmp, out);
        for (int c = 0; c < n; ++c) y[r * ldy + c0 + c] = bias ? tmp[c] + bias[c0 + c] : tmp[c];
      }
    }
  }
}

// The 32-input formats (Q4_0 ... Q8_0) tiled the same way (Tile32<Type>): lane c of an int16 value vector
// holds 2 consecutive values of column c, so VPDPWSSD (or VPMADDWD + VPADDD) adds a broadcast pair of the
// row's int16 inputs times them to every column: a group's dot product exact in int32. Then, per output, as
// the row layout did: acc += float(dot) * d over the groups in order, the mins' chain min * (the group's
// input sum) beside it, and out = float((acc + mins) * row scale).
inline VI i16_pairs(const uint8_t* p, bool is_signed) {  // 2 * kLanes bytes as int16
  return is_signed ? i8_i16(p) : u8_i16(p);
}

template <typename T, int R, int H>
void tile32_rows(const QuantisedRows& x, int64_t m0, int64_t K, const uint8_t* tile, int lane0, const float* bias,
                 float* y, int64_t ldy, int cols, bool prefetch) {  // the arguments as tile_rows's
  const int64_t G = K / 32;
  VF acc[R][H], mins[R][H];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) acc[r][h] = mins[r][h] = fzero();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* tg = tile + g * T::kBytes;
    if (prefetch && g % T::kPrefetchEvery == 0)
      for (int64_t line = 0; line < T::kPrefetchEvery * T::kBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(tg + kTileLead + line), _MM_HINT_T1);
    VI dots[R][H];  // the group's dot products: one exact int32 sum (low and high inputs alike)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h) dots[r][h] = izero();
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {  // inputs 2s, 2s + 1 (lo) and 16 + 2s, 17 + 2s (hi)
      VI a[H], b[H];
      for (int h = 0; h < H; ++h) {
        const int l = lane0 + h * kLanes;
        if constexpr (T::kBits == 8) {
          a[h] = i16_pairs(tg + T::kQs + (s * kTileCols + l) * 2, true);
          b[h] = i16_pairs(tg + T::kQs + ((s + 8) * kTileCols + l) * 2, true);
        } else {
          const VI v = i16_pairs(tg + T::kQs + (s * kTileCols + l) * 2, false);
          a[h] = vand(v, vset8(0x0F));
          b[h] = shift16(v, -4);
          if constexpr (T::kBits == 5) {
            a[h] = or_bits(a[h], tg + T::kQh + (2 * s) * 4, l);
            b[h] = or_bits(b[h], tg + T::kQh + (2 * s + 1) * 4, l);
          }
          if constexpr (T::kOffset != 0) {
            a[h] = sub16(a[h], T::kOffset);
            b[h] = sub16(b[h], T::kOffset);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int16_t* xg = x.q.data() + (m0 + r) * K + g * 32;
        for (int h = 0; h < H; ++h) {
          dots[r][h] = dot2(dot2(dots[r][h], a[h], bcast32(xg + 2 * s)), b[h], bcast32(xg + 16 + 2 * s));
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      const int l = lane0 + h * kLanes;
      const VF d = half_f32(tg + T::kD + l * 2);
      for (int r = 0; r < R; ++r) {
        acc[r][h] = fmadd(cvt(dots[r][h]), d, acc[r][h]);
        if constexpr (T::kMin)
          mins[r][h] = fmadd(half_f32(tg + T::kM + l * 2), fset1(x.sums[(m0 + r) * G + g]), mins[r][h]);
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    const int c0 = h * kLanes, n = std::min(cols - c0, kLanes);
    for (int r = 0; r < R; ++r) {
      alignas(64) float total[kLanes];
      fstore(total, fadd(acc[r][h], mins[r][h]));
      for (int c = 0; c < n; ++c) {
        const float out = float(double(total[c]) * x.scale[m0 + r]);
        y[r * ldy + c0 + c] = bias ? out + bias[c0 + c] : out;
      }
    }
  }
}
