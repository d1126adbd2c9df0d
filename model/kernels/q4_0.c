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
 * Tiles of weight rows are split statically across the pool's threads (pool.c). Without AVX2
 * a portable scalar loop computes the same sums (same quantization, same integer dot products).
 *
 * Sparse ReGLU (end of file): st_q4_0_matvec_rows (GEMV on a list of rows),
 * st_q4_0_axpy_rows (sum of scaled rows of a transposed matrix) and st_reglu_sparse (a whole
 * expert for one activation row: gate -> select relu > 0 -> up on those rows -> down^T axpy).
 *
 * Built at first use by model/kernels/__init__.py with the flags of the chosen ISA (isa.py);
 * threads: the pool of pool.c, as many as torch's OpenMP runtime says (torch.set_num_threads applies).
 * The engine's dense products run on the x4 layout (x4.c); these GGML-order products serve the
 * sparse kernels and matrices kept in row order.
 */
#include <math.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "q4_0.h"

#define PACK_ROWS 8      /* weight rows per packed tile when m > 1 */
#define GEMM_COLS 4      /* activation rows per packed tile pass when m > 1 */

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

int st_kernel_abi(void) { return ST_ABI; }

int st_num_threads(void) { return omp_get_max_threads(); }  /* what the pool uses (pool.c) */

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
void st_quantize_row(const float *v, int64_t nb, block_q8 *out, uint8_t flip) {
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
    for (int64_t r = 0; r < m; r++) st_quantize_row(x + r * k, nb, out + r * nb, 0);
}

#if defined(__AVX2__)

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
            acc += st_fp16_to_fp32(load_u16(wb)) * x[b].d * (float)isum;
        }
        y[t * n] = acc;
    }
}
#endif

static void matmul_task(void *p, int ith, int nth) {
    const st_matmul_args *a = p;
    const int64_t n = a->n, k = a->k, m = a->m, nb = k / QK, row_bytes = nb * Q4_BYTES;
#if defined(__AVX2__)
    const int64_t rows = m == 1 ? GEMV_ROWS : PACK_ROWS;
    const uint8_t flip = m == 1 ? 0 : 0x80;
#else
    const int64_t rows = 1;
    const uint8_t flip = 0;
#endif
    int64_t lo, hi;
    st_share(m, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) st_quantize_row(a->x + t * k, nb, a->xq + t * nb, flip);
    st_sync(nth);
    st_share((n + rows - 1) / rows, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        const int64_t r0 = i * rows;
        const uint8_t *wr = a->w + r0 * row_bytes;
#if defined(__AVX2__)
        const int nrows = n - r0 < rows ? (int)(n - r0) : (int)rows;
        if (m > 1) {
            packed_rows(wr, row_bytes, nrows, a->xq, nb, m, a->y + r0, n);
        } else if (nrows == GEMV_ROWS) {
            gemv_rows(wr, row_bytes, a->xq, nb, a->y + r0, GEMV_ROWS);
        } else {
            for (int r = 0; r < nrows; r++) gemv_rows(wr + r * row_bytes, row_bytes, a->xq, nb, a->y + r0 + r, 1);
        }
#else
        scalar_row(wr, a->xq, nb, m, a->y + r0, n);
#endif
    }
}

/*
 * y[m, n] = x[m, k] . w[n, k]; w: n rows of k/32 Q4_0 blocks; xq: scratch for m*k/32 Q8_0
 * blocks (the caller allocates it once and reuses it). Tiles of weight rows are split
 * statically across threads, after all threads have quantized their share of x.
 */
void st_q4_0_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, block_q8 *xq) {
    st_matmul_args a = {w, n, k, m, x, y, xq, NULL};
    st_run(matmul_task, &a, st_worth_threads(n * k * (m < 4 ? m : 4)));
}

/* ------------------------------------------------------------------------------------------ */
/*
 * Sparse ReGLU (the PowerInfer trick) for one activation row: out = down(relu(gate(x)) * up(x))
 * touching only the rows j whose gate is positive. Rules:
 * - row index lists are int32 (`rows`), any order, repeats allowed;
 * - `down` is stored TRANSPOSED as downT [F, D] in Q4_0 along D, so an active row j is one
 *   contiguous row of D/32 blocks and out = sum over active j of a_j * dequant(downT[j]);
 * - gate/up products are the GEMV above (x rounded to Q8_0 per 32 values);
 * - the axpy over downT rounds its coefficients too, the transpose of what the GEMV does to x:
 *   per output block b and per group of AXPY_GROUP consecutive entries of `rows`, the products
 *   s_j = a_j * d(j, b) (d: the weight block's fp16 scale) share one float scale
 *   max|s_j| / 127 and become int8 (round to nearest even), so the inner loop is int8 x nibble
 *   maddubs over pairs of rows (exact int16 sums), then one float fma per output per group;
 * - every output value is computed by one thread in a fixed order (groups in list order), so
 *   results do not depend on the thread count; outputs are overwritten, never accumulated;
 * - inputs must be finite (NaN/inf coefficients poison their whole group).
 */
#define AXPY_GROUP 16    /* rows per coefficient quantization group: 8 maddubs pairs fit int16 */
#define AXPY_CHUNK 32    /* output blocks whose coefficients are rounded in one pass */

#if defined(__AVX2__)
/* gemv_rows over R rows given by pointer (a gathered tile); next: the following tile's rows. */
static ALWAYS_INLINE void gemv_gather(const uint8_t *const *w, const uint8_t *const *next, int64_t row_bytes,
                                      const block_q8 *x, int64_t nb, float *y, const int R) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1), shift_hi = _mm256_setr_epi64x(0, 0, 4, 4);
    __m256 acc[GEMV_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        /* run through the next tile's rows at twice the pace (one prefetch per 36 bytes) */
        if (2 * b * Q4_BYTES < row_bytes)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)next[r] + 2 * b * Q4_BYTES, _MM_HINT_T0);
        const __m256i xq = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i xc = _mm256_maddubs_epi16(eight, xq);
        const __m256 xd = _mm256_broadcast_ss(&x[b].d);
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w[r] + b * Q4_BYTES;
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

/* The int8 coefficient x nibble sums of a chunk of blocks (pass 2 of axpy_range). */
static ALWAYS_INLINE void axpy_pass2(const uint8_t *const *p, int64_t c0b, int nblk, int16_t (*pair)[AXPY_GROUP / 2],
                                     const int16_t *corrs, const float *scales, float *y, const int npairs) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < nblk; i++) {
        const int64_t off = (c0b + i) * Q4_BYTES;
        __m256i lo = _mm256_set1_epi16(corrs[i]), hi = lo;   /* int16 sums, elements 0..15 / 16..31 */
        for (int pp = 0; pp < npairs; pp++) {
            const __m256i r0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p[2 * pp] + off + 2)));
            const __m256i r1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p[2 * pp + 1] + off + 2)));
            /* byte e of both rows side by side (bytes 0..7 in the low lane, 8..15 in the high
               one): low nibbles = element e, high nibbles = element e + 16 */
            const __m256i inter = _mm256_blend_epi32(_mm256_unpacklo_epi8(r0, r1), _mm256_unpackhi_epi8(r0, r1), 0xF0);
            const __m256i cp = _mm256_set1_epi16(pair[i][pp]);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(inter, low4), cp));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(inter, 4), low4), cp));
        }
        const __m256 vs = _mm256_set1_ps(scales[i]);
        float *yb = y + (c0b + i) * QK;
        const __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                 _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
        for (int e = 0; e < 4; e++)
            _mm256_storeu_ps(yb + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[e])), vs,
                                                         _mm256_loadu_ps(yb + 8 * e)));
    }
}
#endif

/* Dense m = 1 tile t (GEMV_ROWS rows from t * GEMV_ROWS) of w [n, nb blocks]: y[row] = w[row] . x. */
static void dense_tile(const uint8_t *w, int64_t row_bytes, int64_t n, const block_q8 *xq, int64_t nb, float *y,
                       int64_t t) {
    const int64_t r0 = t * GEMV_ROWS;
    const int nrows = n - r0 < GEMV_ROWS ? (int)(n - r0) : GEMV_ROWS;
    const uint8_t *wr = w + r0 * row_bytes;
#if defined(__AVX2__)
    if (nrows == GEMV_ROWS) gemv_rows(wr, row_bytes, xq, nb, y + r0, GEMV_ROWS);
    else for (int r = 0; r < nrows; r++) gemv_rows(wr + r * row_bytes, row_bytes, xq, nb, y + r0 + r, 1);
#else
    for (int r = 0; r < nrows; r++) scalar_row(wr + r * row_bytes, xq, nb, 1, y + r0 + r, 1);
#endif
}

/* Gathered tile t: yt[r] = W[rows[t * GEMV_ROWS + r]] . x for the (up to GEMV_ROWS) rows of the tile. */
static void rows_tile(const uint8_t *w, int64_t row_bytes, const int32_t *rows, int64_t n_rows,
                      const block_q8 *xq, int64_t nb, float *yt, int64_t t) {
    const int64_t i0 = t * GEMV_ROWS;
    const int nrows = n_rows - i0 < GEMV_ROWS ? (int)(n_rows - i0) : GEMV_ROWS;
#if defined(__AVX2__)
    const uint8_t *cur[GEMV_ROWS], *next[GEMV_ROWS];
    for (int r = 0; r < GEMV_ROWS; r++) {
        const int64_t i = i0 + r, j = i0 + GEMV_ROWS + r;
        cur[r] = w + (int64_t)rows[i < n_rows ? i : n_rows - 1] * row_bytes;
        next[r] = w + (int64_t)rows[j < n_rows ? j : n_rows - 1] * row_bytes;
    }
    if (nrows == GEMV_ROWS) gemv_gather(cur, next, row_bytes, xq, nb, yt, GEMV_ROWS);
    else for (int r = 0; r < nrows; r++) gemv_gather(cur + r, next + r, row_bytes, xq, nb, yt + r, 1);
#else
    for (int r = 0; r < nrows; r++) scalar_row(w + (int64_t)rows[i0 + r] * row_bytes, xq, nb, 1, yt + r, 1);
#endif
}

/*
 * y[b*32 .. b1*32) = sum_i coeffs[i] * dequant(w[rows[i]]) restricted to blocks [b0, b1) of the
 * rows (see the rules above). Groups of AXPY_GROUP list entries run outermost so each group's row
 * addresses are computed once; y (a few KB) takes the float partial sums per group.
 */
static void axpy_range(const uint8_t *w, int64_t row_bytes, const int32_t *rows, const float *coeffs,
                       int64_t n_rows, int64_t b0, int64_t b1, float *y) {
    if (b1 <= b0) return;
    memset(y + b0 * QK, 0, (size_t)(b1 - b0) * QK * sizeof(float));
    for (int64_t g = 0; g < n_rows; g += AXPY_GROUP) {
        const int G = n_rows - g < AXPY_GROUP ? (int)(n_rows - g) : AXPY_GROUP;
        const uint8_t *p[AXPY_GROUP];   /* padded with the group's last row (coefficient 0) */
        for (int i = 0; i < AXPY_GROUP; i++) p[i] = w + (int64_t)rows[g + (i < G ? i : G - 1)] * row_bytes;
#if defined(__AVX2__)
        /* the next group's spans of its rows start arriving while this group computes: short
           spans of scattered rows are latency-bound and the hardware prefetcher does not see them */
        for (int64_t i = g + AXPY_GROUP; i < g + 2 * AXPY_GROUP && i < n_rows; i++)
            for (int64_t off = b0 * Q4_BYTES; off < b1 * Q4_BYTES; off += 64)
                _mm_prefetch((const char *)w + (int64_t)rows[i] * row_bytes + off, _MM_HINT_T0);
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 c0 = _mm256_maskload_ps(coeffs + g, _mm256_cmpgt_epi32(_mm256_set1_epi32(G), lanes));
        const __m256 c1 = _mm256_maskload_ps(coeffs + g + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(G - 8), lanes));
        const __m256 sign = _mm256_set1_ps(-0.0f);
        const int npairs = (G + 1) / 2;
        for (int64_t c0b = b0; c0b < b1; c0b += AXPY_CHUNK) {
            const int nblk = b1 - c0b < AXPY_CHUNK ? (int)(b1 - c0b) : AXPY_CHUNK;
            /* pass 1, the coefficients of every block of the chunk (independent chains that the
               core overlaps); pair[i][p]: int8 coefficients of rows 2p, 2p + 1 for block i */
            int16_t pair[AXPY_CHUNK][AXPY_GROUP / 2] __attribute__((aligned(16)));
            float scales[AXPY_CHUNK];
            int16_t corrs[AXPY_CHUNK];
            for (int i = 0; i < nblk; i++) {
                const int64_t off = (c0b + i) * Q4_BYTES;
                const __m256 s0 = _mm256_mul_ps(c0, _mm256_cvtph_ps(_mm_setr_epi16(
                    (short)load_u16(p[0] + off), (short)load_u16(p[1] + off), (short)load_u16(p[2] + off),
                    (short)load_u16(p[3] + off), (short)load_u16(p[4] + off), (short)load_u16(p[5] + off),
                    (short)load_u16(p[6] + off), (short)load_u16(p[7] + off))));
                const __m256 s1 = _mm256_mul_ps(c1, _mm256_cvtph_ps(_mm_setr_epi16(
                    (short)load_u16(p[8] + off), (short)load_u16(p[9] + off), (short)load_u16(p[10] + off),
                    (short)load_u16(p[11] + off), (short)load_u16(p[12] + off), (short)load_u16(p[13] + off),
                    (short)load_u16(p[14] + off), (short)load_u16(p[15] + off))));
                const __m256 mx = _mm256_max_ps(_mm256_andnot_ps(sign, s0), _mm256_andnot_ps(sign, s1));
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                const float scale = _mm_cvtss_f32(m4) / 127.0f, id = scale ? 1.0f / scale : 0.0f;
                const __m256 vid = _mm256_set1_ps(id);
                const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(s0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(s1, vid));
                const __m256i i01 = _mm256_add_epi32(i0, i1);
                __m128i cs = _mm_add_epi32(_mm256_castsi256_si128(i01), _mm256_extracti128_si256(i01, 1));
                cs = _mm_add_epi32(cs, _mm_shuffle_epi32(cs, 0x4E));
                cs = _mm_add_epi32(cs, _mm_shuffle_epi32(cs, 0xB1));
                /* the (q - 8) offset: start the sums at -8 * sum of the int8 coefficients; the
                   int16 sums wrap on the way but end exact, |sum s8 * (q - 8)| <= 16*127*8 = 16256 */
                corrs[i] = (int16_t)(-8 * _mm_cvtsi128_si32(cs));
                scales[i] = scale;
                const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
                _mm_store_si128((__m128i *)pair[i], _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
            }
            /* pass 2, int8 coefficients x nibbles, two rows per maddubs, then one fma per output */
            if (npairs == AXPY_GROUP / 2) axpy_pass2(p, c0b, nblk, pair, corrs, scales, y, AXPY_GROUP / 2);
            else axpy_pass2(p, c0b, nblk, pair, corrs, scales, y, npairs);
        }
#else
        for (int64_t b = b0; b < b1; b++) {
            const int64_t off = b * Q4_BYTES;
            float s[AXPY_GROUP], amax = 0.0f;
            for (int i = 0; i < G; i++) {
                s[i] = coeffs[g + i] * st_fp16_to_fp32(load_u16(p[i] + off));
                if (fabsf(s[i]) > amax) amax = fabsf(s[i]);
            }
            const float scale = amax / 127.0f, id = scale ? 1.0f / scale : 0.0f;
            int32_t isum[QK];
            int q8[AXPY_GROUP], csum = 0;
            for (int i = 0; i < G; i++) { q8[i] = (int)lrintf(s[i] * id); csum += q8[i]; }
            for (int e = 0; e < QK; e++) isum[e] = -8 * csum;
            for (int i = 0; i < G; i++) {
                const uint8_t *wb = p[i] + off + 2;
                for (int e = 0; e < QK / 2; e++) {
                    isum[e] += (wb[e] & 0x0F) * q8[i];
                    isum[e + QK / 2] += (wb[e] >> 4) * q8[i];
                }
            }
            float *yb = y + b * QK;
            for (int e = 0; e < QK; e++) yb[e] += (float)isum[e] * scale;
        }
#endif
    }
}

typedef struct {
    const uint8_t *w;
    int64_t k;
    const int32_t *rows;
    const float *coeffs;
    int64_t n_rows;
    const float *x;
    float *y;
    block_q8 *xq;
} rows_args;

static void matvec_rows_task(void *p, int ith, int nth) {
    const rows_args *a = p;
    const int64_t nb = a->k / QK, row_bytes = nb * Q4_BYTES;
    if (ith == 0) st_quantize_row(a->x, nb, a->xq, 0);
    st_sync(nth);
    int64_t lo, hi;
    st_share((a->n_rows + GEMV_ROWS - 1) / GEMV_ROWS, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) rows_tile(a->w, row_bytes, a->rows, a->n_rows, a->xq, nb, a->y + t * GEMV_ROWS, t);
}

/*
 * y[i] = W[rows[i]] . x for i < n_rows. w: n rows of k/32 Q4_0 blocks; rows: int32 indices in
 * [0, n), any order; x: k floats; xq: scratch for k/32 Q8_0 blocks (quantized here).
 */
void st_q4_0_matvec_rows(const uint8_t *w, int64_t n, int64_t k, const int32_t *rows, int64_t n_rows,
                         const float *x, float *y, block_q8 *xq) {
    (void)n;
    rows_args a = {w, k, rows, NULL, n_rows, x, y, xq};
    st_run(matvec_rows_task, &a, st_worth_threads(n_rows * k));
}

static void axpy_rows_task(void *p, int ith, int nth) {
    const rows_args *a = p;
    const int64_t nb = a->k / QK;
    axpy_range(a->w, nb * Q4_BYTES, a->rows, a->coeffs, a->n_rows, split_at(nb, ith, nth), split_at(nb, ith + 1, nth), a->y);
}

/*
 * y[k] = sum_i coeffs[i] * dequant(wT[rows[i], :]) (overwritten; all zeros when n_rows = 0).
 * wT: n rows of k/32 Q4_0 blocks; rows: int32 indices in [0, n); coeffs: n_rows floats.
 * The k/32 output blocks are split into contiguous ranges, one per thread (no reduction).
 */
void st_q4_0_axpy_rows(const uint8_t *wt, int64_t n, int64_t k, const int32_t *rows, const float *coeffs,
                       int64_t n_rows, float *y) {
    (void)n;
    rows_args a = {wt, k, rows, coeffs, n_rows, NULL, y, NULL};
    st_run(axpy_rows_task, &a, st_worth_threads(n_rows * k) && k / QK > 1);
}

typedef struct {
    const uint8_t *gate, *up, *down_t;
    int64_t d, f, d_out;
    const float *x;
    float *out, *h;
    int32_t *rows;
    float weight;
    float *acc;
    int64_t n_active;
} reglu_sparse_args;

static void reglu_sparse_task(void *p, int ith, int nth) {
    reglu_sparse_args *a = p;
    const int64_t d = a->d, f = a->f, nb = d / QK, row_bytes = nb * Q4_BYTES;
    const int64_t nb_out = a->d_out / QK, out_row_bytes = nb_out * Q4_BYTES;
    float *g = a->h, *coef = a->h + f;
    block_q8 xq_own[nb];
    st_quantize_row(a->x, nb, xq_own, 0);
    int64_t lo, hi;
    st_share((f + GEMV_ROWS - 1) / GEMV_ROWS, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) dense_tile(a->gate, row_bytes, f, xq_own, nb, g, t);
    st_sync(nth);
    /* every thread lists the active rows (the same list); each fills its share of rows/coef */
    int32_t active[f];
    int64_t n = 0;
    for (int64_t j = 0; j < f; j++)
        if (g[j] > 0.0f) active[n++] = (int32_t)j;
    if (ith == 0) a->n_active = n;
    const int64_t i0 = split_at(n, ith, nth), i1 = split_at(n, ith + 1, nth);
    for (int64_t i0t = i0; i0t < i1; i0t += GEMV_ROWS) {
        float u[GEMV_ROWS];
        rows_tile(a->up, row_bytes, active + i0t, i1 - i0t, xq_own, nb, u, 0);
        for (int r = 0; r < GEMV_ROWS && i0t + r < i1; r++) {
            a->rows[i0t + r] = active[i0t + r];
            coef[i0t + r] = g[active[i0t + r]] * u[r];
        }
    }
    st_sync(nth);
    const int64_t b0 = split_at(nb_out, ith, nth), b1 = split_at(nb_out, ith + 1, nth);
    axpy_range(a->down_t, out_row_bytes, a->rows, coef, n, b0, b1, a->out);
    if (a->acc != NULL)
        for (int64_t i = b0 * QK; i < b1 * QK; i++) a->acc[i] += a->weight * a->out[i];
}

/*
 * The whole sparse ReGLU expert for one activation row, in one call:
 *   g = gate . x (all f rows); active = {j : g_j > 0} in increasing j; a_j = g_j * (up[j] . x)
 *   for active j only; out = sum over active j of a_j * dequant(down_t[j]).
 * gate, up: f rows of d/32 Q4_0 blocks (e.g. the two halves of a fused gate_up matrix);
 * down_t: f rows of d_out/32 blocks (down transposed); x: d floats; out: d_out floats
 * (overwritten). Scratch from the caller: h (2f floats; on return h[f..f+n) = a of the active
 * rows), rows (f int32; on return rows[0..n) = the active rows); xq is unused (each thread
 * quantizes x itself, so threads meet at two barriers only: gate done, a done).
 * With acc (not NULL) also acc += weight * out (a layer's experts summed in place, in the
 * order of the calls). Returns n, the number of active rows.
 */
int64_t st_reglu_sparse(const uint8_t *gate, const uint8_t *up, const uint8_t *down_t, int64_t d, int64_t f,
                        int64_t d_out, const float *x, float *out, block_q8 *xq, float *h, int32_t *rows,
                        float weight, float *acc) {
    (void)xq;
    reglu_sparse_args a = {gate, up, down_t, d, f, d_out, x, out, h, rows, weight, acc, 0};
    st_run(reglu_sparse_task, &a, st_worth_threads(f * d));
    return a.n_active;
}
