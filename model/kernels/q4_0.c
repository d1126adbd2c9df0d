/*
 * Q4_0 x Q8_0 matrix products for CPU decode and prefill.
 *
 * Rule: weights stay in GGML Q4_0 blocks exactly as stored in the package (18 bytes per 32
 * weights: fp16 d, 16 bytes of nibbles, low nibble = element j, high = j+16); activations are
 * quantized per 32 values to int8 with a float scale (Q8_0), as llama.cpp does, and the dot
 * products run on int8 SIMD. Output: Y[m, n] = sum_k X[m, k] * W[n, k].
 *
 * Built at first use by model/kernels/__init__.py with the host's own flags (-march=native);
 * threads come from the OpenMP runtime torch already loaded, so torch.set_num_threads applies.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define Q4_BYTES 18

typedef struct {
    float d;
    int8_t qs[QK];
} block_q8;

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) { bits = sign; }
        else { exp = 127 - 15 + 1; while (!(mant & 0x400)) { mant <<= 1; exp--; } mant &= 0x3FF; bits = sign | (exp << 23) | (mant << 13); }
    } else if (exp == 31) { bits = sign | 0x7F800000 | (mant << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (mant << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

int st_kernel_abi(void) { return 2; }

int st_num_threads(void) { return omp_get_max_threads(); }

int st_has_avx2(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* x: [m, k] float -> out: [m, k/32] Q8_0 blocks */
void st_quantize_q8_0(const float *x, int64_t m, int64_t k, block_q8 *out) {
    const int64_t nb = k / QK;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + r * k + b * QK;
            block_q8 *o = out + r * nb + b;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) { float a = fabsf(v[j]); if (a > amax) amax = a; }
            const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
            o->d = d;
            for (int j = 0; j < QK; j++) o->qs[j] = (int8_t)lrintf(v[j] * id);
        }
    }
}

#if defined(__AVX2__)
static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i tmp = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline __m256 dot_i8_to_float(const __m256i x, const __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
    const __m256i pairs = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float dot_row(const uint8_t *w, const block_q8 *x, int64_t nb) {
#if defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + b * Q4_BYTES, *w1 = w0 + Q4_BYTES;
        const __m256 d0 = _mm256_set1_ps(fp16_to_fp32(*(const uint16_t *)w0) * x[b].d);
        const __m256 d1 = _mm256_set1_ps(fp16_to_fp32(*(const uint16_t *)w1) * x[b + 1].d);
        const __m256i q0 = _mm256_sub_epi8(unpack_nibbles(w0 + 2), eight);
        const __m256i q1 = _mm256_sub_epi8(unpack_nibbles(w1 + 2), eight);
        acc0 = _mm256_fmadd_ps(d0, dot_i8_to_float(q0, _mm256_loadu_si256((const __m256i *)x[b].qs)), acc0);
        acc1 = _mm256_fmadd_ps(d1, dot_i8_to_float(q1, _mm256_loadu_si256((const __m256i *)x[b + 1].qs)), acc1);
    }
    for (; b < nb; b++) {
        const uint8_t *w0 = w + b * Q4_BYTES;
        const __m256 d0 = _mm256_set1_ps(fp16_to_fp32(*(const uint16_t *)w0) * x[b].d);
        const __m256i q0 = _mm256_sub_epi8(unpack_nibbles(w0 + 2), eight);
        acc0 = _mm256_fmadd_ps(d0, dot_i8_to_float(q0, _mm256_loadu_si256((const __m256i *)x[b].qs)), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q4_BYTES;
        int isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += ((blk[2 + j] & 0x0F) - 8) * x[b].qs[j];
            isum += ((blk[2 + j] >> 4) - 8) * x[b].qs[j + QK / 2];
        }
        sum += fp16_to_fp32(*(const uint16_t *)blk) * x[b].d * (float)isum;
    }
    return sum;
#endif
}

/*
 * y[m, n] = x[m, k] . w[n, k]; w: n rows of k/32 Q4_0 blocks; xq: scratch for m*k/32 Q8_0
 * blocks (the caller allocates it once and reuses it). Rows of w are split across threads.
 */
void st_q4_0_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, block_q8 *xq) {
    const int64_t nb = k / QK, row_bytes = nb * Q4_BYTES;
    st_quantize_q8_0(x, m, k, xq);
    const int parallel = n * k * (m < 4 ? m : 4) >= 65536;
    #pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *wr = w + r * row_bytes;
        for (int64_t t = 0; t < m; t++) y[t * n + r] = dot_row(wr, xq + t * nb, nb);
    }
}
