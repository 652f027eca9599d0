/* The decoder stack of a Llama-family model on the CPU: every layer of one step in one call, on
 * quantized weights. Written for decode steps of a few sequences; in batch-invariant mode
 * (shard/numerics.py) it runs every step, prompts included.
 *
 * Why: at a few sequences a step's real work is the quantized products (~5 ms for
 * SmolLM2-135M at one sequence on 2 cores); run as PyTorch ops, the rest of a layer (norms,
 * rotary, the cache write, paged attention, residuals: ~90 operator calls) cost twice as much
 * again in dispatch. Here they are loops between the products, and the threads of one
 * OpenMP region go from one phase to the next at a barrier instead of a fork per product.
 *
 * Compiled at run time by shard/models/llama_decode.py, like shard/quant/kernels.c, whose
 * products and activation quantization it includes, as it includes the paged attention of
 * shard/attention/paged_decode.c. The pure-PyTorch reference is the model's
 * own eager forward (shard/models/decoder.py); the tests compare the two. Besides Llama's
 * layer it takes what a layer description (DecoderLayer) says: per-head q/k norms, no rotary,
 * a sliding window, a residual multiplier; the Python side refuses the rest.
 *
 * Activations and arithmetic are float32 whatever the model's dtype; the KV cache is float32
 * bfloat16 or float16 (kv_type), laid out [num_blocks, block_size, kv_heads, head_dim] as
 * shard/engine/kv_cache.py. The T tokens are any step's: a decode step's one token per sequence, or
 * prompt chunks (paged->token_seq and token_len say whose each token is and what it sees).
 * Every token is computed on its own, in one order, whatever the others: batch invariance
 * (shard/numerics.py). All the step's K/V are written before any token attends.
 */
#include "../attention/paged_decode.c"
#include "../quant/kernels.c"

typedef struct {
    int kind, group, N, K; /* kind 4: q4, 8: q8 (shard/quant/weight.py); W is [N, K] */
    const uint8_t *qs;
    const f16 *scale, *min;   /* [N, K / group]; min only for q4 */
    const float *bias;        /* [N] or NULL */
} QMatrix;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    QMatrix qkv, o, gate_up, down;       /* q|k|v and gate|up fused along their rows */
    const float *q_norm, *k_norm;        /* [head_dim]: RMSNorm of each head (Qwen3) or NULL */
    int rope;                            /* 0: no rotary in this layer (SmolLM3's NoPE) */
    int window;                          /* > 0: attends to the last `window` positions */
} DecoderLayer;

typedef struct {
    PagedKV paged;                   /* the sequences' blocks; heads and head_dim */
    int T, hidden, intermediate;
    float eps;                       /* RMSNorm epsilon */
    float residual_scale;            /* each block's output times this (Granite; else 1) */
    const float *cos, *sin;          /* [T, head_dim / 2] at each token's position */
    const int64_t *slots;            /* [T] cache slot of each token's K/V */
    void *const *keys, *const *values; /* [num_layers] the layers' cache tensors */
} DecodeStep;

/* 1 / sqrt(mean((x + delta)^2) + eps) of one row of H values (delta NULL: x alone). */
static float inverse_rms(const float *x, const float *delta, int H, float eps) {
    float sum = 0.f;
    for (int h = 0; h < H; h++) {
        float v = x[h] + (delta ? delta[h] : 0.f);
        sum += v * v;
    }
    return 1.f / sqrtf(sum / (float)H + eps);
}

/* The residual stream x + delta (delta NULL: x alone) written to `sum` [T, H], and its RMSNorm
 * (weight w) quantized for a product with W of `kind`: the phase between two halves of a
 * layer, in one barrier. Each quad of 128 values is one thread's; every thread computes the
 * norm of the rows it touches from x and delta, which no thread writes in this phase. */
static void add_norm_quantize(int kind, const float *x, const float *delta, float *sum,
                              const float *w, int T, int H, float eps, QuantX *xq) {
    long n = quads(H), blocks = H / 32, row = -1;
    float r = 0.f;
#pragma omp for schedule(static)
    for (long u = 0; u < T * n; u++) {
        long t = u / n, g = u % n, start = g * 128, count = H - start < 128 ? H - start : 128;
        const float *xt = x + t * H, *dt = delta ? delta + t * H : NULL;
        if (t != row) { /* a thread's quads come in order: once per row it touches */
            r = inverse_rms(xt, dt, H, eps);
            row = t;
        }
        float v[128];
        for (long i = 0; i < count; i++) {
            float total = xt[start + i] + (dt ? dt[start + i] : 0.f);
            if (dt) sum[t * H + start + i] = total;
            v[i] = w[start + i] * (total * r);
        }
        quantize_quad(kind, v, t, g, blocks, xq);
    }
}

/* silu(gate) * up of gate_up [T, 2 I] quantized for a product with W of `kind`, a quad of 128
 * values per thread at a time. */
static void silu_quantize(int kind, const float *gate_up, int T, int I, QuantX *xq) {
    long n = quads(I), blocks = I / 32;
#pragma omp for schedule(static)
    for (long u = 0; u < T * n; u++) {
        long t = u / n, g = u % n, start = g * 128, count = I - start < 128 ? I - start : 128;
        const float *gate = gate_up + t * 2 * I + start, *up = gate + I;
        float v[128];
        for (long i = 0; i < count; i += 16) {
            int n = count - i < 16 ? (int)(count - i) : 16;
            v16f out = silu16(load16_part(gate + i, n)) * load16_part(up + i, n);
            memcpy(v + i, &out, sizeof(float) * n);
        }
        quantize_quad(kind, v, t, g, blocks, xq);
    }
}

static void add_bias(float *y, const float *bias, int T, int N) {
    if (!bias) return;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) y[(long)t * N + n] += bias[n];
}

/* y [T, w->N] = xq [T, w->K] @ W^T (+ bias), W's rows shared among the region's threads. */
static void product(const QMatrix *w, const QuantX *xq, int T, float *y) {
    if (w->kind == 4)
        matmul_shared(4, xq, T, w->K, w->qs, w->scale, w->min, w->N, w->group, y, 0);
    else
        matmul_shared(8, xq, T, w->K, w->qs, w->scale, w->min, w->N, w->group, y, 0);
    if (w->bias) {
#pragma omp single
        add_bias(y, w->bias, T, w->N);
    }
}

/* Rotates the halves (x1, x2) of `heads` heads of D: (x1 cos - x2 sin, x2 cos + x1 sin). */
static void rotary(float *x, const float *cos, const float *sin, int heads, int D) {
    int half = D / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (long)h * D;
        for (int i = 0; i < half; i++) {
            float x1 = v[i], x2 = v[half + i];
            v[i] = x1 * cos[i] - x2 * sin[i];
            v[half + i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

static void store_kv(void *cache, long i, const float *x, int n, int type) {
    for (int j = 0; j < n; j++) {
        if (type == KV_BF16)
            ((uint16_t *)cache)[i + j] = f32_to_bf16(x[j]);
        else if (type == KV_F16)
            ((uint16_t *)cache)[i + j] = f32_to_f16(x[j]);
        else
            ((float *)cache)[i + j] = x[j];
    }
}

/* Scratch of one step, shared by the threads. */
typedef struct {
    float *residual; /* [T, hidden]: the residual stream's other buffer (Residual) */
    float *qkv;      /* [T, (heads + 2 kv_heads) head_dim] */
    float *attn;     /* [T, heads head_dim] */
    float *gate_up;  /* [T, 2 intermediate] */
    float *out;      /* [T, hidden]: o_proj's, then down_proj's output */
    QuantX xq;       /* the next product's input, quantized */
    int *starts;     /* [runs + 1] the first token of each run attended together */
    int runs;
} Scratch;

/* The residual stream as every thread holds it: x, and the output of the last product (delta)
 * still to be added to it. The next norm writes their sum to `spare`, which then becomes x:
 * x itself is read by every thread during that phase, so it is never written in it. */
typedef struct {
    float *x, *spare;
    const float *delta;
} Residual;

/* Adds the pending delta and quantizes the RMSNorm (weight w) for a product with W of `kind`. */
static void norm(Residual *r, int kind, const float *w, const DecodeStep *s, QuantX *xq) {
    add_norm_quantize(kind, r->x, r->delta, r->spare, w, s->T, s->hidden, s->eps, xq);
    if (r->delta) {
        float *sum = r->spare;
        r->spare = r->x;
        r->x = sum;
        r->delta = NULL;
    }
}

/* RMSNorm of each of `heads` rows of D values, in place (weight w [D]). */
static void head_norm(float *x, const float *w, int heads, int D, float eps) {
    for (int h = 0; h < heads; h++, x += D) {
        float inverse = inverse_rms(x, NULL, D, eps);
        for (int i = 0; i < D; i++) x[i] = w[i] * (x[i] * inverse);
    }
}

static void scale_rows(float *y, long n, float scale) {
    if (scale == 1.f) return;
#pragma omp for schedule(static)
    for (long i = 0; i < n; i++) y[i] *= scale;
}

static void attention(const DecoderLayer *w, const DecodeStep *s, int layer, Scratch *m,
                      float *scores, Residual *r) {
    PagedKV layer_kv = s->paged;
    layer_kv.window = w->window;
    const PagedKV *paged = &layer_kv;
    int T = s->T, D = paged->head_dim;
    int q_width = paged->heads * D, kv_width = paged->kv_heads * D;
    int width = q_width + 2 * kv_width;
    norm(r, w->qkv.kind, w->input_norm, s, &m->xq);
    product(&w->qkv, &m->xq, T, m->qkv);
#pragma omp single
    for (int t = 0; t < T; t++) {
        float *q = m->qkv + (long)t * width, *k = q + q_width, *v = k + kv_width;
        const float *cos = s->cos + (long)t * D / 2, *sin = s->sin + (long)t * D / 2;
        if (w->q_norm) head_norm(q, w->q_norm, paged->heads, D, s->eps);
        if (w->k_norm) head_norm(k, w->k_norm, paged->kv_heads, D, s->eps);
        if (w->rope) {
            rotary(q, cos, sin, paged->heads, D);
            rotary(k, cos, sin, paged->kv_heads, D);
        }
        long at = s->slots[t] * kv_width;
        store_kv(s->keys[layer], at, k, kv_width, paged->kv_type);
        store_kv(s->values[layer], at, v, kv_width, paged->kv_type);
    }
    int units = group_units(paged), runs = m->runs;
#pragma omp for collapse(2) schedule(static, 1) /* prompt tokens' lengths grow: interleave */
    for (int k = 0; k < runs; k++)
        for (int u = 0; u < units; u++) {
            int kv_head, first, count, tokens = m->starts[k + 1] - m->starts[k], t[RUN_MAX];
            const float *qs[RUN_MAX];
            float *outs[RUN_MAX];
            unit_heads(paged, u, &kv_head, &first, &count);
            for (int i = 0; i < tokens; i++) {
                t[i] = m->starts[k] + i;
                qs[i] = m->qkv + (long)t[i] * width + (long)first * D;
                outs[i] = m->attn + (long)t[i] * q_width + (long)first * D;
            }
            attend(paged, s->keys[layer], s->values[layer], t, tokens, kv_head, count, qs, outs,
                   scores);
        }
    quantize_x(w->o.kind, m->attn, T, q_width, &m->xq);
    product(&w->o, &m->xq, T, m->out);
    scale_rows(m->out, (long)T * s->hidden, s->residual_scale);
    r->delta = m->out;
}

static void mlp(const DecoderLayer *w, const DecodeStep *s, Scratch *m, Residual *r) {
    norm(r, w->gate_up.kind, w->post_norm, s, &m->xq);
    product(&w->gate_up, &m->xq, s->T, m->gate_up);
    silu_quantize(w->down.kind, m->gate_up, s->T, s->intermediate, &m->xq);
    product(&w->down, &m->xq, s->T, m->out);
    scale_rows(m->out, (long)s->T * s->hidden, s->residual_scale);
    r->delta = m->out;
}

static long larger(long a, long b) { return a > b ? a : b; }

/* Sequences up to which a decode step is faster here than in the eager layers, whose products
 * take the dense GEMM past quant_direct_max_rows: the GEMM alone wins from 12 rows, but the
 * eager layers' ~2,000 operator calls cost more. SmolLM2 bf16 steps (2 cores, AMX): 19.3 vs
 * 23.5 ms at 8 rows, 30.2 vs 45.1 at 16, even at 32. Without AVX-512 VNNI, an estimate: the
 * AVX2 path's ~5 ms per sequence against float32 GEMMs reading every dense weight. */
int llama_decode_max_rows(void) {
#ifdef HAVE_VNNI_512
    return 16;
#else
    return 4;
#endif
}

/* x [T, hidden]: the embeddings in, the last layer's output (before the final norm) out.
 * The threads of one region go through every layer, from phase to phase at a barrier: ten
 * per layer, each a product or what lies between two (shard/models/llama_decode.py). */
void llama_decode(const DecoderLayer *layers, int num_layers, const DecodeStep *s, float *x) {
    const PagedKV *paged = &s->paged;
    long T = s->T, D = paged->head_dim, I = s->intermediate;
    long width = larger(larger(s->hidden, I), paged->heads * D);
    Scratch m = {
        .residual = malloc(sizeof(float) * T * s->hidden),
        .qkv = malloc(sizeof(float) * T * (paged->heads + 2 * paged->kv_heads) * D),
        .attn = malloc(sizeof(float) * T * paged->heads * D),
        .gate_up = malloc(sizeof(float) * T * 2 * I),
        .out = malloc(sizeof(float) * T * s->hidden),
        .xq = quantx_new(T, width),
        .starts = malloc(sizeof(int) * (T + 1)),
    };
    int longest = longest_sequence(paged, T);
    m.runs = token_runs(paged, T, m.starts);
#pragma omp parallel
    {
        /* attend's scratch */
        float *scores = malloc(sizeof(float) * RUN_MAX * GROUP_MAX * (longest + 16));
        Residual r = {x, m.residual, NULL};
        for (int l = 0; l < num_layers; l++) {
            attention(&layers[l], s, l, &m, scores, &r);
            mlp(&layers[l], s, &m, &r);
        }
#pragma omp for schedule(static)
        for (long i = 0; i < T * s->hidden; i++) x[i] = r.x[i] + r.delta[i];
        free(scores);
    }
    free(m.residual);
    free(m.qkv);
    free(m.attn);
    free(m.gate_up);
    free(m.out);
    quantx_free(&m.xq);
    free(m.starts);
}
