/*
 * The x4 products as a program, for kernel builds this host cannot load (another architecture,
 * run under qemu-user by tests/test_kernel_arm.py).
 *
 * stdin: int64 n, k, m; then n rows of k/32 GGML Q4_0 blocks; then m x k float32 activations.
 * stdout: the ISA name (st_isa) and a newline, then y = x . w^T as m x n float32, computed by
 * repacking the rows in place to x4 (st_q4_0_to_x4) and st_q4_0_x4_matmul; the rows read back
 * through st_q4_0_x4_rows must equal the input, else exit 3.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "q4_0.h"

void st_q4_0_to_x4(const uint8_t *src, uint8_t *dst, int64_t n, int64_t k);
void st_q4_0_x4_rows(const uint8_t *x4, int64_t n, int64_t k, const int64_t *ids, int64_t count, uint8_t *out);
int64_t st_q4_0_x4_bytes(int64_t n, int64_t k);
void st_q4_0_x4_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, block_q8 *xq,
                       int32_t *corr);
const char *st_isa(void);

static void read_all(void *p, size_t bytes) {
    if (fread(p, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "x4_products: short input\n");
        exit(2);
    }
}

int main(void) {
    int64_t shape[3];
    read_all(shape, sizeof shape);
    const int64_t n = shape[0], k = shape[1], m = shape[2], nb = k / QK, row_bytes = nb * Q4_BYTES;
    if (n < 1 || k < QK || k % QK || m < 1) {
        fprintf(stderr, "x4_products: bad shape\n");
        return 2;
    }
    uint8_t *rows = malloc((size_t)(n * row_bytes)), *w = malloc((size_t)st_q4_0_x4_bytes(n, k));
    uint8_t *back = malloc((size_t)(n * row_bytes));
    float *x = malloc((size_t)(m * k) * sizeof(float)), *y = malloc((size_t)(m * n) * sizeof(float));
    block_q8 *xq = malloc((size_t)(m * nb) * sizeof(block_q8));
    int32_t *corr = malloc((size_t)(m * nb) * sizeof(int32_t));
    int64_t *ids = malloc((size_t)n * sizeof(int64_t));
    read_all(rows, (size_t)(n * row_bytes));
    read_all(x, (size_t)(m * k) * sizeof(float));
    st_q4_0_to_x4(rows, w, n, k);
    for (int64_t i = 0; i < n; i++) ids[i] = i;
    st_q4_0_x4_rows(w, n, k, ids, n, back);
    if (memcmp(back, rows, (size_t)(n * row_bytes)) != 0) {
        fprintf(stderr, "x4_products: rows read back differ from the input\n");
        return 3;
    }
    st_q4_0_x4_matmul(w, n, k, x, m, y, xq, corr);
    printf("%s\n", st_isa());
    fflush(stdout);
    fwrite(y, sizeof(float), (size_t)(m * n), stdout);
    return 0;
}
