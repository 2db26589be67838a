// CPU kernels for the decode hot path: RMSNorm (with the residual add), rotary embedding, paged decode
// attention (a cache in the query's dtype, or int8 / float8 codes) and an int8 head (32-column groups), each one call. (SiLU-and-mul stays with torch: its vectorized exp beat a scalar loop here.)
//
// On a CPU a decode step of a small model is hundreds of tiny torch ops, and each op's fixed cost (dispatch,
// allocation, a microsecond or more) outweighs its arithmetic. These kernels do the same float32 arithmetic as
// kubellm.runtime.kernels.reference in one pass each. Decode attention reads K and V straight from the paged
// cache (no gather copy). Built on first use by cpu.py (torch.utils.cpp_extension); numerics are tested
// against the reference ops in tests/runtime/test_cpu_kernels.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// One row of d values to float32. bf16 -> float is a 16-bit shift; written on raw bits so that it vectorizes.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = to_f(src[i]);
}

template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t d) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// float8 e4m3fn codes (a quantized KV cache) to float32 through a 256-entry table: one load per value.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i),
                                                                                     c10::Float8_e4m3fn::from_bits()));
  }
};

template <>
inline void load_row<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* src, float* dst, int64_t d) {
  static const Fp8Table table;
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < d; ++i) dst[i] = table.value[bits[i]];
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// out = rms_norm(x + residual) * weight; new_residual = x + residual (rounded to x's dtype), as the reference.
template <typename T>
void rms_norm_impl(const T* x, const T* res, const T* w, T* out, T* new_res, int64_t rows, int64_t h,
                   int64_t x_stride, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(h);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      float sumsq = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        float v = to_f(xr[i]);
        if (res != nullptr) {
          T rounded = static_cast<T>(v + to_f(res[r * h + i]));
          new_res[r * h + i] = rounded;
          v = to_f(rounded);
        }
        buf[i] = v;
        sumsq += v * v;
      }
      const float scale = 1.f / std::sqrt(sumsq / static_cast<float>(h) + static_cast<float>(eps));
      T* o = out + r * h;
      for (int64_t i = 0; i < h; ++i) o[i] = static_cast<T>(buf[i] * scale * to_f(w[i]));
    }
  });
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with hidden contiguous");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [hidden], contiguous");
  const int64_t rows = x.size(0), h = x.size(1);
  auto out = torch::empty({rows, h}, x.options());
  torch::Tensor new_res = x;
  torch::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == x.sizes(), "residual must have x's shape");
    new_res = torch::empty({rows, h}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");
    rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), residual.has_value() ? res.data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            residual.has_value() ? new_res.data_ptr<scalar_t>() : nullptr, rows, h, x.stride(0),
                            eps);
  });
  return {out, new_res};
}

// x: [T, H, D] with D contiguous (a view is fine) -> a new contiguous tensor rotated by each token's position
// (neox "rotate half" pairs (i, i + D/2)); cos_sin: [max_position, D] float32, cos half then sin half.
torch::Tensor rotary(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [tokens, heads, head_dim] with head_dim contiguous");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(), "cos_sin must be contiguous float32");
  TORCH_CHECK(cos_sin.size(1) == x.size(2), "cos_sin must be [max_position, head_dim]");
  auto pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == x.size(0), "positions must be [tokens]");
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2, max_pos = cos_sin.size(0);
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) TORCH_CHECK(p[i] >= 0 && p[i] < max_pos, "position out of range");
  auto out = torch::empty({t, heads, d}, x.options());
  const float* cs = cos_sin.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    at::parallel_for(0, t * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t tok = row / heads, head = row % heads;
        const scalar_t* xr = in + tok * s0 + head * s1;
        const float* c = cs + p[tok] * d;
        const float* s = c + half;
        scalar_t* orow = o + row * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_f(xr[i]), x2 = to_f(xr[i + half]);
          orow[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
          orow[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
        }
      }
    });
  });
  return out;
}

// The cache row of position p of a sequence (block table `table`) for KV head kvh: head_dim values.
template <typename T>
inline const T* cache_row(const T* cache, const int32_t* table, int64_t p, int64_t block_size, int64_t block_stride,
                          int64_t slot_stride, int64_t kvh, int64_t d) {
  return cache + table[p / block_size] * block_stride + (p % block_size) * slot_stride + kvh * d;
}

// scores[g * len + p] = q_g . k_p for the positions p < len of one sequence's KV head (q pre-scaled, float32).
template <typename T>
void score_keys_portable(const float* qf, const T* k_cache, const int32_t* table, int64_t len, int64_t group, int64_t d,
                int64_t block_size, int64_t block_stride, int64_t slot_stride, int64_t kvh, float* scores) {
  std::vector<float> kf(d);
  for (int64_t p = 0; p < len; ++p) {
    load_row(cache_row(k_cache, table, p, block_size, block_stride, slot_stride, kvh, d), kf.data(), d);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * d;
      float dot = 0.f;
      for (int64_t i = 0; i < d; ++i) dot += qg[i] * kf[i];
      scores[g * len + p] = dot;
    }
  }
}

// acc[g * d + i] += weights[g * len + p] * v_p[i] over the positions p < len.
template <typename T>
void accumulate_values_portable(const float* weights, const T* v_cache, const int32_t* table, int64_t len, int64_t group,
                       int64_t d, int64_t block_size, int64_t block_stride, int64_t slot_stride, int64_t kvh,
                       float* acc) {
  std::vector<float> vf(d);
  for (int64_t p = 0; p < len; ++p) {
    load_row(cache_row(v_cache, table, p, block_size, block_stride, slot_stride, kvh, d), vf.data(), d);
    for (int64_t g = 0; g < group; ++g) {
      const float w = weights[g * len + p];
      float* ag = acc + g * d;
      for (int64_t i = 0; i < d; ++i) ag[i] += w * vf[i];
    }
  }
}

template <typename T>
void score_keys(const float* qf, const T* k_cache, const int32_t* table, int64_t len, int64_t group, int64_t d,
                int64_t block_size, int64_t block_stride, int64_t slot_stride, int64_t kvh, float* scores) {
  score_keys_portable(qf, k_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh, scores);
}

template <typename T>
void accumulate_values(const float* weights, const T* v_cache, const int32_t* table, int64_t len, int64_t group,
                       int64_t d, int64_t block_size, int64_t block_stride, int64_t slot_stride, int64_t kvh,
                       float* acc) {
  accumulate_values_portable(weights, v_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh,
                             acc);
}

#if defined(__AVX512F__)
// bf16 with head_dim a multiple of 16: 16 lanes at a time, bf16 -> float32 by widening and a 16-bit shift.
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <>
void score_keys<c10::BFloat16>(const float* qf, const c10::BFloat16* k_cache, const int32_t* table, int64_t len,
                               int64_t group, int64_t d, int64_t block_size, int64_t block_stride,
                               int64_t slot_stride, int64_t kvh, float* scores) {
  if (d % 16 != 0 || d > 256) {
    score_keys_portable(qf, k_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh, scores);
    return;
  }
  const int64_t chunks = d / 16;
  __m512 k[16];
  for (int64_t p = 0; p < len; ++p) {
    const c10::BFloat16* row = cache_row(k_cache, table, p, block_size, block_stride, slot_stride, kvh, d);
    for (int64_t c = 0; c < chunks; ++c) k[c] = load16(row + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qf + g * d), k[0]);
      for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * d + 16 * c), k[c], sum);
      scores[g * len + p] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <>
void accumulate_values<c10::BFloat16>(const float* weights, const c10::BFloat16* v_cache, const int32_t* table,
                                      int64_t len, int64_t group, int64_t d, int64_t block_size,
                                      int64_t block_stride, int64_t slot_stride, int64_t kvh, float* acc) {
  if (d % 16 != 0 || d > 256) {
    accumulate_values_portable(weights, v_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh,
                               acc);
    return;
  }
  const int64_t chunks = d / 16;
  __m512 v[16];
  for (int64_t p = 0; p < len; ++p) {
    const c10::BFloat16* row = cache_row(v_cache, table, p, block_size, block_stride, slot_stride, kvh, d);
    for (int64_t c = 0; c < chunks; ++c) v[c] = load16(row + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * len + p]);
      float* ag = acc + g * d;
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(ag + 16 * c, _mm512_fmadd_ps(w, v[c], _mm512_loadu_ps(ag + 16 * c)));
    }
  }
}
#endif

// Decode attention over the paged cache: query [B, Hq, D] (one new token per sequence, already written to the
// cache), kv_cache [2, num_blocks, block_size, Hkv, D], block_tables [B, W] int32, seq_lens [B] int32
// (including the new token) -> out [B, Hq, D]. One task per (sequence, KV head): the GROUP query heads that
// share a KV head read each K and V row once. Scores and the softmax in float32.
// The cache holds T (the query's dtype) or, quantized, C = int8 / float8 codes with the layer's k_scale and
// v_scale (kernels/kv_quant.py): k_scale folds into the query's scale, v_scale into the output's normalizer.
template <typename T, typename C>
void decode_impl(const T* q, const C* cache, const int32_t* tables, const int32_t* lens, T* out, int64_t b,
                 int64_t hq, int64_t hkv, int64_t d, int64_t num_blocks, int64_t block_size, int64_t width,
                 int64_t q_s0, int64_t q_s1, float scale, float v_scale) {
  const int64_t group = hq / hkv;
  const int64_t slot_stride = hkv * d, block_stride = block_size * slot_stride;
  const C* k_cache = cache;
  const C* v_cache = cache + num_blocks * block_stride;
  // one task per (sequence, KV head); tasks run inline below about 2048 positions x query heads of work, where
  // waking a second thread costs more than it saves (a single short sequence)
  int64_t max_len = 1;
  for (int64_t s = 0; s < b; ++s) max_len = std::max<int64_t>(max_len, lens[s]);
  const int64_t grain = std::max<int64_t>(1, 2048 / (max_len * group));
  at::parallel_for(0, b * hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / hkv, kvh = task % hkv;
      const int64_t len = lens[seq];
      const int32_t* table = tables + seq * width;
      qf.assign(group * d, 0.f);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_f(q[seq * q_s0 + (kvh * group + g) * q_s1 + i]) * scale;
      scores.assign(group * std::max<int64_t>(len, 1), 0.f);
      score_keys(qf.data(), k_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh,
                 scores.data());
      acc.assign(group * d, 0.f);
      std::vector<float> inv_sum(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < len; ++p) m = std::max(m, sg[p]);
        float sum = 0.f;
        for (int64_t p = 0; p < len; ++p) {
          sg[p] = std::exp(sg[p] - m);
          sum += sg[p];
        }
        inv_sum[g] = sum > 0.f ? v_scale / sum : 0.f;
      }
      accumulate_values(scores.data(), v_cache, table, len, group, d, block_size, block_stride, slot_stride, kvh,
                        acc.data());
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + (seq * hq + kvh * group + g) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(acc[g * d + i] * inv_sum[g]);
      }
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, double scale, double k_scale, double v_scale) {
  check_cpu(query, "query");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [seqs, heads, head_dim], head_dim contiguous");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, num_blocks, block_size, num_kv_heads, head_dim]");
  const auto cache_type = kv_cache.scalar_type();
  const bool quantized = cache_type == at::kChar || cache_type == at::kFloat8_e4m3fn;
  TORCH_CHECK(cache_type == query.scalar_type() || quantized, "kv_cache must have query's dtype, int8 or float8");
  TORCH_CHECK(quantized || (k_scale == 1.0 && v_scale == 1.0), "k_scale / v_scale are for a quantized cache");
  const int64_t b = query.size(0), hq = query.size(1), d = query.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d && hq % hkv == 0, "head_dim must match and num_heads divide by num_kv_heads");
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == b && lens.numel() == b, "block_tables/seq_lens: one row per seq");
  const int64_t width = tables.size(1);
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < b; ++s) {
    TORCH_CHECK(lp[s] >= 0 && (lp[s] + block_size - 1) / block_size <= width, "seq_len exceeds its block table");
    for (int64_t j = 0; j < (lp[s] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tp[s * width + j] >= 0 && tp[s * width + j] < num_blocks, "block id out of range");
  }
  auto out = torch::empty({b, hq, d}, query.options());
  const float q_scale = static_cast<float>(scale * k_scale), vs = static_cast<float>(v_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = query.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = query.stride(0), s1 = query.stride(1);
    if (cache_type == at::kChar) {
      decode_impl<scalar_t, int8_t>(qp, kv_cache.data_ptr<int8_t>(), tp, lp, op, b, hq, hkv, d, num_blocks,
                                    block_size, width, s0, s1, q_scale, vs);
    } else if (cache_type == at::kFloat8_e4m3fn) {
      decode_impl<scalar_t, c10::Float8_e4m3fn>(qp, kv_cache.data_ptr<c10::Float8_e4m3fn>(), tp, lp, op, b, hq, hkv,
                                                d, num_blocks, block_size, width, s0, s1, q_scale, vs);
    } else {
      decode_impl<scalar_t, scalar_t>(qp, kv_cache.data_ptr<scalar_t>(), tp, lp, op, b, hq, hkv, d, num_blocks,
                                      block_size, width, s0, s1, q_scale, vs);
    }
  });
  return out;
}

// Logits through an int8 head: x [M, K] float32, codes [N, K] int8, scales [N, K / 32] float32 (one per 32
// columns, GGUF Q8_0's layout) -> [M, N] float32 = x @ (codes * scales).T. Reads a bit over half of a bf16 head's
// bytes; rows are split across threads.
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be [rows, K] float32");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(), "codes: [N, K] int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales: [N, K / 32] float32");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), blocks = k / 32;
  TORCH_CHECK(codes.size(1) == k && k % 32 == 0, "K must match and be a multiple of 32");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == blocks, "scales must be [N, K / 32]");
  x = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int8_t* c = cp + row * k;
      const float* sc = sp + row * blocks;
      for (int64_t i = 0; i < m; ++i) {
        const float* xr = xp + i * k;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
          const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 32 * b));
          const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 32 * b + 16));
          __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), _mm512_loadu_ps(xr + 32 * b));
          dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), _mm512_loadu_ps(xr + 32 * b + 16), dot);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(sc[b]), dot, acc);
        }
        op[i * n + row] = _mm512_reduce_add_ps(acc);
#else
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          float dot = 0.f;
          for (int64_t j = 0; j < 32; ++j) dot += static_cast<float>(c[32 * b + j]) * xr[32 * b + j];
          acc += sc[b] * dot;
        }
        op[i * n + row] = acc;
#endif
      }
    }
  });
  return out;
}

}  // namespace

// cpu_quant_ops.cpp (a second translation unit of the same module)
int64_t int8_group_matmul_isa();
torch::Tensor int8_group_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                                c10::optional<torch::Tensor> offsets, int64_t group_size, int64_t isa,
                                int64_t gemm_min_rows);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "(out, new_residual) = rms_norm(x + residual) * weight");
  m.def("rotary", &rotary, "neox rotary embedding of [T, H, D] by positions");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (int8 / float8 codes with k_scale, v_scale)", py::arg("query"),
        py::arg("kv_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"), py::arg("k_scale") = 1.0,
        py::arg("v_scale") = 1.0);
  m.def("int8_matmul", &int8_matmul, "x @ (codes * scales per 32 columns).T");
  m.def("int8_group_matmul", &int8_group_matmul, "x @ (codes * scales + offsets per group).T (GGUF K-quant groups)",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("group_size"),
        py::arg("isa") = 0, py::arg("gemm_min_rows") = 16);
  m.def("int8_group_matmul_isa", &int8_group_matmul_isa, "the ISA int8_group_matmul picks: 1 scalar, 2 avx2, 3 avx512");
}
