/* llama.cpp's own CPU product (ggml_mul_mat through ggml-cpu) on one shape, for the kernel
 * table of scripts/kernel_table.py, which builds and runs this against the libggml of
 * ../shared/tools/build-llama-server.sh:
 *
 *     ggml_matmul_bench TYPE K N ROWS THREADS REPEATS  ->  one "median_ms" line per ROWS
 *
 * ROWS is a comma-separated list (1,4,16,64): the weights are quantized once for all.
 *
 * TYPE is a ggml type name (q4_K, q6_K, q8_0, ...). The weights are random floats quantized by
 * ggml_quantize_chunk; enough copies of them to exceed the last-level cache are used in turn,
 * so that each product reads its weights from memory, as a decode step does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

#define MEMORY_BYTES (256l << 20) /* weights cycled through: well past a 48 MiB L3 */

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static enum ggml_type type_named(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((enum ggml_type)t);
        if (n && strcmp(n, name) == 0) return (enum ggml_type)t;
    }
    fprintf(stderr, "unknown ggml type %s\n", name);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s TYPE K N ROWS THREADS REPEATS\n", argv[0]);
        return 2;
    }
    enum ggml_type type = type_named(argv[1]);
    long K = atol(argv[2]), N = atol(argv[3]), levels[16], rows = 0;
    int count = 0;
    for (char *r = strtok(argv[4], ","); r && count < 16; r = strtok(NULL, ","))
        levels[count++] = atol(r);
    for (int i = 0; i < count; i++) rows = levels[i] > rows ? levels[i] : rows;
    int threads = atoi(argv[5]), repeats = atoi(argv[6]);
    size_t weight_bytes = ggml_row_size(type, K) * N;
    int copies = (int)(MEMORY_BYTES / weight_bytes) + 1;
    size_t per_level = (size_t)rows * (K + N) * 4 * (copies + 1) + copies * ggml_graph_overhead();
    size_t arena = copies * (weight_bytes + 4096) + count * per_level + (16l << 20);
    struct ggml_context *ctx = ggml_init((struct ggml_init_params){arena, NULL, false});
    ggml_cpu_init();

    float *dense = malloc(sizeof(float) * K * N);
    srand(1);
    for (long i = 0; i < K * N; i++) dense[i] = (float)rand() / RAND_MAX - 0.5f;
    struct ggml_tensor **ws = malloc(sizeof *ws * copies);
    for (int c = 0; c < copies; c++) {
        ws[c] = ggml_new_tensor_2d(ctx, type, K, N);
        if (c == 0) /* quantizing is slow: the same bytes elsewhere read just as fast */
            ggml_quantize_chunk(type, dense, ws[c]->data, 0, N, K, NULL);
        else
            memcpy(ws[c]->data, ws[0]->data, weight_bytes);
    }
    free(dense);
    struct ggml_threadpool_params params = ggml_threadpool_params_default(threads);
    struct ggml_threadpool *pool = ggml_threadpool_new(&params); /* as llama-server's */
    struct ggml_cgraph **graphs = malloc(sizeof *graphs * copies);
    double *ms = malloc(sizeof(double) * repeats);
    for (int l = 0; l < count; l++) {
        struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, levels[l]);
        for (long i = 0; i < K * levels[l]; i++) ((float *)x->data)[i] = (float)rand() / RAND_MAX;
        for (int c = 0; c < copies; c++) {
            graphs[c] = ggml_new_graph(ctx);
            ggml_build_forward_expand(graphs[c], ggml_mul_mat(ctx, ws[c], x)); /* [rows, N] */
        }
        struct ggml_cplan plan = ggml_graph_plan(graphs[0], threads, pool);
        plan.work_data = malloc(plan.work_size + 64);
        for (int c = 0; c < copies; c++) ggml_graph_compute(graphs[c], &plan);
        for (int r = 0; r < repeats; r++) {
            double start = now_ms();
            ggml_graph_compute(graphs[r % copies], &plan);
            ms[r] = now_ms() - start;
        }
        qsort(ms, repeats, sizeof(double), compare);
        printf("%.4f\n", ms[repeats / 2]);
        free(plan.work_data);
    }
    ggml_threadpool_free(pool);
    ggml_free(ctx);
    return 0;
}
