/*
 * What the native kernels share across their sources (q4_0.c: GGML-order Q4_0 x Q8_0 products;
 * x4.c: the interleaved layout's products; layer.c: one decoder layer's single-token step built
 * on them; pool.c: their threads). Internal symbols are hidden: only the
 * st_* functions without a leading underscore are the library's interface to Python.
 */
#ifndef ST_Q4_0_H
#define ST_Q4_0_H

#include <stdint.h>
#include <string.h>

#define QK 32
#define Q4_BYTES 18
#define GEMV_ROWS 4      /* weight rows per tile when m = 1 */
#define ST_ABI 5

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define INTERNAL __attribute__((visibility("hidden")))

typedef struct {
    float d;
    int8_t qs[QK];
} block_q8;

/* One row of k floats -> k/32 Q8_0 blocks (flip = 0x80: q + 128 as unsigned bytes). */
INTERNAL void st_quantize_row(const float *v, int64_t nb, block_q8 *out, uint8_t flip);


/* The x4 layout (x4.c): one row's Q8_0 blocks plus the per-block corrections its products need,
   and the products of groups [lo, hi) / of thread ith's share of the groups, for one row. */
#define X4_ROWS 4
INTERNAL void st_x4_quantize_row(const float *v, int64_t nb, block_q8 *xq, int32_t *corr);
INTERNAL void st_x4_gemv_groups(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr,
                                float *y, int64_t lo, int64_t hi);
INTERNAL void st_x4_matmul_groups(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr,
                                  int64_t m, float *y, int64_t lo, int64_t hi);
INTERNAL void st_x4_gemv_share(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr,
                               float *y, int ith, int nth);

#if defined(__F16C__)
#include <immintrin.h>
static inline float st_fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float st_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

#if defined(__AVX2__)
#include <immintrin.h>
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Blocks [split_at(c), split_at(c + 1)) of nb are part c of `parts` (contiguous, as even as possible). */
static inline int64_t split_at(int64_t nb, int c, int parts) { return nb * c / parts; }

/* The arguments of a matrix product task: y[m, n] = x[m, k] . w[n, k] (corr: x4 products only). */
typedef struct {
    const uint8_t *w;
    int64_t n, k, m;
    const float *x;
    float *y;
    block_q8 *xq;
    int32_t *corr;
} st_matmul_args;

/* The thread pool (pool.c): st_run(fn, arg, parallel) runs fn(arg, ith, nth) on nth threads
   (nth = 1 when parallel is 0) and returns when all are done; st_sync(nth) inside fn is a
   barrier of those threads. */
typedef void (*st_task)(void *arg, int ith, int nth);
INTERNAL void st_run(st_task fn, void *arg, int parallel);
INTERNAL void st_sync(int nth);

/* Thread ith's share [*lo, *hi) of n items (static, contiguous, the same split for the same n). */
static inline void st_share(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    *lo = split_at(n, ith, nth);
    *hi = split_at(n, ith + 1, nth);
}

/* Is the pool worth its wake-up for this many multiply-adds? (below ~64K it costs more than it saves) */
static inline int st_worth_threads(int64_t macs) { return macs >= 65536; }

#endif
