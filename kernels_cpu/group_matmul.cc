// y[M, N] = x[M, K] @ W for weights quantized in groups of G rows (32, as GGUF's Q8_0, Q4_0 and Q4_1
// blocks store them; 64 or 128, as AWQ, GPTQ and compressed-tensors int4 checkpoints do):
// W[k, n] = scale[k / G, n] * code[k, n] + min[k / G, n], with unsigned codes (8-bit: Q8_0's value +
// 128; 4-bit: the nibbles) and float16 scales and mins. An XLA FFI handler (kernels_cpu/native.py
// lays the weights out and calls it).
//
// Why it exists: it runs a GGUF file's own blocks, with nothing requantized. Requantizing a file's
// 4-bit blocks to per-channel int8 and then quantizing activations stacks two errors; this adds only
// the second, as llama.cpp does: x is quantized per row in blocks of 32 (int8 and one float scale,
// llama.cpp's Q8 activations), each block's codes meet x's in integer dot products (AVX-512 VNNI
// vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd), and per block of 32
//   y += (dot(code, xq) * x_scale) * scale + (x_scale * sum(xq)) * min,
// scale and min those of the weight group that holds the block (G / 32 blocks share them).
// A 4-bit weight is read as 4 bits (two codes a byte): batch-1 decode streams the file's bytes.
//
// Every row of y is computed by the same instructions in the same order whatever the other rows
// are, so a sequence's result does not depend on what shares its batch.
//
// Layouts, per layer, in blocks of B = 64 columns (a tile of the single-row pass):
//   8-bit: codes [NB, K / 4, B, 4]: each column's 4 consecutive k adjacent, as vpdpbusd takes them;
//   4-bit: codes [NB, K / 32, 4, B, 4]: byte (g, p, c, i) holds k = 32 g + 4 p + i in its low nibble
//          and k + 16 in its high nibble, so one load gives two quads of k for 16 columns.
//   scales, mins: [K / G, N] float16, G = K / (their rows): 32 times a power of two. Symmetric
//   formats have no mins: min = -zero_point * scale (Q8_0: 128, Q4_0: 8).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "kernels_cpu/group_simd.h"
#include "kernels_cpu/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroup = 32;  // x values per activation scale; the weights' groups are 2^shift of these

constexpr int64_t kBlock = 64;  // columns per block of the layouts

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)

struct Problem {
  const int8_t* xq;    // [M, K] activations, int8 per block of 32
  const float* xs;     // [M, K / 32] their scales
  const float* xsums;  // [M, K / 32] scale * sum of the block's int8 values
  const uint8_t* codes;  // this layer's codes (layout above)
  const uint16_t* scales;  // this layer's [K / G, N]
  const uint16_t* mins;    // this layer's [K / G, N], or null: min = -zero_point * scale
  float zero_point;
  float* y;
  int64_t m, k, n;
  int bits;
  int group_shift;  // G = 32 << group_shift rows per weight scale
};

using jaxinfer::NextBlock;

// Rows [m0, m0 + R) of y, V vectors of columns from n0 = c0 + col, in the block that starts at c0.
// kNext: a pass after the block's first, issuing the next block's prefetches (parallel.h's NextBlock).
template <int64_t R, int V, int Bits, bool kNext>
inline void Tile(const Problem& p, const uint8_t* block_codes, int64_t col, int64_t m0, int64_t n0,
                 NextBlock& next) {
  const int64_t groups = p.k / kGroup;
  VecF acc[R][V];
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) acc[r][j] = Zero();
  }
  for (int64_t g = 0; g < groups; ++g) {
    VecI iacc[R][V];
    for (int64_t r = 0; r < R; ++r) {
      for (int j = 0; j < V; ++j) iacc[r][j] = ZeroI();
    }
    if constexpr (Bits == 8) {
      const uint8_t* wp = block_codes + (g * (kGroup / 4) * kBlock + col) * 4;
      for (int64_t q = 0; q < kGroup / 4; ++q, wp += kBlock * 4) {
        __builtin_prefetch(wp + 8 * kBlock * 4);
        if constexpr (kNext) next.Step();
        VecI wv[V];
        for (int j = 0; j < V; ++j) wv[j] = LoadI(wp + j * kLanes * 4);
        for (int64_t r = 0; r < R; ++r) {
          const VecI xb = Bcast(p.xq + (m0 + r) * p.k + g * kGroup + q * 4);
          for (int j = 0; j < V; ++j) iacc[r][j] = Dot8(iacc[r][j], wv[j], xb);
        }
      }
    } else {
      const uint8_t* wp = block_codes + (g * 4 * kBlock + col) * 4;
      for (int64_t q = 0; q < 4; ++q, wp += kBlock * 4) {
        __builtin_prefetch(wp + 8 * kBlock * 4);
        if constexpr (kNext) next.Step();
        VecI lo[V], hi[V];
        for (int j = 0; j < V; ++j) {
          const VecI raw = LoadI(wp + j * kLanes * 4);
          lo[j] = LowNibbles(raw);
          hi[j] = HighNibbles(raw);
        }
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* xr = p.xq + (m0 + r) * p.k + g * kGroup + q * 4;
          const VecI xlo = Bcast(xr), xhi = Bcast(xr + 16);
          for (int j = 0; j < V; ++j) iacc[r][j] = Dot4(Dot4(iacc[r][j], lo[j], xlo), hi[j], xhi);
        }
      }
    }
    VecF scale[V], min[V];
    const int64_t factors = (g >> p.group_shift) * p.n + n0;
    for (int j = 0; j < V; ++j) {
      scale[j] = LoadHalf(p.scales + factors + j * kLanes);
      min[j] = p.mins ? LoadHalf(p.mins + factors + j * kLanes) : Mul(scale[j], Splat(-p.zero_point));
    }
    for (int64_t r = 0; r < R; ++r) {
      const VecF xs = Splat(p.xs[(m0 + r) * groups + g]), xsum = Splat(p.xsums[(m0 + r) * groups + g]);
      for (int j = 0; j < V; ++j) {
        // Explicit fused multiply-adds, which the compiler cannot contract differently in different
        // tile shapes: every row rounds the same way whatever R.
        acc[r][j] = Fma(xsum, min[j], Fma(Mul(ToFloat(iacc[r][j]), xs), scale[j], acc[r][j]));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) Store(p.y + (m0 + r) * p.n + n0 + j * kLanes, acc[r][j]);
  }
}

// Rows [m0, m0 + R) of y, every column of the block at c0 (the columns at or past N are padding).
template <int64_t R, int Bits, bool kNext>
inline void Columns(const Problem& p, const uint8_t* block_codes, int64_t m0, int64_t c0, NextBlock& next) {
  constexpr int kMaxV = jaxinfer::TileVectors(R);
  const int64_t width = std::min(kBlock, p.n - c0);
  int64_t col = 0;
  for (; col + kMaxV * kLanes <= width; col += kMaxV * kLanes) {
    Tile<R, kMaxV, Bits, kNext>(p, block_codes, col, m0, c0 + col, next);
  }
  for (; col < width; col += kLanes) Tile<R, 1, Bits, kNext>(p, block_codes, col, m0, c0 + col, next);
}

// Rows [m0, m0 + R) of the block: with the next block's prefetches if `next` has any to issue.
template <int64_t R, int Bits>
inline void Pass(const Problem& p, const uint8_t* block_codes, int64_t m0, int64_t c0, NextBlock& next) {
  if (next.active()) {
    Columns<R, Bits, true>(p, block_codes, m0, c0, next);
  } else {
    Columns<R, Bits, false>(p, block_codes, m0, c0, next);
  }
}

// Block b's columns for every row, in passes of 4 rows; `prefetch_next`: block b + 1 is this
// thread's too, and its codes go to L2 during the passes after the first (NextBlock: at 8 decode
// rows the Q8_0 LM head's 1.27x, at 32 1.20x; Q4_1 within noise, its blocks half the bytes).
template <int Bits>
void Block(const Problem& p, int64_t b, bool prefetch_next) {
  const int64_t block_bytes = p.k * kBlock * Bits / 8;
  const uint8_t* block_codes = p.codes + b * block_bytes;
  const int64_t width = std::min(kBlock, p.n - b * kBlock);
  // The steps of the passes after the first: their tiles * groups * quads.
  const int64_t steps = jaxinfer::LaterPassTiles(p.m, width, kLanes) * (p.k / kGroup) * (Bits == 8 ? kGroup / 4 : 4);
  NextBlock none, next = prefetch_next ? NextBlock(block_codes + block_bytes, block_bytes, steps) : NextBlock();
  int64_t m0 = 0;
  for (; m0 + 4 <= p.m; m0 += 4) Pass<4, Bits>(p, block_codes, m0, b * kBlock, m0 == 0 ? none : next);
  switch (p.m - m0) {
    case 3: Pass<3, Bits>(p, block_codes, m0, b * kBlock, m0 == 0 ? none : next); break;
    case 2: Pass<2, Bits>(p, block_codes, m0, b * kBlock, m0 == 0 ? none : next); break;
    case 1: Pass<1, Bits>(p, block_codes, m0, b * kBlock, m0 == 0 ? none : next); break;
    default: break;
  }
}

#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// One weight of a call: layer `l` of codes [L, NB, K / 4, B, 4] (8-bit) or [L, NB, K / 32, 4, B, 4]
// (4-bit) uint8, scales and mins [L, K / G, N] float16 (mins [1, 1, 1] when the format has none),
// and its output y [M, N]. Fills p's weight fields; x's are the caller's.
ffi::Error DecodeWeight(int64_t m, int64_t k, ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F16> scales,
                        ffi::Buffer<ffi::F16> mins, int32_t l, ffi::Result<ffi::Buffer<ffi::F32>>& y, int64_t bits,
                        float zero_point, Problem* p) {
  auto cd = codes.dimensions();
  auto sd = scales.dimensions();
  auto yd = y->dimensions();
  if (sd.size() != 3 || yd.size() != 2 || (bits != 4 && bits != 8) || cd.size() != (bits == 8 ? 5u : 6u)) {
    return ffi::Error::InvalidArgument("group_matmul: bad ranks or bits (x [M, K], scales [L, K / G, N], bits 4 or 8)");
  }
  // G from the scales' rows: 32 << shift, dividing K.
  int shift = 0;
  while (sd[1] > 0 && (kGroup << shift) * sd[1] < k && shift < 8) ++shift;
  if (sd[1] <= 0 || (kGroup << shift) * sd[1] != k) {
    return ffi::Error::InvalidArgument("group_matmul: K must be the scales' rows times a group of 32 times a power of two");
  }
  p->group_shift = shift;
  p->m = m;
  p->k = k;
  p->n = sd[2];
  p->bits = static_cast<int>(bits);
  const int64_t num_layers = sd[0], num_blocks = (p->n + kBlock - 1) / kBlock;
  bool ok = k % kGroup == 0 && p->n % kLanes == 0 && yd[0] == m && yd[1] == p->n &&
            cd[0] == num_layers && cd[1] == num_blocks;
  ok &= bits == 8 ? cd[2] == k / 4 && cd[3] == kBlock && cd[4] == 4
                  : cd[2] == k / kGroup && cd[3] == 4 && cd[4] == kBlock && cd[5] == 4;
  const bool has_mins = mins.element_count() != 1;
  ok &= !has_mins || mins.element_count() == scales.element_count();
  if (!ok) return ffi::Error::InvalidArgument("group_matmul: x, codes, scales and mins shapes disagree");
  if (l < 0 || l >= num_layers) return ffi::Error::InvalidArgument("group_matmul: layer out of range");
  const int64_t layer_codes = num_blocks * k * kBlock * bits / 8, layer_scales = sd[1] * p->n;
  p->codes = codes.typed_data() + l * layer_codes;
  p->scales = reinterpret_cast<const uint16_t*>(scales.typed_data()) + l * layer_scales;
  p->mins = has_mins ? reinterpret_cast<const uint16_t*>(mins.typed_data()) + l * layer_scales : nullptr;
  p->zero_point = zero_point;
  p->y = y->typed_data();
  return ffi::Error::Success();
}

// y_i = x @ W_i for every problem (their weight fields set): x quantized once, the blocks of all of
// them dealt out to the threads as one matmul's.
void Run(const float* x, std::vector<Problem>& problems) {
  const int64_t m = problems[0].m, k = problems[0].k;
  int8_t* xq = jaxinfer::Scratch<int8_t, 0>(m * k);
  float* xs = jaxinfer::Scratch<float, 1>(m * (k / kGroup));
  float* xsums = jaxinfer::Scratch<float, 2>(m * (k / kGroup));
  QuantizeX(x, m, k, xq, xs, xsums, nullptr);
  std::vector<int64_t> num_blocks;
  for (Problem& p : problems) {
    p.xq = xq;
    p.xs = xs;
    p.xsums = xsums;
    num_blocks.push_back((p.n + kBlock - 1) / kBlock);
  }
  jaxinfer::Workers::Get().ParallelTilesOf(m, num_blocks, [&](int64_t i, int64_t b0, int64_t b1, int64_t m0,
                                                              int64_t m1) {
    const Problem& p = problems[i];
    Problem rows = p;  // rows [m0, m1)
    rows.m = m1 - m0;
    rows.xq += m0 * p.k;
    rows.xs += m0 * (p.k / kGroup);
    rows.xsums += m0 * (p.k / kGroup);
    rows.y += m0 * p.n;
    for (int64_t b = b0; b < b1; ++b) {
      if (p.bits == 8) {
        Block<8>(rows, b, b + 1 < b1);
      } else {
        Block<4>(rows, b, b + 1 < b1);
      }
    }
  });
}
#endif

// x: [M, K] float32; codes, scales, mins: one weight (DecodeWeight); layer: scalar.
ffi::Error GroupMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F16> scales,
                           ffi::Buffer<ffi::F16> mins, ffi::Buffer<ffi::S32> layer,
                           ffi::ResultBuffer<ffi::F32> y, int64_t bits, float zero_point) {
  if (!kHasGroupPath) return ffi::Error::InvalidArgument("group_matmul: built without AVX2 (FMA, F16C) or AVX-512 VNNI");
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("group_matmul: x must be [M, K]");
  std::vector<Problem> problems(1);
  ffi::Error error = DecodeWeight(xd[0], xd[1], codes, scales, mins, *layer.typed_data(), y, bits, zero_point,
                                  &problems[0]);
  if (error.failure()) return error;
  Run(x.typed_data(), problems);
#endif
  return ffi::Error::Success();
}

// Several weights of one x (fused projections): x, layer, then (codes, scales, mins) per weight, its
// bits and zero point in the attributes' arrays; y per weight.
ffi::Error GroupMatmulFusedImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs args,
                                ffi::RemainingRets rets, ffi::Span<const int64_t> bits,
                                ffi::Span<const float> zero_points) {
  if (!kHasGroupPath) return ffi::Error::InvalidArgument("group_matmul: built without AVX2 (FMA, F16C) or AVX-512 VNNI");
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("group_matmul_fused: x must be [M, K]");
  const size_t count = rets.size();
  if (count == 0 || args.size() != 3 * count || bits.size() != count || zero_points.size() != count) {
    return ffi::Error::InvalidArgument("group_matmul_fused: takes (codes, scales, mins), bits and a zero point per output");
  }
  std::vector<Problem> problems(count);
  for (size_t i = 0; i < count; ++i) {
    auto codes = args.get<ffi::Buffer<ffi::U8>>(3 * i);
    auto scales = args.get<ffi::Buffer<ffi::F16>>(3 * i + 1);
    auto mins = args.get<ffi::Buffer<ffi::F16>>(3 * i + 2);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!codes.has_value() || !scales.has_value() || !mins.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("group_matmul_fused: codes must be uint8, scales and mins float16, y float32");
    }
    ffi::Error error = DecodeWeight(xd[0], xd[1], *codes, *scales, *mins, *layer.typed_data(), *y, bits[i],
                                    zero_points[i], &problems[i]);
    if (error.failure()) return error;
  }
  Run(x.typed_data(), problems);
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferGroupMatmul, GroupMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<float>("zero_point"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferGroupMatmulFused, GroupMatmulFusedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("bits")
                                  .Attr<ffi::Span<const float>>("zero_points"));

// Whether this build has the grouped integer path (AVX-512 VNNI, or AVX2, with F16C).
extern "C" int JaxinferHasGroupPath() { return kHasGroupPath ? 1 : 0; }
