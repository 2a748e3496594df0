// y[M, N] = x[M, K] @ (data[layer, K, N] * scales[layer, N]): int8 weight-only matmul for the CPU,
// an XLA FFI handler (see kernels_cpu/native.py, which compiles this file for the machine it runs on).
//
// Why it exists: XLA's CPU backend does not fuse an int8 -> f32 convert into a dot. It writes the
// dequantized weight out and reads it back, which makes decode compute-bound at about 1/3 of the
// memory bandwidth. Here each tile of W (up to 256 columns wide) is converted in registers and
// multiplied into up to 4 rows' accumulators, so W is read once per 4 rows of x and never written.
//
// The weight comes whole ([L, K, N], a layer stack) with the layer to use, so a layer loop hands the
// kernel its stacked weights without XLA copying the layer out first.
//
// Work is split over the XLA CPU thread pool by blocks of columns; the calling thread takes blocks
// too and waits only for blocks another thread has already started.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A tile is R rows of x by V vectors of columns; its R x V accumulators stay in registers
// (kAccRegs of the 32 zmm with AVX-512, of the 16 ymm with AVX2). One row takes the widest tile,
// so each row of W it reads is several cache lines long; work is dealt out in blocks of kBlock
// columns, a multiple of every tile's width.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccRegs = 16;
#else
constexpr int kLanes = 8;
constexpr int kAccRegs = 8;
#endif
constexpr int64_t kBlock = 256;
constexpr int kPrefetchRows = 8;  // rows of W ahead of the one being read

typedef float VecF __attribute__((vector_size(kLanes * 4)));

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

inline float HalfToFloat(uint16_t h) {
  // IEEE binary16 -> binary32, subnormals included.
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int shift = 0;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        ++shift;
      }
      mant &= 0x3ffu;
      bits = sign | ((127 - 15 - shift + 1) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rows [m0, m0 + R) of y, columns [n0, n0 + width): width <= V * kLanes.
template <int64_t R, int V>
inline void Tile(const float* x, const int8_t* w, const uint16_t* scales, float* y, int64_t k_dim,
                 int64_t n_dim, int64_t m0, int64_t n0, int64_t width) {
  constexpr int64_t kWidth = V * kLanes;
  if (width == kWidth) {
    VecF acc[R][V] = {};
    const int8_t* row = w + n0;
    for (int64_t k = 0; k < k_dim; ++k, row += n_dim) {
      if (k + kPrefetchRows < k_dim) {
        for (int64_t line = 0; line < kWidth; line += 64) __builtin_prefetch(row + kPrefetchRows * n_dim + line);
      }
      VecF wv[V];
      for (int j = 0; j < V; ++j) wv[j] = LoadConvert(row + j * kLanes);
      for (int64_t r = 0; r < R; ++r) {
        const VecF xv = VecF{} + x[(m0 + r) * k_dim + k];
        for (int j = 0; j < V; ++j) acc[r][j] += xv * wv[j];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* out = y + (m0 + r) * n_dim + n0;
      for (int j = 0; j < V; ++j) {
        float lane[kLanes];
        std::memcpy(lane, &acc[r][j], sizeof lane);
        for (int i = 0; i < kLanes; ++i) out[j * kLanes + i] = lane[i] * HalfToFloat(scales[n0 + j * kLanes + i]);
      }
    }
    return;
  }
  float acc[R][kWidth] = {};  // the last, narrower columns
  for (int64_t k = 0; k < k_dim; ++k) {
    const int8_t* row = w + k * n_dim + n0;
    for (int64_t r = 0; r < R; ++r) {
      const float xv = x[(m0 + r) * k_dim + k];
      for (int64_t j = 0; j < width; ++j) acc[r][j] += xv * static_cast<float>(row[j]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* out = y + (m0 + r) * n_dim + n0;
    for (int64_t j = 0; j < width; ++j) out[j] = acc[r][j] * HalfToFloat(scales[n0 + j]);
  }
}

// Every row of y, columns [c0, c1).
template <int64_t R>
inline void Columns(const float* x, const int8_t* w, const uint16_t* scales, float* y, int64_t k_dim,
                    int64_t n_dim, int64_t m0, int64_t c0, int64_t c1) {
  constexpr int V = R == 3 ? kAccRegs / 4 : kAccRegs / R;  // widths divide kBlock
  for (int64_t n0 = c0; n0 < c1; n0 += V * kLanes) {
    Tile<R, V>(x, w, scales, y, k_dim, n_dim, m0, n0, std::min<int64_t>(V * kLanes, c1 - n0));
  }
}

void Blocks(const float* x, const int8_t* w, const uint16_t* scales, float* y, int64_t m_dim,
            int64_t k_dim, int64_t n_dim, int64_t block_begin, int64_t block_end) {
  const int64_t c0 = block_begin * kBlock, c1 = std::min(n_dim, block_end * kBlock);
  int64_t m0 = 0;
  for (; m0 + 4 <= m_dim; m0 += 4) Columns<4>(x, w, scales, y, k_dim, n_dim, m0, c0, c1);
  switch (m_dim - m0) {
    case 3: Columns<3>(x, w, scales, y, k_dim, n_dim, m0, c0, c1); break;
    case 2: Columns<2>(x, w, scales, y, k_dim, n_dim, m0, c0, c1); break;
    case 1: Columns<1>(x, w, scales, y, k_dim, n_dim, m0, c0, c1); break;
    default: break;
  }
}

struct Job {
  const float* x;
  const int8_t* w;
  const uint16_t* scales;
  float* y;
  int64_t m, k, n, num_blocks, blocks_per_chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Takes chunks until none are left; returns after finishing the ones it took.
  void Work() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t begin = c * blocks_per_chunk;
      Blocks(x, w, scales, y, m, k, n, begin, std::min(num_blocks, begin + blocks_per_chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> data,
                          ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = data.dimensions();
  if (xd.size() != 2 || wd.size() != 3) {
    return ffi::Error::InvalidArgument("int8_matmul: x must be [M, K] and data [L, K, N]");
  }
  const int64_t m = xd[0], k = xd[1], num_layers = wd[0], n = wd[2];
  if (wd[1] != k || scales.element_count() != num_layers * n) {
    return ffi::Error::InvalidArgument("int8_matmul: x, data and scales shapes disagree");
  }
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= num_layers) return ffi::Error::InvalidArgument("int8_matmul: layer out of range");

  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = data.typed_data() + static_cast<int64_t>(l) * k * n;
  job->scales = reinterpret_cast<const uint16_t*>(scales.typed_data()) + static_cast<int64_t>(l) * n;
  job->y = y->typed_data();
  job->m = m;
  job->k = k;
  job->n = n;
  job->num_blocks = (n + kBlock - 1) / kBlock;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A few chunks per thread, so that a thread that starts late still finds work.
  const int64_t target_chunks = threads > 1 ? 4 * threads : 1;
  job->blocks_per_chunk = std::max<int64_t>(1, job->num_blocks / target_chunks);
  job->num_chunks = (job->num_blocks + job->blocks_per_chunk - 1) / job->blocks_per_chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, job->num_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
