// Float16 (IEEE binary16) as float32 for the native kernels that read float16 data beside float32
// vectors (int8_matmul.cc's scales, paged_attention.cc's cache): the vector width, one value exactly
// in plain code (for a machine without F16C), and kLanes values at once.
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float VecF __attribute__((vector_size(kLanes * 4)));

// One float16 as a float, exactly (subnormals included).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24
    const float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &value, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// kLanes float16 values widened to float32 (exact): one conversion instruction where there is one.
inline VecF LoadHalf(const uint16_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<VecF>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  return reinterpret_cast<VecF>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = HalfToFloat(p[i]);
  return v;
#endif
}

}  // namespace
