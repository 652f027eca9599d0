/* The decoder stack of a Llama-family model for decode steps of a few sequences, on the CPU:
 * every layer of one step in one call, on quantized weights.
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
 * own eager forward (shard/models/llama.py); the tests compare the two.
 *
 * Activations and arithmetic are float32 whatever the model's dtype; the KV cache is float32
 * or bfloat16 (kv_bf16), laid out [num_blocks, block_size, kv_heads, head_dim] as
 * shard/kv_cache.py. Each of the T query tokens belongs to its own sequence (a decode step).
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
} DecoderLayer;

typedef struct {
    PagedKV paged;                   /* the sequences' blocks; heads and head_dim */
    int T, hidden, intermediate;
    float eps;                       /* RMSNorm epsilon */
    const float *cos, *sin;          /* [T, head_dim / 2] at each token's position */
    const int64_t *slots;            /* [T] cache slot of each token's K/V */
    void *const *keys, *const *values; /* [num_layers] the layers' cache tensors */
} DecodeStep;

/* y[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)); x, y [T, H]. */
static void rms_norm(const float *x, const float *w, float *y, int T, int H, float eps) {
    for (int t = 0; t < T; t++) {
        const float *row = x + (long)t * H;
        float sum = 0.f;
        for (int h = 0; h < H; h++) sum += row[h] * row[h];
        float r = 1.f / sqrtf(sum / (float)H + eps);
        for (int h = 0; h < H; h++) y[(long)t * H + h] = w[h] * (row[h] * r);
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

static void store_kv(void *cache, long i, const float *x, int n, int bf16) {
    for (int j = 0; j < n; j++) {
        if (bf16)
            ((uint16_t *)cache)[i + j] = f32_to_bf16(x[j]);
        else
            ((float *)cache)[i + j] = x[j];
    }
}

/* Scratch of one step, shared by the threads. */
typedef struct {
    float *normed;  /* [T, max(hidden, intermediate)]: a norm's output, then the activation */
    float *qkv;     /* [T, (heads + 2 kv_heads) head_dim] */
    float *attn;    /* [T, heads head_dim] */
    float *gate_up; /* [T, 2 intermediate] */
    float *out;     /* [T, hidden]: o_proj's, then down_proj's output */
    QuantX xq;      /* the next product's input, quantized */
} Scratch;

static void attention(const DecoderLayer *w, const DecodeStep *s, int layer, Scratch *m,
                      float *scores, float *x) {
    const PagedKV *paged = &s->paged;
    int T = s->T, D = paged->head_dim, H = s->hidden;
    int q_width = paged->heads * D, kv_width = paged->kv_heads * D;
    int width = q_width + 2 * kv_width;
#pragma omp single
    rms_norm(x, w->input_norm, m->normed, T, H, s->eps);
    quantize_x(w->qkv.kind, m->normed, T, H, &m->xq);
    product(&w->qkv, &m->xq, T, m->qkv);
#pragma omp single
    for (int t = 0; t < T; t++) {
        float *q = m->qkv + (long)t * width, *k = q + q_width, *v = k + kv_width;
        const float *cos = s->cos + (long)t * D / 2, *sin = s->sin + (long)t * D / 2;
        rotary(q, cos, sin, paged->heads, D);
        rotary(k, cos, sin, paged->kv_heads, D);
        long at = s->slots[t] * kv_width;
        store_kv(s->keys[layer], at, k, kv_width, paged->kv_bf16);
        store_kv(s->values[layer], at, v, kv_width, paged->kv_bf16);
    }
    int group = paged->heads / paged->kv_heads;
#pragma omp for collapse(2) schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < paged->heads; h++)
            attend(paged, s->keys[layer], s->values[layer], t, h / group,
                   m->qkv + (long)t * width + (long)h * D, m->attn + (long)t * q_width + h * D,
                   scores);
    quantize_x(w->o.kind, m->attn, T, q_width, &m->xq);
    product(&w->o, &m->xq, T, m->out);
#pragma omp single
    for (long i = 0; i < (long)T * H; i++) x[i] += m->out[i];
}

static void mlp(const DecoderLayer *w, const DecodeStep *s, Scratch *m, float *x) {
    int T = s->T, H = s->hidden, I = s->intermediate;
#pragma omp single
    rms_norm(x, w->post_norm, m->normed, T, H, s->eps);
    quantize_x(w->gate_up.kind, m->normed, T, H, &m->xq);
    product(&w->gate_up, &m->xq, T, m->gate_up);
#pragma omp for schedule(static)
    for (long i = 0; i < (long)T * I; i++) { /* silu(gate) * up */
        float gate = m->gate_up[i / I * 2 * I + i % I], up = m->gate_up[i / I * 2 * I + I + i % I];
        m->normed[i] = gate / (1.f + expf(-gate)) * up;
    }
    quantize_x(w->down.kind, m->normed, T, I, &m->xq);
    product(&w->down, &m->xq, T, m->out);
#pragma omp single
    for (long i = 0; i < (long)T * H; i++) x[i] += m->out[i];
}

static long larger(long a, long b) { return a > b ? a : b; }

/* x [T, hidden]: the embeddings in, the last layer's output (before the final norm) out. */
void llama_decode(const DecoderLayer *layers, int num_layers, const DecodeStep *s, float *x) {
    const PagedKV *paged = &s->paged;
    long T = s->T, D = paged->head_dim, I = s->intermediate;
    long width = larger(larger(s->hidden, I), paged->heads * D);
    Scratch m = {
        .normed = malloc(sizeof(float) * T * width),
        .qkv = malloc(sizeof(float) * T * (paged->heads + 2 * paged->kv_heads) * D),
        .attn = malloc(sizeof(float) * T * paged->heads * D),
        .gate_up = malloc(sizeof(float) * T * 2 * I),
        .out = malloc(sizeof(float) * T * s->hidden),
        .xq = quantx_new(T, width),
    };
    int longest = longest_sequence(paged, T);
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (longest + 16)); /* attend's scratch */
        for (int l = 0; l < num_layers; l++) {
            attention(&layers[l], s, l, &m, scores, x);
            mlp(&layers[l], s, &m, x);
        }
        free(scores);
    }
    free(m.normed);
    free(m.qkv);
    free(m.attn);
    free(m.gate_up);
    free(m.out);
    quantx_free(&m.xq);
}
