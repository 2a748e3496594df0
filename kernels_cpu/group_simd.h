// Vector helpers shared by the grouped integer kernels (group_matmul.cc, kquant_matmul.cc): one
// set of names over AVX-512 (VNNI, BW) and AVX2 (FMA, F16C), so each kernel is written once. Every
// helper is one fixed instruction sequence: the kernels' row invariance relies on that.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "kernels_cpu/parallel.h"

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
constexpr bool kHasGroupPath = true;
constexpr int kLanes = 16;
typedef __m512i VecI;
typedef __m512 VecF;
inline VecI LoadI(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VecI Bcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
inline VecI ZeroI() { return _mm512_setzero_si512(); }
inline VecI LowNibbles(VecI v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0f)); }
inline VecI HighNibbles(VecI v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f)); }
// acc + the sums of 4 products of unsigned codes and signed activations, exact in int32.
inline VecI Dot4(VecI acc, VecI codes, VecI x) { return _mm512_dpbusd_epi32(acc, codes, x); }
inline VecI Dot8(VecI acc, VecI codes, VecI x) { return _mm512_dpbusd_epi32(acc, codes, x); }
inline VecF ToFloat(VecI v) { return _mm512_cvtepi32_ps(v); }
inline VecF LoadHalf(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline VecF Splat(float v) { return _mm512_set1_ps(v); }
inline VecF Zero() { return _mm512_setzero_ps(); }
inline VecF Mul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF Fma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline void Store(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecI Or(VecI a, VecI b) { return _mm512_or_si512(a, b); }
inline VecI SubI(VecI a, int32_t v) { return _mm512_sub_epi32(a, _mm512_set1_epi32(v)); }
// Each byte's bits [shift, shift + width) moved to bits [4, 4 + width): the high bits of a code.
inline VecI HighBits(VecI h, int shift, int mask) {
  return _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(h, _mm_cvtsi32_si128(shift)), _mm512_set1_epi8(mask)), 4);
}
inline VecF LoadU8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline VecF LoadS8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline VecI LoadS8I(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VecI MulI(VecI a, VecI b) { return _mm512_mullo_epi32(a, b); }
inline VecI AddI(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr bool kHasGroupPath = true;
constexpr int kLanes = 8;
typedef __m256i VecI;
typedef __m256 VecF;
inline VecI LoadI(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI Bcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline VecI ZeroI() { return _mm256_setzero_si256(); }
inline VecI LowNibbles(VecI v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0f)); }
inline VecI HighNibbles(VecI v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)); }
// vpmaddubsw adds pairs of products in int16 with saturation: exact for 4-bit codes (2 * 15 * 127).
inline VecI Dot4(VecI acc, VecI codes, VecI x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
}
// 8-bit codes would saturate (2 * 255 * 127): their low and high nibbles go separately, the high
// nibbles' pair sums weighted by 16 in vpmaddwd.
inline VecI Dot8(VecI acc, VecI codes, VecI x) {
  const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(LowNibbles(codes), x), _mm256_set1_epi16(1));
  const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(HighNibbles(codes), x), _mm256_set1_epi16(16));
  return _mm256_add_epi32(acc, _mm256_add_epi32(lo, hi));
}
inline VecF ToFloat(VecI v) { return _mm256_cvtepi32_ps(v); }
inline VecF LoadHalf(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VecF Splat(float v) { return _mm256_set1_ps(v); }
inline VecF Zero() { return _mm256_setzero_ps(); }
inline VecF Mul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF Fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline void Store(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecI Or(VecI a, VecI b) { return _mm256_or_si256(a, b); }
inline VecI SubI(VecI a, int32_t v) { return _mm256_sub_epi32(a, _mm256_set1_epi32(v)); }
// Each byte's bits [shift, shift + width) moved to bits [4, 4 + width): the high bits of a code.
inline VecI HighBits(VecI h, int shift, int mask) {
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(mask)), 4);
}
inline VecF LoadU8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
inline VecF LoadS8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
inline VecI LoadS8I(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline VecI MulI(VecI a, VecI b) { return _mm256_mullo_epi32(a, b); }
inline VecI AddI(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
#else
constexpr bool kHasGroupPath = false;
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// One block of 32 x values -> int8 codes q = round(v * 127 / amax) (round to nearest even, llama.cpp's
// Q8_0 rule), returning amax; *sum and *first_half get the sums of all and of the first 16 codes.
// Vector code with the scalar rule's results: max is exact, and v * inv rounds once either way.
inline float QuantizeBlock(const float* v, int8_t* q, int32_t* sum, int32_t* first_half) {
#if defined(__AVX512F__)
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  // max(|v|, acc): a NaN lane keeps acc, as std::max(amax, fabs(v)) keeps amax.
  const __m512 m = _mm512_max_ps(_mm512_abs_ps(b), _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps()));
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  *first_half = _mm512_reduce_add_epi32(qa);
  *sum = *first_half + _mm512_reduce_add_epi32(qb);
#else
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 x[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    m = _mm256_max_ps(_mm256_andnot_ps(sign, x[i]), m);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
  int32_t sums[2] = {0, 0};
  for (int i = 0; i < 4; ++i) {
    alignas(32) int32_t codes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv)));
    for (int j = 0; j < 8; ++j) {
      q[8 * i + j] = static_cast<int8_t>(codes[j]);
      sums[i / 2] += codes[j];
    }
  }
  *first_half = sums[0];
  *sum = sums[0] + sums[1];
#endif
  return amax;
}

// x [M, K] -> int8 per block of 32 (QuantizeBlock), the blocks' scales, each block's scale times the
// sum of its int8 values (for the mins), and (isums16, unless null) the integer sum of each half
// block of 16 (K-quants' Q6_K has a scale per 16). Rows are independent: many of them (a prefill
// chunk) are split between the threads.
inline void QuantizeX(const float* x, int64_t m_dim, int64_t k_dim, int8_t* xq, float* xs, float* xsums,
                      int32_t* isums16) {
  constexpr int64_t kGroup = 32, kRows = 16;
  const int64_t groups = k_dim / kGroup;
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = m * groups + g;
        int32_t sum, first_half;
        const float amax = QuantizeBlock(x + m * k_dim + g * kGroup, xq + m * k_dim + g * kGroup, &sum, &first_half);
        const float scale = amax / 127.0f;
        xs[i] = scale;
        xsums[i] = scale * static_cast<float>(sum);
        if (isums16) {
          isums16[2 * i] = first_half;
          isums16[2 * i + 1] = sum - first_half;
        }
      }
    }
  };
  jaxinfer::Workers::Get().ParallelRows(m_dim, kRows, rows);
}
#endif

}  // namespace
