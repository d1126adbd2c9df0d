/*
 * Q4_0 x Q8_0 matrix products for CPU decode and prefill.
 *
 * Rule: weights stay in GGML Q4_0 blocks exactly as stored in the package (18 bytes per 32
 * weights: fp16 d, 16 bytes of nibbles, low nibble = element j, high = j+16, weight = d*(q-8));
 * activations are quantized per 32 values to int8 with a float scale (Q8_0, round to nearest
 * even), as llama.cpp does, and the dot products run on int8 SIMD. Output:
 * Y[m, n] = sum_k X[m, k] * W[n, k]. Every output is summed by one thread in a fixed order
 * (blocks left to right), so results do not depend on the thread count or on timing.
 *
 * Structure (AVX2): decode (m = 1) streams 4 weight rows at a time against the one activation
 * row (gemv_rows); prefill (m > 1) repacks 8 weight rows x 32 blocks into an L1-resident
 * interleaved copy once and runs every activation row against it, 4 at a time (packed_rows).
 * Tiles of weight rows are split statically across the OpenMP threads. Without AVX2 a portable
 * scalar loop computes the same sums (same quantization, same integer dot products).
 *
 * Built at first use by model/kernels/__init__.py with the host's own flags (-march=native);
 * threads come from the OpenMP runtime torch already loaded, so torch.set_num_threads applies.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32
#define Q4_BYTES 18
#define GEMV_ROWS 4      /* weight rows per tile when m = 1 */
#define PACK_ROWS 8      /* weight rows per packed tile when m > 1 */
#define GEMM_COLS 4      /* activation rows per packed tile pass when m > 1 */

typedef struct {
    float d;
    int8_t qs[QK];
} block_q8;

#define ALWAYS_INLINE inline __attribute__((always_inline))

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
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

/*
 * One row of k floats -> k/32 Q8_0 blocks. flip = 0x80 stores q + 128 as unsigned bytes instead
 * of q (the layout the packed prefill kernel wants); flip = 0 is plain Q8_0.
 */
static void quantize_row_q8_0(const float *v, int64_t nb, block_q8 *out, uint8_t flip) {
    for (int64_t b = 0; b < nb; b++, v += QK) {
        block_q8 *o = out + b;
#if defined(__AVX2__)
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 f0 = _mm256_loadu_ps(v), f1 = _mm256_loadu_ps(v + 8);
        __m256 f2 = _mm256_loadu_ps(v + 16), f3 = _mm256_loadu_ps(v + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, f0), _mm256_andnot_ps(sign, f1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, f2), _mm256_andnot_ps(sign, f3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f, id = d ? 1.0f / d : 0.0f;
        o->d = d;
        const __m256 vid = _mm256_set1_ps(id);
        /* cvtps rounds to nearest even (the default MXCSR mode), like lrintf below. */
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(f0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(f1, vid));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(f2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(f3, vid));
        /* packs work per 128-bit lane; the final permute restores element order. */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)o->qs, _mm256_xor_si256(ordered, _mm256_set1_epi8((char)flip)));
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) { float a = fabsf(v[j]); if (a > amax) amax = a; }
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        o->d = d;
        for (int j = 0; j < QK; j++) o->qs[j] = (int8_t)((uint8_t)lrintf(v[j] * id) ^ flip);
#endif
    }
}

/* x: [m, k] float -> out: [m, k/32] Q8_0 blocks */
void st_quantize_q8_0(const float *x, int64_t m, int64_t k, block_q8 *out) {
    const int64_t nb = k / QK;
    for (int64_t r = 0; r < m; r++) quantize_row_q8_0(x + r * k, nb, out + r * nb, 0);
}

#if defined(__AVX2__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * Decode (m = 1): y[r] = W[r] . x for r < R, R a compile-time constant at every call site so
 * the loops unroll and the R accumulators live in registers. The activation block is loaded
 * once per R rows. The unsigned nibbles q go straight into maddubs against the signed
 * activations; the offset leaves in int16 as sum (q-8)*x = sum q*x - 8*sum x, where the
 * 8*(x[2i] + x[2i+1]) pairs are one maddubs per activation block, shared by the R rows.
 */
static ALWAYS_INLINE void gemv_rows(const uint8_t *w, int64_t row_bytes, const block_q8 *x, int64_t nb,
                                    float *y, const int R) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1), shift_hi = _mm256_setr_epi64x(0, 0, 4, 4);
    __m256 acc[GEMV_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    /* The R rows are one contiguous span; stream the next span into cache meanwhile (the
       hardware prefetcher does not follow R interleaved streams well when W comes from DRAM). */
    const char *next = (const char *)w + R * row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch(next + b * R * Q4_BYTES, _MM_HINT_T0);
        _mm_prefetch(next + b * R * Q4_BYTES + 64, _MM_HINT_T0);
        const __m256i xq = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i xc = _mm256_maddubs_epi16(eight, xq);
        const __m256 xd = _mm256_broadcast_ss(&x[b].d);
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * row_bytes + b * Q4_BYTES;
            /* the 16 nibble bytes in both halves; shift the upper half to expose the high nibbles */
            const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wb + 2)));
            const __m256i q = _mm256_and_si256(_mm256_srlv_epi64(both, shift_hi), low4);
            const __m256 wd = _mm256_cvtph_ps(_mm_set1_epi16((short)load_u16(wb)));
            const __m256i pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(q, xq), xc);
            const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(wd, xd), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r] = hsum(acc[r]);
}

/*
 * Prefill (m > 1) repacks PACK_ROWS weight rows at a time, PACK_BLOCKS blocks per pass, so that
 * one register holds 4 consecutive weights of each of the 8 rows (lane r = row r). Against a
 * broadcast of 4 activation bytes, one maddubs then yields partial dot products for all 8 rows
 * at once: no horizontal sums, one scale multiply per 8 rows, and 8 outputs stored per vector.
 * Weights are signed (q - 8) here and activations unsigned (q + 128, see quantize_row_q8_0);
 * the offset comes back out through corr = 128 * sum(q - 8) per row and block. Int16 partial
 * sums stay exact: 16 products of at most 255 * 8 sum to at most 32640.
 */
#define PACK_BLOCKS 32   /* 32 packed blocks = 10 KB: stays in L1 while all m rows go by */

typedef struct {
    __m256i q[8];        /* q[j], lane r: row r's weights 4j..4j+3 (q - 8, int8) */
    __m256i corr;        /* lane r: 128 * sum of row r's (q - 8) over the block */
    __m256 d;            /* lane r: row r's scale */
} packed_block;

/* Pack blocks [b0, b0 + nblk) of rows w[r], r < PACK_ROWS (rows past nrows repeat the last). */
static void pack_rows(const uint8_t *w, int64_t row_bytes, int nrows, int64_t b0, int64_t nblk, packed_block *out) {
    const uint8_t *row[PACK_ROWS];
    for (int r = 0; r < PACK_ROWS; r++) row[r] = w + (r < nrows ? r : nrows - 1) * row_bytes + b0 * Q4_BYTES;
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t off = b * Q4_BYTES;
        /* a[r] = nibble bytes of rows r (low half) and r + 4 (high half); then a 4x4 transpose
           of 32-bit words in each half leaves g[j] = word j of rows 0..7 */
        __m256i a[4], g[4];
        for (int r = 0; r < 4; r++)
            a[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row[r] + off + 2))),
                                           _mm_loadu_si128((const __m128i *)(row[r + 4] + off + 2)), 1);
        const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpacklo_epi32(a[2], a[3]);
        const __m256i t2 = _mm256_unpackhi_epi32(a[0], a[1]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
        g[0] = _mm256_unpacklo_epi64(t0, t1);
        g[1] = _mm256_unpackhi_epi64(t0, t1);
        g[2] = _mm256_unpacklo_epi64(t2, t3);
        g[3] = _mm256_unpackhi_epi64(t2, t3);
        __m256i sum = _mm256_setzero_si256();   /* per byte, |sum of 8 values| <= 64 */
        for (int j = 0; j < 4; j++) {
            /* word j holds elements 4j.. in its low nibbles and 16 + 4j.. in its high ones */
            const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(g[j], low4), eight);
            const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(g[j], 4), low4), eight);
            out[b].q[j] = lo;
            out[b].q[j + 4] = hi;
            sum = _mm256_add_epi8(sum, _mm256_add_epi8(lo, hi));
        }
        out[b].corr = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, sum), ones16), 7);
        out[b].d = _mm256_cvtph_ps(_mm_setr_epi16(
            (short)load_u16(row[0] + off), (short)load_u16(row[1] + off), (short)load_u16(row[2] + off),
            (short)load_u16(row[3] + off), (short)load_u16(row[4] + off), (short)load_u16(row[5] + off),
            (short)load_u16(row[6] + off), (short)load_u16(row[7] + off)));
    }
}

/*
 * T activation rows (x: offset-128 Q8 blocks, nb apart) against nblk packed blocks; y[t*ldy + r]
 * for r < nrows gets the result (added to what is there when accumulate is set). T is a
 * compile-time constant at every call site.
 */
static ALWAYS_INLINE void packed_tile(const packed_block *pb, int64_t nblk, const block_q8 *x, int64_t nb,
                                      float *y, int64_t ldy, int nrows, int accumulate, const int T) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[GEMM_COLS];   /* fixed size: C has no constexpr, T <= GEMM_COLS */
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; b++) {
        for (int t = 0; t < T; t++) {
            __m256i s = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                int32_t xw;
                memcpy(&xw, x[t * nb + b].qs + 4 * j, 4);
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_set1_epi32(xw), _mm256_load_si256(&pb[b].q[j])));
            }
            const __m256i isum = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), pb[b].corr);
            const __m256 scale = _mm256_mul_ps(pb[b].d, _mm256_broadcast_ss(&x[t * nb + b].d));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
        }
    }
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), lanes);
    for (int t = 0; t < T; t++) {
        float *yt = y + t * ldy;
        if (accumulate) acc[t] = _mm256_add_ps(acc[t], _mm256_maskload_ps(yt, mask));
        _mm256_maskstore_ps(yt, mask, acc[t]);
    }
}

/* Rows w[0 .. nrows) (nrows <= PACK_ROWS) against all m activation rows; y: column of row 0. */
static void packed_rows(const uint8_t *w, int64_t row_bytes, int nrows, const block_q8 *xq, int64_t nb,
                        int64_t m, float *y, int64_t n) {
    packed_block pack[PACK_BLOCKS] __attribute__((aligned(32)));
    for (int64_t b0 = 0; b0 < nb; b0 += PACK_BLOCKS) {
        const int64_t nblk = nb - b0 < PACK_BLOCKS ? nb - b0 : PACK_BLOCKS;
        pack_rows(w, row_bytes, nrows, b0, nblk, pack);
        int64_t t = 0;
        for (; t + GEMM_COLS <= m; t += GEMM_COLS)
            packed_tile(pack, nblk, xq + t * nb + b0, nb, y + t * n, n, nrows, b0 > 0, GEMM_COLS);
        for (; t < m; t++) packed_tile(pack, nblk, xq + t * nb + b0, nb, y + t * n, n, nrows, b0 > 0, 1);
    }
}
#else
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

/* Portable fallback: one weight row against all m activation rows. */
static void scalar_row(const uint8_t *w, const block_q8 *xq, int64_t nb, int64_t m, float *y, int64_t n) {
    for (int64_t t = 0; t < m; t++) {
        const block_q8 *x = xq + t * nb;
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * Q4_BYTES;
            int isum = 0;
            for (int j = 0; j < QK / 2; j++) {
                isum += ((wb[2 + j] & 0x0F) - 8) * x[b].qs[j];
                isum += ((wb[2 + j] >> 4) - 8) * x[b].qs[j + QK / 2];
            }
            acc += fp16_to_fp32(load_u16(wb)) * x[b].d * (float)isum;
        }
        y[t * n] = acc;
    }
}
#endif

/*
 * y[m, n] = x[m, k] . w[n, k]; w: n rows of k/32 Q4_0 blocks; xq: scratch for m*k/32 Q8_0
 * blocks (the caller allocates it once and reuses it). Tiles of weight rows are split
 * statically across threads, after all threads have quantized their share of x.
 */
void st_q4_0_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, block_q8 *xq) {
    const int64_t nb = k / QK, row_bytes = nb * Q4_BYTES;
#if defined(__AVX2__)
    const int64_t rows = m == 1 ? GEMV_ROWS : PACK_ROWS;
    const uint8_t flip = m == 1 ? 0 : 0x80;
#else
    const int64_t rows = 1;
    const uint8_t flip = 0;
#endif
    const int64_t tiles = (n + rows - 1) / rows;
    /* below ~64K multiply-adds the fork/join costs more than it saves */
    const int parallel = n * k * (m < 4 ? m : 4) >= 65536 && omp_get_max_threads() > 1;
    #pragma omp parallel if (parallel)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < m; t++) quantize_row_q8_0(x + t * k, nb, xq + t * nb, flip);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < tiles; i++) {
            const int64_t r0 = i * rows;
            const uint8_t *wr = w + r0 * row_bytes;
#if defined(__AVX2__)
            const int nrows = n - r0 < rows ? (int)(n - r0) : (int)rows;
            if (m > 1) {
                packed_rows(wr, row_bytes, nrows, xq, nb, m, y + r0, n);
            } else if (nrows == GEMV_ROWS) {
                gemv_rows(wr, row_bytes, xq, nb, y + r0, GEMV_ROWS);
            } else {
                for (int r = 0; r < nrows; r++) gemv_rows(wr + r * row_bytes, row_bytes, xq, nb, y + r0 + r, 1);
            }
#else
            scalar_row(wr, xq, nb, m, y + r0, n);
#endif
        }
    }
}
