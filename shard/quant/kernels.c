/* Weight-only quantized matrix products for the CPU: y[T, N] = x[T, K] @ dequant(W)[N, K]^T.
 *
 * Compiled at run time by shard/quant/kernels.py with `-O3 -march=native -fopenmp`: the
 * 16-float vector type of shard/simd.h becomes one AVX-512 register, two AVX2 registers, or plain
 * loops elsewhere. Byte-to-float conversions use intrinsics where the CPU has them, because
 * GCC 12 turns a generic vector conversion from bytes into scalar code.
 * The pure-PyTorch reference of these kernels is `dequantize` in shard/quant/weight.py.
 *
 * Layouts (GGUF's Q4_1 and Q8_0 blocks, so a GGUF file is served as it is stored):
 *   q4: qs [N, K/2] uint8. In each block of 32 weights, byte j holds weight j in its low
 *       nibble and weight j + 16 in its high nibble; w = q * scale + min (q in 0..15).
 *   q8: qs [N, K] int8; w = q * scale.
 *   scale, min: [N, K / group] float16 (as GGUF stores them: a sixth of a q4 block's bytes);
 *               group is a multiple of 32 (32, or K: per channel).
 *   x [T, K] and y [T, N] are float32 or bfloat16, contiguous.
 */
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_VNNI_512 1
#endif
#if !defined(HAVE_VNNI_512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_PAIRS_256 1 /* q4 in groups of 32 by pairs of blocks (dot_q4_256) */
#endif
#if defined(HAVE_VNNI_512) || defined(HAVE_PAIRS_256)
#define HAVE_QUADS 1 /* x is also arranged by quads (arrange_quad) */
#endif

#define TILE 4 /* rows of x that share one dequantized block of W */

/* How far ahead of the quad it reads each thread asks for W's bytes. A thread's rows of W are
 * contiguous, so this runs ahead into its next rows; the hardware prefetcher alone left a
 * batch-1 decode step waiting on the L3: the SmolLM2 decoder 7.8 -> 5.7 ms with it on the
 * 512-bit path (4 rows: 10 % faster), 10 % faster on the AVX2 path; best 4 to 8 KiB ahead. */
#define PREFETCH 6144

/* 16 bytes (unsigned / signed) to 16 floats. */
static inline v16f u8_to_f32(const uint8_t *p, int shift) {
#if defined(__AVX512F__)
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(0x0F));
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    b = _mm_and_si128(_mm_srli_epi16(b, shift), _mm_set1_epi8(0x0F));
    union { v16f v; __m256 h[2]; } u;
    u.h[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    u.h[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
    return u.v;
#else
    v16f v;
    for (int i = 0; i < 16; i++) v[i] = (float)((p[i] >> shift) & 0x0F);
    return v;
#endif
}

static inline v16f i8_to_f32(const int8_t *p) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    union { v16f v; __m256 h[2]; } u;
    u.h[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    u.h[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    return u.v;
#else
    v16f v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
    return v;
#endif
}

static inline void store(void *y, int y_bf16, long index, float value) {
    if (y_bf16)
        ((uint16_t *)y)[index] = f32_to_bf16(value);
    else
        ((float *)y)[index] = value;
}

/* The 32 weights of the block at column k of one row, as two vectors (k..k+15, k+16..k+31). */
static inline __attribute__((always_inline)) void block(int kind, const uint8_t *row, int k,
                                                        float scale, float min, v16f *lo,
                                                        v16f *hi) {
    if (kind == 4) {
        v16f s = splat(scale), m = splat(min);
        *lo = u8_to_f32(row + k / 2, 0) * s + m;
        *hi = u8_to_f32(row + k / 2, 4) * s + m;
    } else {
        v16f s = splat(scale);
        *lo = i8_to_f32((const int8_t *)row + k) * s;
        *hi = i8_to_f32((const int8_t *)row + k + 16) * s;
    }
}

/* ---- Decode products: x quantized to int8 blocks, integer dot products (as llama.cpp) ----
 *
 * A step with few rows of x is bound by how fast the weights stream from memory; converting
 * every weight to float costs more instructions than that allows. So x is quantized once per
 * call to int8 in blocks of 32 (xq = round(x / dx), dx = max|x| / 127, as GGUF Q8_0) and each
 * block of weights meets it in one integer dot product (u8 x s8 -> i32: one VNNI instruction,
 * or two AVX2 ones), scaled once per block: sum_k w x = dw dx sum(q xq) + mw dx sum(xq).
 * With AVX-512 VNNI (and BW, DQ, VL), groups of 32 take a 512-bit path instead (dot_q4_512,
 * dot_q8_512): x is arranged once per product in the order of W's bytes, so each 64 bytes
 * of W are unpacked without shuffles and meet up to 4 rows of x, with no scalar work per
 * block. Measured on SmolLM2's decode matrices (2 cores): one row, 16-18 ms -> 8 ms for the
 * 120 layer products and the LM head together with two blocks per instruction, then 1.1-1.3x
 * more with quads of 4 blocks; four rows 1.4-1.9x faster than one row at a time.
 */

typedef struct {
    int8_t *q;   /* [T, K] */
    float *d;    /* [T, K/32] dx */
    float *sum;  /* [T, K/32] dx * sum(xq) of the block */
    /* The 512-bit paths read x by quads of 4 blocks (the last one padded with zeros), arranged
     * for the kind of W it meets (arrange_quad): */
    int8_t *quad_q;  /* [T / 4, quads, 4, 128] */
    float *quad_d;   /* [T / 4, quads, 4, 32]: dx of the block each int32 lane of a product sums */
    int32_t *quad_c; /* [T / 4, quads, 4, 32]: q8 only, 128 * the sum of each lane's 4 values */
} QuantX;

static long quads(long K) { return (K / 32 + 3) / 4; }

/* Where quad g of row t of x lies among `n` quads per row: the 4 rows of a tile side by side
 * for each quad, so a tile's rows are one pointer and constant offsets (quad_slot * 128 bytes
 * of quad_q, * 32 values of quad_d and quad_c). */
static inline long quad_slot(long t, long g, long n) { return ((t >> 2) * n + g) * 4 + (t & 3); }

/* Room for T rows of up to K values. */
static QuantX quantx_new(long T, long K) {
    QuantX xq = {malloc(T * K), malloc(sizeof(float) * T * K / 32),
                 malloc(sizeof(float) * T * K / 32), NULL, NULL, NULL};
#ifdef HAVE_QUADS
    long rows = (T + 3) / 4 * 4; /* whole tiles of 4 rows */
    xq.quad_q = malloc(rows * quads(K) * 128);
    xq.quad_d = malloc(sizeof(float) * rows * quads(K) * 32);
    xq.quad_c = malloc(sizeof(int32_t) * rows * quads(K) * 32);
#endif
    return xq;
}

static void quantx_free(QuantX *xq) {
    free(xq->q);
    free(xq->d);
    free(xq->sum);
    free(xq->quad_q);
    free(xq->quad_d);
    free(xq->quad_c);
}

/* Quad g of row t (quad_q, quad_d and quad_c) from q and d, in the order of W's bytes.
 * q4: a quad's 64 bytes of nibbles give the 4 blocks' values 0..15 (low nibbles), then their
 *     values 16..31 (high nibbles): x's quad is the same, and lanes 4i..4i+3 sum block i.
 * q8: 4 blocks of 32 values in order, in two halves of 2 blocks: lanes 8i..8i+7 of a half
 *     sum its block i. W is read as unsigned (w + 128), so 128 * sum(x) comes off each lane. */
#ifdef HAVE_QUADS
static void arrange_quad(int kind, long t, long g, long blocks, QuantX *out) {
    long n = (blocks + 3) / 4;
    int8_t *q = out->quad_q + quad_slot(t, g, n) * 128;
    float *d = out->quad_d + quad_slot(t, g, n) * 32;
    int32_t *c = out->quad_c + quad_slot(t, g, n) * 32;
    int lanes = kind == 4 ? 4 : 8; /* int32 lanes of a product that sum one block */
    for (int i = 0; i < 4; i++) {
        long b = g * 4 + i;
        int8_t src[32] = {0};
        float dx = 0.f;
        if (b < blocks) {
            memcpy(src, out->q + (t * blocks + b) * 32, 32);
            dx = out->d[t * blocks + b];
        }
        if (kind == 4) {
            memcpy(q + i * 16, src, 16);
            memcpy(q + 64 + i * 16, src + 16, 16);
        } else {
            memcpy(q + i * 32, src, 32);
        }
        for (int j = 0; j < lanes; j++) d[lanes * i + j] = dx;
    }
    if (kind == 8)
        for (int lane = 0; lane < 32; lane++)
            c[lane] = 128 * (q[4 * lane] + q[4 * lane + 1] + q[4 * lane + 2] + q[4 * lane + 3]);
}
#endif

#if defined(__AVX512F__)
/* round(r), halves away from zero, as (int)(r + copysign(0.5, r)) in quantize_block. */
static inline __m512i round_away(__m512 r) {
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32((int)0x80000000));
    __m512 half = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x3f000000)));
    return _mm512_cvttps_epi32(_mm512_add_ps(r, half));
}
#endif

/* Block b of x (32 values at v): xq = round(x / dx), dx = max|x| / 127. */
static void quantize_block(const float *v, long b, QuantX *out) {
#if defined(__AVX512F__)
    __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    __m512i qlo = round_away(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    __m512i qhi = round_away(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i *)(out->q + b * 32), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128((__m128i *)(out->q + b * 32 + 16), _mm512_cvtepi32_epi8(qhi));
    int total = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = v[i] > amax ? v[i] : (-v[i] > amax ? -v[i] : amax);
    float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int total = 0;
    for (int i = 0; i < 32; i++) {
        float r = v[i] * inv;
        int q = (int)(r + (r >= 0.f ? 0.5f : -0.5f));
        out->q[b * 32 + i] = (int8_t)q;
        total += q;
    }
#endif
    out->d[b] = d;
    out->sum[b] = d * (float)total;
}

/* Quad g of row t of x (the up to 128 values at v) quantized for a product with W of `kind`. */
static inline void quantize_quad(int kind, const float *v, long t, long g, long blocks,
                                 QuantX *out) {
    long end = 4 * g + 4 < blocks ? 4 * g + 4 : blocks; /* past the quad's last block */
    for (long b = 4 * g; b < end; b++) quantize_block(v + (b - 4 * g) * 32, t * blocks + b, out);
#if defined(HAVE_VNNI_512)
    arrange_quad(kind, t, g, blocks, out);
#elif defined(HAVE_PAIRS_256)
    if (kind == 4) arrange_quad(4, t, g, blocks, out); /* q8 takes dot_rows */
#else
    (void)kind;
#endif
}

/* x [T, K] quantized for a product with W of `kind` (4 or 8), a quad of 4 blocks at a time,
 * the quads shared among the threads of an enclosing parallel region (orphaned `omp for`). */
static void quantize_x(int kind, const float *x, int T, int K, QuantX *out) {
    long blocks = K / 32, n = quads(K);
#pragma omp for schedule(static)
    for (long u = 0; u < T * n; u++) {
        long t = u / n, g = u % n;
        quantize_quad(kind, x + t * K + g * 128, t, g, blocks, out);
    }
}

#if defined(__AVX2__)
/* 8 int32 sums of 4 products each, of 32 unsigned bytes a and 32 signed bytes b. */
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A block's weights as unsigned bytes: q4's nibbles (weights 0..15, then 16..31), or |q8|;
 * u8 x s8 products then need x with the signs of q8's weights (sign_x). */
static inline __attribute__((always_inline)) __m256i block_weights(int kind, const uint8_t *row,
                                                                   int b, __m256i *signs) {
    if (kind == 4) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(row + b * 16));
        __m128i low = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        __m128i high = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        return _mm256_set_m128i(high, low);
    }
    *signs = _mm256_loadu_si256((const __m256i *)(row + b * 32));
    return _mm256_sign_epi8(*signs, *signs);
}

/* out[t] = x[t] . w_row for `rows` rows (a constant where inlined: accumulators stay in
 * registers). */
static inline __attribute__((always_inline)) void dot_rows(int kind, const QuantX *xq, long x0,
                                                           int rows, int K, const uint8_t *row,
                                                           const f16 *scale, const f16 *min,
                                                           int group, float *out) {
    int blocks = K / 32;
    __m256 acc[TILE];
    float low[TILE];
    for (int t = 0; t < rows; t++) {
        acc[t] = _mm256_setzero_ps();
        low[t] = 0.f;
    }
    for (int g = 0; g < K / group; g++) {
        float dw = f16_to_f32(scale[g]), mw = kind == 4 ? f16_to_f32(min[g]) : 0.f;
        for (int b = g * group / 32; b < (g + 1) * group / 32; b++) {
            __m256i signs = _mm256_setzero_si256();
            __m256i w = block_weights(kind, row, b, &signs);
            for (int t = 0; t < rows; t++) {
                long xb = (x0 + t) * blocks + b;
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq->q + xb * 32));
                if (kind == 8) x = _mm256_sign_epi8(x, signs);
                __m256 p = _mm256_cvtepi32_ps(dot_u8s8(w, x));
                acc[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * xq->d[xb]), acc[t]);
                if (kind == 4) low[t] += mw * xq->sum[xb];
            }
        }
    }
    for (int t = 0; t < rows; t++) out[t] = hsum8(acc[t]) + low[t];
}

#ifdef HAVE_PAIRS_256
/* a0 . b0 + a1 . b1 in 8 int32 lanes of 4 products each; a holds values 0..15, so the int16
 * sums of maddubs cannot saturate (4 * 15 * 127 < 32767). */
static inline __m256i dot2_u4s8(__m256i a0, __m256i b0, __m256i a1, __m256i b1) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a0, b0), a1, b1);
#else
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b0), _mm256_maddubs_epi16(a1, b1));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

/* The 32 bytes of blocks 2h and 2h + 1 of a quad (16 bytes where only the first is `real`)
 * and those blocks' lanes of the quad's x (arrange_quad): the low nibbles meet x's bytes
 * 32h.., the high nibbles its bytes 64 + 32h..; lanes 0-3 sum block 2h, lanes 4-7 block 2h+1. */
static inline __attribute__((always_inline)) __m256 half_q4(const QuantX *xq, long at, int h,
                                                           const uint8_t *bytes, int real) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i raw = real == 2 ? _mm256_loadu_si256((const __m256i *)bytes)
                            : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)bytes));
    __m256i lo = _mm256_and_si256(raw, nibble);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
    const int8_t *x = xq->quad_q + at * 128 + h * 32; /* at: quad_slot */
    __m256i dot = dot2_u4s8(lo, _mm256_loadu_si256((const __m256i *)x), hi,
                            _mm256_loadu_si256((const __m256i *)(x + 64)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(xq->quad_d + at * 32 + h * 8));
}

/* `n` float16 values (n <= 4) at p as 4 floats, zeros past n. */
static inline __m128 load_f16x4(const f16 *p, int n) {
    int64_t bits = 0;
    memcpy(&bits, p, 2 * n);
    return _mm_cvtph_ps(_mm_cvtsi64_si128(bits));
}

/* Quad g of q4 (`real` < 4 blocks in a last, partial quad) against `rows` rows of x: two
 * halves of 2 blocks, whose lanes are scaled by the 4 blocks' dw spread over them. */
static inline __attribute__((always_inline)) void quad_q4_256(const QuantX *xq, long t0,
                                                              int rows, long n, long blocks,
                                                              long g, int real,
                                                              const uint8_t *row,
                                                              const f16 *scale, const f16 *min,
                                                              __m256 *acc, __m128 *low) {
    __m256 dw = _mm256_castps128_ps256(load_f16x4(scale + 4 * g, real));
    __m256 dw01 = _mm256_permutevar8x32_ps(dw, _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
    __m256 dw23 = _mm256_permutevar8x32_ps(dw, _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2));
    __m128 mw = load_f16x4(min + 4 * g, real);
    const uint8_t *bytes = row + g * 64;
    _mm_prefetch((const char *)bytes + PREFETCH, _MM_HINT_T0);
    for (int r = 0; r < rows; r++) {
        long at = quad_slot(t0 + r, g, n);
        acc[r] = _mm256_fmadd_ps(half_q4(xq, at, 0, bytes, real < 2 ? real : 2), dw01, acc[r]);
        if (real > 2)
            acc[r] = _mm256_fmadd_ps(half_q4(xq, at, 1, bytes + 32, real - 2), dw23, acc[r]);
        float sums[4] = {0.f, 0.f, 0.f, 0.f};
        memcpy(sums, xq->sum + (t0 + r) * blocks + 4 * g, sizeof(float) * real);
        low[r] = _mm_fmadd_ps(mw, _mm_loadu_ps(sums), low[r]);
    }
}

/* out[r] = x[t0 + r] . w_row for r < rows, q8 in groups of 32 (GGUF Q8_0), with AVX2: one block
 * per 256 bits (u8 x s8 products take |w| and x with w's signs, which cannot saturate), its
 * dw dx applied to the block's lanes; one accumulator per row of x, blocks in order, whatever
 * `rows` is (batch invariance: a row's sum never depends on its tile-mates). */
static inline __attribute__((always_inline)) void dot_q8_256(const QuantX *xq, long t0, int rows,
                                                             int K, const uint8_t *row,
                                                             const f16 *scale, float *out) {
    long blocks = K / 32;
    __m256 acc[TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        if (b % 2 == 0) _mm_prefetch((const char *)row + b * 32 + PREFETCH, _MM_HINT_T0);
        __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * 32));
        __m256i magnitude = _mm256_sign_epi8(w, w);
        float dw = f16_to_f32(scale[b]);
        for (int r = 0; r < rows; r++) {
            long xb = (t0 + r) * blocks + b;
            __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq->q + xb * 32)), w);
            __m256 p = _mm256_cvtepi32_ps(dot_u8s8(magnitude, x));
            acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * xq->d[xb]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum8(acc[r]);
}

/* out[r] = x[t0 + r] . w_row for r < rows, q4 in groups of 32 (GGUF Q4_1), with AVX2: as
 * dot_q4_512 with half its width, a quad at a time, and no scalar work per block (dot_rows
 * scales each block's sum on its own). */
static inline __attribute__((always_inline)) void dot_q4_256(const QuantX *xq, long t0, int rows,
                                                             int K, const uint8_t *row,
                                                             const f16 *scale, const f16 *min,
                                                             float *out) {
    long blocks = K / 32, n = quads(K), g = 0;
    __m256 acc[TILE];
    __m128 low[TILE];
    for (int r = 0; r < rows; r++) {
        acc[r] = _mm256_setzero_ps();
        low[r] = _mm_setzero_ps();
    }
    for (; g < blocks / 4; g++) quad_q4_256(xq, t0, rows, n, blocks, g, 4, row, scale, min, acc, low);
    if (blocks % 4)
        quad_q4_256(xq, t0, rows, n, blocks, g, blocks % 4, row, scale, min, acc, low);
    for (int r = 0; r < rows; r++) {
        __m128 l = _mm_add_ps(low[r], _mm_movehl_ps(low[r], low[r]));
        out[r] = hsum8(acc[r]) + _mm_cvtss_f32(_mm_add_ss(l, _mm_movehdup_ps(l)));
    }
}
#endif
#else
/* Portable: the same arithmetic in plain loops. */
static inline void dot_rows(int kind, const QuantX *xq, long x0, int rows, int K,
                            const uint8_t *row, const f16 *scale, const f16 *min, int group,
                            float *out) {
    int blocks = K / 32;
    for (int t = 0; t < rows; t++) {
        float total = 0.f;
        for (int b = 0; b < blocks; b++) {
            long xb = (x0 + t) * blocks + b;
            const int8_t *x = xq->q + xb * 32;
            int dot = 0;
            for (int i = 0; i < 32; i++) {
                int w = kind == 4 ? (row[b * 16 + i % 16] >> (i < 16 ? 0 : 4)) & 0x0F
                                  : ((const int8_t *)row)[b * 32 + i];
                dot += w * x[i];
            }
            int g = b * 32 / group;
            float dw = f16_to_f32(scale[g]), mw = kind == 4 ? f16_to_f32(min[g]) : 0.f;
            total += dw * xq->d[xb] * (float)dot + mw * xq->sum[xb];
        }
        out[t] = total;
    }
}
#endif

#ifdef HAVE_VNNI_512
#define ROWS_512 4 /* rows of x that share one unpacked quad of W */
#define WROWS 4    /* rows of W whose sums are reduced together (reduce16x4) */

/* Batch invariance: whatever the step's rows and however they are tiled, output (t, n) is
 * computed by the same operations in the same order: one accumulator per (row of x, row of
 * W), fed quad after quad in column order (quad_q4, pair_q8); q4's min term in its own
 * 16-lane accumulator, 16 blocks at a time in column order (min_term); both reduced by one
 * tree (reduce16x4, lane j of which depends on its own vector only). The integer dot products
 * are exact, so only this float order matters; tiles decide what is loaded once and shared,
 * never an order. */

/* One quad of 4 blocks of q4 (`real` < 4 in a last, partial quad) against `rows` rows of x:
 * acc[r] takes row t0 + r's products. */
static inline __attribute__((always_inline)) void quad_q4(const QuantX *xq, long t0, int rows,
                                                          long n, long g, int real,
                                                          const uint8_t *row, const f16 *scale,
                                                          __m512 *acc) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __mmask64 bytes = real == 4 ? ~0ULL : (1ULL << (16 * real)) - 1;
    __mmask8 four = (__mmask8)((1 << real) - 1);
    _mm_prefetch((const char *)row + g * 64 + PREFETCH, _MM_HINT_T0);
    __m512i raw = _mm512_maskz_loadu_epi8(bytes, row + g * 64);
    __m512i lo = _mm512_and_si512(raw, nibble);                       /* values 0..15 */
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble); /* values 16..31 */
    __m128 dw = _mm_cvtph_ps(_mm_maskz_loadu_epi16(four, scale + 4 * g));
    __m512 dws = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dw));
    long at = quad_slot(t0, g, n); /* the tile's rows follow each other (quad_slot) */
    const int8_t *x = xq->quad_q + at * 128;
    const float *d = xq->quad_d + at * 32;
    for (int r = 0; r < rows; r++) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x + r * 128));
        dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(x + r * 128 + 64));
        __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(d + r * 32));
        acc[r] = _mm512_fmadd_ps(p, dws, acc[r]);
    }
}

/* Two blocks of q8 (`real` 1 in a last, odd block) against `rows` rows of x. VNNI multiplies
 * unsigned by signed bytes, so W is read as w + 128 (w ^ 0x80) and 128 sum(x) (quad_c) is
 * taken off each lane. */
static inline __attribute__((always_inline)) void pair_q8(const QuantX *xq, long t0, int rows,
                                                          long n, long h, int real,
                                                          const uint8_t *row, const f16 *scale,
                                                          __m512 *acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __mmask64 bytes = real == 2 ? ~0ULL : (1ULL << 32) - 1;
    _mm_prefetch((const char *)row + h * 64 + PREFETCH, _MM_HINT_T0);
    __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, row + h * 64), flip);
    __m128 dw = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1 << real) - 1), scale + 2 * h));
    __m512 dws = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dw));
    long at = quad_slot(t0, h / 2, n) * 2 + h % 2; /* the pair's 64 values and 16 lanes */
    for (int r = 0; r < rows; r++) {
        long a = at + r * 2; /* the next row's same pair: one quad slot (2 halves) later */
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                          _mm512_loadu_si512(xq->quad_q + a * 64));
        dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(xq->quad_c + a * 16));
        __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(xq->quad_d + a * 16));
        acc[r] = _mm512_fmadd_ps(p, dws, acc[r]);
    }
}

/* Column step g of W's row (scale: that row's) against `rows` rows of x from t0: a quad of q4
 * (GGUF Q4_1) or a pair of blocks of q8 (Q8_0); `real` blocks of it exist (4 or 2 but in a
 * row's last, partial step), a constant where inlined. */
static inline __attribute__((always_inline)) void step_512(int kind, const QuantX *xq, long t0,
                                                           int rows, long K, long g, int real,
                                                           const uint8_t *row, const f16 *scale,
                                                           __m512 *acc) {
    if (kind == 4)
        quad_q4(xq, t0, rows, quads(K), g, real, row, scale, acc);
    else
        pair_q8(xq, t0, rows, quads(K), g, real, row, scale, acc);
}

/* Whole steps of a row of W, and the blocks of its last, partial step (0: none). */
static inline long whole_steps(int kind, long K) { return K / 32 / (kind == 4 ? 4 : 2); }
static inline int last_blocks(int kind, long K) { return (int)(K / 32 % (kind == 4 ? 4 : 2)); }
#define WHOLE(kind) ((kind) == 4 ? 4 : 2)

/* sums[r] of one row of W against `rows` rows of x (rows from 2 to 4: they share each step's
 * unpacked weights). */
static inline __attribute__((always_inline)) void dot_rows_512(int kind, const QuantX *xq,
                                                               long t0, int rows, int K,
                                                               const uint8_t *row,
                                                               const f16 *scale, __m512 *sums) {
    __m512 acc[ROWS_512];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    long g = 0, whole = whole_steps(kind, K);
    for (; g < whole; g++) step_512(kind, xq, t0, rows, K, g, WHOLE(kind), row, scale, acc);
    if (last_blocks(kind, K))
        step_512(kind, xq, t0, rows, K, g, last_blocks(kind, K), row, scale, acc);
    for (int r = 0; r < rows; r++) sums[r] = acc[r];
}

/* sums[j] of WROWS rows of W against one row of x: their steps interleaved, so that four
 * accumulators hide each other's latency (the order of each one's sum is unchanged). */
static inline __attribute__((always_inline)) void dot_wrows_512(int kind, const QuantX *xq,
                                                                long t0, int K,
                                                                const uint8_t *const *rows,
                                                                const f16 *const *scales,
                                                                __m512 *sums) {
    __m512 acc[WROWS];
    for (int j = 0; j < WROWS; j++) acc[j] = _mm512_setzero_ps();
    long g = 0, whole = whole_steps(kind, K);
    int last = last_blocks(kind, K);
    for (; g < whole; g++)
        for (int j = 0; j < WROWS; j++)
            step_512(kind, xq, t0, 1, K, g, WHOLE(kind), rows[j], scales[j], acc + j);
    if (last)
        for (int j = 0; j < WROWS; j++)
            step_512(kind, xq, t0, 1, K, g, last, rows[j], scales[j], acc + j);
    for (int j = 0; j < WROWS; j++) sums[j] = acc[j];
}

/* q4's min terms of W's row (its mins) and rows t0..t0 + rows - 1 of x: for each row,
 * sum_b mw_b dx_b sum(xq_b), 16 blocks per multiply-add in column order (the last ones
 * masked), as 16 lanes (lows[r]); each 16 of W's mins are converted once for all rows. */
static inline __attribute__((always_inline)) void min_terms(const QuantX *xq, long t0, int rows,
                                                            long blocks, const f16 *min,
                                                            __m512 *lows) {
    for (int r = 0; r < rows; r++) lows[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b += 16) {
        __mmask16 m = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
        __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, min + b));
        for (int r = 0; r < rows; r++) {
            __m512 sx = _mm512_maskz_loadu_ps(m, xq->sum + (t0 + r) * blocks + b);
            lows[r] = _mm512_fmadd_ps(mw, sx, lows[r]);
        }
    }
}

/* y[t0 + r, n] for r < rows and n in [n0, n1): WROWS rows of W at a time, met by `rows` rows
 * of x, each (row of x, row of W) summed and reduced the one way above. Each (kind, rows) is
 * compiled on its own (SPAN below): inlined into one function, the eight variants left GCC
 * short of registers, spilling loop variables in the inner loops. */
static inline __attribute__((always_inline)) void span_512(int kind, int rows, const QuantX *xq,
                                                           long t0, int K, const uint8_t *qs,
                                                           const f16 *scale, const f16 *min,
                                                           long n0, long n1, int N, void *y,
                                                           int y_bf16) {
    long groups = K / 32, row_bytes = kind == 4 ? K / 2 : K;
    for (long n = n0; n < n1; n += WROWS) {
        int ws = n1 - n < WROWS ? (int)(n1 - n) : WROWS;
        v16f sums[ROWS_512][WROWS], lows[ROWS_512][WROWS]; /* lows: q4's min terms */
        const uint8_t *w[WROWS];
        const f16 *s[WROWS];
        for (int j = 0; j < WROWS; j++) {
            long at = n + (j < ws ? j : 0);
            w[j] = qs + at * row_bytes;
            s[j] = scale + at * groups;
        }
        for (int r = 0; r < rows; r++)
            for (int j = ws; j < WROWS; j++) sums[r][j] = lows[r][j] = splat(0.f); /* padding */
        if (kind != 4)
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < ws; j++) lows[r][j] = splat(0.f);
        if (rows == 1 && ws == WROWS) {
            __m512 v[WROWS];
            dot_wrows_512(kind, xq, t0, K, w, s, v);
            for (int j = 0; j < WROWS; j++) sums[0][j] = (v16f)v[j];
        } else {
            for (int j = 0; j < ws; j++) {
                __m512 v[ROWS_512];
                dot_rows_512(kind, xq, t0, rows, K, w[j], s[j], v);
                for (int r = 0; r < rows; r++) sums[r][j] = (v16f)v[r];
            }
        }
        if (kind == 4)
            for (int j = 0; j < ws; j++) {
                __m512 v[ROWS_512];
                min_terms(xq, t0, rows, groups, min + (n + j) * groups, v);
                for (int r = 0; r < rows; r++) lows[r][j] = (v16f)v[r];
            }
        for (int r = 0; r < rows; r++) {
            float total[WROWS], low[WROWS];
            reduce16x4(sums[r], total);
            reduce16x4(lows[r], low);
            for (int j = 0; j < ws; j++) store(y, y_bf16, (t0 + r) * N + n + j, total[j] + low[j]);
        }
    }
}

typedef void (*SpanFn)(const QuantX *, long, int, const uint8_t *, const f16 *, const f16 *,
                       long, long, int, void *, int);
#define SPAN(KIND, ROWS)                                                                    \
    static __attribute__((noinline)) void span_##KIND##_##ROWS(                             \
        const QuantX *xq, long t0, int K, const uint8_t *qs, const f16 *scale,              \
        const f16 *min, long n0, long n1, int N, void *y, int y_bf16) {                   \
        span_512(KIND, ROWS, xq, t0, K, qs, scale, min, n0, n1, N, y, y_bf16);              \
    }
SPAN(4, 1) SPAN(4, 2) SPAN(4, 3) SPAN(4, 4) SPAN(8, 1) SPAN(8, 2) SPAN(8, 3) SPAN(8, 4)
#undef SPAN
static const SpanFn SPANS[2][ROWS_512] = {{span_4_1, span_4_2, span_4_3, span_4_4},
                                          {span_8_1, span_8_2, span_8_3, span_8_4}};

/* Rows of W a thread takes at a time when x has many rows (a prompt): their bytes stay in the
 * L1 cache while every tile of x meets them. */
#define W_CHUNK 16

/* This thread's share of W's rows (as `omp for schedule(static)` would give), every row of
 * x; then the barrier that ends an `omp for`. */
static void matmul_512(int kind, const QuantX *xq, int T, int K, const uint8_t *qs,
                       const f16 *scale, const f16 *min, int N, void *y, int y_bf16) {
    long threads = omp_get_num_threads(), me = omp_get_thread_num();
    long n0 = N * me / threads, n1 = N * (me + 1) / threads;
    long chunk = T > 64 ? W_CHUNK : n1 - n0; /* a decode step streams its rows once */
    for (long c0 = n0; c0 < n1; c0 += chunk) {
        long c1 = c0 + chunk < n1 ? c0 + chunk : n1;
        for (int t0 = 0; t0 < T; t0 += ROWS_512) {
            int rows = T - t0 < ROWS_512 ? T - t0 : ROWS_512;
            SPANS[kind == 8][rows - 1](xq, t0, K, qs, scale, min, c0, c1, N, y, y_bf16);
        }
    }
#pragma omp barrier
}
#endif

/* out[t] = x[t0 + t] . w_row for t < rows, by the widest path this CPU has short of 512 bits. */
static inline __attribute__((always_inline)) void dot(int kind, const QuantX *xq, long t0,
                                                      int rows, int K, const uint8_t *row,
                                                      const f16 *scale, const f16 *min,
                                                      int group, float *out) {
#ifdef HAVE_PAIRS_256
    if (kind == 4 && group == 32) {
        dot_q4_256(xq, t0, rows, K, row, scale, min, out);
        return;
    }
    if (kind == 8 && group == 32) {
        dot_q8_256(xq, t0, rows, K, row, scale, out);
        return;
    }
#endif
    dot_rows(kind, xq, t0, rows, K, row, scale, min, group, out);
}

/* Rows of x up to which the direct kernel beats dequantize + dense GEMM, measured on SmolLM2
 * decode steps (bf16, 2 cores, 300 MB of L3), whole steps through the compiled decoder against
 * the eager layers: the 512-bit path wins up to 8 rows (24.7 vs 38.7 ms at 6, 40.0 vs
 * 49.2 ms at 8), loses from 12 (54.9 vs 50.6 ms) and 16 (71.4 vs 52.8 ms); the 256-bit path
 * wins only up to 2. */
int quant_direct_max_rows(void) {
#ifdef HAVE_VNNI_512
    return 8;
#else
    return 2;
#endif
}

/* The rows of W are shared out among the threads of the enclosing parallel region (an
 * orphaned `omp for`, which ends in a barrier); outside one, the calling thread does them all.
 * shard/models/llama_decode.c calls it inside its own region, once per weight of a layer. */
static inline __attribute__((always_inline)) void matmul_shared(
    int kind, const QuantX *xq, int T, int K, const uint8_t *qs, const f16 *scale,
    const f16 *min, int N, int group, void *y, int y_bf16) {
#ifdef HAVE_VNNI_512
    if (group == 32) {
        matmul_512(kind, xq, T, K, qs, scale, min, N, y, y_bf16);
        return;
    }
#endif
    int groups = K / group;
    long row_bytes = kind == 4 ? K / 2 : K;
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = qs + (long)n * row_bytes;
        const f16 *s = scale + (long)n * groups, *m = kind == 4 ? min + (long)n * groups : 0;
        float out[TILE];
        int t0 = 0;
        for (; t0 + TILE <= T; t0 += TILE) {
            dot(kind, xq, t0, TILE, K, row, s, m, group, out);
            for (int t = 0; t < TILE; t++) store(y, y_bf16, (long)(t0 + t) * N + n, out[t]);
        }
        for (; t0 < T; t0++) {
            dot(kind, xq, t0, 1, K, row, s, m, group, out);
            store(y, y_bf16, (long)t0 * N + n, out[0]);
        }
    }
}

static void matmul(int kind, const QuantX *xq, int T, int K, const uint8_t *qs,
                   const f16 *scale, const f16 *min, int N, int group, void *y, int y_bf16) {
#pragma omp parallel
    {
        if (kind == 4) /* a constant kind inlines each variant on its own */
            matmul_shared(4, xq, T, K, qs, scale, min, N, group, y, y_bf16);
        else
            matmul_shared(8, xq, T, K, qs, scale, min, N, group, y, y_bf16);
    }
}

/* kind 4: q4 (qs, scale, min); kind 8: q8 (qs, scale; min unused). */
void quant_matmul(int kind, const void *x, int x_bf16, int T, int K, const void *qs,
                  const f16 *scale, const f16 *min, int N, int group, void *y, int y_bf16) {
    long count = (long)T * K;
    float *xf = malloc(sizeof(float) * count);
    for (long i = 0; i < count; i++)
        xf[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    QuantX xq = quantx_new(T, K);
    quantize_x(kind, xf, T, K, &xq);
    matmul(kind, &xq, T, K, qs, scale, min, N, group, y, y_bf16);
    free(xf);
    quantx_free(&xq);
}

/* W dequantized into w [N, K] (float32 or bfloat16), for products with many rows of x, which
 * go to the dense GEMM instead. Weights are finite, so bfloat16 rounding skips the NaN case. */
void quant_dequantize(int kind, const void *qs, const f16 *scale, const f16 *min, int N,
                      int K, int group, void *w, int w_bf16) {
    int groups = K / group;
    long row_bytes = kind == 4 ? K / 2 : K;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = (const uint8_t *)qs + (long)n * row_bytes;
        for (int k = 0; k < K; k += 32) {
            int g = n * groups + k / group;
            v16f half[2];
            if (kind == 4)
                block(4, row, k, f16_to_f32(scale[g]), f16_to_f32(min[g]), &half[0], &half[1]);
            else
                block(8, row, k, f16_to_f32(scale[g]), 0.f, &half[0], &half[1]);
            if (!w_bf16) {
                memcpy((float *)w + (long)n * K + k, half, sizeof half);
                continue;
            }
            uint32_t bits[32];
            uint16_t *out = (uint16_t *)w + (long)n * K + k;
            memcpy(bits, half, sizeof bits);
            for (int i = 0; i < 32; i++) /* round to nearest even, vectorized by GCC */
                out[i] = (uint16_t)((bits[i] + 0x7fffu + ((bits[i] >> 16) & 1u)) >> 16);
        }
    }
}
