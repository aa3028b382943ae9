// CPU kernels for linears on low-precision weights (AVX2 + FMA + F16C), registered as PyTorch ops `kimi_k2::*`
// (schemas, fake shapes and the PyTorch reference live in kernels.py; built and loaded by kernels.py).
//
//   linear_f16(x, w, ids)     y = x W^T,  W fp16 [N, K] (or [E, N, K] with ids), x / y fp32, fp32 accumulation
//   linear_q8(x, q, d, ids)   y = x W^T,  W = q * d: q int8 [N, K], d fp16 [N, K/32] (one scale per 32 weights of a
//                             row, llama.cpp's Q8_0), both in the packed row order below (N % 8 == 0); x is quantized
//                             the same way per row (int8 + an fp32 scale per 32), each 32-block's integer dot product
//                             is exact in int32, then scaled by d_w * d_x.
//   ids [M] int64 (optional): output row i uses expert ids[i] of a stacked W [E, N, K] (x has M rows, or one row that
//                             every output row reads); consecutive rows of the same expert are computed as one GEMM.
//
// int8 runs register tiles of up to 4 rows x 8 packed weight rows at every batch size. fp32 / fp16: small batches
// (the decode case, M < DEQUANT_MIN rows per weight) run tiles of MR rows x NR weight rows over the weights as
// stored; larger fp16 ones convert NC weight rows at a time into fp32 (L1-sized) and run fp32 tiles over all rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t QK = 32;           // weights per int8 scale (Q8_0 block)
constexpr int64_t RG = 8;            // int8 weight rows interleaved in the packed layout
constexpr int64_t DEQUANT_MIN = 6;   // fp16: rows per weight from which dequantize + fp32 tiles win
constexpr int64_t NC = 16;           // weight rows per parallel task (fp16: converted to fp32 at a time)
constexpr int64_t MB = 64;           // rows of x per pass over a chunk of weights
constexpr int64_t PREFETCH = 512;    // bytes ahead on each weight row

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int MR, int NR>
inline void store_tile(__m256 (&acc)[MR][NR], float* y, int64_t ldy) {
  for (int r = 0; r < MR; ++r) {
    if constexpr (NR == 4) {
      _mm_storeu_ps(y + r * ldy, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int j = 0; j < NR; ++j) y[r * ldy + j] = hsum(acc[r][j]);
    }
  }
}

// 8 weights as fp32 from fp32 or fp16 storage
template <typename W>
inline __m256 load8(const W* p) {
  if constexpr (sizeof(W) == 2) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_ps(p);
  }
}

// y[MR, NR] = x[MR, K] . w[NR, K]^T, K % 8 == 0; two accumulators per output when MR == 1 hide the FMA latency
template <int MR, int NR, typename W>
void tile_f(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K, float* y, int64_t ldy) {
  constexpr int U = MR == 1 ? 2 : 1;
  __m256 acc[U][MR][NR];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[u][r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k + 8 * u);
      for (int j = 0; j < NR; ++j) {
        const W* p = w + j * ldw + k + 8 * u;
        if (u == 0 && ((k * int64_t(sizeof(W))) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH, _MM_HINT_T0);
        const __m256 wv = load8(p);
        for (int r = 0; r < MR; ++r) acc[u][r][j] = _mm256_fmadd_ps(wv, xv[r], acc[u][r][j]);
      }
    }
  }
  for (; k < K; k += 8) {
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = load8(w + j * ldw + k);
      for (int r = 0; r < MR; ++r) acc[0][r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + k), acc[0][r][j]);
    }
  }
  if constexpr (U == 2) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[0][r][j] = _mm256_add_ps(acc[0][r][j], acc[1][r][j]);
  }
  store_tile<MR, NR>(acc[0], y, ldy);
}

// y[0:nr] = w[nr, K] . x[K] one weight row at a time (a single sequential stream: fastest for M == 1 on fp16)
template <typename W>
void rows_f(const float* x, const W* w, int64_t K, int64_t nr, float* y) {
  for (int64_t j = 0; j < nr; ++j) {
    const W* wj = w + j * K;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wj + k) + PREFETCH, _MM_HINT_T0);
      if constexpr (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(wj + k + 16) + PREFETCH, _MM_HINT_T0);
      for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(load8(wj + k + 8 * u), _mm256_loadu_ps(x + k + 8 * u), a[u]);
    }
    for (; k < K; k += 8) a[0] = _mm256_fmadd_ps(load8(wj + k), _mm256_loadu_ps(x + k), a[0]);
    y[j] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  }
}

// Q8_0 weights packed for AVX2 (`pack_q8` in kernels.py): rows in groups of RG = 8; group g's quants (RG * K bytes)
// ordered [block b][chunk c][row r][4 weights 4c..4c+3 of block b] and its scales [block b][row r]. One 32-byte load
// then holds 4 weights of each of the 8 rows, so a block's 8 int32 dot products end in the 8 lanes of one register,
// scaled by the 8 rows' scales in one FMA: no per-row horizontal sums, scale broadcasts or second memory stream per
// row (ggml's repacked Q8_0 / Q4_0 GEMV layouts follow the same idea).
//
// y[MR, RG] = x[MR, K] . group^T: per 4-byte chunk, |w| (u8) x sign(x, w) (s8) pairs summed in int16 by vpmaddubsw
// (at most 2 * 127 * 127, no saturation), in int32 by vpmaddwd, over the block's 8 chunks in int32 (exact), then
// scaled by d_w * d_x into fp32. One row: |x| (xa, made once per call) times sign(w, x) saves the |w| per load.
template <int MR>
void group_q8(const int8_t* xq, const int8_t* xa, const float* xd, int64_t ldxq, int64_t ldxd, const int8_t* wq,
              const uint16_t* wd, int64_t nb, float* y, int64_t ldy) {
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wq + b * QK * RG;
    for (int i = 0; i < QK * RG; i += 64) _mm_prefetch(reinterpret_cast<const char*>(wb) + PREFETCH + i, _MM_HINT_T0);
    __m256i t[MR];
    for (int r = 0; r < MR; ++r) t[r] = _mm256_setzero_si256();
    for (int c = 0; c < QK / 4; ++c) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 32));
      if constexpr (MR == 1) {
        const __m256i s = _mm256_maddubs_epi16(_mm256_set1_epi32(load4(xa + b * QK + 4 * c)),
                                               _mm256_sign_epi8(wv, _mm256_set1_epi32(load4(xq + b * QK + 4 * c))));
        t[0] = _mm256_add_epi32(t[0], _mm256_madd_epi16(s, ones));
      } else {
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        for (int r = 0; r < MR; ++r) {
          const __m256i xv = _mm256_set1_epi32(load4(xq + r * ldxq + b * QK + 4 * c));
          t[r] = _mm256_add_epi32(t[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones));
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b * RG)));
    for (int r = 0; r < MR; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[r]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[r * ldxd + b])), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(y + r * ldy, acc[r]);
}

// x rows -> int8 + one fp32 scale per 32 values: d = amax / 127, q = round(x / d) (to nearest even, as torch.round);
// qa = |q|
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int8_t* qa, float* d) {
  const int64_t nb = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * ldx + b * QK;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
      const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float scale = _mm_cvtss_f32(h) / 127.0f;
      const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
      d[m * nb + b] = scale;
      __m256i i0 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
                                      _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)));
      __m256i i2 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
                                      _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)));
      // packs interleave 128-bit lanes: 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31 -> in order
      i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * QK), i0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qa + m * K + b * QK), _mm256_sign_epi8(i0, i0));
    }
  }
}

void dequant_f16(const uint16_t* w, int64_t K, int64_t nr, float* out) {
  for (int64_t i = 0; i < nr * K; i += 8) _mm256_storeu_ps(out + i, load8(w + i));
}

// fp32 tiles over rows [0, M) of x (stride ldx; 0 = one row read by all) against nr weight rows -> y[:, 0:nr]
template <typename W>
void tiles_f(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, int64_t nr, float* y, int64_t ldy) {
  if (M == 1) {
    rows_f(x, w, K, nr, y);
    return;
  }
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t me = std::min(mb + MB, M);
    int64_t j = 0;
    for (; j + 4 <= nr; j += 4) {
      const W* wj = w + j * K;
      int64_t m = mb;
      for (; m + 4 <= me; m += 4) {
        tile_f<4, 2>(x + m * ldx, ldx, wj, K, K, y + m * ldy + j, ldy);
        tile_f<4, 2>(x + m * ldx, ldx, wj + 2 * K, K, K, y + m * ldy + j + 2, ldy);
      }
      for (; m + 2 <= me; m += 2) tile_f<2, 4>(x + m * ldx, ldx, wj, K, K, y + m * ldy + j, ldy);
      if (m < me) tile_f<1, 4>(x + m * ldx, ldx, wj, K, K, y + m * ldy + j, ldy);
    }
    for (; j < nr; ++j) {
      for (int64_t m = mb; m < me; ++m) tile_f<1, 1>(x + m * ldx, ldx, w + j * K, K, K, y + m * ldy + j, ldy);
    }
  }
}

void tiles_q8(const int8_t* xq, const int8_t* xa, const float* xd, int64_t ldxq, int64_t ldxd, int64_t M,
              const int8_t* wq, const uint16_t* wd, int64_t K, int64_t nr, float* y, int64_t ldy) {
  const int64_t nb = K / QK;
  for (int64_t g = 0; g < nr; g += RG) {
    const int8_t* wg = wq + g * K;
    const uint16_t* dg = wd + g * nb;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      group_q8<4>(xq + m * ldxq, nullptr, xd + m * ldxd, ldxq, ldxd, wg, dg, nb, y + m * ldy + g, ldy);
    }
    if (M - m == 3) group_q8<3>(xq + m * ldxq, nullptr, xd + m * ldxd, ldxq, ldxd, wg, dg, nb, y + m * ldy + g, ldy);
    if (M - m == 2) group_q8<2>(xq + m * ldxq, nullptr, xd + m * ldxd, ldxq, ldxd, wg, dg, nb, y + m * ldy + g, ldy);
    if (M - m == 1) {
      group_q8<1>(xq + m * ldxq, xa + m * ldxq, xd + m * ldxd, ldxq, ldxd, wg, dg, nb, y + m * ldy + g, ldy);
    }
  }
}

struct Rows {
  int64_t begin, end, expert;
};

// maximal runs of output rows that use the same expert
std::vector<Rows> groups(int64_t M, const std::optional<at::Tensor>& ids) {
  std::vector<Rows> out;
  if (!ids.has_value()) {
    out.push_back({0, M, 0});
    return out;
  }
  const int64_t* id = ids->data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t m = 1; m <= M; ++m) {
    if (m == M || id[m] != id[start]) {
      out.push_back({start, m, id[start]});
      start = m;
    }
  }
  return out;
}

// shapes: x [Mx, K] fp32; w [N, K] (no ids) or [E, N, K] (ids [M], Mx == M or 1) -> (M, N, E)
std::tuple<int64_t, int64_t, int64_t> check(const at::Tensor& x, const at::Tensor& w,
                                            const std::optional<at::Tensor>& ids, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous CPU tensors");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % multiple == 0, "in_features ", K, " must be a multiple of ", multiple);
  TORCH_CHECK(w.size(-1) == K, "x has ", K, " features, the weight ", w.size(-1));
  if (!ids.has_value()) {
    TORCH_CHECK(w.dim() == 2, "a weight without ids must be 2-D, got ", w.sizes());
    return {x.size(0), w.size(0), 1};
  }
  TORCH_CHECK(w.dim() == 3, "a weight with ids must be a [E, N, K] stack, got ", w.sizes());
  TORCH_CHECK(ids->dim() == 1 && ids->scalar_type() == at::kLong && ids->is_contiguous(), "ids must be int64 [M]");
  const int64_t M = ids->size(0), E = w.size(0);
  TORCH_CHECK(x.size(0) == M || x.size(0) == 1, "x has ", x.size(0), " rows for ", M, " ids");
  const int64_t* id = ids->data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(0 <= id[m] && id[m] < E, "expert id ", id[m], " out of [0, ", E, ")");
  return {M, w.size(1), E};
}

template <typename W>
at::Tensor linear_float(const at::Tensor& x_, const at::Tensor& w, const std::optional<at::Tensor>& ids) {
  const at::Tensor x = x_.contiguous();
  const auto [M, N, E] = check(x, w, ids, 8);
  const int64_t K = x.size(1), ldx = x.size(0) == 1 ? 0 : K;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const W* wp = reinterpret_cast<const W*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  for (const Rows& g : groups(M, ids)) {
    const int64_t rows = g.end - g.begin;
    const bool dequant = sizeof(W) == 2 && rows >= DEQUANT_MIN;
    const W* we = wp + g.expert * N * K;
    const float* xg = xp + g.begin * ldx;
    float* yg = yp + g.begin * N;
    at::parallel_for(0, (N + NC - 1) / NC, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> buf(dequant ? NC * K : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n = c * NC, nr = std::min(NC, N - n);
        if (dequant) {
          dequant_f16(reinterpret_cast<const uint16_t*>(we + n * K), K, nr, buf.data());
          tiles_f<float>(xg, ldx, rows, buf.data(), K, nr, yg + n, N);
        } else {
          tiles_f<W>(xg, ldx, rows, we + n * K, K, nr, yg + n, N);
        }
      }
    });
  }
  return y;
}

at::Tensor linear_f16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& ids) {
  TORCH_CHECK(w.scalar_type() == at::kHalf, "linear_f16 needs float16 weights, got ", w.scalar_type());
  return linear_float<uint16_t>(x, w, ids);
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& ids) {
  TORCH_CHECK(w.scalar_type() == at::kFloat, "linear_f32 needs float32 weights, got ", w.scalar_type());
  return linear_float<float>(x, w, ids);
}

at::Tensor linear_q8(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& d,
                     const std::optional<at::Tensor>& ids) {
  TORCH_CHECK(q.scalar_type() == at::kChar && d.scalar_type() == at::kHalf,
              "linear_q8 needs int8 weights and float16 scales, got ", q.scalar_type(), " / ", d.scalar_type());
  const at::Tensor x = x_.contiguous();
  const auto [M, N, E] = check(x, q, ids, QK);
  TORCH_CHECK(N % RG == 0, "packed int8 weights need out_features divisible by ", RG, ", got ", N);
  const int64_t K = x.size(1), nb = K / QK, Mx = x.size(0);
  TORCH_CHECK(d.is_contiguous() && d.numel() == E * N * nb, "scales must be contiguous [..., N, K / 32]");
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  float* yp = y.data_ptr<float>();
  const std::vector<Rows> gs = groups(M, ids);
  // int8 activations (and |x_q|) for every row; every row runs the same exact int32 block sums and fp32 scaling
  // whatever its batch (batch-invariant): on AVX2 without VNNI these match fp32 FMAs per weight and row (vpmaddubsw +
  // vpmaddwd vs a dequantized weight's FMA), so dequantizing to fp32 for large batches would only add its own cost
  const auto i8 = x.options().dtype(at::kChar);
  at::Tensor xq = at::empty({Mx, K}, i8), xa = at::empty({Mx, K}, i8), xd = at::empty({Mx, nb}, x.options());
  quantize_rows(x.data_ptr<float>(), Mx, K, K, xq.data_ptr<int8_t>(), xa.data_ptr<int8_t>(), xd.data_ptr<float>());
  const int64_t step = Mx == 1 ? 0 : 1;  // x row of output row m: m * step
  for (const Rows& g : groups(M, ids)) {
    const int8_t* qe = qp + g.expert * N * K;
    const uint16_t* de = dp + g.expert * N * nb;
    float* yg = yp + g.begin * N;
    at::parallel_for(0, (N + NC - 1) / NC, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n = c * NC, nr = std::min(NC, N - n);
        tiles_q8(xq.data_ptr<int8_t>() + g.begin * step * K, xa.data_ptr<int8_t>() + g.begin * step * K,
                 xd.data_ptr<float>() + g.begin * step * nb, step * K, step * nb, g.end - g.begin, qe + n * K,
                 de + n * nb, K, nr, yg + n, N);
      }
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(kimi_k2, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_f16", &linear_f16);
  m.impl("linear_q8", &linear_q8);
}
