// The ε stream of the Triton noise kernels (kernels/noise.py), computed on the CPU.
//
// Normal j (0..3) of row r of plane p (in-plane elements 4r .. 4r+3) is made from the four words of
// Philox-4x32-10 with counter (lo, hi, 0, 0) of p * ceil(HW / 4) + r and key (lo, hi) of the seed,
// exactly as tl.randint4x computes them, then two Box-Muller transforms: (w0, w1) -> normals 0, 1
// and (w2, w3) -> normals 2, 3. The Box-Muller steps are the kernels' _box_muller, operation for
// operation in float32 (no FMA contraction), so a CPU run and the Triton interpreter agree to the
// last ulp of the logarithm; a GPU run also to the FMAs its compiler forms.
//
// Rows are generated kTileRows at a time into structure-of-arrays buffers, so every loop below is a
// plain loop over independent lanes that the compiler vectorises (Philox's 32 x 32 -> 64-bit
// products are vpmuludq; the logarithm is a polynomial, not a libm call).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace srdiff {
namespace normal_stream {

// Inlined into each caller, so a caller compiled for AVX2 vectorises these loops with AVX2.
#define SRDIFF_STREAM_INLINE inline __attribute__((always_inline))

constexpr int kTileRows = 64;                 // rows of four normals generated together
constexpr int kTileElems = 4 * kTileRows;     // elements a tile covers
constexpr int kPhiloxRounds = 10;             // tl.randint4x's default
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr float kInv2Pow23 = 1.1920928955078125e-07f;  // 2^-23

// Philox-4x32-10 of the counters (first + i, 0, 0) for i < kTileRows (split into 32-bit lo / hi as
// tl.randint4x does for an int64 offset), key (k0, k1); the four words of row i go to w0..w3[i].
// The portable definition; philox_tile_avx2 below computes the same words eight rows at a time.
SRDIFF_STREAM_INLINE void philox_tile(uint64_t first, uint32_t k0, uint32_t k1, uint32_t* w0, uint32_t* w1,
                                      uint32_t* w2, uint32_t* w3) {
  for (int i = 0; i < kTileRows; ++i) {
    const uint64_t counter = first + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ key0;
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ key1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      key0 += kKeyA;
      key1 += kKeyB;
    }
    w0[i] = c0;
    w1[i] = c1;
    w2[i] = c2;
    w3[i] = c3;
  }
}

SRDIFF_STREAM_INLINE float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

SRDIFF_STREAM_INLINE uint32_t as_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// mask ? a : b for an all-ones or all-zero mask, as bit operations (exact, and a loop of them
// vectorises where GCC would keep a float ?: as a branch).
SRDIFF_STREAM_INLINE float select(uint32_t mask, float a, float b) {
  return as_float((as_bits(a) & mask) | (as_bits(b) & ~mask));
}

// ln(u) for u in [2^-24, 1), a normal float: u = 2^e * m with m in [√½, √2), ln(1 + x) for
// x = m - 1 from Cephes' logf polynomial (relative error < 1e-7 over that range).
SRDIFF_STREAM_INLINE float log_unit(float u) {
  const uint32_t bits = as_bits(u);
  const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const uint32_t high = mbits > 0x3FB504F3u ? 1u : 0u;        // m > √2 (as float bits, both positive)
  const float m = as_float(mbits - (high << 23));             // halved when high: exact
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(high);
  const float x = m - 1.0f, z = x * x, fe = static_cast<float>(e);
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// The kernels' _box_muller: two N(0, 1) draws from two words. Radius from a: u = (top 23 bits +
// 1/2) * 2^-23, exact, in (0, 1). Angle from b: its top two bits pick the quadrant, the next 23 a
// phase in (-π/4, π/4) where Taylor polynomials to φ^9 / φ^10 serve for sin and cos.
SRDIFF_STREAM_INLINE void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float u = (static_cast<float>(static_cast<int32_t>(a >> 9)) + 0.5f) * kInv2Pow23;
  const float r = __builtin_sqrtf(-2.0f * log_unit(u));
  const float quarter_turns =
      (static_cast<float>(static_cast<int32_t>((b >> 7) & 0x7FFFFFu)) + 0.5f) * kInv2Pow23 - 0.5f;
  const float phi = quarter_turns * 1.5707963267948966f;
  const float p2 = phi * phi;
  const float sin = phi + phi * p2 *
                              (-1.6666666666666666e-01f +
                               p2 * (8.333333333333333e-03f + p2 * (-1.984126984126984e-04f + p2 * 2.7557319223985893e-06f)));
  const float cos =
      1.0f + p2 * (-0.5f + p2 * (4.1666666666666664e-02f +
                                 p2 * (-1.3888888888888889e-03f + p2 * (2.48015873015873e-05f - p2 * 2.755731922398589e-07f))));
  const uint32_t odd = 0u - ((b >> 30) & 1u);  // all ones: rotate (cos, sin) by a quarter turn ...
  const float x = select(odd, -sin, cos);
  const float y = select(odd, cos, sin);
  const uint32_t half = (b >> 31) << 31;        // ... and by a half turn: flip both signs
  z0 = as_float(as_bits(r * x) ^ half);
  z1 = as_float(as_bits(r * y) ^ half);
}

// The kTileElems normals of rows first .. first + kTileRows - 1 (counters), in element order.
// Box-Muller of a tile's words, interleaved into element order: eps[4i + j] = normal j of row i.
SRDIFF_STREAM_INLINE void normals_from_words(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                             const uint32_t* w3, float* eps) {
  alignas(64) float n0[kTileRows], n1[kTileRows], n2[kTileRows], n3[kTileRows];
  for (int i = 0; i < kTileRows; ++i) box_muller(w0[i], w1[i], n0[i], n1[i]);
  for (int i = 0; i < kTileRows; ++i) box_muller(w2[i], w3[i], n2[i], n3[i]);
  for (int i = 0; i < kTileRows; ++i) {
    eps[4 * i + 0] = n0[i];
    eps[4 * i + 1] = n1[i];
    eps[4 * i + 2] = n2[i];
    eps[4 * i + 3] = n3[i];
  }
}

// The kTileElems normals of rows first .. first + kTileRows - 1 (counters), in element order:
// the portable definition.
inline void normal_tile_portable(uint64_t first, uint32_t k0, uint32_t k1, float* eps) {
  alignas(64) uint32_t w0[kTileRows], w1[kTileRows], w2[kTileRows], w3[kTileRows];
  philox_tile(first, k0, k1, w0, w1, w2, w3);
  normals_from_words(w0, w1, w2, w3, eps);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SRDIFF_NORMAL_STREAM_AVX2 1

// (hi, lo) 32-bit halves of a * x for eight lanes: the even and odd lanes as 64-bit products
// (vpmuludq), recombined by blends. Plain C++ cannot say this: GCC widens the product to a full
// 64 x 64-bit multiply of three vpmuludq.
__attribute__((target("avx2"), always_inline)) inline void mul_hi_lo_avx2(__m256i a, __m256i x, __m256i& hi,
                                                                          __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, x);
  const __m256i odd = _mm256_mul_epu32(a, _mm256_srli_epi64(x, 32));
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// normal_tile_portable's words eight rows per step (the same arithmetic, lane by lane), then the
// same Box-Muller loops, which the compiler vectorises for AVX2 here.
__attribute__((target("avx2"))) inline void normal_tile_avx2(uint64_t first, uint32_t k0, uint32_t k1, float* eps) {
  alignas(64) uint32_t w0[kTileRows], w1[kTileRows], w2[kTileRows], w3[kTileRows];
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  for (int g = 0; g < kTileRows; g += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int k = 0; k < 8; ++k) {
      const uint64_t counter = first + static_cast<uint64_t>(g + k);
      lo[k] = static_cast<uint32_t>(counter);
      hi[k] = static_cast<uint32_t>(counter >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo_avx2(round_b, c2, hi_b, lo_b);
      mul_hi_lo_avx2(round_a, c0, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c1 = lo_b;
      c3 = lo_a;
      key0 += kKeyA;
      key1 += kKeyB;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(w0 + g), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w1 + g), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w2 + g), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w3 + g), c3);
  }
  normals_from_words(w0, w1, w2, w3, eps);
}
#endif

}  // namespace normal_stream
}  // namespace srdiff
