/* Fused element-wise ops of a decoder layer for the CPU: RMSNorm, rotary embedding and (for
 * batch-invariant mode) SiLU-and-multiply, each one
 * pass over its rows instead of 8 PyTorch ops (at decode, a PyTorch op costs microseconds of
 * dispatch for nanoseconds of work).
 *
 * Compiled at run time by shard/layers/fused.py (as shard/quant/kernels.c). Every op rounds
 * where PyTorch's own sequence of ops rounds (the pure-PyTorch reference is in
 * shard/layers/{layernorm,rotary}.py): rotary's results are the same bits, RMSNorm's may
 * differ in the last bit of a float (the order of its sum).
 * Tensors are float32 (bf16 = 0) or bfloat16 (bf16 = 1); rows may be strided (`stride`
 * elements from one row to the next), the elements of a row are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../simd.h"

#define PARALLEL_ROWS 16 /* fewer rows run on the calling thread: a fork costs more */

static inline float load(const void *p, int bf16, long i) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float round_to(int bf16, float f) { /* what storing in the dtype keeps */
    if (!bf16) return f;
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return f; /* NaN */
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void save_rounded(void *p, int bf16, long i, float rounded) {
    if (!bf16) {
        ((float *)p)[i] = rounded;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &rounded, 4);
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

/* y[t] = w * (x[t] * rsqrt(mean(x[t]^2) + eps)), the product inside rounded to the dtype
 * first (Llama: `weight * x.to(dtype)`). x [T, H] (row stride x_stride), w [H], y [T, H]. */
void fused_rms_norm(const void *x, long x_stride, const void *w, void *y, int T, int H,
                    float eps, int bf16) {
#pragma omp parallel for schedule(static) if (T >= PARALLEL_ROWS)
    for (int t = 0; t < T; t++) {
        long row = (long)t * x_stride;
        float sum = 0.f;
        for (int h = 0; h < H; h++) {
            float v = load(x, bf16, row + h);
            sum += v * v;
        }
        float r = 1.f / sqrtf(sum / (float)H + eps);
        for (int h = 0; h < H; h++) {
            float normed = round_to(bf16, load(x, bf16, row + h) * r);
            save_rounded(y, bf16, (long)t * H + h, round_to(bf16, load(w, bf16, h) * normed));
        }
    }
}

/* Rotates the halves (x1, x2) of every head: y = (x1 cos - x2 sin, x2 cos + x1 sin), each
 * product and sum rounded as PyTorch's ops round. x [T, heads, D] and y (which may be x: in
 * place) have row stride x_stride and contiguous heads; cos/sin [T, D/2] contiguous. */
void fused_rotary(const void *x, long x_stride, const void *cos, const void *sin, void *y, int T,
                  int heads, int D, int bf16) {
    int half = D / 2;
#pragma omp parallel for schedule(static) if (T >= PARALLEL_ROWS)
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < heads; h++) {
            long in = (long)t * x_stride + (long)h * D, out = in;
            for (int i = 0; i < half; i++) {
                float c = load(cos, bf16, (long)t * half + i), s = load(sin, bf16, (long)t * half + i);
                float x1 = load(x, bf16, in + i), x2 = load(x, bf16, in + half + i);
                float a = round_to(bf16, round_to(bf16, x1 * c) - round_to(bf16, x2 * s));
                float b = round_to(bf16, round_to(bf16, x2 * c) + round_to(bf16, x1 * s));
                save_rounded(y, bf16, out + i, a);
                save_rounded(y, bf16, out + half + i, b);
            }
        }
    }
}

/* y [T, I] = act(gate) * up of x [T, 2 I] = [gate | up] (Llama's MLP: silu; Gemma's: gelu with
 * the tanh approximation when `gelu`), each value a function of
 * its own gate and up alone (silu16: the same vector code for every lane, a row's last vector
 * padded), so a row's values never depend on the other rows (batch invariance). Rounded to
 * the dtype once, at the end. */
void fused_gated_mul(const void *x, void *y, int T, int I, int bf16, int gelu) {
#pragma omp parallel for schedule(static) if (T >= PARALLEL_ROWS)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < I; i += 16) {
            int n = I - i < 16 ? I - i : 16;
            v16f gate = splat(0.f), up = splat(0.f);
            for (int j = 0; j < n; j++) {
                gate[j] = load(x, bf16, (long)t * 2 * I + i + j);
                up[j] = load(x, bf16, (long)t * 2 * I + I + i + j);
            }
            v16f out = (gelu ? gelu_tanh16(gate) : silu16(gate)) * up;
            for (int j = 0; j < n; j++) save_rounded(y, bf16, (long)t * I + i + j, round_to(bf16, out[j]));
        }
    }
}
