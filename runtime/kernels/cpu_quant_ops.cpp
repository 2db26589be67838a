// Weight-only int8 group matmul for the CPU: y = x @ W.T with W = codes * scale (+ offset) per group of G input
// columns. The layout of GGUF's K-quants as the file stores them (quantization/int8_groups.py):
//   Q6_K: G = 16, codes -32..31, scale = d * sc, no offset      (w = d * sc * q)
//   Q5_K: G = 32, codes 0..31,  scale = d * sc, offset = -dmin * m  (w = d * sc * q - dmin * m)
//   Q8_0: G = 32, codes -127..127, no offset
// Its torch reference: kernels/quant_reference.py int8_group_matmul.
//
// Two regimes (the caller picks by row count, quantization/int8_groups.py GEMM_MIN_ROWS says why):
// - few rows (decode): the bytes of W are the cost. Each weight row is decoded once per block of 4 activation
//   rows (w = fma(q, scale, offset), 16 lanes on AVX-512, 8 on AVX2) and multiplied into 4 accumulators.
//   The ISA is chosen at run time (isa 0) or forced (1 scalar, 2 AVX2, 3 AVX-512: tests run every path the CPU
//   has); the vector paths are compiled with target attributes, so one build carries all of them.
// - many rows (a prefill chunk): arithmetic is the cost. Each thread dequantizes a tile of 64 weight rows to
//   float32 (64 x K floats: the tile, never the matrix) and multiplies it with one GEMM (at::mm, which runs on
//   one thread inside the parallel region).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KUBELLM_X86 1
#endif

namespace {

constexpr int64_t kRowBlock = 4;   // activation rows sharing one decode of a weight row
constexpr int64_t kTileRows = 64;  // weight rows per dequantized tile (64 x K float32 stays in L2)

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int64_t best_isa() {
#if defined(KUBELLM_X86)
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

// One weight row (K codes, its group scales and offsets) against R activation rows (stride k): out[r].
template <int R>
void dot_rows_scalar(const float* x, int64_t k, const int8_t* c, const float* sc, const float* off, int64_t gs,
                     float* out) {
  float acc[R] = {};
  for (int64_t g = 0; g < k / gs; ++g) {
    const float s = sc[g], o = off != nullptr ? off[g] : 0.f;
    for (int64_t j = g * gs; j < (g + 1) * gs; ++j) {
      const float w = static_cast<float>(c[j]) * s + o;
      for (int r = 0; r < R; ++r) acc[r] += w * x[r * k + j];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#if defined(KUBELLM_X86)
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int R>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* x, int64_t k, const int8_t* c, const float* sc,
                                                       const float* off, int64_t gs, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / gs; ++g) {
    const __m256 s = _mm256_set1_ps(sc[g]);
    const __m256 o = off != nullptr ? _mm256_set1_ps(off[g]) : _mm256_setzero_ps();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 8) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j));
      const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s, o);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * k + j), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);
}

template <int R>
__attribute__((target("avx512f"))) void dot_rows_avx512(const float* x, int64_t k, const int8_t* c, const float* sc,
                                                        const float* off, int64_t gs, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / gs; ++g) {
    const __m512 s = _mm512_set1_ps(sc[g]);
    const __m512 o = off != nullptr ? _mm512_set1_ps(off[g]) : _mm512_setzero_ps();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 16) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j));
      const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), s, o);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * k + j), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

__attribute__((target("avx2,fma"))) void dequantize_row_avx2(const int8_t* c, const float* sc, const float* off,
                                                             int64_t k, int64_t gs, float* t) {
  for (int64_t g = 0; g < k / gs; ++g) {
    const __m256 s = _mm256_set1_ps(sc[g]);
    const __m256 o = off != nullptr ? _mm256_set1_ps(off[g]) : _mm256_setzero_ps();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 8) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j));
      _mm256_storeu_ps(t + j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s, o));
    }
  }
}

__attribute__((target("avx512f"))) void dequantize_row_avx512(const int8_t* c, const float* sc, const float* off,
                                                              int64_t k, int64_t gs, float* t) {
  for (int64_t g = 0; g < k / gs; ++g) {
    const __m512 s = _mm512_set1_ps(sc[g]);
    const __m512 o = off != nullptr ? _mm512_set1_ps(off[g]) : _mm512_setzero_ps();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 16) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j));
      _mm512_storeu_ps(t + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), s, o));
    }
  }
}
#endif

template <int R>
void dot_rows(int64_t isa, const float* x, int64_t k, const int8_t* c, const float* sc, const float* off, int64_t gs,
              float* out) {
#if defined(KUBELLM_X86)
  if (isa == kAvx512) return dot_rows_avx512<R>(x, k, c, sc, off, gs, out);
  if (isa == kAvx2) return dot_rows_avx2<R>(x, k, c, sc, off, gs, out);
#endif
  dot_rows_scalar<R>(x, k, c, sc, off, gs, out);
}

// out[i, n] for all activation rows i, weight rows [begin, end).
void few_rows(int64_t isa, const float* x, int64_t m, int64_t k, const int8_t* codes, const float* scales,
              const float* offsets, int64_t gs, int64_t n, int64_t begin, int64_t end, float* out) {
  const int64_t groups = k / gs;
  float res[kRowBlock];
  for (int64_t row = begin; row < end; ++row) {
    const int8_t* c = codes + row * k;
    const float* sc = scales + row * groups;
    const float* off = offsets != nullptr ? offsets + row * groups : nullptr;
    for (int64_t i = 0; i < m; i += kRowBlock) {
      const int64_t r = std::min<int64_t>(kRowBlock, m - i);
      const float* xi = x + i * k;
      switch (r) {
        case 4: dot_rows<4>(isa, xi, k, c, sc, off, gs, res); break;
        case 3: dot_rows<3>(isa, xi, k, c, sc, off, gs, res); break;
        case 2: dot_rows<2>(isa, xi, k, c, sc, off, gs, res); break;
        default: dot_rows<1>(isa, xi, k, c, sc, off, gs, res); break;
      }
      for (int64_t j = 0; j < r; ++j) out[(i + j) * n + row] = res[j];
    }
  }
}

// Weight rows [begin, end) as float32 into tile [end - begin, K] (w = fma(q, scale, offset), as the decode path).
void dequantize_tile(int64_t isa, const int8_t* codes, const float* scales, const float* offsets, int64_t k,
                     int64_t gs, int64_t begin, int64_t end, float* tile) {
  const int64_t groups = k / gs;
  for (int64_t row = begin; row < end; ++row) {
    const int8_t* c = codes + row * k;
    const float* sc = scales + row * groups;
    const float* off = offsets != nullptr ? offsets + row * groups : nullptr;
    float* t = tile + (row - begin) * k;
#if defined(KUBELLM_X86)
    if (isa == kAvx512) {
      dequantize_row_avx512(c, sc, off, k, gs, t);
      continue;
    }
    if (isa == kAvx2) {
      dequantize_row_avx2(c, sc, off, k, gs, t);
      continue;
    }
#endif
    for (int64_t g = 0; g < groups; ++g) {
      const float s = sc[g], o = off != nullptr ? off[g] : 0.f;
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) t[j] = std::fma(static_cast<float>(c[j]), s, o);
    }
  }
}

}  // namespace

int64_t int8_group_matmul_isa() { return best_isa(); }

// x [M, K] float32, codes [N, K] int8, scales [N, K / G] float32, offsets [N, K / G] float32 or None
// -> [M, N] float32 = x @ (codes * scales + offsets).T. M < gemm_min_rows: the decode path; else tiles and GEMMs.
torch::Tensor int8_group_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                                c10::optional<torch::Tensor> offsets, int64_t group_size, int64_t isa,
                                int64_t gemm_min_rows) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "x must be [rows, K] float32");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(), "codes: [N, K] int8");
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0, "group_size must be a positive multiple of 16");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), groups = k / group_size;
  TORCH_CHECK(codes.size(1) == k && k % group_size == 0, "K must match codes and be a multiple of group_size");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == groups,
              "scales must be [N, K / group_size] float32, contiguous");
  const float* op = nullptr;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == at::kFloat && offsets->is_contiguous() && offsets->sizes() == scales.sizes(),
                "offsets must be [N, K / group_size] float32, contiguous (scales' shape)");
    op = offsets->data_ptr<float>();
  }
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "isa must be 0 (auto), 1 (scalar), 2 (avx2) or 3 (avx512)");
  TORCH_CHECK(isa <= best, "isa ", isa, " is not supported by this CPU (best: ", best, ")");
  x = x.contiguous();
  auto out = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  if (m < gemm_min_rows || m == 0) {
    // grain: about 64k weight bytes per task, so that small matrices do not wake threads for nothing
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      few_rows(isa, xp, m, k, cp, sp, op, group_size, n, begin, end, outp);
    });
    return out;
  }
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
    // the torch ops below run on pool threads, which do not inherit the caller's inference mode: out may be an
    // inference tensor, written in place here
    c10::InferenceMode inference;
    auto tile = torch::empty({kTileRows, k}, x.options());
    auto product = torch::empty({m, kTileRows}, x.options());
    for (int64_t t = tb; t < te; ++t) {
      const int64_t begin = t * kTileRows, rows = std::min(n, begin + kTileRows) - begin;
      dequantize_tile(isa, cp, sp, op, k, group_size, begin, begin + rows, tile.data_ptr<float>());
      auto part = product.narrow(1, 0, rows);
      at::mm_out(part, x, tile.narrow(0, 0, rows).t());
      out.narrow(1, begin, rows).copy_(part);
    }
  });
  return out;
}
