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
 *     q[256]       the weights' integer values, all >= 0 (unsigned: one u8 x s8 product),
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
 * x is quantized once per call to int8 in blocks of 32 (xq = round(x / dx), dx = max|x| /
 * 127, as the other quantized kernels and llama.cpp's Q8 activations), and each 16 weights
 * meet it in integer products (u8 x s8 -> i32: VNNI, or maddubs + madd with AVX2; q <= 63
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

static void unpack_q4k_q5k(int type, const uint8_t *b, Chunk *u) {
    float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == Q4_K ? b + 16 : b + 48;
    for (int j = 0; j < 4; j++) { /* 64 weights: low nibbles of 32 bytes, then high */
        uint8_t *q = u->q + 64 * j;
        for (int l = 0; l < 32; l++) q[l] = qs[32 * j + l] & 0x0F, q[l + 32] = qs[32 * j + l] >> 4;
        if (type == Q5_K)
            for (int l = 0; l < 32; l++) {
                q[l] |= ((qh[l] >> (2 * j)) & 1) << 4;
                q[l + 32] |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
    }
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min_k4(j, scales, &sc, &m);
        u->scale[2 * j] = u->scale[2 * j + 1] = d * (float)sc;
        u->offset[2 * j] = u->offset[2 * j + 1] = dmin * (float)m;
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

/* ---- x quantized to int8 blocks of 32, padded with zeros to whole chunks ---- */

typedef struct {
    long kp;       /* K rounded up to a chunk */
    int8_t *q;     /* [T, kp] */
    float *d;      /* [T, kp / 32] dx */
    float *bsum;   /* [T, kp / 16] dx times the sum of the 16 xq of each sub-block */
} QuantX;

static void quantize_x(const float *x, int T, int K, QuantX *xq) {
    long kp = xq->kp;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        int8_t *q = xq->q + t * kp;
        float *d = xq->d + t * (kp / 32), *bsum = xq->bsum + t * (kp / 16);
        for (long b = 0; b < kp / 32; b++) {
            const float *v = x + t * (long)K + 32 * b;
            int n = K - 32 * b < 32 ? (int)(K - 32 * b) : 32;
            if (n < 0) n = 0;
            float amax = 0.f;
            for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(v[i]));
            float dx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int sums[2] = {0, 0};
            for (int i = 0; i < 32; i++) {
                float r = i < n ? v[i] * inv : 0.f;
                int qi = (int)(r + copysignf(0.5f, r)); /* round half away from zero */
                q[32 * b + i] = (int8_t)qi;
                sums[i >> 4] += qi;
            }
            d[b] = dx;
            bsum[2 * b] = dx * (float)sums[0], bsum[2 * b + 1] = dx * (float)sums[1];
        }
    }
}

/* ---- the chunk products: acc[r] += this chunk's sum for rows r of W and one row of x ---- */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* 64 weights per vector; lane l of vector v sums weights 64v + 4l .. +3: sub-block 4v + l/4,
 * x block 2v + l/8. */
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

static inline void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    __m512 a[ROWS];
    for (int r = 0; r < rows; r++) a[r] = acc[r];
    for (int v = 0; v < nv; v++) {
        __m512i x = _mm512_loadu_si512(xq + 64 * v);
        __m512 d = _mm512_insertf32x8(_mm512_set1_ps(dx[2 * v]), _mm256_set1_ps(dx[2 * v + 1]), 1);
        for (int r = 0; r < rows; r++) {
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r].q[v], x);
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(w[r].scale[v], d), a[r]);
        }
    }
    __m512 b = _mm512_loadu_ps(bsum);
    for (int r = 0; r < rows; r++) acc[r] = _mm512_fnmadd_ps(w[r].offset, b, a[r]);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* 32 weights per vector; lane l of vector v sums weights 32v + 4l .. +3: sub-block 2v + l/4,
 * x block v. */
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

static inline void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a[ROWS];
    for (int r = 0; r < rows; r++) a[r] = acc[r];
    for (int v = 0; v < 2 * nv; v++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * v));
        __m256 d = _mm256_set1_ps(dx[v]);
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

static inline void chunk_dot(const Tile *w, int rows, int nv, const int8_t *xq, const float *dx,
                             const float *bsum, Acc *acc) {
    for (int r = 0; r < rows; r++) {
        float sum = 0.f;
        for (int j = 0; j < 4 * nv; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += (int)w[r].q[16 * j + i] * (int)xq[16 * j + i];
            sum += dx[j >> 1] * w[r].scale[j] * (float)s - w[r].offset[j] * bsum[j];
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

/* y[t * ldy + n] for n < N: x [T, K] float32 or bfloat16 times W [N, row_bytes] of `type`. */
void ggml_matmul(int type, const void *x, int x_bf16, int T, int K, const uint8_t *W,
                 long row_bytes, int N, void *y, int y_bf16, long ldy) {
    long chunks = (K + CHUNK - 1) / CHUNK, kp = chunks * CHUNK;
    float *xf = (float *)x;
    if (x_bf16) {
        xf = malloc(sizeof(float) * (size_t)T * K);
        for (long i = 0; i < (long)T * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    QuantX xq = {kp, malloc((size_t)T * kp), malloc(sizeof(float) * T * (kp / 32)),
                 malloc(sizeof(float) * T * (kp / 16))};
    quantize_x(xf, T, K, &xq);
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
                    unpack(type, W + (n0 + r) * row_bytes, c, n32, &u);
                    load_tile(&u, &w[r]);
                }
                int nv = (n32 + 1) / 2; /* vectors of 64 weights holding real ones */
                for (int t = 0; t < tn; t++) {
                    long at = (long)(t0 + t);
                    chunk_dot(w, rows, nv, xq.q + at * kp + c * CHUNK, xq.d + at * (kp / 32) + c * 8,
                              xq.bsum + at * (kp / 16) + c * 16, acc[t]);
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
            for (int k = 0; k < 32 * n32; k++) o[k] = u.scale[k >> 4] * (float)u.q[k] - u.offset[k >> 4];
        }
    }
}
