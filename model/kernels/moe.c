/*
 * A layer's dense ReGLU experts over a batch of tokens (prefill), in one native call.
 *
 * Rule: the same math as model/model.py's Block.moe for T > 1: for each token t and each of its
 * top_k experts e (ids[t, k], weights[t, k]), out[t] += weight * down_e(relu(gate_e . x[t]) *
 * (up_e . x[t])), with x and the activations rounded to Q8_0 per 32 values as every x4 product
 * does, into a zeroed out that the caller adds to the residual; and the same bits whenever
 * Block.moe takes the experts in index order too (always without a budget; under one the store's
 * order can move the last bits of a token with 3 or more experts). Experts run in index order,
 * each over the tokens routed to it (in token order) as one matrix product per weight matrix,
 * so its weights stream once per pass of up to 4 tokens (x4.c); the tokens' rows are rounded
 * once for all experts. Threads split every product by
 * groups of 4 output rows, and each output element is summed by one thread, expert after
 * expert, so the result does not depend on the thread count.
 */
#include "q4_0.h"

typedef struct {
    const uint8_t *const *gate_up, *const *down;   /* all n_experts experts, x4 (x4.c) */
    int64_t n_experts, top_k, d, f, t;
    const int32_t *ids;                            /* [t, top_k] */
    const float *weights;                          /* [t, top_k] */
    const float *x;                                /* [t, d] */
    float *out;                                    /* [t, d], added to */
    uint8_t *work;                                 /* st_moe_batch_work_bytes(...) bytes */
} moe_batch_args;

/* The work memory's parts: the tokens rounded once, one expert's gathered rows, its products
   and rounded activations, and every expert's tokens (rows) and weights, expert after expert. */
typedef struct {
    block_q8 *xq, *xq_e, *aq;
    int32_t *corr, *corr_e, *acorr;
    float *gu, *down_out, *w_e;
    int64_t *rows, *first;   /* expert e's tokens: rows[first[e] .. first[e + 1]) */
} moe_batch_work;

static int64_t round_up(int64_t n) { return (n + 63) / 64 * 64; }

/* Lays the parts out from base (when w is given); returns the bytes they take. */
static int64_t layout(int64_t t, int64_t d, int64_t f, int64_t n_experts, int64_t top_k, uint8_t *base,
                      moe_batch_work *w) {
    const int64_t nb_d = d / QK, nb_f = f / QK, q8 = (int64_t)sizeof(block_q8), pairs = t * top_k;
    const int64_t sizes[] = {t * nb_d * q8, t * nb_d * q8, t * nb_f * q8, t * nb_d * 4, t * nb_d * 4, t * nb_f * 4,
                             t * 2 * f * 4, t * d * 4, pairs * 4, pairs * 8, (n_experts + 1) * 8};
    void *parts[11];
    int64_t at = 0;
    for (int i = 0; i < 11; i++) {
        parts[i] = base ? base + at : NULL;
        at += round_up(sizes[i]);
    }
    if (w) {
        w->xq = parts[0], w->xq_e = parts[1], w->aq = parts[2];
        w->corr = parts[3], w->corr_e = parts[4], w->acorr = parts[5];
        w->gu = parts[6], w->down_out = parts[7], w->w_e = parts[8];
        w->rows = parts[9], w->first = parts[10];
    }
    return at;
}

/* Bytes of work memory st_moe_batch needs for t tokens. */
int64_t st_moe_batch_work_bytes(int64_t t, int64_t d, int64_t f, int64_t n_experts, int64_t top_k) {
    return layout(t, d, f, n_experts, top_k, NULL, NULL);
}

/* Every expert's tokens in token order, and their weights (thread 0, once). */
static void group_by_expert(const moe_batch_args *a, moe_batch_work *w) {
    const int64_t pairs = a->t * a->top_k;
    for (int64_t e = 0; e <= a->n_experts; e++) w->first[e] = 0;
    for (int64_t p = 0; p < pairs; p++) w->first[a->ids[p] + 1]++;
    for (int64_t e = 0; e < a->n_experts; e++) w->first[e + 1] += w->first[e];
    int64_t next[a->n_experts];
    for (int64_t e = 0; e < a->n_experts; e++) next[e] = w->first[e];
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t at = next[a->ids[p]]++;
        w->rows[at] = p / a->top_k;
        w->w_e[at] = a->weights[p];
    }
}

/* o[r] += w * s[r] for r in [r0, r1), the product rounded before the sum (never one fused
   multiply-add): the roundings of the torch path's contrib * weight, index_add (model.py). */
__attribute__((optimize("fp-contract=off"))) static void add_scaled(float *o, float w, const float *s, int64_t r0,
                                                                     int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float p = w * s[r];
        o[r] += p;
    }
}

static void moe_batch_task(void *p, int ith, int nth) {
    const moe_batch_args *a = p;
    const int64_t d = a->d, f = a->f, nb_d = d / QK, nb_f = f / QK;
    const int64_t groups_gu = (2 * f + X4_ROWS - 1) / X4_ROWS, groups_d = (d + X4_ROWS - 1) / X4_ROWS;
    moe_batch_work w;
    layout(a->t, d, f, a->n_experts, a->top_k, a->work, &w);
    int64_t lo, hi;
    st_share(a->t, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) st_x4_quantize_row(a->x + t * d, nb_d, w.xq + t * nb_d, w.corr + t * nb_d);
    if (ith == 0) group_by_expert(a, &w);
    st_sync(nth);
    for (int64_t e = 0; e < a->n_experts; e++) {
        const int64_t m = w.first[e + 1] - w.first[e];
        const int64_t *rows = w.rows + w.first[e];
        const float *wt = w.w_e + w.first[e];
        if (m == 0) continue;
        /* the last expert's gate/up products are done (a barrier came after them), so its
           gathered rows may be overwritten; its down products only touch this thread's rows */
        st_share(m, ith, nth, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) {
            memcpy(w.xq_e + i * nb_d, w.xq + rows[i] * nb_d, (size_t)nb_d * sizeof(block_q8));
            memcpy(w.corr_e + i * nb_d, w.corr + rows[i] * nb_d, (size_t)nb_d * sizeof(int32_t));
        }
        st_sync(nth);
        st_share(groups_gu, ith, nth, &lo, &hi);
        st_x4_matmul_groups(a->gate_up[e], 2 * f, nb_d, w.xq_e, w.corr_e, m, w.gu, lo, hi);
        st_sync(nth);
        st_share(m, ith, nth, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) {
            float *g = w.gu + i * 2 * f;
            for (int64_t j = 0; j < f; j++) g[j] = (g[j] > 0.0f ? g[j] : 0.0f) * g[f + j];
            st_x4_quantize_row(g, nb_f, w.aq + i * nb_f, w.acorr + i * nb_f);
        }
        st_sync(nth);
        /* each thread owns a range of output rows: their products, then their weighted sums */
        st_share(groups_d, ith, nth, &lo, &hi);
        st_x4_matmul_groups(a->down[e], d, nb_f, w.aq, w.acorr, m, w.down_out, lo, hi);
        const int64_t r0 = lo * X4_ROWS, r1 = hi * X4_ROWS < d ? hi * X4_ROWS : d;
        for (int64_t i = 0; i < m; i++) add_scaled(a->out + rows[i] * d, wt[i], w.down_out + i * d, r0, r1);
    }
}

/*
 * out [t, d] (zeroed by the caller) += the layer's experts of each token (see the rule above). gate_up[e]: Q4_0 x4
 * [2f, d] (gate rows, then up rows); down[e]: Q4_0 x4 [d, f]; ids, weights [t, top_k]: each
 * token's experts and their weights; x [t, d]: the post-attention norm; work:
 * st_moe_batch_work_bytes(t, d, f, n_experts, top_k) bytes, 64-byte aligned.
 */
void st_moe_batch(const uint8_t *const *gate_up, const uint8_t *const *down, int64_t n_experts, int64_t top_k,
                  int64_t d, int64_t f, int64_t t, const int32_t *ids, const float *weights, const float *x,
                  float *out, uint8_t *work) {
    moe_batch_args a = {gate_up, down, n_experts, top_k, d, f, t, ids, weights, x, out, work};
    st_run(moe_batch_task, &a, 1);
}
