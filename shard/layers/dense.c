/* Dense matrix products for the CPU in one fixed order per output: y[T, N] = x[T, K] @ W[N, K]^T.
 *
 * Why not torch's (oneDNN's) GEMM: its kernels and blocking change with the number of rows, so
 * row r of a product alone and the same row among others differ in their last bits, and a
 * request's logits depend on its batch. Here every output (t, n) is one 16-lane accumulator
 * fed 16 columns at a time in column order (the last, partial vector padded with zeros), then
 * reduced by one tree (reduce16x4 in shard/simd.h); tiles of 4 rows of x by 4 rows of W only decide
 * what is loaded once and shared (batch invariance, shard/numerics.py).
 *
 * Compiled at run time by shard/layers/dense.py (as shard/quant/kernels.c). The pure-PyTorch
 * reference is F.linear. x, W and y are float32 or bfloat16 (each its own flag), contiguous;
 * the arithmetic is float32 (fused multiply-adds with AVX-512, else multiply then add).
 */
#include <omp.h>
#include <stdlib.h>

#include "../simd.h"

#define ROWS 4  /* rows of x that share each loaded vector of W */
#define WROWS 4 /* rows of W that share each loaded vector of x, reduced together */
#define W_CHUNK 32 /* rows of W a thread takes at a time when x has many rows */

static inline v16f load_w(const void *w, int bf16, long i, int n) {
    if (!bf16) return n == 16 ? load16((const float *)w + i) : load16_part((const float *)w + i, n);
#if defined(__AVX512F__)
    if (n == 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        return (v16f)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
#endif
    v16f v = splat(0.f);
    const uint16_t *p = (const uint16_t *)w + i;
    for (int j = 0; j < n; j++) v[j] = bf16_to_f32(p[j]);
    return v;
}

/* acc[r][j] += x[r] . w[j] over the 16 columns from k (`count` of them: 16 but in a row's
 * last, partial vector, whose missing columns are zeros). */
static inline __attribute__((always_inline)) void columns(int rows, const float *const *x,
                                                          const void *const *w, int w_bf16,
                                                          long k, int count,
                                                          v16f acc[ROWS][WROWS]) {
    v16f wv[WROWS];
    for (int j = 0; j < WROWS; j++) wv[j] = load_w(w[j], w_bf16, k, count);
    for (int r = 0; r < rows; r++) {
        v16f xv = count == 16 ? load16(x[r] + k) : load16_part(x[r] + k, count);
        for (int j = 0; j < WROWS; j++) acc[r][j] = fma16(xv, wv[j], acc[r][j]);
    }
}

/* y[t0 + r, n + j] for r < rows, j < ws: `rows` rows of x (float32) against ws <= WROWS rows of W
 * (pointers w[j]). Every (r, j) accumulator sees the same operations in the same order. */
static inline __attribute__((always_inline)) void tile(int rows, const float *x, long t0, int K,
                                                       const void *const *w, int w_bf16, int ws,
                                                       long n, int N, void *y, int y_bf16) {
    v16f acc[ROWS][WROWS];
    const float *xr[ROWS];
    for (int r = 0; r < rows; r++) {
        xr[r] = x + (t0 + r) * K;
        for (int j = 0; j < WROWS; j++) acc[r][j] = splat(0.f);
    }
    long k = 0;
    for (; k + 16 <= K; k += 16) columns(rows, xr, w, w_bf16, k, 16, acc);
    if (k < K) columns(rows, xr, w, w_bf16, k, (int)(K - k), acc);
    for (int r = 0; r < rows; r++) {
        float out[WROWS];
        reduce16x4(acc[r], out);
        for (int j = 0; j < ws; j++) {
            long at = (t0 + r) * N + n + j;
            if (y_bf16)
                ((uint16_t *)y)[at] = f32_to_bf16(out[j]);
            else
                ((float *)y)[at] = out[j];
        }
    }
}

typedef void (*TileFn)(const float *, long, int, const void *const *, int, int, long, int, void *,
                       int);
#define TILE(R)                                                                              \
    static __attribute__((noinline)) void tile_##R(const float *x, long t0, int K,           \
                                                   const void *const *w, int w_bf16, int ws, \
                                                   long n, int N, void *y, int y_bf16) {     \
        tile(R, x, t0, K, w, w_bf16, ws, n, N, y, y_bf16);                                   \
    }
TILE(1) TILE(2) TILE(3) TILE(4)
#undef TILE
static const TileFn TILES[ROWS] = {tile_1, tile_2, tile_3, tile_4};

/* y = x @ W^T. The rows of W are shared out among the threads; a thread meets every row of x
 * with W_CHUNK rows of W at a time where x has many rows (they stay in its cache). */
void dense_matmul(const void *x, int x_bf16, int T, int K, const void *w, int w_bf16, int N,
                  void *y, int y_bf16) {
    const float *xf = (const float *)x;
    float *converted = NULL;
    if (x_bf16) {
        converted = malloc(sizeof(float) * (long)T * K);
        for (long i = 0; i < (long)T * K; i++) converted[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = converted;
    }
    long row_bytes = (long)K * (w_bf16 ? 2 : 4);
#pragma omp parallel if ((long)T * N * K > 1 << 16)
    {
        long threads = omp_get_num_threads(), me = omp_get_thread_num();
        long n0 = N * me / threads, n1 = N * (me + 1) / threads;
        long chunk = T > ROWS ? W_CHUNK : n1 - n0;
        for (long c0 = n0; c0 < n1; c0 += chunk) {
            long c1 = c0 + chunk < n1 ? c0 + chunk : n1;
            for (long t0 = 0; t0 < T; t0 += ROWS) {
                int rows = T - t0 < ROWS ? (int)(T - t0) : ROWS;
                for (long n = c0; n < c1; n += WROWS) {
                    int ws = c1 - n < WROWS ? (int)(c1 - n) : WROWS;
                    const void *rows_w[WROWS];
                    for (int j = 0; j < WROWS; j++)
                        rows_w[j] = (const char *)w + (n + (j < ws ? j : 0)) * row_bytes;
                    TILES[rows - 1](xf, t0, K, rows_w, w_bf16, ws, n, N, y, y_bf16);
                }
            }
        }
    }
    free(converted);
}
