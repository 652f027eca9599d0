/* Paged attention on the CPU: each query token attends to its sequence's cached positions up
 * to its own, read in place through the block table (no gather into contiguous K/V, no
 * padding, no mask). A token is computed on its own, in position order, the same way whether
 * it is a decode step's only token or one of a prompt chunk's: its output never depends on
 * the other tokens of the step (batch invariance, shard/numerics.py).
 *
 * Compiled at run time by shard/attention/paged_decode.py (as shard/quant/kernels.c), and
 * included by shard/models/llama_decode.c. The references are the SDPA backend's general path
 * and shard/attention/torch_ref.py; the tests compare all of them with dense attention.
 * Scores, softmax and sums are float32; the cache is float32, bfloat16 or float16 (kv_type), laid out
 * [num_blocks, block_size, kv_heads, head_dim] as shard/engine/kv_cache.py; head_dim % 16 == 0.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"

/* Where the step's sequences live in a layer's cache. */
typedef struct {
    int heads, kv_heads, head_dim, block_size, max_blocks, kv_type; /* KV_F32, ... */
    float scale;                 /* of the scores, head_dim^-0.5 for Llama */
    const int32_t *block_tables; /* [B, max_blocks]: each sequence's blocks */
    const int32_t *token_seq;    /* [T] the sequence (row of block_tables) of each query token */
    const int32_t *token_len;    /* [T] the positions token t sees: its own position + 1 */
    int window;                  /* > 0: a token sees only its last `window` positions */
    float softcap;               /* > 0: scores -> softcap * tanh(score / softcap) */
} PagedKV;

static inline v16f load16_kv(const void *cache, long i, int type) {
    if (type == KV_F32) return load16((const float *)cache + i);
    const uint16_t *h = (const uint16_t *)cache + i;
#if defined(__AVX512F__)
    __m256i bits = _mm256_loadu_si256((const __m256i *)h);
    if (type == KV_F16) return (v16f)_mm512_cvtph_ps(bits);
    return (v16f)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
#else
    v16f v;
    for (int j = 0; j < 16; j++) v[j] = type == KV_F16 ? f16_to_f32(h[j]) : bf16_to_f32(h[j]);
    return v;
#endif
}

/* The 16 lanes of q . k for the key at `at` (D / 16 multiply-adds in order). */
static inline v16f dot_lanes(const float *q, const void *key, long at, int D, int type) {
    v16f acc = splat(0.f);
    for (int i = 0; i < D; i += 16) acc = fma16(load16(q + i), load16_kv(key, at + i, type), acc);
    return acc;
}

#define GROUP_MAX 8 /* query heads attended together (a KV head's group, 8 at a time) */
#define RUN_MAX 4   /* tokens of one sequence attended together (a prompt chunk's) */

/* For the `tokens` (<= RUN_MAX) tokens t[i] of one sequence and the `heads` (<= GROUP_MAX)
 * query heads that read KV head kv_head: out[i] [heads, D] = softmax(q[i] . K^T * scale) V over
 * the token_len[t[i]] first cached positions, q[i] [heads, D]. They share each load of K and V.
 * scores: tokens * heads * (the longest token_len + 16) floats of scratch.
 *
 * Batch invariance: positions are walked block by block through the block table; a (token,
 * head)'s score for a position is its dot_lanes reduced by reduce16x4 (positions by 4 from each
 * block's start, each lane on its own: the same bits in any group), its softmax and weighted
 * sum run in position order. So each (token, head) gets the numbers it would get alone,
 * whatever runs beside it: a prompt token those of a decode token at its position. */
static inline __attribute__((always_inline)) void attend_d(const PagedKV *s, int D,
                                                           const void *key, const void *value,
                                                           const int *t, int tokens,
                                                           int kv_head, int heads,
                                                           const float *const *q,
                                                           float *const *out, float *scores) {
    int type = s->kv_type, size = s->block_size, n[RUN_MAX], st[RUN_MAX], longest = 0;
    int earliest = 1 << 30;
    for (int i = 0; i < tokens; i++) {
        n[i] = s->token_len[t[i]];
        st[i] = s->window > 0 && n[i] > s->window ? n[i] - s->window : 0; /* its first */
        longest = n[i] > longest ? n[i] : longest;
        earliest = st[i] < earliest ? st[i] : earliest;
    }
    int first_block = earliest / size;
    const int32_t *table = s->block_tables + (long)s->token_seq[t[0]] * s->max_blocks;
    long stride = (long)s->kv_heads * D; /* from one slot to the next */
    long width = longest + 16;           /* one (token, head)'s scores */
    float top[RUN_MAX][GROUP_MAX];
    for (int i = 0; i < tokens; i++)
        for (int h = 0; h < heads; h++) top[i][h] = -INFINITY;
    for (int b = first_block, p0 = b * size; p0 < longest; p0 += size, b++) {
        long at = (long)table[b] * size * stride + (long)kv_head * D;
        for (int p = p0; p < longest && p < p0 + size; p += 4, at += 4 * stride) {
            for (int i = 0; i < tokens; i++) {
                int end = n[i] < p0 + size ? n[i] : p0 + size;
                if (p >= end || p + 4 <= st[i]) continue;
                int count = end - p < 4 ? end - p : 4;
                for (int h = 0; h < heads; h++) {
                    v16f lanes[4] = {splat(0.f), splat(0.f), splat(0.f), splat(0.f)};
                    for (int j = 0; j < count; j++)
                        lanes[j] = dot_lanes(q[i] + h * D, key, at + j * stride, D, type);
                    float four[4];
                    reduce16x4(lanes, four);
                    float *row = scores + (i * heads + h) * width;
                    for (int j = 0; j < count; j++) {
                        float score = four[j] * s->scale;
                        if (s->softcap > 0.f) score = s->softcap * tanhf(score / s->softcap);
                        if (p + j < st[i]) score = -INFINITY; /* before the window */
                        row[p + j] = score;
                        top[i][h] = score > top[i][h] ? score : top[i][h];
                    }
                }
            }
        }
    }
    for (int i = 0; i < tokens; i++)
        for (int h = 0; h < heads; h++) {
            float *row = scores + (i * heads + h) * width;
            int from = st[i] & ~15; /* the window's first position, its vector's start */
            for (int p = from; p < st[i]; p++) row[p] = -INFINITY;
            for (int p = n[i]; p < n[i] + 16; p++) row[p] = -INFINITY; /* a whole last vector */
            v16f sums = splat(0.f);
            for (int p = from; p < n[i]; p += 16) {
                v16f e = exp16(load16(row + p) - splat(top[i][h]));
                for (int k = n[i] - p; k < 16; k++) e[k] = 0.f; /* past the sequence */
                memcpy(row + p, &e, sizeof e);
                sums += e;
            }
            float total = hsum(sums);
            for (int p = st[i]; p < n[i]; p++) row[p] /= total; /* each position's weight */
            memset(out[i] + h * D, 0, sizeof(float) * D);
        }
    /* Block by block, each (token, head)'s sum in registers over the block's positions (the
     * block's V stays in the L1 cache for the others). */
    for (int b = first_block, p0 = b * size; p0 < longest; p0 += size, b++) {
        long first = (long)table[b] * size * stride + (long)kv_head * D;
        for (int i = 0; i < tokens; i++) {
            int end = n[i] < p0 + size ? n[i] : p0 + size, begin = st[i] > p0 ? st[i] : p0;
            for (int h = 0; h < heads; h += 2) { /* two heads' sums interleave their latency */
                int pair = heads - h < 2 ? 1 : 2;
                float *o0 = out[i] + h * D, *o1 = out[i] + (h + pair - 1) * D;
                v16f acc0[D / 16], acc1[D / 16];
                for (int k = 0; k < D / 16; k++) {
                    acc0[k] = load16(o0 + k * 16);
                    acc1[k] = load16(o1 + k * 16);
                }
                const float *w0 = scores + (i * heads + h) * width;
                const float *w1 = scores + (i * heads + h + pair - 1) * width;
                long at = first + (long)(begin - p0) * stride;
                for (int p = begin; p < end; p++, at += stride) {
                    v16f a = splat(w0[p]), b = splat(w1[p]);
                    for (int k = 0; k < D / 16; k++) {
                        v16f v = load16_kv(value, at + k * 16, type);
                        acc0[k] = fma16(a, v, acc0[k]);
                        acc1[k] = fma16(b, v, acc1[k]);
                    }
                }
                memcpy(o1, acc1, sizeof acc1); /* the same head twice when alone: acc0 wins */
                memcpy(o0, acc0, sizeof acc0);
            }
        }
    }
}

/* attend_d for the common head sizes as constants (their loops unrolled), else any size. */
static __attribute__((noinline)) void attend_64(const PagedKV *s, const void *key,
                                                const void *value, const int *t, int tokens,
                                                int kv_head, int heads, const float *const *q,
                                                float *const *out, float *scores) {
    attend_d(s, 64, key, value, t, tokens, kv_head, heads, q, out, scores);
}

static __attribute__((noinline)) void attend_128(const PagedKV *s, const void *key,
                                                 const void *value, const int *t, int tokens,
                                                 int kv_head, int heads, const float *const *q,
                                                 float *const *out, float *scores) {
    attend_d(s, 128, key, value, t, tokens, kv_head, heads, q, out, scores);
}

static void attend(const PagedKV *s, const void *key, const void *value, const int *t,
                   int tokens, int kv_head, int heads, const float *const *q, float *const *out,
                   float *scores) {
    if (s->head_dim == 64)
        attend_64(s, key, value, t, tokens, kv_head, heads, q, out, scores);
    else if (s->head_dim == 128)
        attend_128(s, key, value, t, tokens, kv_head, heads, q, out, scores);
    else
        attend_d(s, s->head_dim, key, value, t, tokens, kv_head, heads, q, out, scores);
}

/* The query heads of a KV head, GROUP_MAX at a time: how many units a token's heads make, and
 * the heads of unit u (its KV head, first head, count). */
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

/* The step's runs: up to RUN_MAX consecutive tokens of one sequence (a decode step's tokens
 * are runs of one). starts[k] is run k's first token, starts[runs] == T; returns runs. */
static int token_runs(const PagedKV *s, int T, int *starts) {
    int runs = 0;
    for (int t = 0; t < T; t++)
        if (t == 0 || s->token_seq[t] != s->token_seq[t - 1] || t - starts[runs - 1] == RUN_MAX)
            starts[runs++] = t;
    starts[runs] = T;
    return runs;
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
    int *starts = malloc(sizeof(int) * (T + 1)), runs = token_runs(s, T, starts);
#pragma omp parallel if (T * s->heads > 1)
    {
        float *scores = malloc(sizeof(float) * RUN_MAX * GROUP_MAX * (longest + 16));
        float *qf = malloc(sizeof(float) * RUN_MAX * GROUP_MAX * D);
        float *of = malloc(sizeof(float) * RUN_MAX * GROUP_MAX * D);
#pragma omp for collapse(2) schedule(static, 1) /* prompt tokens' lengths grow: interleave */
        for (int k = 0; k < runs; k++) {
            for (int u = 0; u < units; u++) {
                int kv_head, first, count, tokens = starts[k + 1] - starts[k], t[RUN_MAX];
                const float *qs[RUN_MAX];
                float *outs[RUN_MAX];
                unit_heads(s, u, &kv_head, &first, &count);
                for (int i = 0; i < tokens; i++) {
                    t[i] = starts[k] + i;
                    long row = ((long)t[i] * s->heads + first) * D;
                    for (int j = 0; j < count * D; j++)
                        qf[i * GROUP_MAX * D + j] = load_value(q, x_bf16, row + j);
                    qs[i] = qf + i * GROUP_MAX * D;
                    outs[i] = of + i * GROUP_MAX * D;
                }
                attend(s, key, value, t, tokens, kv_head, count, qs, outs, scores);
                for (int i = 0; i < tokens; i++) {
                    long row = ((long)t[i] * s->heads + first) * D;
                    for (int j = 0; j < count * D; j++) {
                        float v = outs[i][j];
                        if (x_bf16)
                            ((uint16_t *)out)[row + j] = f32_to_bf16(v);
                        else
                            ((float *)out)[row + j] = v;
                    }
                }
            }
        }
        free(scores);
        free(qf);
        free(of);
    }
    free(starts);
}
