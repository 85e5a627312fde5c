// fastmath.h: exp, sigmoid and tanh in float without libm calls, for the gate loops.
#pragma once
#include "common.h"

// exp, sigmoid and tanh without libm calls, so the gate loops vectorize (each is marked omp simd:
// iterations touch distinct elements of the four gate blocks): libm's expf and tanhf are scalar
// calls and took 40% of a step. The gate functions clamp with integer operations on the bits: a
// clamp written as a float select made the compiler split every gate loop into masked copies,
// twice as slow. Error is a few ulp, relative even near 0, far inside the 1e-5 we test; NaN
// propagates.

// e^r - 1 for |r| <= ln(2) / 2: Taylor to r^7, whose next term is below float rounding
static inline float expm1_reduced(float r) {
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f; p = p * r + 0.5f;
    return (p * r) * r + r;
}

// e^x = 2^n e^r with x = n ln 2 + r, for x in [-87, 88]: returns 2^n and sets *em1 = e^r - 1
static inline float exp_split(float* em1, float x) {
    float t = x * 1.44269504f + 12582912.0f;   // + 1.5 * 2^23 rounds x / ln 2 into t's low mantissa bits
    float n = t - 12582912.0f;
    *em1 = expm1_reduced(x - n * 0.693145751953125f - n * 1.428606765330187e-06f);   // Cody-Waite
    uint32_t bits;   // 2^n from those bits, in unsigned arithmetic: no undefined conversion for a NaN x
    memcpy(&bits, &t, sizeof(bits));
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return scale;
}

static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float em1, s = exp_split(&em1, x);
    return s * em1 + s;
}

// min(|x|, 87) by the bits (an integer min, which the compiler keeps as one instruction); NaN gives 87
static inline float abs_clamped(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof(b));
    b &= 0x7FFFFFFFu;
    b = b < 0x42AE0000u ? b : 0x42AE0000u;
    memcpy(&x, &b, sizeof(x));
    return x;
}

// y, or a NaN where x is one
static inline float nan_from(float y, float x) {
    uint32_t xb, yb;
    memcpy(&xb, &x, sizeof(xb)); memcpy(&yb, &y, sizeof(yb));
    uint32_t is_nan = (0x7F800000u - (xb & 0x7FFFFFFFu)) >> 31;
    yb |= (0u - is_nan) & 0x7FC00000u;
    memcpy(&y, &yb, sizeof(y));
    return y;
}

// from e = e^-|x| in (0, 1], which never overflows
static inline float sigmoidf(float x) {
    float em1, s = exp_split(&em1, -abs_clamped(x));
    float e = s * em1 + s;
    // 1 / (1 + e) for x >= 0, else e / (1 + e): select the numerator, not a product the compiler would
    // compute in one branch only (a possibly trapping operation there keeps the loop scalar on AVX2)
    float num = x >= 0.0f ? 1.0f : e;
    return nan_from(num / (1.0f + e), x);
}

// tanh |x| = -m / (m + 2) with m = e^-2|x| - 1 in (-1, 0], relative-exact near 0 through expm1
static inline float tanh_approx(float x) {
    float em1, s = exp_split(&em1, -abs_clamped(2.0f * x));
    float m = s * em1 + (s - 1.0f);
    return nan_from(copysignf(-m / (m + 2.0f), x), x);
}

