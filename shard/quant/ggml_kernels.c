/* Products with GGML's block-quantized matrices, read from the GGUF file's own bytes:
 * y[T, N] = x[T, K] @ dequant(W)[N, K]^T, and the rows of dequant(W) (embedding lookups).
 *
 * Compiled at run time by shard/quant/kernels.py with `-O3 -march=native -fopenmp`. The pure
 * reference is gguf-py's `gguf.quants.dequantize` (shard/quant/ggml.py), which this file is
 * tested against for every type.
 *
 * W is [N, row_bytes] uint8: each row the blocks of its K weights, as llama.cpp writes them.
 * Every type is read 256 weights (a "chunk") at a time: one K-quant super-block, or eight
 * blocks of 32 of the legacy types. A chunk unpacks into
 *     q[256]       the weights' integer values, all >= 0 (unsigned: one u8 x s8 product), in
 *                  the order of its blocks of 32 that the type's bytes give (block_order),
 *     scale[16], offset[16]   per sub-block of 16 weights: w = scale * q - offset,
 * which every type fits exactly (scale and offset are products of the block's float16
 * factors and its small integer sub-scales, exact in float32):
 *     Q4_0  q = nibble,            scale d,          offset 8 d
 *     Q4_1  q = nibble,            scale d,          offset -m
 *     Q5_0  q = nibble | hbit<<4,  scale d,          offset 16 d
 *     Q5_1  q = nibble | hbit<<4,  scale d,          offset -m
 *     Q2_K  q in 0..3,             scale d sc,       offset dmin m   (4-bit sc, m per 16)
 *     Q3_K  q in 0..7,             scale d (sc-32),  offset 4 scale  (6-bit sc per 16)
 *     Q4_K  q in 0..15,            scale d sc,       offset dmin m   (6-bit sc, m per 32)
 *     Q5_K  q in 0..31,            as Q4_K
 *     Q6_K  q in 0..63,            scale d sc,       offset 32 scale (int8 sc per 16)
 *
 * x is quantized once per call to int8, arranged in W's block order, in groups of 64 (xq =
 * round(x / dx), dx = max|x| / 127: finer than llama.cpp's groups of 256 for K-quants), and
 * each 16 weights meet it in integer products (u8 x s8 -> i32: VNNI, or maddubs + madd with AVX2; q <= 63
 * keeps AVX2's int16 pair sums below 2 * 63 * 127):
 *     sum_i w_i x_i = sum_j dx_j (scale_j sum_i q_i xq_i - offset_j sum_i xq_i).
 * Batch invariance: each row of x is quantized on its own, and each output is summed by one
 * thread in one order (chunk by chunk, the same lanes), whatever the other rows of x or of W.
 */
#include <math.h>
#include <stdlib.h>

#include "../simd.h"

/* gguf.GGMLQuantizationType */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

#define CHUNK 256
#define ROWS 4  /* rows of W unpacked together, each meeting every row of x */
#define XTILE 64 /* rows of x per pass over a tile of W (their quantized bytes stay in L2) */

typedef struct {
    uint8_t q[CHUNK];
    float scale[16], offset[16];
} Chunk;

static inline float h2f(const uint8_t *p) {
    f16 h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* Bytes of one block, and weights per block. */
static int block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q2_K: return 84;
    case Q3_K: return 110;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

static int block_weights(int type) { return type >= Q2_K ? 256 : 32; }

int ggml_supported(int type) { return block_bytes(type) != 0; }

/* One legacy block of 32 (b: its bytes) into u at weight 32 j. */
static void unpack_legacy(int type, const uint8_t *b, int j, Chunk *u) {
    float d = h2f(b), m = 0.f;
    const uint8_t *qs = b + 2;
    uint32_t qh = 0;
    if (type == Q4_1 || type == Q5_1) m = h2f(b + 2), qs += 2;
    if (type == Q5_0 || type == Q5_1) memcpy(&qh, qs, 4), qs += 4;
    uint8_t *q = u->q + 32 * j;
    for (int l = 0; l < 16; l++) q[l] = qs[l] & 0x0F, q[l + 16] = qs[l] >> 4;
    if (type == Q5_0 || type == Q5_1)
        for (int l = 0; l < 32; l++) q[l] |= ((qh >> l) & 1u) << 4;
    float offset = type == Q4_0 ? 8.f * d : type == Q5_0 ? 16.f * d : -m;
    u->scale[2 * j] = u->scale[2 * j + 1] = d;
    u->offset[2 * j] = u->offset[2 * j + 1] = offset;
}

/* Q4_K and Q5_K's 6-bit scale and min of sub-block j (of 32) from their 12 packed bytes. */
static inline void scale_min_k4(int j, const uint8_t *s, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q4_K and Q5_K chunks are held in their bytes' order: the low nibbles of bytes 0..63 are
 * blocks (of 32) 0 and 2, their high nibbles blocks 1 and 3, then blocks 4, 6, 5, 7 from
 * bytes 64..127, so that a 64-byte load is a vector of weights without shuffles. */
static const int ORDER_K4[8] = {0, 2, 1, 3, 4, 6, 5, 7};
static const int ORDER_NATURAL[8] = {0, 1, 2, 3, 4, 5, 6, 7};

/* The block order a type's chunks are held in (x is arranged in the same order). */
static const int *block_order(int type) { return type == Q4_K || type == Q5_K ? ORDER_K4 : ORDER_NATURAL; }

static void unpack_q4k_q5k(int type, const uint8_t *b, Chunk *u) {
    float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == Q4_K ? b + 16 : b + 48;
    for (int v = 0; v < 4; v++) { /* blocks ORDER_K4[2v], ORDER_K4[2v + 1] */
        uint8_t *q = u->q + 64 * v;
        const uint8_t *bytes = qs + 64 * (v >> 1);
        for (int l = 0; l < 64; l++) q[l] = (v & 1 ? bytes[l] >> 4 : bytes[l]) & 0x0F;
        for (int half = 0; type == Q5_K && half < 2; half++) {
            int k = ORDER_K4[2 * v + half]; /* block k's fifth bits: bit k of qh[0..31] */
            for (int l = 0; l < 32; l++) q[32 * half + l] |= ((qh[l] >> k) & 1) << 4;
        }
    }
    for (int p = 0; p < 8; p++) {
        int sc, m;
        scale_min_k4(ORDER_K4[p], scales, &sc, &m);
        u->scale[2 * p] = u->scale[2 * p + 1] = d * (float)sc;
        u->offset[2 * p] = u->offset[2 * p + 1] = dmin * (float)m;
    }
}

static void unpack_q6k(const uint8_t *b, Chunk *u) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = h2f(b + 208);
    for (int h = 0; h < 2; h++) { /* 128 weights: 64 bytes of nibbles, 32 bytes of bit pairs */
        uint8_t *q = u->q + 128 * h;
        for (int i = 0; i < 64; i++) q[i] = ql[64 * h + i] & 0x0F, q[64 + i] = ql[64 * h + i] >> 4;
        for (int s = 0; s < 4; s++)
            for (int i = 0; i < 32; i++) q[32 * s + i] |= ((qh[32 * h + i] >> (2 * s)) & 3) << 4;
    }
    for (int j = 0; j < 16; j++) u->scale[j] = d * (float)sc[j], u->offset[j] = 32.f * u->scale[j];
}

/* Bit pairs: value 128 h + 32 s + i is bits 2s, 2s+1 of byte 32 h + i. */
static inline void unpack_pairs(const uint8_t *qs, uint8_t *q) {
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int i = 0; i < 32; i++) q[128 * h + 32 * s + i] = (qs[32 * h + i] >> (2 * s)) & 3;
}

static void unpack_q3k(const uint8_t *b, Chunk *u) {
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    float d = h2f(b + 108);
    unpack_pairs(qs, u->q);
    for (int bit = 0; bit < 8; bit++) /* value 32 bit + i: bit `bit` of hmask[i] */
        for (int i = 0; i < 32; i++) u->q[32 * bit + i] |= ((hmask[i] >> bit) & 1) << 2;
    for (int k = 0; k < 16; k++) {
        int low = (s[k & 7] >> (4 * (k >> 3))) & 0x0F, high = (s[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
        u->scale[k] = d * (float)((low | (high << 4)) - 32);
        u->offset[k] = 4.f * u->scale[k];
    }
}

static void unpack_q2k(const uint8_t *b, Chunk *u) {
    const uint8_t *scales = b, *qs = b + 16;
    float d = h2f(b + 80), dmin = h2f(b + 82);
    unpack_pairs(qs, u->q);
    for (int k = 0; k < 16; k++)
        u->scale[k] = d * (float)(scales[k] & 0x0F), u->offset[k] = dmin * (float)(scales[k] >> 4);
}

/* Chunk c of a row (its first n32 blocks of 32 real: the row's last chunk may be partial for
 * the legacy types); the rest of the chunk is zero. */
static void unpack(int type, const uint8_t *row, long c, int n32, Chunk *u) {
    if (type < Q2_K) {
        int bytes = block_bytes(type);
        for (int j = 0; j < n32; j++) unpack_legacy(type, row + (c * 8 + j) * bytes, j, u);
        if (n32 < 8) {
            memset(u->q + 32 * n32, 0, 32 * (8 - n32));
            for (int k = 2 * n32; k < 16; k++) u->scale[k] = u->offset[k] = 0.f;
        }
        return;
    }
    const uint8_t *b = row + c * block_bytes(type);
    switch (type) {
    case Q2_K: unpack_q2k(b, u); break;
    case Q3_K: unpack_q3k(b, u); break;
    case Q6_K: unpack_q6k(b, u); break;
    default: unpack_q4k_q5k(type, b, u);
    }
}

/* ---- x quantized to int8, padded with zeros to whole chunks ---- */

/* Each chunk of x is arranged in W's block order (block_order) and quantized in groups of
 * 64 values there: one vector of the products, one dx. */
typedef struct {
    long kp;       /* K rounded up to a chunk */
    int8_t *q;     /* [T, kp] */
    float *d;      /* [T, kp / 64] dx of each group of 64 */
    float *bsum;   /* [T, kp / 16] dx times the sum of the 16 xq of each sub-block */
} QuantX;

static void quantize_x(const float *x, int T, int K, QuantX *xq, const int *order) {
    long kp = xq->kp;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        int8_t *q = xq->q + t * kp;
        float *d = xq->d + t * (kp / 64), *bsum = xq->bsum + t * (kp / 16);
        for (long c = 0; c < kp / CHUNK; c++) {
            float v[CHUNK];
            for (int p = 0; p < 8; p++) { /* block order[p] of the chunk, at 32 p */
                long start = c * CHUNK + 32L * order[p];
                for (int i = 0; i < 32; i++) v[32 * p + i] = start + i < K ? x[t * (long)K + start + i] : 0.f;
            }
            for (int g = 0; g < 4; g++) {
                float amax = 0.f;
                for (int i = 0; i < 64; i++) amax = fmaxf(amax, fabsf(v[64 * g + i]));
                float dx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
                int sums[4] = {0, 0, 0, 0};
                for (int i = 0; i < 64; i++) {
                    float r = v[64 * g + i] * inv;
                    int qi = (int)(r + copysignf(0.5f, r)); /* round half away from zero */
                    q[c * CHUNK + 64 * g + i] = (int8_t)qi;
                    sums[i >> 4] += qi;
                }
                d[c * 4 + g] = dx;
                for (int j = 0; j < 4; j++) bsum[c * 16 + 4 * g + j] = dx * (float)sums[j];
            }
        }
    }
}

/* ---- the chunk products: acc[r] += this chunk's sum for rows r of W and one row of x ---- */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* 64 weights per vector (in the chunk's block order); lane l of vector v sums weights
 * 64v + 4l .. +3: sub-block 4v + l/4, x group v. */
typedef __m512 Acc; /* an output's partial sums, reduced once its row is done */
static inline Acc acc_zero(void) { return _mm512_setzero_ps(); }
static inline float acc_sum(Acc a) { return _mm512_reduce_add_ps(a); }

typedef struct {
    __m512i q[4];
    __m512 scale[4]; /* each lane's sub-block scale */
    __m512 offset;   /* sub-block j's offset in lane j */
} Tile;

static void load_tile(const Chunk *u, Tile *w) {
    __m512 scale = _mm512_loadu_ps(u->scale);
    for (int v = 0; v < 4; v++) {
        __m512i index = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(16 * v),
                                                           _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
                                          2);
        w->q[v] = _mm512_loadu_si512(u->q + 64 * v);
        w->scale[v] = _mm512_permutexvar_ps(index, scale);
    }
    w->offset = _mm512_loadu_ps(u->offset);
}

static inline __attribute__((always_inline)) void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    __m512 a[ROWS];
    for (int r = 0; r < rows; r++) a[r] = acc[r];
    for (int v = 0; v < nv; v++) {
        __m512i x = _mm512_loadu_si512(xq + 64 * v);
        __m512 d = _mm512_set1_ps(dx[v]);
        for (int r = 0; r < rows; r++) {
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r].q[v], x);
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(w[r].scale[v], d), a[r]);
        }
    }
    __m512 b = _mm512_loadu_ps(bsum);
    for (int r = 0; r < rows; r++) acc[r] = _mm512_fnmadd_ps(w[r].offset, b, a[r]);
}

/* The K-quants most files hold, unpacked straight into registers (in ORDER_K4 for Q4_K and
 * Q5_K, each lane taking its block's scale; Q6_K's order is the weights'). */

static inline __m512i halves_epi16(int low, int high) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)low), _mm256_set1_epi16((short)high), 1);
}

static inline __m512i halves_epi32(int low, int high) {
    return _mm512_inserti64x4(_mm512_set1_epi32(low), _mm256_set1_epi32(high), 1);
}

static inline __attribute__((always_inline)) void tile_q4k_q5k(int type, const uint8_t *b, Tile *w) {
    uint32_t u[3];
    memcpy(u, b + 4, 12); /* scale_min_k4's bytes, four at a time */
    uint32_t sc_lo = u[0] & 0x3f3f3f3f, m_lo = u[1] & 0x3f3f3f3f;
    uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    __m512i ints = _mm512_cvtepu8_epi32(_mm_set_epi32((int)m_hi, (int)m_lo, (int)sc_hi, (int)sc_lo));
    __m512 factors = _mm512_insertf32x8(_mm512_set1_ps(h2f(b)), _mm256_set1_ps(h2f(b + 2)), 1);
    __m512 sm = _mm512_mul_ps(_mm512_cvtepi32_ps(ints), factors); /* lanes: 8 scales, 8 mins */
    const uint8_t *qs = type == Q4_K ? b + 16 : b + 48;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512i low = _mm512_loadu_si512(qs), high = _mm512_loadu_si512(qs + 64);
    w->q[0] = _mm512_and_si512(low, nibble);
    w->q[1] = _mm512_and_si512(_mm512_srli_epi16(low, 4), nibble);
    w->q[2] = _mm512_and_si512(high, nibble);
    w->q[3] = _mm512_and_si512(_mm512_srli_epi16(high, 4), nibble);
    if (type == Q5_K) { /* block k's fifth bits: bit k of qh[0..31] */
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
        const __m512i one = _mm512_set1_epi8(1);
        for (int v = 0; v < 4; v++) {
            int k = ORDER_K4[2 * v];
            __m512i bits = _mm512_and_si512(_mm512_srlv_epi16(qh, halves_epi16(k, k + 2)), one);
            w->q[v] = _mm512_or_si512(w->q[v], _mm512_slli_epi16(bits, 4));
        }
    }
    for (int v = 0; v < 4; v++)
        w->scale[v] = _mm512_permutexvar_ps(halves_epi32(ORDER_K4[2 * v], ORDER_K4[2 * v + 1]), sm);
    w->offset = _mm512_permutexvar_ps( /* sub-block j: the min of block ORDER_K4[j / 2] */
        _mm512_set_epi32(15, 15, 13, 13, 14, 14, 12, 12, 11, 11, 9, 9, 10, 10, 8, 8), sm);
}

static inline __attribute__((always_inline)) void tile_q6k(const uint8_t *b, Tile *w) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), pair = _mm512_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        __m512i ql = _mm512_loadu_si512(b + 64 * h);
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
        __m512i low = _mm512_and_si512(ql, nibble), high = _mm512_and_si512(_mm512_srli_epi16(ql, 4), nibble);
        __m512i bits_low = _mm512_and_si512(_mm512_srlv_epi16(qh, halves_epi16(0, 2)), pair);
        __m512i bits_high = _mm512_and_si512(_mm512_srlv_epi16(qh, halves_epi16(4, 6)), pair);
        w->q[2 * h] = _mm512_or_si512(low, _mm512_slli_epi16(bits_low, 4));
        w->q[2 * h + 1] = _mm512_or_si512(high, _mm512_slli_epi16(bits_high, 4));
    }
    __m512 scale = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192)))),
                                 _mm512_set1_ps(h2f(b + 208)));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int v = 0; v < 4; v++)
        w->scale[v] = _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(16 * v), lane), 2), scale);
    w->offset = _mm512_mul_ps(scale, _mm512_set1_ps(32.f));
}

static inline __attribute__((always_inline)) int fast_tile(int type, const uint8_t *row, long c, Tile *w) {
    if (type == Q4_K || type == Q5_K) {
        tile_q4k_q5k(type, row + c * block_bytes(type), w);
        return 1;
    }
    if (type == Q6_K) {
        tile_q6k(row + c * block_bytes(type), w);
        return 1;
    }
    return 0;
}
/* How far ahead of the chunk it reads a thread asks for W's bytes (as kernels.c: the hardware
 * prefetcher alone leaves a one-row product waiting on memory). */
#define PREFETCH_AHEAD 4096

/* Decode steps (T <= 4 rows of x) of the fast types: each row of W streams through once,
 * its chunks unpacked in registers and met by every row of x there. */
static inline __attribute__((always_inline)) void few_rows(int type, int T, const QuantX *xq, long chunks,
                                                          const uint8_t *row, long row_bytes, float *out) {
    Acc acc[4] = {acc_zero(), acc_zero(), acc_zero(), acc_zero()};
    long bytes = block_bytes(type);
    for (long c = 0; c < chunks; c++) {
        _mm_prefetch((const char *)row + c * bytes + PREFETCH_AHEAD, _MM_HINT_T0);
        Tile w;
        if (type == Q6_K)
            tile_q6k(row + c * bytes, &w);
        else
            tile_q4k_q5k(type, row + c * bytes, &w);
        for (int t = 0; t < T; t++)
            chunk_dot(&w, 1, 4, xq->q + t * xq->kp + c * CHUNK, xq->d + t * (xq->kp / 64) + c * 4,
                      xq->bsum + t * (xq->kp / 16) + c * 16, &acc[t]);
    }
    for (int t = 0; t < T; t++) out[t] = acc_sum(acc[t]);
}

static int few_rows_matmul(int type, int T, const QuantX *xq, long chunks, const uint8_t *W, long row_bytes,
                           int N, void *y, int y_bf16, long ldy);
#define FAST_FEW_ROWS 1
#else
static inline int fast_tile(int type, const uint8_t *row, long c, void *w) { return 0; }
#define FAST_FEW_ROWS 0
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#elif defined(__AVX2__) && defined(__FMA__)
/* 32 weights per vector; lane l of vector v sums weights 32v + 4l .. +3: sub-block 2v + l/4,
 * x group v / 2. */
typedef __m256 Acc;
static inline Acc acc_zero(void) { return _mm256_setzero_ps(); }
static inline float acc_sum(Acc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

typedef struct {
    __m256i q[8];
    __m256 scale[8];
    __m256 offset[2];
} Tile;

static void load_tile(const Chunk *u, Tile *w) {
    for (int v = 0; v < 8; v++) {
        w->q[v] = _mm256_loadu_si256((const __m256i *)(u->q + 32 * v));
        w->scale[v] = _mm256_set_m128(_mm_set1_ps(u->scale[2 * v + 1]), _mm_set1_ps(u->scale[2 * v]));
    }
    w->offset[0] = _mm256_loadu_ps(u->offset), w->offset[1] = _mm256_loadu_ps(u->offset + 8);
}

static inline __attribute__((always_inline)) void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a[ROWS];
    for (int r = 0; r < rows; r++) a[r] = acc[r];
    for (int v = 0; v < 2 * nv; v++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * v));
        __m256 d = _mm256_set1_ps(dx[v >> 1]);
        for (int r = 0; r < rows; r++) {
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r].q[v], x), ones);
            a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(w[r].scale[v], d), a[r]);
        }
    }
    __m256 b0 = _mm256_loadu_ps(bsum), b1 = _mm256_loadu_ps(bsum + 8);
    for (int r = 0; r < rows; r++) {
        a[r] = _mm256_fnmadd_ps(w[r].offset[0], b0, a[r]);
        acc[r] = _mm256_fnmadd_ps(w[r].offset[1], b1, a[r]);
    }
}
#else
typedef float Acc;
static inline Acc acc_zero(void) { return 0.f; }
static inline float acc_sum(Acc a) { return a; }
typedef Chunk Tile;

static void load_tile(const Chunk *u, Tile *w) { *w = *u; }

static inline __attribute__((always_inline)) void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    for (int r = 0; r < rows; r++) {
        float sum = 0.f;
        for (int j = 0; j < 4 * nv; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += (int)w[r].q[16 * j + i] * (int)xq[16 * j + i];
            sum += dx[j >> 2] * w[r].scale[j] * (float)s - w[r].offset[j] * bsum[j];
        }
        acc[r] += sum;
    }
}
#endif

static inline void store(void *y, int y_bf16, long index, float value) {
    if (y_bf16)
        ((uint16_t *)y)[index] = f32_to_bf16(value);
    else
        ((float *)y)[index] = value;
}

#if FAST_FEW_ROWS
/* few_rows over every row of W, for T <= 4 rows of x; 0 where it does not apply. */
static int few_rows_matmul(int type, int T, const QuantX *xq, long chunks, const uint8_t *W, long row_bytes,
                           int N, void *y, int y_bf16, long ldy) {
    if (T > 4 || !(type == Q4_K || type == Q5_K || type == Q6_K)) return 0;
#pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        float out[4];
        const uint8_t *row = W + n * row_bytes;
        switch (T) { /* constant trip counts: the sums stay in registers */
        case 1: few_rows(type, 1, xq, chunks, row, row_bytes, out); break;
        case 2: few_rows(type, 2, xq, chunks, row, row_bytes, out); break;
        case 3: few_rows(type, 3, xq, chunks, row, row_bytes, out); break;
        default: few_rows(type, 4, xq, chunks, row, row_bytes, out);
        }
        for (int t = 0; t < T; t++) store(y, y_bf16, t * ldy + n, out[t]);
    }
    return 1;
}
#else
static int few_rows_matmul(int type, int T, const QuantX *xq, long chunks, const uint8_t *W, long row_bytes,
                           int N, void *y, int y_bf16, long ldy) {
    return 0;
}
#endif

/* y[t * ldy + n] for n < N: x [T, K] float32 or bfloat16 times W [N, row_bytes] of `type`. */
void ggml_matmul(int type, const void *x, int x_bf16, int T, int K, const uint8_t *W,
                 long row_bytes, int N, void *y, int y_bf16, long ldy) {
    long chunks = (K + CHUNK - 1) / CHUNK, kp = chunks * CHUNK;
    float *xf = (float *)x;
    if (x_bf16) {
        xf = malloc(sizeof(float) * (size_t)T * K);
        for (long i = 0; i < (long)T * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    QuantX xq = {kp, malloc((size_t)T * kp), malloc(sizeof(float) * T * (kp / 64)),
                 malloc(sizeof(float) * T * (kp / 16))};
    quantize_x(xf, T, K, &xq, block_order(type));
    if (few_rows_matmul(type, T, &xq, chunks, W, row_bytes, N, y, y_bf16, ldy)) {
        free(xq.q), free(xq.d), free(xq.bsum);
        if (x_bf16) free(xf);
        return;
    }
    long tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (long tile = 0; tile < tiles; tile++) {
        int n0 = (int)(tile * ROWS), rows = N - n0 < ROWS ? N - n0 : ROWS;
        Chunk u;
        Tile w[ROWS];
        Acc acc[XTILE][ROWS];
        for (int t0 = 0; t0 < T; t0 += XTILE) {
            int tn = T - t0 < XTILE ? T - t0 : XTILE;
            for (int t = 0; t < tn; t++)
                for (int r = 0; r < ROWS; r++) acc[t][r] = acc_zero();
            for (long c = 0; c < chunks; c++) {
                int n32 = (int)((K - c * CHUNK) / 32 < 8 ? (K - c * CHUNK) / 32 : 8);
                for (int r = 0; r < rows; r++) {
                    const uint8_t *row = W + (n0 + r) * row_bytes;
                    if (!fast_tile(type, row, c, &w[r])) {
                        unpack(type, row, c, n32, &u);
                        load_tile(&u, &w[r]);
                    }
                }
                int nv = (n32 + 1) / 2; /* vectors of 64 weights holding real ones */
                for (int t = 0; t < tn; t++) {
                    long at = (long)(t0 + t);
                    const int8_t *q = xq.q + at * kp + c * CHUNK;
                    const float *d = xq.d + at * (kp / 64) + c * 4, *bsum = xq.bsum + at * (kp / 16) + c * 16;
                    if (rows == ROWS && nv == 4) /* constants: the loops unroll, sums stay in registers */
                        chunk_dot(w, ROWS, 4, q, d, bsum, acc[t]);
                    else
                        chunk_dot(w, rows, nv, q, d, bsum, acc[t]);
                }
            }
            for (int t = 0; t < tn; t++)
                for (int r = 0; r < rows; r++) store(y, y_bf16, (long)(t0 + t) * ldy + n0 + r, acc_sum(acc[t][r]));
        }
    }
    free(xq.q), free(xq.d), free(xq.bsum);
    if (x_bf16) free(xf);
}

/* out [n, K] float32: rows `index` of dequant(W). */
void ggml_dequantize_rows(int type, const uint8_t *W, long row_bytes, int K, const int64_t *index,
                          int n, float *out) {
    long chunks = (K + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (n > 8)
    for (long i = 0; i < n; i++) {
        Chunk u;
        for (long c = 0; c < chunks; c++) {
            int n32 = (int)((K - c * CHUNK) / 32 < 8 ? (K - c * CHUNK) / 32 : 8);
            unpack(type, W + index[i] * row_bytes, c, n32, &u);
            float *o = out + i * (long)K + c * CHUNK;
            const int *order = block_order(type);
            for (int k = 0; k < 32 * n32; k++) /* storage position k: weight 32 order[k/32] + k%32 */
                o[32 * order[k >> 5] + (k & 31)] = u.scale[k >> 4] * (float)u.q[k] - u.offset[k >> 4];
        }
    }
}
