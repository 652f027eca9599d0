/* Paged attention on the CPU: each query token attends to its sequence's cached positions up
 * to its own, read in place through the block table (no gather into contiguous K/V, no
 * padding, no mask). A token is computed on its own, in position order, the same way whether
 * it is a decode step's only token or one of a prompt chunk's: its output never depends on
 * the other tokens of the step (batch invariance, shard/numerics.py).
 *
 * Compiled at run time by shard/attention/paged_decode.py (as shard/quant/kernels.c), and
 * included by shard/models/llama_decode.c. The references are the SDPA backend's general path
 * and shard/attention/torch_ref.py; the tests compare all of them with dense attention.
 * Scores, softmax and sums are float32; the cache is float32 or bfloat16 (kv_bf16), laid out
 * [num_blocks, block_size, kv_heads, head_dim] as shard/kv_cache.py; head_dim % 16 == 0.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"

/* Where the step's sequences live in a layer's cache. */
typedef struct {
    int heads, kv_heads, head_dim, block_size, max_blocks, kv_bf16;
    float scale;                 /* of the scores, head_dim^-0.5 for Llama */
    const int32_t *block_tables; /* [B, max_blocks]: each sequence's blocks */
    const int32_t *token_seq;    /* [T] the sequence (row of block_tables) of each query token */
    const int32_t *token_len;    /* [T] the positions token t sees: its own position + 1 */
} PagedKV;

static inline v16f load16_kv(const void *cache, long i, int bf16) {
    if (!bf16) return load16((const float *)cache + i);
#if defined(__AVX512F__)
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + i));
    return (v16f)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    v16f v;
    for (int j = 0; j < 16; j++) v[j] = bf16_to_f32(((const uint16_t *)cache)[i + j]);
    return v;
#endif
}

static inline v16f fma16(v16f a, v16f b, v16f acc) {
#if defined(__AVX512F__)
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#else
    return acc + a * b;
#endif
}

/* The 16 lanes of q . k for the key at `at` (D / 16 multiply-adds in order). */
static inline v16f dot_lanes(const float *q, const void *key, long at, int D, int bf16) {
    v16f acc = splat(0.f);
    for (int i = 0; i < D; i += 16) acc = fma16(load16(q + i), load16_kv(key, at + i, bf16), acc);
    return acc;
}

#define GROUP_MAX 8 /* query heads attended together (a KV head's group, 8 at a time) */

/* out [g, D] = softmax(q[g] . K^T * scale) V over the token_len[t] first cached positions of
 * token t's sequence, for the `heads` (<= GROUP_MAX) query heads q [heads, D] that read KV head
 * kv_head: they share each load of K and V. scores: heads * (token_len[t] + 16) floats of
 * scratch. Positions are walked block by block through the block table; a head's score for a
 * position is its dot_lanes reduced by reduce16x4 (4 positions at a time, each lane on its
 * own: the same bits in any group), its softmax and weighted sum run in position order: each
 * head's numbers are those it would get alone, whatever its token's step holds. */
static inline __attribute__((always_inline)) void attend_d(const PagedKV *s, int D,
                                                           const void *key, const void *value,
                                                           int t, int kv_head, int heads,
                                                           const float *q, float *out,
                                                           float *scores) {
    int n = s->token_len[t], bf16 = s->kv_bf16, size = s->block_size;
    const int32_t *table = s->block_tables + (long)s->token_seq[t] * s->max_blocks;
    long stride = (long)s->kv_heads * D; /* from one slot to the next */
    long width = n + 16;                 /* one head's scores */
    float top[GROUP_MAX];
    for (int h = 0; h < heads; h++) top[h] = -INFINITY;
    for (int p0 = 0, b = 0; p0 < n; p0 += size, b++) {
        long at = (long)table[b] * size * stride + (long)kv_head * D;
        int end = n < p0 + size ? n : p0 + size;
        for (int p = p0; p < end; p += 4, at += 4 * stride) {
            int count = end - p < 4 ? end - p : 4;
            for (int h = 0; h < heads; h++) {
                v16f lanes[4] = {splat(0.f), splat(0.f), splat(0.f), splat(0.f)};
                for (int j = 0; j < count; j++)
                    lanes[j] = dot_lanes(q + h * D, key, at + j * stride, D, bf16);
                float four[4];
                reduce16x4(lanes, four);
                float *row = scores + h * width;
                for (int j = 0; j < count; j++) {
                    row[p + j] = four[j] * s->scale;
                    top[h] = row[p + j] > top[h] ? row[p + j] : top[h];
                }
            }
        }
    }
    for (int h = 0; h < heads; h++) {
        float *row = scores + h * width;
        for (int p = n; p < n + 16; p++) row[p] = -INFINITY; /* a whole last vector */
        v16f sums = splat(0.f);
        for (int p = 0; p < n; p += 16) {
            v16f e = exp16(load16(row + p) - splat(top[h]));
            for (int i = n - p; i < 16; i++) e[i] = 0.f; /* past the sequence */
            memcpy(row + p, &e, sizeof e);
            sums += e;
        }
        float total = hsum(sums);
        for (int p = 0; p < n; p++) row[p] /= total; /* each position's weight */
    }
    /* Block by block, each head's sum in registers over the block's positions (the block's V
     * stays in the L1 cache for the group's other heads). */
    for (int h = 0; h < heads; h++) memset(out + h * D, 0, sizeof(float) * D);
    for (int p0 = 0, b = 0; p0 < n; p0 += size, b++) {
        long first = (long)table[b] * size * stride + (long)kv_head * D;
        int end = n < p0 + size ? n : p0 + size;
        for (int h = 0; h < heads; h++) {
            v16f acc[D / 16];
            for (int i = 0; i < D / 16; i++) acc[i] = load16(out + h * D + i * 16);
            const float *weights = scores + h * width;
            long at = first;
            for (int p = p0; p < end; p++, at += stride) {
                v16f w = splat(weights[p]);
                for (int i = 0; i < D / 16; i++)
                    acc[i] = fma16(w, load16_kv(value, at + i * 16, bf16), acc[i]);
            }
            memcpy(out + h * D, acc, sizeof acc);
        }
    }
}

/* attend_d for the common head sizes as constants (their loops unrolled), else any size. */
static __attribute__((noinline)) void attend_64(const PagedKV *s, const void *key,
                                                const void *value, int t, int kv_head,
                                                int heads, const float *q, float *out,
                                                float *scores) {
    attend_d(s, 64, key, value, t, kv_head, heads, q, out, scores);
}

static __attribute__((noinline)) void attend_128(const PagedKV *s, const void *key,
                                                 const void *value, int t, int kv_head,
                                                 int heads, const float *q, float *out,
                                                 float *scores) {
    attend_d(s, 128, key, value, t, kv_head, heads, q, out, scores);
}

static void attend(const PagedKV *s, const void *key, const void *value, int t, int kv_head,
                   int heads, const float *q, float *out, float *scores) {
    if (s->head_dim == 64)
        attend_64(s, key, value, t, kv_head, heads, q, out, scores);
    else if (s->head_dim == 128)
        attend_128(s, key, value, t, kv_head, heads, q, out, scores);
    else
        attend_d(s, s->head_dim, key, value, t, kv_head, heads, q, out, scores);
}

/* The query heads of the (token, KV head) pairs, GROUP_MAX at a time: how many attend calls a
 * step makes (`units`), and the heads of unit u (first head, count). */
static inline int group_units(const PagedKV *s) {
    int group = s->heads / s->kv_heads;
    return s->kv_heads * ((group + GROUP_MAX - 1) / GROUP_MAX);
}

static inline void unit_heads(const PagedKV *s, int u, int *kv_head, int *first, int *count) {
    int group = s->heads / s->kv_heads, per = (group + GROUP_MAX - 1) / GROUP_MAX;
    *kv_head = u / per;
    int start = (u % per) * GROUP_MAX;
    *first = *kv_head * group + start;
    *count = group - start < GROUP_MAX ? group - start : GROUP_MAX;
}

static int longest_sequence(const PagedKV *s, int T) {
    int longest = 1;
    for (int t = 0; t < T; t++) longest = s->token_len[t] > longest ? s->token_len[t] : longest;
    return longest;
}

static inline float load_value(const void *p, int bf16, long i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* out [T, heads, D] = attention of q [T, heads, D] (both float32, or both bfloat16 with
 * x_bf16) over one layer's cache (key, value), every token on its own, the heads of a KV
 * head's group together. */
void paged_decode_attention(const PagedKV *s, int T, const void *q, void *out, int x_bf16,
                            const void *key, const void *value) {
    int D = s->head_dim, longest = longest_sequence(s, T), units = group_units(s);
#pragma omp parallel if (T * s->heads > 1)
    {
        float *scores = malloc(sizeof(float) * GROUP_MAX * (longest + 16));
        float *qf = malloc(sizeof(float) * GROUP_MAX * D), *of = malloc(sizeof(float) * GROUP_MAX * D);
#pragma omp for collapse(2) schedule(static, 1) /* prompt tokens' lengths grow: interleave */
        for (int t = 0; t < T; t++) {
            for (int u = 0; u < units; u++) {
                int kv_head, first, count;
                unit_heads(s, u, &kv_head, &first, &count);
                long row = ((long)t * s->heads + first) * D;
                for (int i = 0; i < count * D; i++) qf[i] = load_value(q, x_bf16, row + i);
                attend(s, key, value, t, kv_head, count, qf, of, scores);
                for (int i = 0; i < count * D; i++) {
                    if (x_bf16)
                        ((uint16_t *)out)[row + i] = f32_to_bf16(of[i]);
                    else
                        ((float *)out)[row + i] = of[i];
                }
            }
        }
        free(scores);
        free(qf);
        free(of);
    }
}
