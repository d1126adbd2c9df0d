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
 * Q8_0 GEMV of q4_0.c (activations rounded to Q8_0 per 32 values). Each call is one OpenMP
 * parallel region (its serial steps in `single` blocks), not one per product, and every output
 * is computed by one thread in a fixed order, so results do not depend on the thread count.
 */
#include <math.h>
#include <omp.h>

#include "q4_0.h"

/* The weights and shape of one layer (built once by model/kernels/layer.py). */
typedef struct {
    int64_t d, n_heads, n_kv_heads, head_dim;
    float eps, scale;
    const float *input_norm, *post_norm;   /* [d] */
    const float *router;                   /* [n_experts, d] */
    int64_t n_experts, top_k;
    int64_t softmax;                       /* 1: softmax over the top-k logits; 0: sigmoid, normalized */
    const uint8_t *qkv;                    /* Q4_0 [(n_heads + 2 n_kv_heads) head_dim, d] */
    const uint8_t *o;                      /* Q4_0 [d, n_heads head_dim] */
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

/* The attention of kv group g for the one new token (its key and value go to cache slot `slot`). */
static void attend_group(const st_layer *L, int64_t g, float *qkv, float *att, float *scores, float *k_cache,
                         float *v_cache, int64_t slot, int64_t n_keys, const float *cos, const float *sin) {
    const int64_t H = L->n_heads, G = L->n_kv_heads, hd = L->head_dim, group = H / G;
    const int64_t q_dim = H * hd, kv_dim = G * hd;
    float *k = qkv + q_dim + g * hd, *v = qkv + q_dim + kv_dim + g * hd;
    if (cos != NULL) rope(k, cos, sin, hd);
    memcpy(k_cache + slot * kv_dim + g * hd, k, (size_t)hd * sizeof(float));
    memcpy(v_cache + slot * kv_dim + g * hd, v, (size_t)hd * sizeof(float));
    for (int64_t head = g * group; head < (g + 1) * group; head++) {
        float *q = qkv + head * hd, *s = scores + head * n_keys, *out = att + head * hd;
        if (cos != NULL) rope(q, cos, sin, hd);
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n_keys; j++) {
            s[j] = dot(q, k_cache + (j * G + g) * hd, hd) * L->scale;
            if (s[j] > mx) mx = s[j];
        }
        for (int64_t j = 0; j < n_keys; j++) sum += (s[j] = expf(s[j] - mx));
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int64_t j = 0; j < n_keys; j++) {
            const float p = s[j] / sum, *vj = v_cache + (j * G + g) * hd;
            for (int64_t i = 0; i < hd; i++) out[i] += p * vj[i];
        }
    }
}

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
    const int64_t d = L->d, H = L->n_heads, G = L->n_kv_heads, hd = L->head_dim;
    const int64_t q_dim = H * hd, kv_dim = G * hd, n_qkv = q_dim + 2 * kv_dim;
    const int64_t nb_d = d / QK, nb_q = q_dim / QK;
    float *o_out = work, *qkv = o_out + d, *att = qkv + n_qkv, *scores = att + q_dim;
    const int64_t tiles_qkv = (n_qkv + GEMV_ROWS - 1) / GEMV_ROWS, tiles_o = (d + GEMV_ROWS - 1) / GEMV_ROWS;
    #pragma omp parallel if (omp_get_max_threads() > 1)
    {
        float x[d];
        block_q8 xq[(nb_d > nb_q ? nb_d : nb_q)];
        rms_norm(h, L->input_norm, d, L->eps, x);
        st_quantize_row(x, nb_d, xq, 0);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles_qkv; t++) st_dense_tile(L->qkv, nb_d * Q4_BYTES, n_qkv, xq, nb_d, qkv, t);
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < G; g++) attend_group(L, g, qkv, att, scores, k_cache, v_cache, slot, n_keys, cos, sin);
        st_quantize_row(att, nb_q, xq, 0);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles_o; t++) st_dense_tile(L->o, nb_q * Q4_BYTES, d, xq, nb_q, o_out, t);
        #pragma omp single nowait
        {
            for (int64_t i = 0; i < d; i++) h[i] += o_out[i];
            rms_norm(h, L->post_norm, d, L->eps, y);
        }
    }
}

/* Floats of work memory st_reglu_dense needs. */
int64_t st_reglu_dense_work_floats(int64_t d, int64_t f, int64_t d_out) {
    (void)d;
    return 2 * f + d_out;
}

/*
 * A dense ReGLU expert for one activation row, added in place: acc [d_out] += weight *
 * down(relu(gate . x) * (up . x)). gate_up: Q4_0 [2f, d] (gate rows, then up rows); down: Q4_0
 * [d_out, f]; x [d]; work: st_reglu_dense_work_floats(d, f, d_out) floats. One barrier (gate and
 * up done): each thread quantizes x and then relu(gate) * up itself.
 */
void st_reglu_dense(const uint8_t *gate_up, const uint8_t *down, int64_t d, int64_t f, int64_t d_out,
                    const float *x, float weight, float *acc, float *work) {
    const int64_t nb_d = d / QK, nb_f = f / QK;
    float *g = work, *out = g + 2 * f;
    const int64_t tiles_gu = (2 * f + GEMV_ROWS - 1) / GEMV_ROWS, tiles_down = (d_out + GEMV_ROWS - 1) / GEMV_ROWS;
    #pragma omp parallel if (omp_get_max_threads() > 1)
    {
        block_q8 xq[(nb_d > nb_f ? nb_d : nb_f)];
        float a[f];
        st_quantize_row(x, nb_d, xq, 0);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles_gu; t++) st_dense_tile(gate_up, nb_d * Q4_BYTES, 2 * f, xq, nb_d, g, t);
        for (int64_t j = 0; j < f; j++) a[j] = (g[j] > 0.0f ? g[j] : 0.0f) * g[f + j];
        st_quantize_row(a, nb_f, xq, 0);
        #pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles_down; t++) {
            st_dense_tile(down, nb_f * Q4_BYTES, d_out, xq, nb_f, out, t);
            for (int64_t r = t * GEMV_ROWS; r < (t + 1) * GEMV_ROWS && r < d_out; r++) acc[r] += weight * out[r];
        }
    }
}
