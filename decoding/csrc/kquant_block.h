// The k-quant linear's column blocks (included by gguf_blocks.h twice, with KQ_WIDE 0 for AVX2 and 1 for
// AVX-512BW, each in its own namespace): per super-block, sc * (q - offset) * x summed exactly in int32
// lanes by VPMADDUBSW (value bytes times int8 inputs; |pair| <= 2 * 63 * 127 fits int16) and VPMADDWD with
// the sub-block scales, the mins meeting the inputs' 16-value sums in a VPMADDWD of their own. Lane j holds
// inputs 4j..4j+3 of every group (the mins' lane g, group g) whatever the vector width, the rows or the
// columns computed together; each output then adds its lanes, times the block's float scales, into float
// lanes in block order and sums them once: the same bits for a row alone, in any batch, and on either ISA.

#if KQ_WIDE
// The two groups one 512-bit vector holds (pair p, 0..3): Q4_K / Q5_K groups 2j and 2j + 2 (the low nibbles
// of two 32-byte chunks), then 2j + 1 and 2j + 3 (their high nibbles); Q6_K groups 2p and 2p + 1.
template <typename F>
constexpr int pair_group(int p, int half) {
  return F::kSplit ? 2 * p + half : 4 * (p / 2) + (p % 2) + 2 * half;
}

// 16-bit lanes of `count_lo` in the low 256 bits and `count_hi` in the high 256 bits.
inline __m512i split_counts(int count_lo, int count_hi) {
  return _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(count_lo)),
                            _mm256_set1_epi16(static_cast<int16_t>(count_hi)), 1);
}

// The value bytes of pair p's two groups (F::bytes of each, side by side).
template <typename F>
inline __m512i pair_bytes(const uint8_t* b, int p) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  if constexpr (F::kSplit) {  // Q6_K: ql's 64 bytes of half p / 2 (low, then high nibbles) and qh's bit pairs
    const int n = p / 2, k = 2 * (p % 2);
    const __m512i low = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(b + 64 * n), 2 * k), low4);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * n)));
    const __m512i high = _mm512_and_si512(_mm512_srlv_epi16(qh, split_counts(2 * k, 2 * k + 2)), _mm512_set1_epi8(3));
    return _mm512_or_si512(low, _mm512_slli_epi16(high, 4));
  } else {
    const uint8_t* qs = b + (F::kBytes == 144 ? 16 : 48);
    const __m512i nibbles = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(qs + 64 * (p / 2)), 4 * (p % 2)),
                                             low4);
    if constexpr (F::kBytes == 144) {
      return nibbles;
    } else {  // Q5_K: the fifth bit of group g is bit g of each qh byte
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
      const __m512i fifth = _mm512_and_si512(
          _mm512_srlv_epi16(qh, split_counts(pair_group<F>(p, 0), pair_group<F>(p, 1))), _mm512_set1_epi8(1));
      return _mm512_or_si512(nibbles, _mm512_slli_epi16(fifth, 4));
    }
  }
}
#endif

// One super-block's lanes for rows 0..R-1 and columns 0..C-1: `lanes` the value sums (less Q6_K's offset
// term), `min_lanes` the Q4_K / Q5_K mins times the inputs' group sums.
template <typename F, int R, int C>
inline void kquant_lanes(const KRows& x, int64_t m0, int64_t K, int64_t blk, const uint8_t* const* block,
                         const KScales* scales, __m256i (&lanes)[R][C], __m256i (&min_lanes)[R][C]) {
  const int8_t* xb[R];
  for (int r = 0; r < R; ++r) xb[r] = x.q.data() + (m0 + r) * K + blk * 256;
#if KQ_WIDE
  __m512i acc[R][C] = {};  // zeros
  __m512i scales8[C];
  for (int c = 0; c < C; ++c) scales8[c] = _mm512_broadcast_i64x4(group_scales8<F>(scales[c]));
  for (int p = 0; p < 4; ++p) {
    const int ga = pair_group<F>(p, 0), gb = pair_group<F>(p, 1);
    const __m512i control = split_counts((2 * ga) | ((2 * ga + 1) << 8), (2 * gb) | ((2 * gb + 1) << 8));
    __m512i q[C], sc[C];
    for (int c = 0; c < C; ++c) {
      q[c] = pair_bytes<F>(block[c], p);
      sc[c] = _mm512_shuffle_epi8(scales8[c], control);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i xg = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[r] + 32 * ga))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[r] + 32 * gb)), 1);
      for (int c = 0; c < C; ++c)
#if KQ_VNNI  // VPDPWSSD: VPMADDWD and VPADDD in one instruction, the same wrapping int32 sums
        acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], _mm512_maddubs_epi16(q[c], xg), sc[c]);
#else
        acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(q[c], xg), sc[c]));
#endif
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      lanes[r][c] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r][c]), _mm512_extracti64x4_epi64(acc[r][c], 1));
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) lanes[r][c] = _mm256_setzero_si256();
  __m256i scales8[C];
  for (int c = 0; c < C; ++c) scales8[c] = group_scales8<F>(scales[c]);
  for (int g = 0; g < 8; ++g) {
    __m256i q[C], sc[C];
    for (int c = 0; c < C; ++c) {
      q[c] = F::bytes(block[c], g);
      sc[c] = lane_broadcast(scales8[c], g);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[r] + g * 32));
      for (int c = 0; c < C; ++c)
        lanes[r][c] = _mm256_add_epi32(lanes[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], xg), sc[c]));
    }
  }
#endif
  for (int r = 0; r < R; ++r) {
    const __m256i sums16 = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(x.sums16.data() + ((m0 + r) * K + blk * 256) / 16));
    for (int c = 0; c < C; ++c) {
      if constexpr (F::kOffset != 0)
        lanes[r][c] = _mm256_sub_epi32(lanes[r][c], _mm256_mullo_epi32(
            _mm256_madd_epi16(sub_scales16<F>(scales[c]), sums16), _mm256_set1_epi32(F::kOffset)));
      if constexpr (F::kMin) min_lanes[r][c] = _mm256_madd_epi16(paired_mins(scales[c]), sums16);
    }
  }
}

// Columns n..n+C-1 of input rows 0..R-1 for a k-quant: each output's float lanes take every super-block's
// integer lanes times d (and the mins' times dmin), both times the input block's scale, in block order.
template <int64_t Type, int R, int C>
void kquant_block(const KRows& x, int64_t m0, int64_t K, const uint8_t* w, int64_t row_bytes, const float* bias,
                  float* y, int64_t ldy, int64_t n, Cursor& cursor) {
  using F = Format<Type>;
  const int64_t B = K / 256;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < B; ++blk) {
    cursor.tick(blk * 256);
    KScales scales[C];
    const uint8_t* block[C];
    for (int c = 0; c < C; ++c) {
      block[c] = w + (n + c) * row_bytes + blk * F::kBytes;
      F::scales(block[c], scales[c]);
    }
    __m256i lanes[R][C], min_lanes[R][C];
    kquant_lanes<F, R, C>(x, m0, K, blk, block, scales, lanes, min_lanes);
    for (int r = 0; r < R; ++r) {
      const float xs = x.scale[(m0 + r) * B + blk];
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes[r][c]), _mm256_set1_ps(xs * scales[c].d), acc[r][c]);
        if constexpr (F::kMin)
          acc[r][c] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_lanes[r][c]), _mm256_set1_ps(xs * scales[c].dmin),
                                       acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const float out = horizontal_sum(acc[r][c]);
      y[r * ldy + n + c] = bias ? out + bias[n + c] : out;
    }
}
