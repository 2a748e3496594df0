// y[M, N] = x[M, K] @ W for GGUF's quantized blocks, held as stored, bits rearranged
// (jaxinfer/kquant.py writes the layout; an XLA FFI handler). K-quants, super-blocks of 256 rows:
//   Q4_K, Q5_K: W[k, n] = d * sc[k / 32] * code - dmin * m[k / 32], code 4 or 5 bits;
//   Q6_K:       W[k, n] = d * sc[k / 16] * (code - 32), code 6 bits, sc signed;
// d, dmin float16 per super-block; sc, m the 6-bit (Q6_K: int8) sub-block scales as bytes.
// d * sc and dmin * m are formed here, in float32, where they are exact. Blocks of 32 rows:
//   Q8_0, Q4_0, Q5_0: W[k, n] = d[k / 32] * (code - zero), zero 128 / 8 / 16 (Q8_0: value + 128);
//   Q4_1, Q5_1:       W[k, n] = d[k / 32] * code + m[k / 32], d and m float16.
//
// Why it exists: a Q4_K_M file's 4-, 5- and 6-bit weights would otherwise be requantized to int8 (8
// bits a weight, two rounding errors). As group_matmul.cc does for Q8_0/Q4_x: x is quantized per row in
// blocks of 32 (int8, llama.cpp's Q8 activations), codes meet x in integer dot products (AVX-512 VNNI
// vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd; codes < 64 cannot saturate, Q8_0's go by nibbles: Dot8),
// and per sub-block
//   Q4_K/Q5_K: y += (dot(code, xq) * x_scale) * (d * sc) - (x_scale * sum(xq)) * (dmin * m)
//   Q6_K:      y += (sum over the two halves of sc * (dot(code, xq) - 32 * sum(xq))) * x_scale * d
//              (a scale per 16 rows, half an x block: the halves meet in int32)
//   Q8_0/Q4_0/Q5_0: y += ((dot(code, xq) - zero * sum(xq)) * x_scale) * d
//   Q4_1/Q5_1: y += (dot(code, xq) * x_scale) * d + (x_scale * sum(xq)) * m
// Batch-1 decode streams the stored bits: 4.625, 5.625 and 6.5625 bits a weight; blocks of 32 the
// file's own (Q5_0 5.5, Q8_0 8.5).
//
// One projection's layer stack may mix types (a Q4_K_M file makes some layers' ffn_down Q6_K, some
// attn_v Q8_0 among Q5_0): the layers of every type lie in one byte buffer, and `index` [L, 2] gives
// each layer's type (0 Q4_K, 1 Q5_K, 2 Q6_K, 3 Q8_0, 4 Q4_0, 5 Q4_1, 6 Q5_0, 7 Q5_1) and byte
// offset / 64. Each row of y is computed by the same instructions in the same order whatever the
// other rows are (row invariance, as in group_matmul.cc).
//
// A layer's bytes, in blocks of B = 64 columns (NB = ceil(N / 64), the last block zero-padded):
//   nibbles [NB, K / 32, 4, B, 4]: byte (g, p, c, i) holds code k = 32 g + 4 p + i's low 4 bits in
//           its low nibble and k + 16's in its high nibble (group_matmul.cc's 4-bit layout);
//   high    [NB, K / 32, H, B, 4] (H = bits - 4): the codes' high bits, j = 4 * half + p at bit
//           position j * H of byte (j * H) / 8 (Q5_K: one byte, bit j; Q6_K: byte half, bits 2 p);
//   sc      [NB, K / S, B] uint8 (S = 32; Q6_K: 16, int8); m [NB, K / 32, B] uint8 (Q4_K, Q5_K);
//   d       [NB, K / 256, B] float16; dmin [NB, K / 256, B] float16 (Q4_K, Q5_K).
// Blocks of 32: nibbles and high (Q5_0, Q5_1: one plane) as above, or (Q8_0) codes [NB, K / 4, B, 4]
// (group_matmul.cc's 8-bit layout); then d [NB, K / 32, B] float16 and m [NB, K / 32, B] float16
// (Q4_1, Q5_1). The factors are blocked by columns like the codes: a tile reads each section as one
// sequential stream (rows of [K / S, N] lay N bytes apart, a page or more for wide layers, which
// the hardware prefetchers do not follow).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels_cpu/group_simd.h"
#include "kernels_cpu/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSuper = 256;  // rows per super-block
constexpr int64_t kCols = 64;    // columns per block of the layout

struct Type {
  int bits;
  bool block32;  // blocks of 32 rows with float16 factors (else a K-quant)
  bool has_min;
  int zero;  // blocks of 32 without a min: W = d * (code - zero)
};
// By type id; jaxinfer/kquant.py's TYPES say the same.
constexpr Type kTypes[8] = {{4, false, true, 0},  {5, false, true, 0}, {6, false, false, 0}, {8, true, false, 128},
                            {4, true, false, 8},  {4, true, true, 0},  {5, true, false, 16}, {5, true, true, 0}};

// The byte sizes of one layer's sections (the layout above); kquant.py computes the same.
struct Sections {
  int64_t nibbles = 0, high = 0, codes = 0, sc = 0, m = 0, d = 0, dmin = 0;
  Sections(const Type& t, int64_t k, int64_t n) {
    const int64_t nb = (n + kCols - 1) / kCols;
    if (t.block32) {
      nibbles = t.bits < 8 ? nb * k * kCols / 2 : 0;
      high = t.bits == 5 ? nb * k * kCols / 8 : 0;
      codes = t.bits == 8 ? nb * k * kCols : 0;
      d = nb * (k / 32) * kCols * 2;
      m = t.has_min ? d : 0;
      return;
    }
    nibbles = nb * k * kCols / 2;
    high = nb * k * kCols * (t.bits - 4) / 8;
    sc = nb * (k / (t.bits == 6 ? 16 : 32)) * kCols;
    m = t.has_min ? nb * (k / 32) * kCols : 0;
    d = nb * (k / kSuper) * kCols * 2;
    dmin = t.has_min ? d : 0;
  }
  int64_t total() const { return nibbles + high + codes + sc + m + d + dmin; }
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)

struct Problem {
  const int8_t* xq;      // [M, K] activations, int8 per block of 32
  const float* xs;       // [M, K / 32] their scales
  const float* xsums;    // [M, K / 32] scale * sum of the block's int8 values
  const int32_t* isums;  // [M, K / 16] integer sums of each half block
  const uint8_t *nibbles, *high, *sc, *m;  // this layer's sections (Q8_0: nibbles = its codes)
  const uint16_t *d, *dmin, *m16;            // m16: the float16 mins of Q4_1, Q5_1
  float* y;
  int64_t rows, k, n;
};

// acc += ((iacc - zero * sum(xq)) * x_scale) * d: a block of 32 of Q8_0, Q4_0 or Q5_0.
template <int64_t R, int V>
inline void ZeroPointStep(const Problem& p, const VecI (&iacc)[R][V], const VecF (&d)[V], int zero, int64_t m0,
                          int64_t g, VecF (&acc)[R][V]) {
  const int64_t groups = p.k / 32;
  for (int64_t r = 0; r < R; ++r) {
    const VecF xs = Splat(p.xs[(m0 + r) * groups + g]);
    const int32_t* half_sums = p.isums + (m0 + r) * 2 * groups + 2 * g;
    const int32_t offset = zero * (half_sums[0] + half_sums[1]);
    for (int j = 0; j < V; ++j) acc[r][j] = Fma(Mul(ToFloat(SubI(iacc[r][j], offset)), xs), d[j], acc[r][j]);
  }
}

// Rows [m0, m0 + R) of y, V vectors of columns from n0 = c0 + col, in the block that starts at c0;
// p's factor pointers are that block's (`Block`). kNext: a pass after the block's first, which
// brings in the next block's codes and high bits (parallel.h's NextBlock), a step per group.
template <int64_t R, int V, int Id, bool kNext>
inline void Tile(const Problem& p, const uint8_t* nibbles, const uint8_t* high, int64_t col, int64_t m0, int64_t n0,
                 jaxinfer::NextBlock (&next)[2]) {
  constexpr Type kType = kTypes[Id];
  constexpr int Bits = kType.bits;
  constexpr int kHigh = Bits == 8 ? 0 : Bits - 4;
  const int64_t groups = p.k / 32;
  VecF acc[R][V];
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) acc[r][j] = Zero();
  }
  for (int64_t g = 0; g < groups; ++g) {
    if constexpr (kNext) {
      next[0].Step();
      next[1].Step();
    }
    const uint8_t* wp = nibbles + (g * 4 * kCols + col) * 4;
    const uint8_t* hp = high + (g * kHigh * kCols + col) * 4;
    VecF d[V];
    const int64_t d_row = kType.block32 ? g : g * 32 / kSuper;
    for (int j = 0; j < V; ++j) d[j] = LoadHalf(p.d + d_row * kCols + col + j * kLanes);
    if constexpr (Bits == 8) {  // Q8_0: 8 quads of k a group, [K / 4, B, 4]
      VecI iacc[R][V];
      for (int64_t r = 0; r < R; ++r) {
        for (int j = 0; j < V; ++j) iacc[r][j] = ZeroI();
      }
      const uint8_t* cp = nibbles + (g * 8 * kCols + col) * 4;
      for (int q = 0; q < 8; ++q) {
        __builtin_prefetch(cp + (q + 16) * kCols * 4);
        VecI code[V];
        for (int j = 0; j < V; ++j) code[j] = LoadI(cp + (q * kCols + j * kLanes) * 4);
        for (int64_t r = 0; r < R; ++r) {
          const VecI xb = Bcast(p.xq + (m0 + r) * p.k + g * 32 + q * 4);
          for (int j = 0; j < V; ++j) iacc[r][j] = Dot8(iacc[r][j], code[j], xb);
        }
      }
      ZeroPointStep<R, V>(p, iacc, d, kType.zero, m0, g, acc);
    } else if constexpr (Bits == 6) {  // a scale per 16: both halves' sums, scaled in integers
      VecI iacc[2][R][V];
      for (int h = 0; h < 2; ++h) {
        for (int64_t r = 0; r < R; ++r) {
          for (int j = 0; j < V; ++j) iacc[h][r][j] = ZeroI();
        }
      }
      for (int q = 0; q < 4; ++q) {
        // The codes and high bits two groups ahead, as the 4- and 5-bit path does: without them a
        // batch-1 Q6_K matmul streamed at about two thirds of Q4_K's bytes/s (kernel_ab.py: 1.54x).
        __builtin_prefetch(wp + (q + 8) * kCols * 4);
        __builtin_prefetch(hp + 4 * kCols * 4 + q * 128);
        __builtin_prefetch(hp + 4 * kCols * 4 + q * 128 + 64);
        VecI lo[V], hi[V];
        for (int j = 0; j < V; ++j) {
          const VecI raw = LoadI(wp + (q * kCols + j * kLanes) * 4);
          lo[j] = Or(LowNibbles(raw), HighBits(LoadI(hp + j * kLanes * 4), 2 * q, 3));
          hi[j] = Or(HighNibbles(raw), HighBits(LoadI(hp + (kCols + j * kLanes) * 4), 2 * q, 3));
        }
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* xr = p.xq + (m0 + r) * p.k + g * 32 + q * 4;
          const VecI xlo = Bcast(xr), xhi = Bcast(xr + 16);
          for (int j = 0; j < V; ++j) {
            iacc[0][r][j] = Dot4(iacc[0][r][j], lo[j], xlo);
            iacc[1][r][j] = Dot4(iacc[1][r][j], hi[j], xhi);
          }
        }
      }
      VecI sc[2][V];
      for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < V; ++j) sc[h][j] = LoadS8I(p.sc + (2 * g + h) * kCols + col + j * kLanes);
      }
      for (int64_t r = 0; r < R; ++r) {
        const VecF xs = Splat(p.xs[(m0 + r) * groups + g]);
        const int32_t* half_sums = p.isums + (m0 + r) * 2 * groups + 2 * g;
        for (int j = 0; j < V; ++j) {
          // the halves of sc * (dot - 32 * sum(xq)), each below 2^23 in size: exact in int32 and float
          const VecI t = AddI(MulI(SubI(iacc[0][r][j], 32 * half_sums[0]), sc[0][j]),
                              MulI(SubI(iacc[1][r][j], 32 * half_sums[1]), sc[1][j]));
          acc[r][j] = Fma(Mul(ToFloat(t), xs), d[j], acc[r][j]);
        }
      }
    } else {
      VecI iacc[R][V];
      for (int64_t r = 0; r < R; ++r) {
        for (int j = 0; j < V; ++j) iacc[r][j] = ZeroI();
      }
      for (int q = 0; q < 4; ++q) {
        __builtin_prefetch(wp + (q + 8) * kCols * 4);
        // Q5_0/Q5_1's high-bit plane too (1.12x on Q5_0); Q5_K's measured 0.97x with it.
        if constexpr (kHigh == 1 && kType.block32) __builtin_prefetch(hp + 2 * kCols * 4 + q * 64);
        VecI lo[V], hi[V];
        for (int j = 0; j < V; ++j) {
          const VecI raw = LoadI(wp + (q * kCols + j * kLanes) * 4);
          lo[j] = LowNibbles(raw);
          hi[j] = HighNibbles(raw);
          if constexpr (kHigh == 1) {
            const VecI bits = LoadI(hp + j * kLanes * 4);
            lo[j] = Or(lo[j], HighBits(bits, q, 1));
            hi[j] = Or(hi[j], HighBits(bits, 4 + q, 1));
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* xr = p.xq + (m0 + r) * p.k + g * 32 + q * 4;
          const VecI xlo = Bcast(xr), xhi = Bcast(xr + 16);
          for (int j = 0; j < V; ++j) iacc[r][j] = Dot4(Dot4(iacc[r][j], lo[j], xlo), hi[j], xhi);
        }
      }
      if constexpr (kType.block32 && !kType.has_min) {
        ZeroPointStep<R, V>(p, iacc, d, kType.zero, m0, g, acc);
        continue;
      }
      VecF scale[V], min[V];
      for (int j = 0; j < V; ++j) {
        const int64_t at = g * kCols + col + j * kLanes;
        if constexpr (kType.block32) {  // Q4_1, Q5_1: + m, float16 per 32
          scale[j] = d[j];
          min[j] = LoadHalf(p.m16 + at);
        } else {
          scale[j] = Mul(d[j], LoadU8(p.sc + at));
          min[j] = Mul(LoadHalf(p.dmin + g * 32 / kSuper * kCols + col + j * kLanes), LoadU8(p.m + at));
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const float sum = p.xsums[(m0 + r) * groups + g];
        const VecF xs = Splat(p.xs[(m0 + r) * groups + g]), xsum = Splat(kType.block32 ? sum : -sum);
        // Explicit fused multiply-adds: every row rounds the same way whatever R and V.
        for (int j = 0; j < V; ++j) acc[r][j] = Fma(xsum, min[j], Fma(Mul(ToFloat(iacc[r][j]), xs), scale[j], acc[r][j]));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) Store(p.y + (m0 + r) * p.n + n0 + j * kLanes, acc[r][j]);
  }
}

// Rows [m0, m0 + R) of y, every column of the block at c0 (columns at or past N are padding).
template <int64_t R, int Id, bool kNext>
inline void Columns(const Problem& p, const uint8_t* nibbles, const uint8_t* high, int64_t m0, int64_t c0,
                    jaxinfer::NextBlock (&next)[2]) {
  constexpr int kMaxV = jaxinfer::TileVectors(R);
  const int64_t width = std::min(kCols, p.n - c0);
  int64_t col = 0;
  for (; col + kMaxV * kLanes <= width; col += kMaxV * kLanes) {
    Tile<R, kMaxV, Id, kNext>(p, nibbles, high, col, m0, c0 + col, next);
  }
  for (; col < width; col += kLanes) Tile<R, 1, Id, kNext>(p, nibbles, high, col, m0, c0 + col, next);
}

// Rows [m0, m0 + R) of the block, with the next block's prefetches if `next` has any to issue.
template <int64_t R, int Id>
inline void Pass(const Problem& p, const uint8_t* nibbles, const uint8_t* high, int64_t m0, int64_t c0,
                 jaxinfer::NextBlock (&next)[2]) {
  if (next[0].active() || next[1].active()) {
    Columns<R, Id, true>(p, nibbles, high, m0, c0, next);
  } else {
    Columns<R, Id, false>(p, nibbles, high, m0, c0, next);
  }
}

// Block b's columns for every row, in passes of 4 rows; `prefetch_next`: block b + 1 is this
// thread's too, and its codes and high bits come into L2 during the passes after the first.
template <int Id>
void Block(const Problem& problem, int64_t b, bool prefetch_next) {
  constexpr Type kType = kTypes[Id];
  constexpr int Bits = kType.bits;
  const int64_t nibble_bytes = problem.k * kCols / (Bits == 8 ? 1 : 2);  // Q8_0: its codes
  const int64_t high_bytes = problem.k * kCols * (Bits == 8 ? 0 : Bits - 4) / 8;
  const uint8_t* nibbles = problem.nibbles + b * nibble_bytes;
  const uint8_t* high = problem.high + b * high_bytes;
  Problem p = problem;  // with this block's factors: [K / S, B] each
  if constexpr (kType.block32) {
    p.d += b * (p.k / 32) * kCols;
    if constexpr (kType.has_min) p.m16 += b * (p.k / 32) * kCols;
  } else {
    p.sc += b * (p.k / (Bits == 6 ? 16 : 32)) * kCols;
    p.d += b * (p.k / kSuper) * kCols;
    if constexpr (kType.has_min) {
      p.m += b * (p.k / 32) * kCols;
      p.dmin += b * (p.k / kSuper) * kCols;
    }
  }
  const int64_t width = std::min(kCols, p.n - b * kCols);
  // A step per group of each tile of the passes after the first.
  const int64_t steps = jaxinfer::LaterPassTiles(p.rows, width, kLanes) * (p.k / 32);
  jaxinfer::NextBlock none[2], next[2];
  if (prefetch_next) {
    next[0] = jaxinfer::NextBlock(nibbles + nibble_bytes, nibble_bytes, steps);
    next[1] = jaxinfer::NextBlock(high + high_bytes, high_bytes, high_bytes ? steps : 0);
  }
  int64_t m0 = 0;
  for (; m0 + 4 <= p.rows; m0 += 4) Pass<4, Id>(p, nibbles, high, m0, b * kCols, m0 == 0 ? none : next);
  switch (p.rows - m0) {
    case 3: Pass<3, Id>(p, nibbles, high, m0, b * kCols, m0 == 0 ? none : next); break;
    case 2: Pass<2, Id>(p, nibbles, high, m0, b * kCols, m0 == 0 ? none : next); break;
    case 1: Pass<1, Id>(p, nibbles, high, m0, b * kCols, m0 == 0 ? none : next); break;
    default: break;
  }
}
#endif

// x: [M, K] float32; data: uint8, every layer's sections; index: [L, 2] int32 (type id, offset / 64);
// layer: scalar int32; n: the output width.
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// One weight of a call: layer `l` of the stack `data` / `index` [L, 2], N = n columns, its output y
// [M, N]. Fills p's weight fields and the layer's type id; x's fields are the caller's.
ffi::Error DecodeWeight(int64_t m, int64_t k, ffi::Buffer<ffi::U8> data, ffi::Buffer<ffi::S32> index, int32_t l,
                        ffi::Result<ffi::Buffer<ffi::F32>>& y, int64_t n, Problem* p, int32_t* type_id) {
  auto id = index.dimensions();
  if (id.size() != 2 || id[1] != 2) return ffi::Error::InvalidArgument("kquant_matmul: bad ranks (x [M, K], index [L, 2])");
  *p = Problem{};
  p->rows = m;
  p->k = k;
  p->n = n;
  if (l < 0 || l >= id[0]) return ffi::Error::InvalidArgument("kquant_matmul: layer out of range");
  const int32_t type = index.typed_data()[2 * l];
  if (type < 0 || type > 7) return ffi::Error::InvalidArgument("kquant_matmul: unknown type id");
  const Type& t = kTypes[type];
  auto yd = y->dimensions();
  if (p->k % (t.block32 ? 32 : kSuper) || p->n % kLanes || yd.size() != 2 || yd[0] != m || yd[1] != p->n) {
    return ffi::Error::InvalidArgument("kquant_matmul: K must be a multiple of the type's block (256 or 32), N of 16, "
                                       "y [M, N]");
  }
  const Sections s(t, p->k, p->n);
  const int64_t offset = int64_t{index.typed_data()[2 * l + 1]} * 64;
  if (offset < 0 || offset + s.total() > static_cast<int64_t>(data.element_count())) {
    return ffi::Error::InvalidArgument("kquant_matmul: the layer's bytes lie outside the data");
  }
  const uint8_t* base = data.typed_data() + offset;
  p->nibbles = base;
  p->high = p->nibbles + s.nibbles;
  if (t.block32) {  // nibbles, high or codes, d, m
    p->d = reinterpret_cast<const uint16_t*>(p->high + s.high + s.codes);
    p->m16 = reinterpret_cast<const uint16_t*>(p->high + s.high + s.codes + s.d);
  } else {  // nibbles, high, sc, m, d, dmin
    p->sc = p->high + s.high;
    p->m = p->sc + s.sc;
    p->d = reinterpret_cast<const uint16_t*>(p->m + s.m);
    p->dmin = reinterpret_cast<const uint16_t*>(p->m + s.m + s.d);
  }
  p->y = y->typed_data();
  *type_id = type;
  return ffi::Error::Success();
}

// y_i = x @ W_i for every problem (their weight fields set, `types` their layers' type ids): x
// quantized once, the blocks of all of them dealt out to the threads as one matmul's.
void Run(const float* x, std::vector<Problem>& problems, const std::vector<int32_t>& types) {
  const int64_t m = problems[0].rows, k = problems[0].k, groups = k / 32;
  int8_t* xq = jaxinfer::Scratch<int8_t, 0>(m * k);
  float* xs = jaxinfer::Scratch<float, 1>(m * groups);
  float* xsums = jaxinfer::Scratch<float, 2>(m * groups);
  int32_t* isums = jaxinfer::Scratch<int32_t, 3>(m * groups * 2);
  QuantizeX(x, m, k, xq, xs, xsums, isums);
  std::vector<int64_t> num_blocks;
  for (Problem& p : problems) {
    p.xq = xq;
    p.xs = xs;
    p.xsums = xsums;
    p.isums = isums;
    num_blocks.push_back((p.n + kCols - 1) / kCols);
  }
  jaxinfer::Workers::Get().ParallelTilesOf(m, num_blocks, [&](int64_t i, int64_t b0, int64_t b1, int64_t m0,
                                                              int64_t m1) {
    const Problem& p = problems[i];
    Problem rows = p;  // rows [m0, m1)
    rows.rows = m1 - m0;
    rows.xq += m0 * p.k;
    rows.xs += m0 * groups;
    rows.xsums += m0 * groups;
    rows.isums += m0 * 2 * groups;
    rows.y += m0 * p.n;
    for (int64_t b = b0; b < b1; ++b) {
      switch (types[i]) {
        case 0: Block<0>(rows, b, b + 1 < b1); break;
        case 1: Block<1>(rows, b, b + 1 < b1); break;
        case 2: Block<2>(rows, b, b + 1 < b1); break;
        case 3: Block<3>(rows, b, b + 1 < b1); break;
        case 4: Block<4>(rows, b, b + 1 < b1); break;
        case 5: Block<5>(rows, b, b + 1 < b1); break;
        case 6: Block<6>(rows, b, b + 1 < b1); break;
        default: Block<7>(rows, b, b + 1 < b1); break;
      }
    }
  });
}
#endif

ffi::Error KQuantMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> data, ffi::Buffer<ffi::S32> index,
                            ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t n) {
  if (!kHasGroupPath) return ffi::Error::InvalidArgument("kquant_matmul: built without AVX2 (FMA, F16C) or AVX-512 VNNI");
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("kquant_matmul: bad ranks (x [M, K], index [L, 2])");
  std::vector<Problem> problems(1);
  std::vector<int32_t> types(1);
  ffi::Error error = DecodeWeight(xd[0], xd[1], data, index, *layer.typed_data(), y, n, &problems[0], &types[0]);
  if (error.failure()) return error;
  Run(x.typed_data(), problems, types);
#endif
  return ffi::Error::Success();
}

// Several weights of one x (fused projections): x, layer, then (data, index) per weight, its N in
// the attribute `n`; y per weight.
ffi::Error KQuantMatmulFusedImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs args,
                                 ffi::RemainingRets rets, ffi::Span<const int64_t> n) {
  if (!kHasGroupPath) return ffi::Error::InvalidArgument("kquant_matmul: built without AVX2 (FMA, F16C) or AVX-512 VNNI");
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("kquant_matmul_fused: x must be [M, K]");
  const size_t count = rets.size();
  if (count == 0 || args.size() != 2 * count || n.size() != count) {
    return ffi::Error::InvalidArgument("kquant_matmul_fused: takes (data, index) and n per output");
  }
  std::vector<Problem> problems(count);
  std::vector<int32_t> types(count);
  for (size_t i = 0; i < count; ++i) {
    auto data = args.get<ffi::Buffer<ffi::U8>>(2 * i);
    auto index = args.get<ffi::Buffer<ffi::S32>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!data.has_value() || !index.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("kquant_matmul_fused: data must be uint8, index int32, y float32");
    }
    ffi::Error error = DecodeWeight(xd[0], xd[1], *data, *index, *layer.typed_data(), *y, n[i], &problems[i],
                                    &types[i]);
    if (error.failure()) return error;
  }
  Run(x.typed_data(), problems, types);
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferKQuantMatmul, KQuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferKQuantMatmulFused, KQuantMatmulFusedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("n"));
