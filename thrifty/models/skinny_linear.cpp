// thrifty::skinny_linear(x, weight): x @ weight^T in float32 for a few rows of x, on AVX-512 CPUs.
//
// A decode or verify step multiplies 1-17 rows by each weight, so it is bound by reading the
// weight once; the work is how to keep the FMA units busy while it streams in. Each output is the
// dot product of a row of x with a row of the weight, over K in steps of 16 lanes, then the lanes
// summed in a fixed order. Tiles of 4 weight rows x up to 4 rows of x keep 16 accumulators in
// registers; the weight tile stays in L1 while every row of x passes over it, and the next tiles
// are prefetched into L2 as the first pass streams the current one.
//
// An output's arithmetic depends only on its row of x and its row of the weight: never on how many
// rows are multiplied together, on the tiling, or on the thread count. So a verify step's rows get
// the very bits a one-row step gives each of them (batch invariance).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int kWeightRows = 4;        // weight rows per tile
constexpr int kInputRows = 4;         // rows of x per tile
constexpr int64_t kPrefetchTiles = 4;  // how far ahead the weight is prefetched, in tiles

template <int NB, int MB>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t prefetch) {
  __m512 acc[NB][MB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB];
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) wv[i] = _mm512_loadu_ps(w + i * K + k);
    if (prefetch) {
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + prefetch + i * K + k), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) {
      const __m512 xv = _mm512_loadu_ps(x + j * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 16 columns, through a mask
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + j * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + i * K + k), xv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < MB; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) y[j * N + i] = _mm512_reduce_add_ps(acc[i][j]);
}

// All M rows of x against NB rows of the weight (w), into columns [0, NB) of y.
template <int NB>
void weight_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t prefetch) {
  int64_t m = 0;
  for (; m + kInputRows <= M; m += kInputRows) {
    // Only the first pass over the tile prefetches: the others find it in L1.
    tile<NB, kInputRows>(x + m * K, w, y + m * N, K, N, m == 0 ? prefetch : 0);
  }
  const int64_t pf = m == 0 ? prefetch : 0;
  switch (M - m) {
    case 3: tile<NB, 3>(x + m * K, w, y + m * N, K, N, pf); break;
    case 2: tile<NB, 2>(x + m * K, w, y + m * N, K, N, pf); break;
    case 1: tile<NB, 1>(x + m * K, w, y + m * N, K, N, pf); break;
    default: break;
  }
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "thrifty::skinny_linear takes float32 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "thrifty::skinny_linear runs on the CPU");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "thrifty::skinny_linear: x is ", x.sizes(),
              " and the weight ", weight.sizes(), "; x's last dimension must be the weight's second");
  const at::Tensor w = weight.contiguous();
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t M = rows.size(0), K = rows.size(1), N = w.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = rows.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t tiles = N / kWeightRows;
  const int64_t ahead = kPrefetchTiles * kWeightRows * K;
  // Each thread streams one contiguous range of weight rows.
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t prefetch = t + kPrefetchTiles < end ? ahead : 0;
      weight_rows<kWeightRows>(xp, wp + t * kWeightRows * K, yp + t * kWeightRows, M, K, N, prefetch);
    }
  });
  for (int64_t n = tiles * kWeightRows; n < N; ++n) weight_rows<1>(xp, wp + n * K, yp + n, M, K, N, 0);
  return y.reshape(sizes);
}

}  // namespace

// The schema is defined in skinny_linear.py, with the shape function that export needs.
TORCH_LIBRARY_IMPL(thrifty, CPU, m) { m.impl("skinny_linear", TORCH_FN(skinny_linear)); }
