// native_layers: decoder_layers for a native target, whose every linear is in GGUF blocks (gguf_blocks.h), in one
// parallel region. A 1-token step of the default model is ~150 small kernels (a 576 x 576 linear takes ~9 us alone):
// forking the threads for each and joining them after cost about what the second thread gained there
// (docs/measurements.md). Here the threads stay in one region and meet at barriers: each claims a linear's tiles
// (TileClaims) and takes its share of the attention's tokens and units and of the rows of the norms, the SiLU and
// the residual adds; one of them quantises a linear's inputs. Every output is computed by the same code in the same order as the
// kernels called one by one (qblock_linear, cached_attention, rms_norm, silu_mul): the same bits, in any batch.
#include <omp.h>

// Whether decoder_layers' stack is a native target's: every linear's `scales` are qblock_pack's parts.
bool native_stack(at::TensorList scales, int64_t L) {
  if (static_cast<int64_t>(scales.size()) != 4 * L) return false;
  for (const at::Tensor& s : scales)
    if (s.scalar_type() != at::kLong) return false;
  return true;
}

// A share of n items for thread `thread` of `threads`: [first, last).
struct Share {
  int64_t first, last;
  Share(int64_t n, int64_t thread, int64_t threads) : first(n * thread / threads), last(n * (thread + 1) / threads) {}
};

at::Tensor native_layers(const at::Tensor& hidden, at::TensorList norms, at::TensorList weights, at::TensorList parts,
                         const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef skip_attention,
                         at::IntArrayRef skip_mlp, const at::Tensor& cos, const at::Tensor& sin, at::TensorList keys,
                         at::TensorList values, at::IntArrayRef starts, at::IntArrayRef lengths, int64_t q_heads,
                         double scaling, at::IntArrayRef windows, double eps) {
  const int64_t L = static_cast<int64_t>(skip_attention.size()), S = static_cast<int64_t>(starts.size());
  at::Tensor h = hidden.contiguous().clone();
  const int64_t T = h.size(0), H = h.size(1), Hkv = keys[0].size(0), D = keys[0].size(2);
  const int64_t qkv_width = (q_heads + 2 * Hkv) * D, att_width = q_heads * D;
  TORCH_CHECK(q_heads % Hkv == 0 && q_heads / Hkv <= 64, "decoder_layers: query heads must be 1..64 times the KV heads");
  const int64_t inner = check_parts(weights[2], parts[2], H) / 2;
  std::vector<const float*> bias(4 * L);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t outputs[4] = {qkv_width, H, 2 * inner, H}, inputs[4] = {H, att_width, H, inner};
    for (int64_t j = 0; j < 4; ++j) {
      TORCH_CHECK(check_parts(weights[4 * i + j], parts[4 * i + j], inputs[j]) == outputs[j],
                  "decoder_layers: layer ", i, "'s linear ", j, " does not fit the model's widths");
      bias[4 * i + j] = bias_data(biases.get(4 * i + j), outputs[j], "decoder_layers");
    }
    check_kv_buffers(keys.slice(i * S, S), values.slice(i * S, S), starts, lengths, Hkv, D);
  }
  std::vector<int64_t> row_seq, row_pos;
  token_rows(starts, lengths, T, row_seq, row_pos);
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous();
  TORCH_CHECK(c.size(0) == T && c.size(1) == D && sn.sizes() == c.sizes(), "decoder_layers: cos/sin (T, D) expected");
  const auto opts = h.options();
  const at::Tensor xn = at::empty({T, H}, opts), qkv = at::empty({T, qkv_width}, opts),
                   att = at::empty({T, att_width}, opts), gate_up = at::empty({T, 2 * inner}, opts),
                   act = at::empty({T, inner}, opts), out = at::empty({T, H}, opts);
  float *hp = h.data_ptr<float>(), *outp = out.data_ptr<float>();
  const auto kv_type = keys[0].scalar_type();
  const int64_t silu_units_count = T * ((inner + kSiluBlock - 1) / kSiluBlock);
  TileInputs in;  // the current linear's quantised inputs: one thread writes them, all read them
  TileClaims claims(at::get_num_threads());
  const int64_t longest = longest_row(row_pos);

#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
    const Share rows(T, thread, threads);
    // y = x @ W_i.T + b_i; starts after a barrier (x complete), ends with one (y complete)
    const auto linear = [&](const at::Tensor& x, int64_t i, float* y, int64_t N) {
#pragma omp single
      {
        in = tile_inputs(x, parts[i]);
        claims.reset(weights[i], parts[i], T, x.size(1));
      }
      qblock_share(in, T, x.size(1), weights[i], parts[i], bias[i], y, N, thread, claims);
#pragma omp barrier
    };
    const auto attention = [&](const auto& a) {
      a.write_kv(rows.first, rows.last);
#pragma omp barrier
      const Share units(a.units(), thread, threads);
      a.run_units(units.first, units.last, longest);
#pragma omp barrier
    };
    const auto add_out = [&]() {  // h += out, then this thread's rows of it go on (same rows: no barrier)
      for (int64_t k = rows.first * H; k < rows.last * H; ++k) hp[k] += outp[k];
    };
    for (int64_t i = 0; i < L; ++i) {
      if (!skip_attention[i]) {
        rms_norm_rows(hp, norms[2 * i].data_ptr<float>(), xn.data_ptr<float>(), H, eps, rows.first, rows.last);
#pragma omp barrier
        linear(xn, 4 * i, qkv.data_ptr<float>(), qkv_width);
        const float *xp = qkv.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
        const at::TensorList k = keys.slice(i * S, S), v = values.slice(i * S, S);
        with_kv_entries(kv_type, [&](auto* entry) {
          using E = std::remove_pointer_t<decltype(entry)>;
          attention(Attention<E>{xp, cp, sp, T, q_heads + 2 * Hkv, D, q_heads, Hkv, k, v, row_seq, row_pos, scaling,
                                 windows[i], att.data_ptr<float>()});
        });
        linear(att, 4 * i + 1, outp, H);
        add_out();
      }
      if (!skip_mlp[i]) {
        rms_norm_rows(hp, norms[2 * i + 1].data_ptr<float>(), xn.data_ptr<float>(), H, eps, rows.first, rows.last);
#pragma omp barrier
        linear(xn, 4 * i + 2, gate_up.data_ptr<float>(), 2 * inner);
        const Share units(silu_units_count, thread, threads);
        silu_units(gate_up.data_ptr<float>(), act.data_ptr<float>(), inner, units.first, units.last);
#pragma omp barrier
        linear(act, 4 * i + 3, outp, H);
        add_out();
      }
    }
  }
  return h;
}
