/* What the shard's C kernels share: a 16-float vector type (one AVX-512 register, two AVX2
 * ones, or plain loops elsewhere, as -march=native allows), and bfloat16 and float16
 * conversions.
 * Included by shard/quant/kernels.c and shard/attention/paged_decode.c. */
#pragma once

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));

static inline v16f splat(float s) {
    v16f v = {0};
    return v + s;
}

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(v16f v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

typedef int32_t v16i __attribute__((vector_size(64)));

/* e^x for x <= 0, 16 at a time (Cephes' expf: x = n ln2 + f, |f| <= ln2 / 2, a degree-7
 * polynomial for e^f, times 2^n through the exponent bits); within 2 ulp of expf, and
 * 1e-38 or less for x < -87 (expf gives 0 below -103). */
static inline v16f exp16(v16f x) {
    v16i low = x < splat(-87.f); /* lanes of all ones where true */
    x = (v16f)((low & (v16i)splat(-87.f)) | (~low & (v16i)x));
    v16f t = x * splat(1.44269504f) - splat(0.5f); /* x log2(e), rounded below trunc */
    v16i n = __builtin_convertvector(t, v16i);     /* nearest integer to x log2(e) */
    v16f nf = __builtin_convertvector(n, v16f);
    v16f f = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
    v16f y = splat(1.9875691500e-4f);
    y = y * f + splat(1.3981999507e-3f);
    y = y * f + splat(8.3334519073e-3f);
    y = y * f + splat(4.1665795894e-2f);
    y = y * f + splat(1.6666665459e-1f);
    y = y * f + splat(5.0000001201e-1f);
    y = y * f * f + f + splat(1.f);
    return y * (v16f)((n + 127) << 23); /* 2^n from its float bits */
}

/* acc + a b: one fused multiply-add with AVX-512, else a multiply then an add (GCC contracts
 * nothing under -std=c11: each build has one rounding, the same wherever it is used). */
static inline v16f fma16(v16f a, v16f b, v16f acc) {
#if defined(__AVX512F__)
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#else
    return acc + a * b;
#endif
}

/* silu(x) = x sigmoid(x), 16 at a time, from e = e^-|x| (never overflows): sigmoid is
 * 1 / (1 + e) for x >= 0 and e / (1 + e) below. Each lane is a function of its own x alone. */
static inline v16f silu16(v16f x) {
    v16i negative = x < splat(0.f);
    v16f magnitude = (v16f)((negative & (v16i)-x) | (~negative & (v16i)x));
    v16f e = exp16(-magnitude), inverse = splat(1.f) / (splat(1.f) + e);
    v16f sigmoid = (v16f)((negative & (v16i)(e * inverse)) | (~negative & (v16i)inverse));
    return x * sigmoid;
}

/* GELU, tanh approximation (gelu_pytorch_tanh): x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
 * tanh|u| as (1 - e) / (1 + e), e = exp(-2|u|). */
static inline v16f gelu_tanh16(v16f x) {
    v16f u = splat(0.7978845608f) * (x + splat(0.044715f) * x * x * x);
    v16i negative = u < splat(0.f);
    v16f magnitude = (v16f)((negative & (v16i)-u) | (~negative & (v16i)u));
    v16f e = exp16(splat(-2.f) * magnitude), t = (splat(1.f) - e) / (splat(1.f) + e);
    v16f tanh = (v16f)((negative & (v16i)-t) | (~negative & (v16i)t));
    return splat(0.5f) * x * (splat(1.f) + tanh);
}

/* Up to 16 floats from p, zeros past n: a row's last, partial vector. */
static inline v16f load16_part(const float *p, int n) {
    v16f v = splat(0.f);
    memcpy(&v, p, sizeof(float) * (n < 16 ? n : 16));
    return v;
}

/* out[j] = the sum of v[j]'s 16 lanes, for 4 vectors at once (a third of the instructions of
 * four reductions), by one tree: lane j is a function of v[j] alone, so padding the other
 * vectors with zeros changes nothing (batch invariance: an output's sum never depends on the
 * outputs reduced beside it). */
static inline void reduce16x4(const v16f *v, float *out) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    __m512 v0 = (__m512)v[0], v1 = (__m512)v[1], v2 = (__m512)v[2], v3 = (__m512)v[3];
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    for (int j = 0; j < 4; j++) {
        float sum = 0.f;
        for (int i = 0; i < 16; i++) sum += v[j][i];
        out[j] = sum;
    }
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* IEEE half precision (the quantized weights' scales), as its 16 bits. */
typedef uint16_t f16;

static inline float f16_to_f32(f16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) { /* inf, NaN */
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) { /* normal */
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero, subnormal: mantissa 2^-24 */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline f16 f32_to_f16(float f) { /* round to nearest even, as torch's .half() */
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)f;
    f16 bits;
    memcpy(&bits, &h, 2);
    return bits;
#endif
}

/* How a KV cache stores its values (shard/attention/paged_decode.py KV_TYPES). */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };
