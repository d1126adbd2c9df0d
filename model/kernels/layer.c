/*
 * One SmallThinker decoder layer for a single new token (decode), in native calls that Python
 * sequences: st_route -> (the expert store is told the choice) -> st_attention_decode -> one
 * expert call per chosen expert (st_reglu_dense here, st_reglu_sparse in q4_0.c).
 *
 * Rule: the same math as model/model.py's Block for T = 1, only fused: router logits on the
 * pre-norm residual, top-k, softmax or sigmoid-normalize; RMSNorm; the fused qkv product;
 * NeoX RoPE on the full head dim when the layer has it; the new key/value written to its cache
 * slot; GQA attention of the one query over the n visible keys; o product added to the
 * residual; the post-attention RMSNorm that the experts read. Matrix products are the Q4_0 x
 * Q8_0 GEMV of x4.c on the interleaved layout (activations rounded to Q8_0 per 32 values). Each
 * call is one task of the thread pool (pool.c; its serial steps on thread 0), and every output
 * is computed by one thread in a fixed order, so results do not depend on the thread count.
 * With every expert resident, a layer's experts run in one call too (st_moe_dense).
 */
#include <math.h>

#include "q4_0.h"

/* The weights and shape of one layer (built once by model/kernels/layer.py). */
typedef struct {
    int64_t d, n_heads, n_kv_heads, head_dim;
    float eps, scale;
    const float *input_norm, *post_norm;   /* [d] */
    const float *router;                   /* [n_experts, d] */
    int64_t n_experts, top_k;
    int64_t softmax;                       /* 1: softmax over the top-k logits; 0: sigmoid, normalized */
    const uint8_t *qkv;                    /* Q4_0 x4 [(n_heads + 2 n_kv_heads) head_dim, d] (x4.c) */
    const uint8_t *o;                      /* Q4_0 x4 [d, n_heads head_dim] */
} st_layer;

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX2__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++)
            acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * u), _mm256_loadu_ps(b + i + 8 * u), acc[u]);
    s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out = x / sqrt(mean(x^2) + eps) * w */
static void rms_norm(const float *x, const float *w, int64_t d, float eps, float *out) {
    const float r = 1.0f / sqrtf(dot(x, x, d) / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

/* NeoX rotate-half RoPE over the full head dim: cos/sin hold hd values (each half repeated). */
static void rope(float *x, const float *cos, const float *sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/*
 * The layer's top_k experts for the residual h [d], best first (ties: the lower index), and
 * their weights. bias (NULL or [n_experts]) is added to the logits (benchmarks' router skew).
 */
void st_route(const st_layer *L, const float *bias, const float *h, int32_t *ids, float *weights) {
    float logits[L->n_experts];
    for (int64_t e = 0; e < L->n_experts; e++) logits[e] = dot(L->router + e * L->d, h, L->d) + (bias ? bias[e] : 0.0f);
    float top[L->top_k];
    for (int64_t k = 0; k < L->top_k; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < L->n_experts; e++)
            if (logits[e] != -INFINITY && (best < 0 || logits[e] > logits[best])) best = e;
        ids[k] = (int32_t)best;
        top[k] = logits[best];
        logits[best] = -INFINITY;
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < L->top_k; k++) {
        weights[k] = L->softmax ? expf(top[k] - top[0]) : 1.0f / (1.0f + expf(-top[k]));
        sum += weights[k];
    }
    for (int64_t k = 0; k < L->top_k; k++) weights[k] /= sum;
}

/* Floats of work memory st_attention_decode needs with up to max_keys visible keys. */
int64_t st_attention_work_floats(const st_layer *L, int64_t max_keys) {
    const int64_t q_dim = L->n_heads * L->head_dim, kv_dim = L->n_kv_heads * L->head_dim;
    return L->d + q_dim + 2 * kv_dim + q_dim + L->n_heads * max_keys;
}

/* out[i] += p * v[i] for i < n */
static void axpy(float *out, float p, const float *v, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 vp = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
    for (; i < n; i++) out[i] += p * v[i];
}

/*
 * The attention of kv group g for the one new token (its key and value go to cache slot `slot`).
 * The group's query heads walk the cache together, key by key: each cached key and value is
 * read once per token for all of them (not once per head), the scores of all heads first, then
 * the values. scores holds group * n_keys floats for this group.
 */
static void attend_group(const st_layer *L, int64_t g, float *qkv, float *att, float *scores, float *k_cache,
                         float *v_cache, int64_t slot, int64_t n_keys, const float *cos, const float *sin) {
    const int64_t H = L->n_heads, G = L->n_kv_heads, hd = L->head_dim, group = H / G;
    const int64_t q_dim = H * hd, kv_dim = G * hd;
    float *k = qkv + q_dim + g * hd, *v = qkv + q_dim + kv_dim + g * hd;
    float *q = qkv + g * group * hd, *out = att + g * group * hd, *s = scores + g * group * n_keys;
    if (cos != NULL) {
        rope(k, cos, sin, hd);
        for (int64_t h = 0; h < group; h++) rope(q + h * hd, cos, sin, hd);
    }
    memcpy(k_cache + slot * kv_dim + g * hd, k, (size_t)hd * sizeof(float));
    memcpy(v_cache + slot * kv_dim + g * hd, v, (size_t)hd * sizeof(float));
    for (int64_t j = 0; j < n_keys; j++) {
        const float *kj = k_cache + (j * G + g) * hd;
        for (int64_t h = 0; h < group; h++) s[h * n_keys + j] = dot(q + h * hd, kj, hd) * L->scale;
    }
    for (int64_t h = 0; h < group; h++) {
        float *sh = s + h * n_keys, mx = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n_keys; j++) mx = sh[j] > mx ? sh[j] : mx;
        for (int64_t j = 0; j < n_keys; j++) sum += (sh[j] = expf(sh[j] - mx));
        for (int64_t j = 0; j < n_keys; j++) sh[j] /= sum;
    }
    memset(out, 0, (size_t)(group * hd) * sizeof(float));
    for (int64_t j = 0; j < n_keys; j++) {
        const float *vj = v_cache + (j * G + g) * hd;
        for (int64_t h = 0; h < group; h++) axpy(out + h * hd, s[h * n_keys + j], vj, hd);
    }
}

typedef struct {
    const st_layer *L;
    float *h, *y, *k_cache, *v_cache;
    int64_t slot, n_keys;
    const float *cos, *sin;
    float *work;
} attention_args;

/* The attention half for thread ith of nth; ends with the post-attention norm in a->y, written by
   thread 0 after the last barrier (callers that read y on other threads sync first). */
static void attention_part(const attention_args *a, int ith, int nth) {
    const st_layer *L = a->L;
    const int64_t d = L->d, H = L->n_heads, G = L->n_kv_heads, hd = L->head_dim;
    const int64_t q_dim = H * hd, kv_dim = G * hd, n_qkv = q_dim + 2 * kv_dim;
    const int64_t nb_d = d / QK, nb_q = q_dim / QK, nb_max = nb_d > nb_q ? nb_d : nb_q;
    float *o_out = a->work, *qkv = o_out + d, *att = qkv + n_qkv, *scores = att + q_dim;
    float x[d];
    block_q8 xq[nb_max];
    int32_t corr[nb_max];
    int64_t lo, hi;
    rms_norm(a->h, L->input_norm, d, L->eps, x);
    st_x4_quantize_row(x, nb_d, xq, corr);
    st_x4_gemv_share(L->qkv, n_qkv, nb_d, xq, corr, qkv, ith, nth);
    st_sync(nth);
    st_share(G, ith, nth, &lo, &hi);
    for (int64_t g = lo; g < hi; g++)
        attend_group(L, g, qkv, att, scores, a->k_cache, a->v_cache, a->slot, a->n_keys, a->cos, a->sin);
    st_sync(nth);
    st_x4_quantize_row(att, nb_q, xq, corr);
    st_x4_gemv_share(L->o, d, nb_q, xq, corr, o_out, ith, nth);
    st_sync(nth);
    if (ith == 0) {
        for (int64_t i = 0; i < d; i++) a->h[i] += o_out[i];
        rms_norm(a->h, L->post_norm, d, L->eps, a->y);
    }
}

static void attention_task(void *p, int ith, int nth) { attention_part(p, ith, nth); }

/*
 * Attention half of the layer for one token at cache slot `slot`, which sees n_keys cached
 * keys (slot among them): h [d] += o(attention(input_norm(h))), then y [d] = post_norm(h).
 * k_cache, v_cache: [capacity, n_kv_heads, head_dim]; cos, sin: [head_dim] for this position,
 * or NULL on a layer without RoPE; work: st_attention_work_floats(L, n_keys) floats.
 * Threads meet at three barriers (qkv done, attention done, o done): each one quantizes the
 * activations it needs itself (identical bits) instead of waiting for one thread to do it, and
 * the attention is split by kv group, whose key/value writes only its own heads read.
 */
void st_attention_decode(const st_layer *L, float *h, float *y, float *k_cache, float *v_cache, int64_t slot,
                         int64_t n_keys, const float *cos, const float *sin, float *work) {
    attention_args a = {L, h, y, k_cache, v_cache, slot, n_keys, cos, sin, work};
    st_run(attention_task, &a, 1);
}

/* Floats of work memory st_moe_dense needs for up to k experts. */
int64_t st_moe_dense_work_floats(int64_t d, int64_t f, int64_t d_out, int64_t k) {
    (void)d;
    (void)d_out;
    return 2 * f * k;
}

typedef struct {
    const uint8_t *const *gate_up, *const *down;
    const float *weights;
    int64_t k, d, f, d_out;
    const float *x;
    float *acc, *work;
} moe_args;

static void moe_part(const moe_args *a, int ith, int nth) {
    const int64_t d = a->d, f = a->f, d_out = a->d_out, K = a->k, nb_d = d / QK, nb_f = f / QK;
    const int64_t groups_gu = (2 * f + X4_ROWS - 1) / X4_ROWS, groups_down = (d_out + X4_ROWS - 1) / X4_ROWS;
    int64_t lo, hi;
    {
        block_q8 xq[nb_d];
        int32_t corr[nb_d];
        st_x4_quantize_row(a->x, nb_d, xq, corr);
        /* every expert's gate_up groups, one list split across the threads */
        st_share(K * groups_gu, ith, nth, &lo, &hi);
        for (int64_t e = lo / groups_gu; e < K && e * groups_gu < hi; e++) {
            const int64_t g0 = lo > e * groups_gu ? lo - e * groups_gu : 0;
            const int64_t g1 = hi < (e + 1) * groups_gu ? hi - e * groups_gu : groups_gu;
            st_x4_gemv_groups(a->gate_up[e], 2 * f, nb_d, xq, corr, a->work + e * 2 * f, g0, g1);
        }
    }
    st_sync(nth);
    block_q8 aq[K][nb_f];
    int32_t acorr[K][nb_f];
    float act[f];
    for (int64_t e = 0; e < K; e++) {
        const float *g = a->work + e * 2 * f;
        for (int64_t j = 0; j < f; j++) act[j] = (g[j] > 0.0f ? g[j] : 0.0f) * g[f + j];
        st_x4_quantize_row(act, nb_f, aq[e], acorr[e]);
    }
    /* each thread owns a range of output rows and sums the experts into them in order */
    float out[d_out];
    st_share(groups_down, ith, nth, &lo, &hi);
    const int64_t r0 = lo * X4_ROWS, r1 = hi * X4_ROWS < d_out ? hi * X4_ROWS : d_out;
    for (int64_t e = 0; e < K; e++) {
        st_x4_gemv_groups(a->down[e], d_out, nb_f, aq[e], acorr[e], out, lo, hi);
        for (int64_t r = r0; r < r1; r++) a->acc[r] += a->weights[e] * out[r];
    }
}

static void moe_task(void *p, int ith, int nth) { moe_part(p, ith, nth); }

/*
 * A layer's k dense ReGLU experts for one activation row, added in place in list order:
 * acc [d_out] += sum_e weights[e] * down_e(relu(gate_e . x) * (up_e . x)). gate_up[e]: Q4_0 x4
 * [2f, d] (gate rows, then up rows); down[e]: Q4_0 x4 [d_out, f] (x4.c); work:
 * st_moe_dense_work_floats(d, f, d_out, k) floats. One barrier: all experts' gate and up
 * products, then each thread rounds every expert's relu(gate) * up itself and sums the down
 * products of its rows, expert after expert (the same order and bits as k st_reglu_dense calls).
 */
void st_moe_dense(const uint8_t *const *gate_up, const uint8_t *const *down, const float *weights, int64_t k,
                  int64_t d, int64_t f, int64_t d_out, const float *x, float *acc, float *work) {
    moe_args a = {gate_up, down, weights, k, d, f, d_out, x, acc, work};
    st_run(moe_task, &a, 1);
}

/* Floats of work memory st_reglu_dense needs. */
int64_t st_reglu_dense_work_floats(int64_t d, int64_t f, int64_t d_out) {
    return st_moe_dense_work_floats(d, f, d_out, 1);
}

/*
 * A dense ReGLU expert for one activation row, added in place: acc [d_out] += weight *
 * down(relu(gate . x) * (up . x)) (st_moe_dense with one expert). gate_up: Q4_0 [2f, d] (gate
 * rows, then up rows); down: Q4_0 [d_out, f]; x [d]; work: st_reglu_dense_work_floats(d, f, d_out).
 */
void st_reglu_dense(const uint8_t *gate_up, const uint8_t *down, int64_t d, int64_t f, int64_t d_out,
                    const float *x, float weight, float *acc, float *work) {
    st_moe_dense(&gate_up, &down, &weight, 1, d, f, d_out, x, acc, work);
}

typedef struct {
    attention_args attention;
    moe_args moe;
} layer_args;

static void layer_task(void *p, int ith, int nth) {
    layer_args *a = p;
    attention_part(&a->attention, ith, nth);
    st_sync(nth);   /* y, the experts' input, is thread 0's */
    moe_part(&a->moe, ith, nth);
}

/*
 * The whole layer for one token with every expert resident, in one task of the pool:
 * st_route, then st_attention_decode, then st_moe_dense over the chosen experts, in that order
 * and with the same bits as those three calls. gate_up, down: all n_experts experts' matrices
 * (as st_moe_dense takes them); ids, weights: the chosen experts, best first, and their weights
 * (outputs); y [d]: the post-attention norm; work: st_attention_work_floats(L, n_keys) floats;
 * moe_work: st_moe_dense_work_floats(d, f, d, top_k) floats.
 */
void st_layer_decode(const st_layer *L, const uint8_t *const *gate_up, const uint8_t *const *down, int64_t f,
                     const float *bias, float *h, float *y, float *k_cache, float *v_cache, int64_t slot,
                     int64_t n_keys, const float *cos, const float *sin, float *work, float *moe_work, int32_t *ids,
                     float *weights) {
    st_route(L, bias, h, ids, weights);
    const uint8_t *chosen_gate_up[L->top_k], *chosen_down[L->top_k];
    for (int64_t e = 0; e < L->top_k; e++) {
        chosen_gate_up[e] = gate_up[ids[e]];
        chosen_down[e] = down[ids[e]];
    }
    layer_args a = {{L, h, y, k_cache, v_cache, slot, n_keys, cos, sin, work},
                    {chosen_gate_up, chosen_down, weights, L->top_k, L->d, f, L->d, y, h, moe_work}};
    st_run(layer_task, &a, 1);
}
