// Direction generator and storage rounding shared by the CPU (C++) and CUDA backends.
//
// This header is the C++ form of docs/directions.md (spec version 1): Philox4x32-10 keyed by the seed and counted by
// (group = j >> 2, direction index, tag), a Box-Muller transform built only from correctly rounded + - * / sqrt, and
// round-to-nearest-even / stochastic rounding to bf16 and fp16 written with integer operations. It must be compiled
// without floating-point contraction (-ffp-contract=off, nvcc -fmad=false) and without fast-math, so that every
// operation is one IEEE-754 fp32 operation and the results are bit-identical to the Triton and torch backends.
#pragma once

#include <cstdint>
#include <cstring>

#include "hiso/codes.h"

#if defined(__CUDACC__)
#define HISO_HD __host__ __device__ __forceinline__
#else
#define HISO_HD inline __attribute__((always_inline))
#endif

// Correctly rounded division and square root, spelled out so that no build flag can swap in an approximation.
#if defined(__CUDA_ARCH__)
#define HISO_DIV(a, b) __fdiv_rn((a), (b))
#define HISO_SQRT(a) __fsqrt_rn(a)
#else
#define HISO_DIV(a, b) ((a) / (b))
#define HISO_SQRT(a) __builtin_sqrtf(a)
#endif

namespace hiso {

// ---------------------------------------------------------------- constants (see hiso_kernels/spec.py)
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kTagDirection = 0x00000000u;
constexpr uint32_t kTagRounding = 0x726F756Eu;

// fp32 constants as exact hexadecimal literals (identical to the bit patterns in spec.py).
constexpr float kLn2 = 0x1.62e430p-1f;
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kLogC1 = 0x1.555556p-1f;   // 2/3
constexpr float kLogC2 = 0x1.99999ap-2f;   // 2/5
constexpr float kLogC3 = 0x1.24924ap-2f;   // 2/7
constexpr float kLogC4 = 0x1.c71c72p-3f;   // 2/9
constexpr float kSinC1 = -0x1.555556p-3f;  // -1/3!
constexpr float kSinC2 = 0x1.111112p-7f;   // 1/5!
constexpr float kSinC3 = -0x1.a01a02p-13f; // -1/7!
constexpr float kSinC4 = 0x1.71de3ap-19f;  // 1/9!
constexpr float kCosC1 = -0.5f;            // -1/2!
constexpr float kCosC2 = 0x1.555556p-5f;   // 1/4!
constexpr float kCosC3 = -0x1.6c16c2p-10f; // -1/6!
constexpr float kCosC4 = 0x1.a01a02p-16f;  // 1/8!
constexpr float kHalfPi = 0x1.921fb6p+0f;
constexpr float kTwoPowM24 = 0x1.0p-24f;

// ---------------------------------------------------------------- bit casts
HISO_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

HISO_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// ---------------------------------------------------------------- Philox4x32-10 (Salmon et al. 2011)
struct Philox4 {
  uint32_t v[4];
};

HISO_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four words for element group g (elements 4g..4g+3) of direction p under seed.
HISO_HD Philox4 direction_words(uint64_t seed, uint32_t p, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), p, kTagDirection,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The four stochastic-rounding words for element group g under a rounding seed.
HISO_HD Philox4 rounding_words(uint64_t rseed, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, kTagRounding,
                       static_cast<uint32_t>(rseed), static_cast<uint32_t>(rseed >> 32));
}

// ---------------------------------------------------------------- Gaussian transform
// Box-Muller on the word pair (ra, rb): z0 = R cos(theta), z1 = R sin(theta) with
//   R = sqrt(-2 ln u),  u = (2 (ra >> 9) + 1) 2^-24 in (0, 1)   (exact; |z| <= 5.77)
//   theta = q pi/2 + a, q = rb >> 30, a = (f - 1/2) pi/2, f = (2 ((rb & 0x3FFFFFFF) >> 7) + 1) 2^-24
// ln, sin and cos are short polynomials evaluated in a fixed order (relative error below 1e-7).
// Branch-free formulation (integer selects instead of conditionals) so that SSE / AVX2 code vectorises too; each
// select below is exactly the operation the spec names (halving m is an exponent decrement, negation a sign flip).
HISO_HD float portable_log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  const uint32_t mant = bits & 0x007FFFFFu;
  const uint32_t big = mant > 0x003504F3u ? 1u : 0u;  // m > sqrt(2) (0x3FB504F3), m in [1, 2)
  const float m = bits_to_float(mant | (0x3F800000u - (big << 23)));  // m, or m / 2 when big
  const int e = static_cast<int>(bits >> 23) - 127 + static_cast<int>(big);
  const float t = HISO_DIV(m - 1.0f, m + 1.0f);
  const float w = t * t;
  const float lnm = t * (2.0f + w * (kLogC1 + w * (kLogC2 + w * (kLogC3 + w * kLogC4))));
  return static_cast<float>(e) * kLn2 + lnm;
}

HISO_HD void gaussian_pair(uint32_t ra, uint32_t rb, float& z0, float& z1) {
  // Integer-to-float conversions go through int32 (the values are below 2^24, so exact either way): SSE and AVX2
  // have no unsigned conversion, and compilers will not vectorise one.
  const float u = static_cast<float>(static_cast<int32_t>(((ra >> 9) << 1) | 1u)) * kTwoPowM24;
  const float radius = HISO_SQRT(portable_log_unit(u) * -2.0f);
  const uint32_t q = rb >> 30;
  const float f = static_cast<float>(static_cast<int32_t>((((rb & 0x3FFFFFFFu) >> 7) << 1) | 1u)) * kTwoPowM24;
  const float a = (f - 0.5f) * kHalfPi;
  const float a2 = a * a;
  const float sa = a * (1.0f + a2 * (kSinC1 + a2 * (kSinC2 + a2 * (kSinC3 + a2 * kSinC4))));
  const float ca = 1.0f + a2 * (kCosC1 + a2 * (kCosC2 + a2 * (kCosC3 + a2 * kCosC4)));
  // rotate (ca, sa) by q quarter turns: q = 0 (ca, sa), 1 (-sa, ca), 2 (-ca, -sa), 3 (sa, -ca)
  const uint32_t swap = 0u - (q & 1u);  // all ones for odd q
  const uint32_t ca_bits = float_to_bits(ca);
  const uint32_t sa_bits = float_to_bits(sa);
  const uint32_t c_bits = ((sa_bits & swap) | (ca_bits & ~swap)) ^ ((((q + 1u) >> 1) & 1u) << 31);
  const uint32_t s_bits = ((ca_bits & swap) | (sa_bits & ~swap)) ^ ((q >> 1) << 31);
  z0 = radius * bits_to_float(c_bits);
  z1 = radius * bits_to_float(s_bits);
}

HISO_HD float rademacher(uint32_t r) { return bits_to_float(0x3F800000u | (r & 0x80000000u)); }

// The direction values of the four elements of one group.
template <int DIST>
HISO_HD void group_directions(const Philox4& w, float z[4]) {
  if (DIST == kGaussian) {
    gaussian_pair(w.v[0], w.v[1], z[0], z[1]);
    gaussian_pair(w.v[2], w.v[3], z[2], z[3]);
  } else {
    z[0] = rademacher(w.v[0]);
    z[1] = rademacher(w.v[1]);
    z[2] = rademacher(w.v[2]);
    z[3] = rademacher(w.v[3]);
  }
}

// ---------------------------------------------------------------- storage conversions
// c ? a : b as bit arithmetic. Compilers if-convert a plain ternary only up to a point; masks always vectorise.
HISO_HD uint32_t select_u32(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c))); }

HISO_HD bool is_finite_bits(uint32_t b) { return (b & 0x7F800000u) != 0x7F800000u; }

HISO_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0 (the canonical quiet NaN, as torch's conversion).
HISO_HD uint16_t float_to_bf16_nearest(float y) {
  const uint32_t b = float_to_bits(y);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_u32((b & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));
}

// Stochastic rounding: add 16 random bits below the kept mantissa, truncate. Unbiased: E[result] = y.
HISO_HD uint16_t float_to_bf16_stochastic(float y, uint32_t r) {
  const uint32_t b = float_to_bits(y);
  const uint32_t up = (b + (r & 0xFFFFu)) >> 16;
  return static_cast<uint16_t>(select_u32(is_finite_bits(b), up, float_to_bf16_nearest(y)));
}

// IEEE half -> float, exact, with integer operations only (independent of denormal flushing).
HISO_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t exp = em >> 10;
  const uint32_t sub = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * kTwoPowM24);  // m 2^-24
  const uint32_t special = (em << 13) | 0x7F800000u;                                            // inf / nan
  const uint32_t normal = (em << 13) + (112u << 23);                                            // rebias 15 -> 127
  return bits_to_float(select_u32(exp == 0u, sub, select_u32(exp == 31u, special, normal)) | sign);
}

// float -> IEEE half, round to nearest even (NaN -> 0x7E00 with the sign kept). Every path is computed and one is
// selected, so the conversion vectorises (no variable shifts: SSE has none).
HISO_HD uint16_t float_to_fp16_nearest(float y) {
  const uint32_t b0 = float_to_bits(y);
  const uint32_t sign = (b0 >> 16) & 0x8000u;
  const uint32_t b = b0 & 0x7FFFFFFFu;
  // normal half; the carry of a round-up past 65504 gives 0x7C00 = inf
  const uint32_t normal = ((b - (112u << 23)) + 0x0FFFu + ((b >> 13) & 1u)) >> 13;
  // subnormal half (|y| < 2^-14): |y| 2^24 < 1024 is exact, and adding 2^23 rounds it to an integer, ties to even
  const float scaled = bits_to_float(b) * 16777216.0f;
  const uint32_t sub = float_to_bits(scaled + 8388608.0f) - 0x4B000000u;
  const uint32_t special = select_u32(b > 0x7F800000u, 0x7E00u, 0x7C00u);  // >= 65536, inf, nan
  const uint32_t o = select_u32(b >= 0x47800000u, special, select_u32(b < 0x38800000u, sub, normal));
  return static_cast<uint16_t>(o | sign);
}

// Stochastic rounding to fp16, returned as the exact fp32 value of the chosen half (convert it with
// float_to_fp16_nearest, which is then exact). Normal range: add 13 random bits below the kept mantissa and
// truncate. Subnormal range (|y| < 2^-14, spacing 2^-24): round |y| 2^24 up with probability equal to its fraction.
HISO_HD float fp16_stochastic_value(float y, uint32_t r) {
  const uint32_t b = float_to_bits(y);
  const uint32_t mag = b & 0x7FFFFFFFu;
  const bool small = mag < 0x38800000u;
  const float normal = bits_to_float((b + (r & 0x1FFFu)) & ~0x1FFFu);
  const float q = bits_to_float(select_u32(small, mag, 0u)) * 16777216.0f;  // |y| 2^24 < 1024, exact
  const float qi = static_cast<float>(static_cast<int32_t>(q));
  const float frac = q - qi;                                                     // exact
  const float uni = static_cast<float>(static_cast<int32_t>(r >> 8)) * kTwoPowM24;  // [0, 1), exact
  const float up = qi + bits_to_float(select_u32(uni < frac, 0x3F800000u, 0u));  // qi + 1 or qi + 0, exact
  const uint32_t sub = float_to_bits(up * kTwoPowM24) | (b & 0x80000000u);
  return bits_to_float(select_u32(is_finite_bits(b), select_u32(small, sub, float_to_bits(normal)), b));
}

}  // namespace hiso
