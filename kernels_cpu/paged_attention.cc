// Ragged paged attention for the CPU, an XLA FFI handler: the contract of
// kernels_pallas.paged_attention.ragged_paged_attention_reference (causal, GQA, sliding window,
// soft cap). jaxinfer/ops.py sends it every step on the CPU, decode and prefill alike, when q is
// float32, the cache float32 or float16, and head_dim fits the vector width. A float16 cache (the
// CPU default, as llama.cpp's) halves the bytes a decode step reads, which bound it at many
// sequences; its keys and values widen to float32 as they are loaded, and all the arithmetic is float32.
//
// Why it exists: the XLA path gathers each sequence's pages into a contiguous chunk before its
// dots, a copy that costs more than the attention itself when a step has few rows. Here each row
// reads its keys and values where they lie in the page pool, with an online softmax over them.
// The cache comes whole ([layers, kv_heads, pages, page_size, head_dim]) with the layer to use, and
// the sliding window (0: none) comes as an operand like the layer, so a model whose layers differ in
// window (Gemma 3: local and global) passes each layer's own from inside one scan. A row block
// starts at its first row's window: pages wholly before it are never read.
//
// Work items are (sequence, KV head, block of up to kRowBlock rows), dealt over parallel.h's threads;
// a few decode rows' last items are split by query heads (SplitTail).
//
// The metadata is checked before any row is read or written (CheckMetadata): query_start_loc, seq_lens
// and block_tables index the query rows, the output and the page pool, so a bad value from the caller
// would otherwise be an out-of-bounds read or write. A bad batch is an InvalidArgument error.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "kernels_cpu/half.h"
#include "kernels_cpu/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef int32_t VecI __attribute__((vector_size(kLanes * 4)));
constexpr int64_t kRowBlock = 16;

inline VecF Load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }

// a * b + c rounded once, written out so that the compiler cannot contract the same arithmetic
// differently in the two copies of the score loop below.
inline VecF Fma(VecF a, VecF b, VecF c) {
#if defined(__AVX512F__)
  return reinterpret_cast<VecF>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                reinterpret_cast<__m512>(c)));
#elif defined(__FMA__)
  return reinterpret_cast<VecF>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

inline float Sum(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#endif
}

// A tile's `len` cache values (its keys' or values' rows, head_dim each) as float32: float32 in place;
// float16 widened once into `buffer` (up to kLanes rows), so every row and head of the block reads it
// as float32.
inline const float* TileAsFloat(const float* tile, int64_t, float*) { return tile; }

inline const float* TileAsFloat(const uint16_t* tile, int64_t len, float* buffer) {
#pragma GCC unroll 8
  for (int64_t i = 0; i < len; i += kLanes) Store(buffer + i, LoadHalf(tile + i));
  return buffer;
}

template <typename KV>  // the cache's element: float, or uint16_t holding float16
struct Problem {
  const float* q;  // [T, H, D]
  const KV* k;  // this layer: [KVH, P, page, D]
  const KV* v;
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* tables;  // [S, max_pages]
  float* out;
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, num_pages, page_size, max_pages;
  float sm_scale, soft_cap;
  int64_t window;  // <= 0: none
};

inline float Max(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

// Lane j of the result is the sum of v[j]'s lanes: kLanes horizontal sums in log2(kLanes) levels of
// pairwise shuffles and adds (2 kLanes - 2 shuffles, kLanes - 1 adds), where one sum at a time takes
// about log2(kLanes) shuffles and adds each.
inline VecF SumEach(VecF* v) {
#if defined(__AVX512F__)
  const VecI lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const VecI hi8 = lo8 + 8;
  const VecI lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const VecI hi4 = lo4 + 4;
  const VecI lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const VecI hi2 = lo2 + 2;
  const VecI lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const VecI hi1 = lo1 + 1;
  VecF w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo8) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi8);
  for (int i = 0; i < 4; ++i) x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], lo4) + __builtin_shuffle(w[2 * i], w[2 * i + 1], hi4);
  for (int i = 0; i < 2; ++i) y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo2) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi2);
  return __builtin_shuffle(y[0], y[1], lo1) + __builtin_shuffle(y[0], y[1], hi1);
#else
  const VecI lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
  const VecI hi4 = lo4 + 4;
  const VecI lo2 = {0, 1, 4, 5, 8, 9, 12, 13};
  const VecI hi2 = lo2 + 2;
  const VecI lo1 = {0, 2, 4, 6, 8, 10, 12, 14};
  const VecI hi1 = lo1 + 1;
  VecF x[4], y[2];
  for (int i = 0; i < 4; ++i) x[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo4) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi4);
  for (int i = 0; i < 2; ++i) y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo2) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi2);
  return __builtin_shuffle(y[0], y[1], lo1) + __builtin_shuffle(y[0], y[1], hi1);
#endif
}

// e^x lane by lane (Cephes' expf: a degree-6 polynomial on x - n ln 2, times 2^n), relative error
// about 1e-7; x at or below -87.3 gives 2^-126 (callers zero masked lanes themselves).
inline VecF Exp(VecF x) {
  const VecF lo = VecF{} - 87.3365448f, hi = VecF{} + 88.3762626f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const VecF magic = VecF{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const VecF n = (x * 1.44269504088896341f + magic) - magic;
  const VecF r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts
  VecF y = VecF{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;  // 2^n
  VecF scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Brings the first `keys` keys and values of KV head g's `page` towards the core (kLocality 3: into
// L1, 2: into L2) while earlier pages are computed: a sequence's pages lie anywhere in the pool, so
// the hardware prefetcher sees a new stream every page (2 KB of keys at page size 16, head_dim 64,
// float16) and a row would otherwise wait for most of each. Always inlined: GCC's pure-const
// analysis took an out-of-line function that only prefetches for one without effects and deleted
// its calls (until 2026-12-06 this kernel compiled with no prefetch at all).
template <int kLocality, typename KV>
__attribute__((always_inline)) inline void PrefetchPage(const Problem<KV>& p, int64_t page, int64_t keys, int64_t g) {
  if (page < 0 || page >= p.num_pages) return;
  const int64_t offset = (g * p.num_pages + page) * p.page_size * p.head_dim;
  const char* k = reinterpret_cast<const char*>(p.k + offset);
  const char* v = reinterpret_cast<const char*>(p.v + offset);
  for (int64_t b = 0; b < keys * p.head_dim * static_cast<int64_t>(sizeof(KV)); b += 64) {
    __builtin_prefetch(k + b, 0, kLocality);
    __builtin_prefetch(v + b, 0, kLocality);
  }
}

// A page's keys and values prefetched into L2 a few lines at a time, between the steps of the tile
// before (Step before each head's scores and each head's values): for a single row, issuing all of a
// page's lines at once (64 at page size 16, head_dim 64, float16) asks for more misses than a core
// keeps in flight, and it stalled on the prefetch instructions (`perf`: a fifth of a 32-row decode
// step's attention samples on them). Spread, 1.20x on 8 and 32 decode rows of 500 keys
// (kernel_ab.py --kernels attention), the same results bit for bit.
template <typename KV>
struct Spread {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t offset = 0, end = 0, per_step = 0;
  void Reset(const Problem<KV>& p, int64_t page, int64_t keys, int64_t g, int64_t steps) {
    Finish();
    if (page < 0 || page >= p.num_pages) return;
    const int64_t at = (g * p.num_pages + page) * p.page_size * p.head_dim;
    k = reinterpret_cast<const char*>(p.k + at);
    v = reinterpret_cast<const char*>(p.v + at);
    offset = 0;
    end = keys * p.head_dim * static_cast<int64_t>(sizeof(KV));
    per_step = std::max<int64_t>(64, (end / steps + 63) / 64 * 64);
  }
  __attribute__((always_inline)) void Step() {
    for (const int64_t stop = std::min(end, offset + per_step); offset < stop; offset += 64) {
      __builtin_prefetch(k + offset, 0, 2);
      __builtin_prefetch(v + offset, 0, 2);
    }
  }
  void Finish() {
    while (offset < end) Step();
  }
};

// Pages prefetched into L2 ahead of the one computed. Measured on 32 decode rows of 500 and 2,000
// keys (float16, head_dim 64, page 16; docs/KERNELS.md): with the next page into L1 alone, pages
// scattered over the pool took 1.45 and 4.66 ms a layer; with 4 pages ahead into L2 as well, 0.98
// and 3.28 ms (2, 8, 16 and 32 ahead: within noise of 4, or slower on contiguous pages).
constexpr int64_t kPagesAhead = 4;

// Rows [r0, r1) of sequence s, query heads [h0, h1) of KV head g's group. Keys go by tiles of up to kLanes within a
// page, at fixed positions (a page's start, then every kLanes keys): per (row, head) one tile's
// scores are one vector, with one max, one vector exp and one rescale of the accumulator per tile.
// A key a row may not see (after it, or before its window) weighs exactly 0, so a row's result does
// not depend on the other rows of its block, nor on the batch.
// kHeadDim: the head_dim as a constant, or 0 (p.head_dim). kOneRow: r1 = r0 + 1 (a decode row, or a
// chunk's last row alone in its block), whose pages are prefetched a few lines at a time (Spread);
// a block of many rows computes long enough on each page for the prefetch of a whole page at once
// (spreading it there cost 8-12%).
template <typename KV, int64_t kHeadDim, bool kOneRow>
void Item(const Problem<KV>& p, int64_t s, int64_t g, int64_t h0, int64_t h1, int64_t r0, int64_t r1) {
  const int64_t group = h1 - h0, d_dim = kHeadDim ? kHeadDim : p.head_dim;
  const int64_t q_len = p.qsl[s + 1] - p.qsl[s];
  const int64_t seq_len = p.seq_lens[s];
  const int64_t first_pos = seq_len - q_len;  // position of the sequence's first query row
  const int64_t rows = kOneRow ? 1 : r1 - r0, lanes = rows * group;
  // Per thread, reused by every item (a decode step has thousands of items): scaled queries,
  // accumulators and softmax statistics per (row, head) lane.
  static thread_local std::vector<float> qs, acc, m, l, correction_buffer;
  static thread_local std::vector<VecF> score_buffer;  // per head of the group: its tile's scores, then weights
  qs.resize(lanes * d_dim);
  acc.assign(lanes * d_dim, 0.0f);
  m.assign(lanes, -INFINITY);
  l.assign(lanes, 0.0f);
  score_buffer.resize(group);
  correction_buffer.resize(group);
  const int64_t first_head = g * (p.num_heads / p.num_kv_heads) + h0;  // of q and out
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < group; ++h) {
      const float* src = p.q + ((r0 + r) * p.num_heads + first_head + h) * d_dim;
      float* dst = qs.data() + (r * group + h) * d_dim;
      for (int64_t d = 0; d < d_dim; ++d) dst[d] = src[d] * p.sm_scale;
    }
  }
  const int64_t pos_lo = first_pos + (r0 - p.qsl[s]), pos_hi = first_pos + (r1 - 1 - p.qsl[s]);
  const int64_t key_end = std::min(seq_len, pos_hi + 1);  // <= max_pages * page_size (CheckMetadata)
  const int64_t key_begin = p.window > 0 ? std::max<int64_t>(0, pos_lo - p.window + 1) : 0;
  const int32_t* table = p.tables + s * p.max_pages;
  const int64_t page_stride = p.page_size * d_dim;
  const KV* k_head = p.k + g * p.num_pages * page_stride;
  const KV* v_head = p.v + g * p.num_pages * page_stride;
  VecF lane_offset;
  for (int i = 0; i < kLanes; ++i) lane_offset[i] = static_cast<float>(i);
  alignas(64) float weights[kLanes];
  // Float16 tiles widened, kLanes rows of d_dim each; vectors, so aligned to a vector (C++17's aligned
  // new). One pair per thread, grown as needed, never cleared: a tile is written before it is read.
  static thread_local std::vector<VecF> k_buffer, v_buffer;
  if constexpr (!std::is_same_v<KV, float>) {
    if (static_cast<int64_t>(k_buffer.size()) < d_dim) {
      k_buffer.resize(d_dim);
      v_buffer.resize(d_dim);
    }
  }
  const int64_t first_page = key_begin / p.page_size, end_page = (key_end + p.page_size - 1) / p.page_size;
  for (int64_t i = first_page + 1; i < std::min(end_page, first_page + kPagesAhead); ++i)
    PrefetchPage<2>(p, table[i], std::min(p.page_size, key_end - i * p.page_size), g);
  Spread<KV> spread;
  for (int64_t page_start = first_page * p.page_size; page_start < key_end; page_start += p.page_size) {
    if (const int64_t ahead = page_start / p.page_size + kPagesAhead; ahead < end_page) {  // into L2
      const int64_t keys = std::min(p.page_size, key_end - ahead * p.page_size);
      if constexpr (kOneRow) {
        spread.Reset(p, table[ahead], keys, g, 2 * group);
      } else {
        PrefetchPage<2>(p, table[ahead], keys, g);
      }
    }
    const int64_t page = table[page_start / p.page_size];
    if (page < 0 || page >= p.num_pages) continue;  // never in a valid batch; never read out of bounds
    const int64_t page_end = std::min(page_start + p.page_size, key_end);
    if (page_end < key_end) {  // the next page's first tile into L1, while this one is computed
      const int64_t keys = std::min({p.page_size, key_end - page_end, int64_t{kLanes}});
      PrefetchPage<3>(p, table[page_end / p.page_size], keys, g);
    }
    for (int64_t t = page_start; t < page_end; t += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, page_end - t);
      if (t + n <= key_begin) continue;
      // The tile's n keys and values, as float32.
      const int64_t offset = page * page_stride + (t - page_start) * d_dim;
      const int64_t tile_len = kHeadDim && n == kLanes ? kLanes * kHeadDim : n * d_dim;  // a constant if whole
      const float* kt = TileAsFloat(k_head + offset, tile_len, reinterpret_cast<float*>(k_buffer.data()));
      const float* vt = TileAsFloat(v_head + offset, tile_len, reinterpret_cast<float*>(v_buffer.data()));
      const VecF key = lane_offset + static_cast<float>(t);  // exact: positions are far below 2^24
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = pos_lo + r;
        if (t > pos || (p.window > 0 && t + n - 1 <= pos - p.window)) continue;  // no key of the tile visible
        // Visible: in the tile, not after the row, inside its window. At least one is (the checks above).
        VecI visible = (lane_offset < static_cast<float>(n)) & (key <= static_cast<float>(pos));
        if (p.window > 0) visible &= key > static_cast<float>(pos - p.window);
        // In three passes over the group's heads (scores, softmax, values), so that the heads' chains
        // of dependent steps (a score's horizontal sums, max, exp, sum) overlap instead of running
        // one head after the other. Each head's arithmetic is the same, in the same order.
        VecF* scores = score_buffer.data();
        float* corrections = correction_buffer.data();
        for (int64_t h = 0; h < group; ++h) {
          if constexpr (kOneRow) spread.Step();
          const float* qr = qs.data() + (r * group + h) * d_dim;
          VecF dots[kLanes];
          if (kHeadDim && n == kLanes) {  // a whole tile: straight-line code, kLanes independent chains
#pragma GCC unroll 16
            for (int64_t j = 0; j < kLanes; ++j) {
              VecF dot = {};
#pragma GCC unroll 16
              for (int64_t d = 0; d < kHeadDim; d += kLanes) dot = Fma(Load(qr + d), Load(kt + j * kHeadDim + d), dot);
              dots[j] = dot;
            }
          } else {
            for (int64_t j = 0; j < kLanes; ++j) {
              VecF dot = {};
              if (j < n) {
                const float* kr = kt + j * d_dim;
                for (int64_t d = 0; d < d_dim; d += kLanes) dot = Fma(Load(qr + d), Load(kr + d), dot);
              }
              dots[j] = dot;
            }
          }
          VecF score = SumEach(dots);
          if (p.soft_cap > 0) {
            for (int64_t j = 0; j < n; ++j) score[j] = p.soft_cap * std::tanh(score[j] / p.soft_cap);
          }
          scores[h] = visible ? score : VecF{} - INFINITY;
        }
        for (int64_t h = 0; h < group; ++h) {
          const int64_t lane = r * group + h;
          const float m_new = std::max(m[lane], Max(scores[h]));
          const VecF w = visible ? Exp(scores[h] - m_new) : VecF{};
          const float correction = std::exp(m[lane] - m_new);  // 0 on the first tile (m = -inf)
          l[lane] = l[lane] * correction + Sum(w);
          m[lane] = m_new;
          scores[h] = w;  // now the weights
          corrections[h] = correction;
        }
        for (int64_t h = 0; h < group; ++h) {
          if constexpr (kOneRow) spread.Step();
          Store(weights, scores[h]);
          const float correction = corrections[h];
          float* a = acc.data() + (r * group + h) * d_dim;
          for (int64_t d = 0; d < d_dim; d += kLanes) {  // two chains (even and odd keys) for the FMA latency
            VecF even = Load(a + d) * correction, odd = {};
            int64_t j = 0;
            for (; j + 1 < n; j += 2) {
              even += weights[j] * Load(vt + j * d_dim + d);
              odd += weights[j + 1] * Load(vt + (j + 1) * d_dim + d);
            }
            if (j < n) even += weights[j] * Load(vt + j * d_dim + d);
            Store(a + d, even + odd);
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < group; ++h) {
      const int64_t lane = r * group + h;
      float* dst = p.out + ((r0 + r) * p.num_heads + first_head + h) * d_dim;
      const float inv = l[lane] > 0 ? 1.0f / l[lane] : 0.0f;
      for (int64_t d = 0; d < d_dim; ++d) dst[d] = acc[lane * d_dim + d] * inv;
    }
  }
}

// An item of Item(): rows [r0, r1) of sequence s, query heads [h0, h1) of KV head g's group.
struct Work {
  int64_t s, g, h0, h1, r0, r1;
};

// A decode step of few sequences has few items, often not a multiple of the threads: SmolLM2's 3
// KV heads at one sequence give 3 items to 2 threads, Gemma 3's 1 KV head gives 1, and a thread
// then waits a whole item for the other. Items alone in the last round (`threads` > the remainder)
// are split by query heads: each head's arithmetic is the same whatever heads share its item (the
// passes over a group's heads keep each head's own order), so a row's result does not change; the
// parts each widen the float16 tiles again, which is why only the tail is split, and only when the
// items are few (in a step of many the last round is a small part of it). Only one-row items
// (decode rows), whose cost is one row's keys: a prefill chunk's items are many already.
void SplitTail(std::vector<Work>& items, int64_t threads) {
  const int64_t n = static_cast<int64_t>(items.size()), tail = n % threads;
  if (threads < 2 || tail == 0 || n >= 4 * threads) return;
  const int64_t parts_each = (threads + tail - 1) / tail;
  std::vector<Work> split(items.begin(), items.end() - tail);
  for (int64_t i = n - tail; i < n; ++i) {
    const Work w = items[i];
    const int64_t heads = w.h1 - w.h0, parts = std::min(parts_each, heads);
    if (w.r1 - w.r0 != 1 || parts < 2) {
      split.push_back(w);
      continue;
    }
    for (int64_t j = 0; j < parts; ++j) {  // heads as even as they go: 3 heads in 2 parts are 2 + 1
      split.push_back({w.s, w.g, w.h0 + heads * j / parts, w.h0 + heads * (j + 1) / parts, w.r0, w.r1});
    }
  }
  items.swap(split);
}

// What Item() relies on, for every sequence s: 0 <= query_start_loc[s] <= query_start_loc[s + 1] <=
// num_tokens (its rows lie in q and out), q_len <= seq_lens[s] <= max_pages * page_size (its first
// query position is >= 0 and its keys lie in its block table row). Page ids are checked as they are
// read: an id outside the pool is skipped.
template <typename KV>
ffi::Error CheckMetadata(const Problem<KV>& p, int64_t num_seqs) {
  if (p.qsl[0] < 0) return ffi::Error::InvalidArgument("paged_attention: query_start_loc[0] is negative");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t begin = p.qsl[s], end = p.qsl[s + 1];
    if (end < begin || end > p.num_tokens) {
      return ffi::Error::InvalidArgument("paged_attention: query_start_loc must be non-decreasing within "
                                         "[0, num_tokens]");
    }
    if (p.seq_lens[s] < end - begin) {
      return ffi::Error::InvalidArgument("paged_attention: seq_lens[s] is less than the sequence's query rows");
    }
    if (p.seq_lens[s] > p.max_pages * p.page_size) {
      return ffi::Error::InvalidArgument("paged_attention: seq_lens[s] exceeds the block table "
                                         "(max_pages * page_size)");
    }
  }
  return ffi::Error::Success();
}

template <ffi::DataType CacheType, typename KV>
ffi::Error RaggedPagedAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<CacheType> k_cache,
                                    ffi::Buffer<CacheType> v_cache, ffi::Buffer<ffi::S32> layer,
                                    ffi::Buffer<ffi::S32> query_start_loc, ffi::Buffer<ffi::S32> seq_lens,
                                    ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> sliding_window,
                                    ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap) {
  auto qd = q.dimensions();
  auto cd = k_cache.dimensions();
  auto td = block_tables.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: bad ranks");
  }
  Problem<KV> p;
  p.num_tokens = qd[0];
  p.num_heads = qd[1];
  p.head_dim = qd[2];
  const int64_t num_layers = cd[0];
  p.num_kv_heads = cd[1];
  p.num_pages = cd[2];
  p.page_size = cd[3];
  p.max_pages = td[1];
  const int64_t num_seqs = td[0];
  if (cd[4] != p.head_dim || p.head_dim % kLanes || p.num_heads % p.num_kv_heads ||
      query_start_loc.element_count() != num_seqs + 1 || seq_lens.element_count() != num_seqs) {
    return ffi::Error::InvalidArgument("paged_attention: shapes disagree (head_dim must be a multiple of the "
                                       "vector width)");
  }
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= num_layers) return ffi::Error::InvalidArgument("paged_attention: layer out of range");
  const int64_t layer_size = p.num_kv_heads * p.num_pages * p.page_size * p.head_dim;
  p.q = q.typed_data();
  p.k = reinterpret_cast<const KV*>(k_cache.typed_data()) + l * layer_size;
  p.v = reinterpret_cast<const KV*>(v_cache.typed_data()) + l * layer_size;
  p.qsl = query_start_loc.typed_data();
  p.seq_lens = seq_lens.typed_data();
  p.tables = block_tables.typed_data();
  p.out = out->typed_data();
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = *sliding_window.typed_data();
  if (ffi::Error error = CheckMetadata(p, num_seqs); error.failure()) return error;
  std::memset(p.out, 0, sizeof(float) * p.num_tokens * p.num_heads * p.head_dim);  // padding rows: zeros

  const int64_t group = p.num_heads / p.num_kv_heads;
  std::vector<Work> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t begin = p.qsl[s], end = p.qsl[s + 1];
    if (begin == end) continue;  // a padding sequence
    for (int64_t g = 0; g < p.num_kv_heads; ++g) {
      for (int64_t r = begin; r < end; r += kRowBlock) {
        items.push_back({s, g, 0, group, r, std::min(end, r + kRowBlock)});
      }
    }
  }
  SplitTail(items, jaxinfer::Workers::Get().size());
  // The common head sizes as constants, so that Item's loops over a head unroll (a decode step at 32
  // sequences spent a quarter of its attention time in the loop overhead of 4-iteration dot products).
  auto pick = [&](auto one_row) {
    constexpr bool kOne = decltype(one_row)::value;
    return p.head_dim == 64 ? Item<KV, 64, kOne> : p.head_dim == 128 ? Item<KV, 128, kOne>
         : p.head_dim == 256 ? Item<KV, 256, kOne> : Item<KV, 0, kOne>;
  };
  auto item = pick(std::false_type{}), one_row = pick(std::true_type{});
  jaxinfer::Workers::Get().ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Work& w = items[i];
    (w.r1 - w.r0 == 1 ? one_row : item)(p, w.s, w.g, w.h0, w.h1, w.r0, w.r1);
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXINFER_ATTENTION_HANDLER(name, cache_type, kv)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (RaggedPagedAttentionImpl<cache_type, kv>),          \
                                ffi::Ffi::Bind()                                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                          \
                                    .Arg<ffi::Buffer<cache_type>>()                        \
                                    .Arg<ffi::Buffer<cache_type>>()                        \
                                    .Arg<ffi::Buffer<ffi::S32>>()                          \
                                    .Arg<ffi::Buffer<ffi::S32>>()                          \
                                    .Arg<ffi::Buffer<ffi::S32>>()                          \
                                    .Arg<ffi::Buffer<ffi::S32>>()                          \
                                    .Arg<ffi::Buffer<ffi::S32>>()                          \
                                    .Ret<ffi::Buffer<ffi::F32>>()                          \
                                    .Attr<float>("sm_scale")                               \
                                    .Attr<float>("soft_cap"));

JAXINFER_ATTENTION_HANDLER(JaxinferRaggedPagedAttention, ffi::F32, float)
JAXINFER_ATTENTION_HANDLER(JaxinferRaggedPagedAttentionF16, ffi::F16, uint16_t)
