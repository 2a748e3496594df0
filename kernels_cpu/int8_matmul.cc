// y[M, N] = x[M, K] @ (data[layer, K, N] * scales[layer, N]): int8 (and float8_e4m3fn) weight-only
// matmul for the CPU, an XLA FFI handler (see kernels_cpu/native.py, which compiles this file for the
// machine it runs on).
//
// Why it exists: XLA's CPU backend does not fuse an int8 -> f32 convert into a dot. It writes the
// dequantized weight out and reads it back, which makes decode compute-bound at about 1/3 of the
// memory bandwidth. Here each tile of W (up to 256 columns wide) is converted in registers and
// multiplied into up to 4 rows' accumulators, so W is read once per 4 rows of x and never written.
//
// The weight comes whole ([L, K, N], a layer stack) with the layer to use, so a layer loop hands the
// kernel its stacked weights without XLA copying the layer out first.
//
// Work is split by blocks of columns over the calling thread and the workers of parallel.h.

#include <algorithm>
#include <cmath>
#include <vector>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <thread>
#include <cstdlib>

#include <immintrin.h>

#include "kernels_cpu/half.h"
#include "kernels_cpu/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A tile is R rows of x by V vectors of columns; its R x V accumulators stay in registers
// (kAccRegs of the 32 zmm with AVX-512, of the 16 ymm with AVX2). One row takes the widest tile,
// so each row of W it reads is several cache lines long; work is dealt out in blocks of kBlock
// columns, a multiple of every tile's width.
constexpr int kAccRegs = kLanes;  // kernels_cpu/half.h: 16 with AVX-512, else 8
constexpr int64_t kBlock = 256;  // of the row-major layout; the blocked layout says its own
constexpr int kPrefetchRows = 8;  // rows of W ahead of the one being read


// A float8_e4m3fn weight (FP8 checkpoints, `--quantization fp8`): its bits, read by the float path
// only. Widened through float16: e4m3's sign, exponent and mantissa shifted into float16's places
// (bits & 0x7f) << 7, sign << 8, are a float16 of value / 256 for normals and subnormals alike (both
// exponent biases differ by 8, and e4m3's subnormals land on float16's subnormals), and the 256 goes
// into the column scale once (kWeightFactor). In vectors the byte is sign-extended to 16 bits and
// shifted left by 7: the sign lands in bits 14 and 15, and one mask (0xbf80) clears bit 14, so a
// vector takes the widening load, a shift, an and and the conversion (it had taken two ands, two
// shifts and an or: 1.24x at one row, 1.10x at 8 and 32 on 1.5B-sized shapes, Zen 3, AVX2). e4m3fn's NaN (0x7f/0xff) reads as 480; a checkpoint's weights hold none.
struct Fp8 {
  uint8_t bits;
};

template <typename W>
constexpr float kWeightFactor = 1.0f;
template <>
constexpr float kWeightFactor<Fp8> = 256.0f;

inline uint16_t Fp8AsHalfBits(uint8_t b) {
  return static_cast<uint16_t>(((b & 0x7fu) << 7) | ((b & 0x80u) << 8));
}

// One weight as a float (times kWeightFactor), for the last, narrower columns.
inline float ScalarWeight(int8_t w) { return static_cast<float>(w); }
inline float ScalarWeight(Fp8 w) { return HalfToFloat(Fp8AsHalfBits(w.bits)); }

// kLanes float8_e4m3fn -> float / 256.
inline VecF LoadConvert(const Fp8* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(static_cast<int16_t>(0xbf80)));
  return reinterpret_cast<VecF>(_mm512_cvtph_ps(bits));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i bits = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(static_cast<int16_t>(0xbf80)));
  return reinterpret_cast<VecF>(_mm256_cvtph_ps(bits));
#else
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = ScalarWeight(p[i]);
  return v;
#endif
}

// kLanes int8 -> float (GCC scalarizes __builtin_convertvector for this, hence the intrinsics).
inline VecF LoadConvert(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<VecF>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<VecF>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// out[i] = acc[i] * scales[i] for i < count (count >= 1): a whole vector in one multiply and store
// (it had been a scalar conversion and store per column: 30% of a prefill matmul's time at K = 576),
// the last columns of an N that is not a multiple of kLanes one by one (the scales end at N).
// `factor` (kWeightFactor: a power of two, so exact) scales acc first.
inline void StoreScaled(float* out, VecF acc, const uint16_t* scales, int64_t count, float factor = 1.0f) {
  if (factor != 1.0f) acc *= factor;
  if (count >= kLanes) {
    const VecF v = acc * LoadHalf(scales);
    std::memcpy(out, &v, sizeof v);
    return;
  }
  float lane[kLanes];
  std::memcpy(lane, &acc, sizeof lane);
  for (int64_t i = 0; i < count; ++i) out[i] = lane[i] * HalfToFloat(scales[i]);
}

// A weight's column scales: one per column (`group` 0), or one per `group` rows of K and column
// ([K / group, N], FP8 checkpoints' 128 x 128 blocks), which the tile applies group by group.
struct Scales {
  const uint16_t* data;
  int64_t group;
};

// acc[r][j] += x[m0 + r, k] * W[k, j-th vector] for k in [k0, k1): the full-width tile's inner loop,
// per channel over all of K and grouped over each group. `row` points at W's row k0 of the tile.
template <int64_t R, int V, typename W>
__attribute__((always_inline)) inline void AccumulateRows(const float* x, const W* row, int64_t stride,
                                                          int64_t k_dim, int64_t m0, int64_t k0, int64_t k1,
                                                          VecF (&acc)[R][V]) {
  constexpr int64_t kWidth = V * kLanes;
  for (int64_t k = k0; k < k1; ++k, row += stride) {
    if (k + kPrefetchRows < k_dim) {
      for (int64_t line = 0; line < kWidth; line += 64) __builtin_prefetch(row + kPrefetchRows * stride + line);
    }
    VecF wv[V];
    for (int j = 0; j < V; ++j) wv[j] = LoadConvert(row + j * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const VecF xv = VecF{} + x[(m0 + r) * k_dim + k];
      for (int j = 0; j < V; ++j) acc[r][j] += xv * wv[j];
    }
  }
}

// The same for the last, narrower columns (`width` of them), one weight at a time.
template <int64_t R, int64_t kWidth, typename W>
__attribute__((always_inline)) inline void AccumulateColumns(const float* x, const W* w, int64_t stride,
                                                             int64_t k_dim, int64_t m0, int64_t width, int64_t k0,
                                                             int64_t k1, float (&acc)[R][kWidth]) {
  for (int64_t k = k0; k < k1; ++k) {
    const W* row = w + k * stride;
    for (int64_t r = 0; r < R; ++r) {
      const float xv = x[(m0 + r) * k_dim + k];
      for (int64_t j = 0; j < width; ++j) acc[r][j] += xv * ScalarWeight(row[j]);
    }
  }
}

// Rows [m0, m0 + R) of y, columns [n0, n0 + width): width <= V * kLanes. `w` points at the tile's
// first weight (row 0, column n0); consecutive rows of W are `stride` bytes apart. W: int8_t or Fp8.
// kGrouped: scales per group of rows, each group's sums scaled into a second set of accumulators.
template <int64_t R, int V, typename W, bool kGrouped>
inline void Tile(const float* x, const W* w, int64_t stride, Scales sc, float* y,
                 int64_t k_dim, int64_t n_dim, int64_t m0, int64_t n0, int64_t width) {
  constexpr int64_t kWidth = V * kLanes;
  const uint16_t* scales = sc.data;
  if (kGrouped && width == kWidth) {
    VecF total[R][V] = {};
    for (int64_t g0 = 0; g0 < k_dim; g0 += sc.group) {
      VecF acc[R][V] = {};
      AccumulateRows<R, V>(x, w + g0 * stride, stride, k_dim, m0, g0, g0 + sc.group, acc);
      for (int j = 0; j < V; ++j) {
        const VecF scale = LoadHalf(scales + g0 / sc.group * n_dim + n0 + j * kLanes) * kWeightFactor<W>;
        for (int64_t r = 0; r < R; ++r) total[r][j] += acc[r][j] * scale;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int j = 0; j < V; ++j) std::memcpy(y + (m0 + r) * n_dim + n0 + j * kLanes, &total[r][j], sizeof(VecF));
    }
    return;
  }
  if (kGrouped) {  // the last, narrower columns
    float total[R][kWidth] = {};
    for (int64_t g0 = 0; g0 < k_dim; g0 += sc.group) {
      float acc[R][kWidth] = {};
      AccumulateColumns<R, kWidth>(x, w, stride, k_dim, m0, width, g0, g0 + sc.group, acc);
      for (int64_t j = 0; j < width; ++j) {
        const float scale = HalfToFloat(scales[g0 / sc.group * n_dim + n0 + j]) * kWeightFactor<W>;
        for (int64_t r = 0; r < R; ++r) total[r][j] += acc[r][j] * scale;
      }
    }
    for (int64_t r = 0; r < R; ++r) std::memcpy(y + (m0 + r) * n_dim + n0, total[r], width * sizeof(float));
    return;
  }
  if (width == kWidth) {
    VecF acc[R][V] = {};
    AccumulateRows<R, V>(x, w, stride, k_dim, m0, 0, k_dim, acc);
    for (int64_t r = 0; r < R; ++r) {
      for (int j = 0; j < V; ++j) {
        StoreScaled(y + (m0 + r) * n_dim + n0 + j * kLanes, acc[r][j], scales + n0 + j * kLanes, kLanes,
                    kWeightFactor<W>);
      }
    }
    return;
  }
  float acc[R][kWidth] = {};  // the last, narrower columns
  AccumulateColumns<R, kWidth>(x, w, stride, k_dim, m0, width, 0, k_dim, acc);
  for (int64_t r = 0; r < R; ++r) {
    float* out = y + (m0 + r) * n_dim + n0;
    for (int64_t j = 0; j < width; ++j) out[j] = acc[r][j] * kWeightFactor<W> * HalfToFloat(scales[n0 + j]);
  }
}

// Rows [m0, m0 + R) of y, columns [c0, c1) of one block; `w` as in Tile, for column c0. The widest
// tiles first, then narrower ones for what is left of the block.
template <int64_t R, typename W, bool kGrouped>
inline void Columns(const float* x, const W* w, int64_t stride, Scales scales, float* y,
                    int64_t k_dim, int64_t n_dim, int64_t m0, int64_t c0, int64_t c1) {
  // Grouped tiles hold two sets of accumulators: half as many columns.
  constexpr int kMaxV = (R == 3 ? kAccRegs / 4 : kAccRegs / R) / (kGrouped ? 2 : 1);
  int64_t n0 = c0;
  auto tiles = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    if constexpr (V <= kMaxV) {
      for (; c1 - n0 >= V * kLanes; n0 += V * kLanes) {
        Tile<R, V, W, kGrouped>(x, w + (n0 - c0), stride, scales, y, k_dim, n_dim, m0, n0, V * kLanes);
      }
    }
  };
  tiles(std::integral_constant<int, 16>{});
  tiles(std::integral_constant<int, 8>{});
  tiles(std::integral_constant<int, 4>{});
  tiles(std::integral_constant<int, 2>{});
  tiles(std::integral_constant<int, 1>{});
  if (n0 < c1) Tile<R, 1, W, kGrouped>(x, w + (n0 - c0), stride, scales, y, k_dim, n_dim, m0, n0, c1 - n0);
}

// Calls rows(std::integral_constant<int64_t, R>, m0) over [0, m_dim) in passes of 4 rows, then one
// pass of the 1-3 left: each pass reads the weights once.
template <typename Rows>
inline void RowPasses(int64_t m_dim, Rows rows) {
  int64_t m0 = 0;
  for (; m0 + 4 <= m_dim; m0 += 4) rows(std::integral_constant<int64_t, 4>{}, m0);
  switch (m_dim - m0) {
    case 3: rows(std::integral_constant<int64_t, 3>{}, m0); break;
    case 2: rows(std::integral_constant<int64_t, 2>{}, m0); break;
    case 1: rows(std::integral_constant<int64_t, 1>{}, m0); break;
    default: break;
  }
}

// Every row of y, columns [c0, c1) of one block of kBlock columns.
template <typename W>
void Block(const float* x, const W* w, int64_t stride, Scales scales, float* y, int64_t m_dim,
           int64_t k_dim, int64_t n_dim, int64_t c0, int64_t c1) {
  RowPasses(m_dim, [&](auto r, int64_t m0) {
    if (scales.group) {
      Columns<decltype(r)::value, W, true>(x, w, stride, scales, y, k_dim, n_dim, m0, c0, c1);
    } else {
      Columns<decltype(r)::value, W, false>(x, w, stride, scales, y, k_dim, n_dim, m0, c0, c1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The integer path ("vnni" layout): x is quantized to int8 per row in blocks of 32 (one float scale
// per block, as llama.cpp's Q8_0 activations), and W's int8 values meet x's in integer dot
// products of 4 pairs (AVX-512 VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd), which do several times
// the multiply-adds per cycle of float FMAs. Layout: [NB, K / 4, B, 4]: in each block of B columns,
// the 4 consecutive k of a column are adjacent, as the dot instructions take them.
//
// Contract: weights of this layout lie in [-127, 127]. The AVX2 dot takes w's sign from x with
// vpsignb, and -(-128) does not fit an int8 (it stays -128), so a weight of -128 would give wrong
// products. jaxinfer.quant's quantizer clips to [-127, 127]; kernels_cpu/native.py's to_vnni, which
// lays weights out for this path, refuses a -128. x is quantized here to [-127, 127] for the same reason.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kQBlock = 32;  // x values per activation scale

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kILanes = 16;  // int32 lanes (columns) per vector
typedef __m512i VecI;
inline VecI LoadI(const int8_t* p) { return _mm512_loadu_si512(p); }
inline VecI Bcast(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
// vpdpbusd multiplies unsigned bytes (its first operand) by signed ones. In a pass of several rows,
// W's bytes are made unsigned (w + 128, an XOR of the sign bit) as they are loaded, once per vector
// for all the rows, and the 128 * sum(x) this adds to a block's sums is taken off at the block's end
// from x's code sums (QuantizeRows). It had been x made unsigned and 128 * sum(w) computed by one more
// dot product per W vector: a fifth of a 4-row pass's dot products, where an XOR takes none. A pass
// of one row (batch-1 decode, which streams W from memory) makes x unsigned instead and keeps that
// dot product, with W as the dots' memory operand: 9-11% faster there than W loaded and XORed. Both
// give the same exact int32 sums, so a row's result does not depend on the pass it is in.
inline VecI Unsigned(VecI v) { return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80))); }
inline VecI Dot(VecI acc, VecI u, VecI s) { return _mm512_dpbusd_epi32(acc, u, s); }
constexpr bool kOffsetW = true;
inline VecF ToFloat(VecI v) { return reinterpret_cast<VecF>(_mm512_cvtepi32_ps(v)); }
inline VecI Sub(VecI a, int32_t b) { return _mm512_sub_epi32(a, _mm512_set1_epi32(b)); }
inline VecI Sub(VecI a, VecI b) { return _mm512_sub_epi32(a, b); }
inline VecI ZeroI() { return _mm512_setzero_si512(); }
#elif defined(__AVX2__)
constexpr int kILanes = 8;
typedef __m256i VecI;
inline VecI LoadI(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI Bcast(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline VecI Unsigned(VecI v) { return v; }  // unused (kOffsetW is false)
// |x| (unsigned) times w with x's sign, so that pairs of products never saturate int16
// (2 * 127 * 127 < 32767). Needs w != -128 (the layout's contract above).
inline VecI Dot(VecI acc, VecI w, VecI x) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
constexpr bool kOffsetW = false;
inline VecF ToFloat(VecI v) { return reinterpret_cast<VecF>(_mm256_cvtepi32_ps(v)); }
inline VecI Sub(VecI a, int32_t b) { return _mm256_sub_epi32(a, _mm256_set1_epi32(b)); }
inline VecI Sub(VecI a, VecI b) { return _mm256_sub_epi32(a, b); }
inline VecI ZeroI() { return _mm256_setzero_si256(); }
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
constexpr bool kHasIntegerPath = true;
static_assert(kILanes == kLanes, "float and int vectors must have the same lanes");

// Rows [m0, m0 + R) of y, V vectors of columns from n0 (all within one block of `block` columns,
// `w` pointing at the block's first byte and `col` the tile's first column in the block). kNext: a
// pass after the block's first, which issues the next block's prefetches (parallel.h's NextBlock).
template <int64_t R, int V, bool kNext>
inline void ITile(const uint8_t* xq, const float* xs, const int32_t* xsums, const int8_t* w, int64_t block,
                  int64_t col, const uint16_t* scales, float* y, int64_t k_dim, int64_t n_dim, int64_t m0, int64_t n0,
                  jaxinfer::NextBlock& next) {
  VecF acc[R][V] = {};
  const int64_t quad_stride = block * 4;  // bytes per 4 rows of k
  const int64_t k_blocks = k_dim / kQBlock;
  const int8_t* wp = w + col * 4;
  constexpr bool kOneRow = kOffsetW && R == 1;  // x made unsigned, W signed (see Unsigned)
  const VecI offset = Unsigned(ZeroI());  // 128 in every byte
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    VecI iacc[R][V], corr[V];
    for (int j = 0; j < V; ++j) {
      corr[j] = ZeroI();
      for (int64_t r = 0; r < R; ++r) iacc[r][j] = ZeroI();
    }
    for (int64_t q = 0; q < kQBlock / 4; ++q, wp += quad_stride) {
      const int64_t k = kb * kQBlock + q * 4;
      __builtin_prefetch(wp + 8 * quad_stride);
      if constexpr (kNext) next.Step();
      if constexpr (kOneRow) {
        const VecI xb = Unsigned(Bcast(xq + m0 * k_dim + k));
        for (int j = 0; j < V; ++j) {
          const VecI wv = LoadI(wp + j * kILanes * 4);
          iacc[0][j] = Dot(iacc[0][j], xb, wv);
          corr[j] = Dot(corr[j], offset, wv);
        }
      } else {
        VecI wv[V];
        for (int j = 0; j < V; ++j) wv[j] = kOffsetW ? Unsigned(LoadI(wp + j * kILanes * 4)) : LoadI(wp + j * kILanes * 4);
        for (int64_t r = 0; r < R; ++r) {
          const VecI xb = Bcast(xq + (m0 + r) * k_dim + k);
          for (int j = 0; j < V; ++j) iacc[r][j] = Dot(iacc[r][j], wv[j], xb);
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * k_blocks + kb;
      const VecF scale = VecF{} + xs[i];
      for (int j = 0; j < V; ++j) {
        const VecI exact = kOneRow ? Sub(iacc[r][j], corr[j]) : kOffsetW ? Sub(iacc[r][j], 128 * xsums[i]) : iacc[r][j];
        acc[r][j] += ToFloat(exact) * scale;
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) {
      const int64_t col = n0 + j * kLanes;  // the block's padding columns (col >= N) are not stored
      if (col < n_dim) StoreScaled(y + (m0 + r) * n_dim + col, acc[r][j], scales + col, n_dim - col);
    }
  }
}

template <int64_t R, bool kNext>
inline void IColumns(const uint8_t* xq, const float* xs, const int32_t* xsums, const int8_t* w, int64_t block,
                     const uint16_t* scales, float* y, int64_t k_dim, int64_t n_dim, int64_t m0, int64_t c0,
                     jaxinfer::NextBlock& next) {
  constexpr int kMaxV = jaxinfer::TileVectors(R);
  int64_t col = 0;
  for (; col + kMaxV * kLanes <= block; col += kMaxV * kLanes) {
    ITile<R, kMaxV, kNext>(xq, xs, xsums, w, block, col, scales, y, k_dim, n_dim, m0, c0 + col, next);
  }
  for (; col < block; col += kLanes) {
    ITile<R, 1, kNext>(xq, xs, xsums, w, block, col, scales, y, k_dim, n_dim, m0, c0 + col, next);
  }
}

// Every row of y, one block of `block` columns from c0 (the block's padding columns are not stored).
// `prefetch_next`: the block after it is this thread's too, and comes into L2 during the passes
// after the first (parallel.h's NextBlock).
void IBlock(const uint8_t* xq, const float* xs, const int32_t* xsums, const int8_t* w, int64_t block,
            const uint16_t* scales, float* y, int64_t m_dim, int64_t k_dim, int64_t n_dim, int64_t c0,
            bool prefetch_next) {
  const int64_t block_bytes = k_dim * block;
  jaxinfer::NextBlock none, next;
  if (prefetch_next) {
    next = jaxinfer::NextBlock(w + block_bytes, block_bytes, jaxinfer::LaterPassTiles(m_dim, block, kLanes) * k_dim / 4);
  }
  RowPasses(m_dim, [&](auto r, int64_t m0) {
    if (m0 > 0 && next.active()) {
      IColumns<decltype(r)::value, true>(xq, xs, xsums, w, block, scales, y, k_dim, n_dim, m0, c0, next);
    } else {
      IColumns<decltype(r)::value, false>(xq, xs, xsums, w, block, scales, y, k_dim, n_dim, m0, c0, none);
    }
  });
}

// x [M, K] -> int8 per block of 32, the blocks' scales and the sums of their codes (for kOffsetW):
// q = round(v * 127 / amax), to nearest even. With AVX-512 in vector code (it had been 4% of a
// prefill step in scalar code) that gives the scalar rule's results: max is exact, v * inv rounds
// once either way, and vcvtps2dq rounds as nearbyint does.
void QuantizeRows(const float* x, int64_t m0, int64_t m1, int64_t k_dim, uint8_t* xq, float* xs, int32_t* xsums) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t kb = 0; kb < k_dim / kQBlock; ++kb) {
      const float* v = x + m * k_dim + kb * kQBlock;
      uint8_t* q = xq + m * k_dim + kb * kQBlock;
      const int64_t i = m * (k_dim / kQBlock) + kb;
#if defined(__AVX512F__)
      static_assert(kQBlock == 32, "two vectors of 16 per block");
      const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
      // max(|v|, acc): a NaN lane keeps acc, as std::max(amax, fabs(v)) keeps amax.
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_abs_ps(b), _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps())));
#else
      float amax = 0;
      for (int64_t j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
#endif
      const float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
      xs[i] = scale;
#if defined(__AVX512F__)
      const __m512 inv_v = _mm512_set1_ps(inv);
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv_v)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv_v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
      xsums[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
      int32_t sum = 0;
      for (int64_t j = 0; j < kQBlock; ++j) {
        const int code = static_cast<int>(std::nearbyint(v[j] * inv));
        q[j] = static_cast<uint8_t>(static_cast<int8_t>(code));
        sum += code;
      }
      xsums[i] = sum;
#endif
    }
  }
}

// Many rows (a prefill chunk) are split between the threads.
void QuantizeX(const float* x, int64_t m_dim, int64_t k_dim, uint8_t* xq, float* xs, int32_t* xsums) {
  jaxinfer::Workers::Get().ParallelRows(m_dim, 16, [&](int64_t m0, int64_t m1) {
    QuantizeRows(x, m0, m1, k_dim, xq, xs, xsums);
  });
}
#else
constexpr bool kHasIntegerPath = false;
#endif

// One weight of a call: layer `l` of data [L, K, N] (row-major), [L, NB, K, B] (blocked: each block of
// B columns contiguous, the last zero-padded past N), int8 or float8_e4m3fn, or [L, NB, K / 4, B, 4]
// ("vnni", the integer path, int8 only), with its scales [L, N] float16 (or, not "vnni", [L, K / G,
// N]: one per G rows), and its output y [M, N].
struct Weight {
  const int8_t* w;  // the bytes of Fp8 where `fp8`
  const uint16_t* scales;
  float* y;
  int64_t n, block, num_blocks;
  bool blocked, vnni, fp8;
  int64_t group;  // rows per scale; 0: one scale per column
};

ffi::Error DecodeWeight(int64_t m, int64_t k, ffi::AnyBuffer data, ffi::Buffer<ffi::F16> scales, int32_t l,
                        ffi::Result<ffi::Buffer<ffi::F32>>& y, Weight* out) {
  auto wd = data.dimensions();
  const bool blocked = wd.size() == 4, vnni = wd.size() == 5;
  const bool fp8 = data.element_type() == ffi::DataType::F8E4M3FN;
  if (wd.size() < 3 || wd.size() > 5 || (data.element_type() != ffi::DataType::S8 && !fp8) || (fp8 && vnni)) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: x must be [M, K] and data int8 [L, K, N], [L, NB, K, B] or [L, NB, K / 4, B, 4], "
        "or float8_e4m3fn [L, K, N] or [L, NB, K, B]");
  }
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != m) return ffi::Error::InvalidArgument("int8_matmul: y must be [M, N]");
  const int64_t num_layers = wd[0], n = yd[1];
  const int64_t block = vnni ? wd[3] : blocked ? wd[3] : kBlock;  // columns per block
  bool shapes_ok = block > 0 && (blocked || vnni ? wd[1] == (n + block - 1) / block : wd[2] == n);
  shapes_ok &= vnni ? (wd[2] * 4 == k && wd[4] == 4 && k % kQBlock == 0 && block % kLanes == 0 && kHasIntegerPath)
                    : blocked ? wd[2] == k : wd[1] == k;
  auto sd = scales.dimensions();
  const int64_t groups = sd.size() == 3 ? sd[1] : 1;  // [L, K / G, N] or [L, N]
  shapes_ok &= (sd.size() == 2 || (sd.size() == 3 && !vnni && groups > 0 && k % groups == 0)) && sd[0] == num_layers &&
               sd[sd.size() - 1] == n;
  if (!shapes_ok) return ffi::Error::InvalidArgument("int8_matmul: x, data and scales shapes disagree");
  if (l < 0 || l >= num_layers) return ffi::Error::InvalidArgument("int8_matmul: layer out of range");
  const int64_t num_blocks = (n + block - 1) / block;
  const int64_t layer_size = blocked || vnni ? num_blocks * k * block : k * n;
  *out = Weight{static_cast<const int8_t*>(data.untyped_data()) + static_cast<int64_t>(l) * layer_size,
                reinterpret_cast<const uint16_t*>(scales.typed_data()) + static_cast<int64_t>(l) * groups * n,
                y->typed_data(), n, block, num_blocks, blocked, vnni, fp8, sd.size() == 3 ? k / groups : 0};
  return ffi::Error::Success();
}

// y_i = x @ W_i for every weight of `weights`: x quantized once (where a weight takes the integer
// path), the blocks of all of them dealt out to the threads as one matmul's.
void Run(const float* xp, int64_t m, int64_t k, const std::vector<Weight>& weights) {
  std::vector<int64_t> num_blocks;
  bool any_vnni = false;
  for (const Weight& w : weights) {
    num_blocks.push_back(w.num_blocks);
    any_vnni |= w.vnni;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
  uint8_t* xq = nullptr;
  float* xs = nullptr;
  int32_t* xsums = nullptr;
  if (any_vnni) {
    xq = jaxinfer::Scratch<uint8_t, 0>(m * k);
    xs = jaxinfer::Scratch<float, 1>(m * (k / kQBlock));
    xsums = jaxinfer::Scratch<int32_t, 2>(m * (k / kQBlock));
    QuantizeX(xp, m, k, xq, xs, xsums);
  }
#endif
  jaxinfer::Workers::Get().ParallelTilesOf(m, num_blocks, [&](int64_t i, int64_t b0, int64_t b1, int64_t m0,
                                                              int64_t m1) {
    const Weight& w = weights[i];
    const int64_t n = w.n, block = w.block;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * block, c1 = std::min(n, c0 + block);
      if (w.vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
        IBlock(xq + m0 * k, xs + m0 * (k / kQBlock), xsums + m0 * (k / kQBlock), w.w + b * k * block, block, w.scales,
               w.y + m0 * n, m1 - m0, k, n, c0, b + 1 < b1);
#endif
      } else {
        // blocked: block b's [K, B] from its start, rows `block` apart; row-major: column c0, rows n apart
        const int64_t start = w.blocked ? b * k * block : c0, stride = w.blocked ? block : n;
        const Scales scales{w.scales, w.group};
        if (w.fp8) {
          Block(xp + m0 * k, reinterpret_cast<const Fp8*>(w.w) + start, stride, scales, w.y + m0 * n, m1 - m0,
                k, n, c0, c1);
        } else {
          Block(xp + m0 * k, w.w + start, stride, scales, w.y + m0 * n, m1 - m0, k, n, c0, c1);
        }
      }
    }
  });
}

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data, ffi::Buffer<ffi::F16> scales,
                          ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("int8_matmul: x must be [M, K]");
  std::vector<Weight> weights(1);
  ffi::Error error = DecodeWeight(xd[0], xd[1], data, scales, *layer.typed_data(), y, &weights[0]);
  if (error.failure()) return error;
  Run(x.typed_data(), xd[0], xd[1], weights);
  return ffi::Error::Success();
}

// Several weights of one x (fused projections): x, layer, then (data, scales) per weight; y per weight.
ffi::Error Int8MatmulFusedImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs args,
                               ffi::RemainingRets rets) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("int8_matmul_fused: x must be [M, K]");
  if (args.size() != 2 * rets.size() || rets.size() == 0) {
    return ffi::Error::InvalidArgument("int8_matmul_fused: takes (data, scales) per output");
  }
  std::vector<Weight> weights(rets.size());
  for (size_t i = 0; i < rets.size(); ++i) {
    auto data = args.get<ffi::AnyBuffer>(2 * i);
    auto scales = args.get<ffi::Buffer<ffi::F16>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!data.has_value() || !scales.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("int8_matmul_fused: data must be int8 or float8_e4m3fn, scales float16, y float32");
    }
    ffi::Error error = DecodeWeight(xd[0], xd[1], *data, *scales, *layer.typed_data(), *y, &weights[i]);
    if (error.failure()) return error;
  }
  Run(x.typed_data(), xd[0], xd[1], weights);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8MatmulFused, Int8MatmulFusedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// Whether this build has the integer ("vnni" layout) path: AVX-512 VNNI or AVX2.
extern "C" int JaxinferHasIntegerPath() { return kHasIntegerPath ? 1 : 0; }

// The instruction sets this build was compiled for (-march=native with JAXINFER_NATIVE_CFLAGS), of
// those that pick the kernels' paths: native.py's instruction_sets() reports them with benchmarks,
// since the same machine name has come with and without AVX-512.
extern "C" const char* JaxinferInstructionSets() {
  return ""
#if defined(__AVX512F__)
         " avx512f"
#endif
#if defined(__AVX512BW__)
         " avx512bw"
#endif
#if defined(__AVX512VNNI__)
         " avx512vnni"
#endif
#if defined(__AVX2__)
         " avx2"
#endif
#if defined(__FMA__)
         " fma"
#endif
#if defined(__F16C__)
         " f16c"
#endif
      ;
}
