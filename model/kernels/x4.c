/*
 * Q4_0 in the interleaved "x4" layout: the dense products of decode and prefill.
 *
 * Rule: x4 holds the same bytes as GGML Q4_0, reordered so that one vector load brings a block
 * of 4 rows and a group of 4 rows is read front to back as one sequential stream. Rows come in
 * groups of 4 (a matrix of n rows has ceil(n/4) groups; missing rows of the last group are
 * zero: nibbles 8, scale 0). Group g, with nb = k/32 blocks per row, is nb*72 bytes, made of
 * chunks of up to X4_CHUNK (8) blocks: a chunk of c blocks holds first the c blocks' scales (for
 * each block, the 4 rows' fp16 scales: 8 bytes), then the c blocks' nibbles (for each block, the
 * 16 nibble bytes of rows 4g..4g+3, row after row: 64 bytes). A whole chunk is 576 bytes, nine
 * cache lines. Within a row's 16 bytes the nibbles keep GGML's order (low nibble = element j,
 * high = j + 16). The repack is a permutation of the verified bytes, done once at load, in place
 * (no second copy); st_q4_0_x4_rows undoes it for the rows a tied embedding looks up.
 *
 * Why one stream: the hardware prefetchers keep a single sequential stream per core at DRAM
 * speed, but not several interleaved ones. Measured on a Zen 4 core (one thread, a 131 MB
 * matrix-vector product, a throwaway harness): scales apart from the nibbles and two groups read
 * side by side (four streams) 12-13 GB/s; this layout, one group at a time, 18-22 GB/s (README,
 * Performance).
 *
 * Products: y[t, r] = sum_k x[t, k] w[r, k] with x rounded to Q8_0 per 32 values, exactly as
 * q4_0.c does: the integer dot products of each block are exact, then scaled by d_w * d_x in
 * float and summed over blocks, so each output is the same on every ISA path up to the order of
 * the float additions (the vector paths keep partial sums per lane, and decode two accumulators
 * per row). Paths: AVX-512 VNNI (64 bytes = 4 rows per instruction), 256-bit (AVX-VNNI dot
 * products where present, else AVX2 maddubs), and portable C. The nibbles are unsigned (0..15)
 * against signed activations; the -8 offset comes back as -2 * sum(x) per 32-bit partial sum
 * (4 partial sums per row and block: -8 * sum(x) in all, exact). A single activation row
 * (decode) walks one group at a time (one stream); several rows (prefill) walk two groups at
 * once and reuse each loaded block for GEMM_T rows.
 */
#include <math.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* ARM: NEON unless the build asks for the portable path (ST_PORTABLE, isa.py's "portable") */
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(ST_PORTABLE)
#define X4_NEON 1
#include <arm_neon.h>
#endif

#include "q4_0.h"

#define X4_QS 64          /* nibble bytes of one block of a group */
#define X4_SC (2 * X4_ROWS) /* scale bytes of one block of a group */
#define X4_BLOCK (X4_QS + X4_SC)
#define X4_CHUNK 8        /* blocks per chunk: scales, then nibbles */
#ifndef GEMM_T
#define GEMM_T 4          /* activation rows per pass of the GEMM */
#endif
#ifndef X4_PREFETCH
/* bytes ahead in the weight stream that a product asks for once per chunk (0: none, the
   hardware prefetcher alone) */
#define X4_PREFETCH 0
#endif

static inline int64_t x4_group_bytes(int64_t nb) { return nb * X4_BLOCK; }

/* Blocks in the chunk that starts at block c0 (X4_CHUNK, or fewer for the last one). */
static inline int64_t x4_chunk_len(int64_t nb, int64_t c0) { return nb - c0 < X4_CHUNK ? nb - c0 : X4_CHUNK; }

/* Offsets in a group of block b's 4 scales and of its 64 nibble bytes. */
static inline int64_t x4_scales_at(int64_t nb, int64_t b) {
    (void)nb;
    return b / X4_CHUNK * X4_CHUNK * X4_BLOCK + b % X4_CHUNK * X4_SC;
}
static inline int64_t x4_nibbles_at(int64_t nb, int64_t b) {
    const int64_t c0 = b / X4_CHUNK * X4_CHUNK;
    return c0 * X4_BLOCK + x4_chunk_len(nb, c0) * X4_SC + (b - c0) * X4_QS;
}

static inline void x4_prefetch(const uint8_t *p) {
#if X4_PREFETCH > 0
    __builtin_prefetch(p + X4_PREFETCH, 0, 3);
#else
    (void)p;
#endif
}

int64_t st_q4_0_x4_bytes(int64_t n, int64_t k) { return (n + X4_ROWS - 1) / X4_ROWS * x4_group_bytes(k / QK); }

/*
 * src: n rows of k/32 GGML blocks -> dst: x4 (st_q4_0_x4_bytes(n, k) bytes). dst may be src
 * when n is a multiple of 4 (each group is copied aside, then written back in its place).
 */
void st_q4_0_to_x4(const uint8_t *src, uint8_t *dst, int64_t n, int64_t k) {
    const int64_t nb = k / QK, row_bytes = nb * Q4_BYTES, gb = x4_group_bytes(nb);
    uint8_t *tmp = malloc((size_t)gb);
    for (int64_t g = 0; g < (n + X4_ROWS - 1) / X4_ROWS; g++) {
        const int rows = n - g * X4_ROWS < X4_ROWS ? (int)(n - g * X4_ROWS) : X4_ROWS;
        memcpy(tmp, src + g * X4_ROWS * row_bytes, (size_t)(rows * row_bytes));
        uint8_t *out = dst + g * gb;
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < X4_ROWS; r++) {
                uint8_t *qs = out + x4_nibbles_at(nb, b) + r * 16, *d = out + x4_scales_at(nb, b) + 2 * r;
                if (r < rows) {
                    const uint8_t *blk = tmp + r * row_bytes + b * Q4_BYTES;
                    memcpy(d, blk, 2);
                    memcpy(qs, blk + 2, 16);
                } else {
                    memset(d, 0, 2);
                    memset(qs, 0x88, 16);
                }
            }
    }
    free(tmp);
}

/* The GGML rows ids[0..count) of an x4 matrix [n, k] -> out (count rows of k/32 blocks). */
void st_q4_0_x4_rows(const uint8_t *x4, int64_t n, int64_t k, const int64_t *ids, int64_t count, uint8_t *out) {
    (void)n;
    const int64_t nb = k / QK, gb = x4_group_bytes(nb);
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *grp = x4 + ids[i] / X4_ROWS * gb;
        const int r = (int)(ids[i] % X4_ROWS);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = out + (i * nb + b) * Q4_BYTES;
            memcpy(blk, grp + x4_scales_at(nb, b) + 2 * r, 2);
            memcpy(blk + 2, grp + x4_nibbles_at(nb, b) + r * 16, 16);
        }
    }
}

/* corr[b] = -2 * sum of block b's 32 int8 values (the -8 offset, a quarter per partial sum). */
static void q8_corrections(const block_q8 *x, int64_t nb, int32_t *corr) {
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += x[b].qs[j];
        corr[b] = -2 * s;
    }
}

static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* ---- AVX-512 VNNI: one zmm = one block of a whole group ---------------------------------- */
static inline __m512 group_scales(const uint8_t *sc) {   /* 4 fp16 -> 16 floats, each 4 times */
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)sc))));
}

static inline __m128 lane_sums(__m512 acc) {   /* 16 partials -> the 4 rows' sums */
    const __m128 a = _mm512_castps512_ps128(acc), b = _mm512_extractf32x4_ps(acc, 1);
    const __m128 c = _mm512_extractf32x4_ps(acc, 2), d = _mm512_extractf32x4_ps(acc, 3);
    return _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
}

/* acc[g][t] += block j of the chunk at w + (g0 + g) * gb + c0 * X4_BLOCK (len blocks) against
   rows t of x (block b = c0 + j), for G groups and T rows. */
static ALWAYS_INLINE void x4_block(__m512 acc[2][GEMM_T], const uint8_t *w, int64_t gb, int64_t nb, int64_t g0,
                                   int64_t c0, int64_t len, int64_t j, const block_q8 *x, const int32_t *corr,
                                   const int G, const int T) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int64_t b = c0 + j;
    __m512i lo[2], hi[2];
    __m512 d[2];
    for (int g = 0; g < G; g++) {
        const uint8_t *chunk = w + (g0 + g) * gb + c0 * X4_BLOCK;
        const __m512i q = _mm512_loadu_si512(chunk + len * X4_SC + j * X4_QS);
        lo[g] = _mm512_and_si512(q, low4);
        hi[g] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
        d[g] = group_scales(chunk + j * X4_SC);
    }
    for (int t = 0; t < T; t++) {
        const block_q8 *xb = x + t * nb + b;
        const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb->qs));
        const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb->qs + 16)));
        const __m512i c = _mm512_set1_epi32(corr[t * nb + b]);
        const __m512 xd = _mm512_set1_ps(xb->d);
        for (int g = 0; g < G; g++) {
            const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, lo[g], xl), hi[g], xh);
            acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d[g], xd), acc[g][t]);
        }
    }
}

/* Groups [g0, g0 + G) against T activation rows; y[t * ldy + row]. G <= 2, T <= GEMM_T. With
   one row (decode) even and odd blocks go to two accumulators, so that consecutive blocks'
   multiply-adds do not wait for each other; with several rows the other pairs' work fills that
   wait, and the registers are needed for them. */
static ALWAYS_INLINE void x4_kernel(const uint8_t *w, int64_t nb, int64_t g0, const block_q8 *x, const int32_t *corr,
                                    int64_t n, float *y, int64_t ldy, const int G, const int T) {
    const int64_t gb = x4_group_bytes(nb);
    __m512 acc[2][GEMM_T], odd[2][GEMM_T];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) acc[g][t] = odd[g][t] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < nb; c0 += X4_CHUNK) {
        const int64_t len = x4_chunk_len(nb, c0);
        for (int g = 0; g < G; g++) x4_prefetch(w + (g0 + g) * gb + c0 * X4_BLOCK);
        int64_t j = 0;
        if (T == 1)
            for (; j + 2 <= len; j += 2) {
                x4_block(acc, w, gb, nb, g0, c0, len, j, x, corr, G, T);
                x4_block(odd, w, gb, nb, g0, c0, len, j + 1, x, corr, G, T);
            }
        for (; j < len; j++) x4_block(acc, w, gb, nb, g0, c0, len, j, x, corr, G, T);
    }
    for (int g = 0; g < G; g++) {
        const int64_t r0 = (g0 + g) * X4_ROWS;
        for (int t = 0; t < T; t++) {
            float out[X4_ROWS];
            _mm_storeu_ps(out, lane_sums(T == 1 ? _mm512_add_ps(acc[g][t], odd[g][t]) : acc[g][t]));
            for (int r = 0; r < X4_ROWS && r0 + r < n; r++) y[t * ldy + r0 + r] = out[r];
        }
    }
}
#elif defined(__AVX2__)
/* ---- 256-bit: one ymm = one block of 2 rows ---------------------------------------------- */
/* c + the 4-byte dot products of the low nibbles with xl and the high nibbles with xh */
static inline __m256i block_dot(__m256i c, __m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(c, lo, xl), hi, xh);
#else
    /* q <= 15, |x| <= 127: a pair sum is at most 3810 and two of them 7620, so adding the two
       int16 products before widening cannot saturate (one widening instead of two) */
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    return _mm256_add_epi32(c, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

static inline __m128 lane_sums(__m256 a, __m256 b) {   /* 2 x (2 rows x 4 partials) -> 4 rows' sums */
    const __m256 h = _mm256_hadd_ps(a, b);            /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    const __m256 h2 = _mm256_hadd_ps(h, h);           /* a0-3 b0-3 . . | a4-7 b4-7 . . */
    /* rows: a0-3 = row 0, a4-7 = row 1, b0-3 = row 2, b4-7 = row 3 */
    const __m128 lo = _mm256_castps256_ps128(h2), hi = _mm256_extractf128_ps(h2, 1);   /* r0 r2 . . | r1 r3 . . */
    return _mm_unpacklo_ps(lo, hi);
}

/* Half h of a block (rows 2h, 2h + 1 of the group) is one ymm; the halves run one after the
   other so that with 16 ymm registers the accumulators of T rows stay in registers. */
static ALWAYS_INLINE void x4_kernel(const uint8_t *w, int64_t nb, int64_t g0, const block_q8 *x, const int32_t *corr,
                                    int64_t n, float *y, int64_t ldy, const int G, const int T) {
    const int64_t gb = x4_group_bytes(nb);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i spread[2] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)};
    __m256 acc[2][GEMM_T][2];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) acc[g][t][0] = acc[g][t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t c0 = b / X4_CHUNK * X4_CHUNK, len = x4_chunk_len(nb, c0), j = b - c0;
        if (j == 0)
            for (int g = 0; g < G; g++) x4_prefetch(w + (g0 + g) * gb + c0 * X4_BLOCK);
        for (int h = 0; h < 2; h++) {
            __m256i lo[2], hi[2];
            __m256 d[2];
            for (int g = 0; g < G; g++) {
                const uint8_t *chunk = w + (g0 + g) * gb + c0 * X4_BLOCK;
                const __m256i q = _mm256_loadu_si256((const __m256i *)(chunk + len * X4_SC + j * X4_QS + 32 * h));
                lo[g] = _mm256_and_si256(q, low4);
                hi[g] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
                const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(chunk + j * X4_SC)));
                d[g] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), spread[h]);
            }
            for (int t = 0; t < T; t++) {
                const block_q8 *xb = x + t * nb + b;
                const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xb->qs));
                const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xb->qs + 16)));
                const __m256i c = _mm256_set1_epi32(corr[t * nb + b]);
                const __m256 xd = _mm256_set1_ps(xb->d);
                for (int g = 0; g < G; g++) {
                    const __m256i s = block_dot(c, lo[g], xl, hi[g], xh);
                    acc[g][t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d[g], xd), acc[g][t][h]);
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int64_t r0 = (g0 + g) * X4_ROWS;
        for (int t = 0; t < T; t++) {
            float out[X4_ROWS];
            _mm_storeu_ps(out, lane_sums(acc[g][t][0], acc[g][t][1]));
            for (int r = 0; r < X4_ROWS && r0 + r < n; r++) y[t * ldy + r0 + r] = out[r];
        }
    }
}
#elif defined(X4_NEON)
/* ---- ARM NEON: one 16-byte register = one row of a block ---------------------------------- */
/* acc + the 4-byte dot products of a and b (SDOT with the dotprod extension, else widening
   multiplies and pairwise adds: the same exact integers) */
static inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b)), hi = vmull_s8(vget_high_s8(a), vget_high_s8(b));
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

/* Groups [g0, g0 + G) against T activation rows; y[t * ldy + row]. The nibbles (0..15) are
   signed bytes as they are, so each row's block sums to its exact integer dot product plus
   8 * sum(x) too much: corr (-2 * sum(x)) is added once per 32-bit lane, four lanes a row. */
static ALWAYS_INLINE void x4_kernel(const uint8_t *w, int64_t nb, int64_t g0, const block_q8 *x, const int32_t *corr,
                                    int64_t n, float *y, int64_t ldy, const int G, const int T) {
    const int64_t gb = x4_group_bytes(nb);
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    float32x4_t acc[2][GEMM_T];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) acc[g][t] = vdupq_n_f32(0.0f);
    for (int64_t c0 = 0; c0 < nb; c0 += X4_CHUNK) {
        const int64_t len = x4_chunk_len(nb, c0);
        for (int g = 0; g < G; g++) x4_prefetch(w + (g0 + g) * gb + c0 * X4_BLOCK);
        for (int64_t j = 0; j < len; j++) {
            const int64_t b = c0 + j;
            int8x16_t lo[2][X4_ROWS], hi[2][X4_ROWS];
            float32x4_t d[2];
            for (int g = 0; g < G; g++) {
                const uint8_t *chunk = w + (g0 + g) * gb + c0 * X4_BLOCK;
                for (int r = 0; r < X4_ROWS; r++) {
                    const uint8x16_t q = vld1q_u8(chunk + len * X4_SC + j * X4_QS + 16 * r);
                    lo[g][r] = vreinterpretq_s8_u8(vandq_u8(q, low4));
                    hi[g][r] = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
                }
                d[g] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(chunk + j * X4_SC))));
            }
            for (int t = 0; t < T; t++) {
                const block_q8 *xb = x + t * nb + b;
                const int8x16_t xl = vld1q_s8(xb->qs), xh = vld1q_s8(xb->qs + 16);
                const int32x4_t c = vdupq_n_s32(corr[t * nb + b]);
                for (int g = 0; g < G; g++) {
                    int32x4_t s[X4_ROWS];
                    for (int r = 0; r < X4_ROWS; r++) s[r] = dot16(dot16(c, lo[g][r], xl), hi[g][r], xh);
                    /* lane r = row r's whole dot product */
                    const int32x4_t rows = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
                    acc[g][t] = vfmaq_f32(acc[g][t], vcvtq_f32_s32(rows), vmulq_n_f32(d[g], xb->d));
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int64_t r0 = (g0 + g) * X4_ROWS;
        for (int t = 0; t < T; t++) {
            float out[X4_ROWS];
            vst1q_f32(out, acc[g][t]);
            for (int r = 0; r < X4_ROWS && r0 + r < n; r++) y[t * ldy + r0 + r] = out[r];
        }
    }
}
#else
/* ---- portable C ------------------------------------------------------------------------- */
static void x4_kernel(const uint8_t *w, int64_t nb, int64_t g0, const block_q8 *x, const int32_t *corr,
                      int64_t n, float *y, int64_t ldy, const int G, const int T) {
    (void)corr;
    const int64_t gb = x4_group_bytes(nb);
    for (int g = 0; g < G; g++) {
        const uint8_t *grp = w + (g0 + g) * gb;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < X4_ROWS && (g0 + g) * X4_ROWS + r < n; r++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *qs = grp + x4_nibbles_at(nb, b) + r * 16;
                    const block_q8 *xb = x + t * nb + b;
                    int32_t s = 0;
                    for (int j = 0; j < 16; j++) s += ((qs[j] & 0x0F) - 8) * xb->qs[j] + ((qs[j] >> 4) - 8) * xb->qs[j + 16];
                    acc += (float)s * (st_fp16_to_fp32(rd16(grp + x4_scales_at(nb, b) + 2 * r)) * xb->d);
                }
                y[t * ldy + (g0 + g) * X4_ROWS + r] = acc;
            }
    }
}
#endif

/* Groups [lo, hi) of w against the m rows of x (Q8_0 + corrections), y [m, n]. */
static void x4_groups(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr, int64_t m,
                      float *y, int64_t lo, int64_t hi) {
/* rows [t, t + T_) against groups [lo, hi), two groups at a time: one pass over the weights */
#define X4_PASS(T_)                                                                                     \
    do {                                                                                                \
        int64_t g = lo;                                                                                 \
        for (; g + 2 <= hi; g += 2) x4_kernel(w, nb, g, xq + t * nb, corr + t * nb, n, y + t * n, n, 2, T_); \
        if (g < hi) x4_kernel(w, nb, g, xq + t * nb, corr + t * nb, n, y + t * n, n, 1, T_);           \
    } while (0)
    int64_t t = 0;
    for (; t + GEMM_T <= m; t += GEMM_T) X4_PASS(GEMM_T);
    /* the last 2 or 3 rows in one more pass, not a pass each; a last single row (decode) walks
       one group at a time, the weights as one sequential stream */
    if (m - t == 3) {
        X4_PASS(3);
    } else if (m - t == 2) {
        X4_PASS(2);
    } else if (m - t == 1) {
        for (int64_t g = lo; g < hi; g++) x4_kernel(w, nb, g, xq + t * nb, corr + t * nb, n, y + t * n, n, 1, 1);
    }
#undef X4_PASS
}

/* Groups [lo, hi) of y [m, n] = x . w^T for m activation rows already in Q8_0 (+ corrections). */
void st_x4_matmul_groups(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr, int64_t m,
                         float *y, int64_t lo, int64_t hi) {
    x4_groups(w, n, nb, xq, corr, m, y, lo, hi);
}

/* Groups [lo, hi) of y = w . x for one activation row already in Q8_0 (+ corrections). */
void st_x4_gemv_groups(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr, float *y,
                       int64_t lo, int64_t hi) {
    x4_groups(w, n, nb, xq, corr, 1, y, lo, hi);
}

/* One thread's share of y[0 .. n) = w . x for one activation row already in Q8_0 (+ corrections). */
void st_x4_gemv_share(const uint8_t *w, int64_t n, int64_t nb, const block_q8 *xq, const int32_t *corr, float *y,
                      int ith, int nth) {
    int64_t lo, hi;
    st_share((n + X4_ROWS - 1) / X4_ROWS, ith, nth, &lo, &hi);
    x4_groups(w, n, nb, xq, corr, 1, y, lo, hi);
}

/* Quantize one row of k floats for the x4 products: Q8_0 blocks and their corrections. */
void st_x4_quantize_row(const float *v, int64_t nb, block_q8 *xq, int32_t *corr) {
    st_quantize_row(v, nb, xq, 0);
    q8_corrections(xq, nb, corr);
}

static void x4_matmul_task(void *p, int ith, int nth) {
    const st_matmul_args *a = p;
    const int64_t nb = a->k / QK;
    int64_t lo, hi;
    st_share(a->m, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) st_x4_quantize_row(a->x + t * a->k, nb, a->xq + t * nb, a->corr + t * nb);
    st_sync(nth);
    st_share((a->n + X4_ROWS - 1) / X4_ROWS, ith, nth, &lo, &hi);
    x4_groups(a->w, a->n, nb, a->xq, a->corr, a->m, a->y, lo, hi);
}

/*
 * y[m, n] = x[m, k] . w[n, k] for w in x4; scratch: m * k/32 Q8_0 blocks (xq) and m * k/32
 * int32 (corr), from the caller. Groups of 4 rows are split statically across the threads.
 */
void st_q4_0_x4_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, block_q8 *xq,
                       int32_t *corr) {
    st_matmul_args a = {w, n, k, m, x, y, xq, corr};
    st_run(x4_matmul_task, &a, st_worth_threads(n * k * (m < 4 ? m : 4)));
}

const char *st_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return "avx512-vnni";
#elif defined(__AVX2__) && defined(__AVXVNNI__)
    return "avx-vnni";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(X4_NEON) && defined(__ARM_FEATURE_DOTPROD)
    return "neon-dotprod";
#elif defined(X4_NEON)
    return "neon";
#else
    return "portable";
#endif
}
