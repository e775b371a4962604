/* Decode attention on the CPU, reading the paged KV cache in place (no gather copy).
 *
 * Semantics, for each decode b (query row rows[b], context length n = context_lens[b],
 * so the query sits at position n - 1) and each query head h (KV head g = h / (H / KVH)):
 *   j in [lo, n), lo = max(0, n - window) when window > 0, else 0
 *   s_j = scale * q[rows[b], h] . K[j, g];  s_j = softcap * tanh(s_j / softcap) if softcap > 0
 *   out[rows[b], h] = sum_j softmax(s)_j * V[j, g]
 * where K[j, g] is k_cache[block_tables[b, j / block_size], j % block_size, g] (likewise V).
 * Caches are [num_blocks, block_size, KVH, D]; q and out rows are [H, D] with a row stride.
 *
 * fp32 and bf16 (raw uint16 bits) builds of the same loops: scores, softmax and the
 * weighted sum are fp32 in both (bf16 values are widened exactly); bf16 output is rounded
 * once, to nearest even. Two passes over the context (scores, then values) instead of an
 * online softmax: the scores of one (decode, KV head) for all its query heads fit in L2.
 *
 * Parallelism: threads split the (decode, KV head) items statically; each item's query
 * heads share every K/V row read. Every output sees the same operations in the same order
 * whatever the batch or the thread count (batch-invariant, deterministic).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (bf16)(u >> 16);
}

static inline float f32_id(float v) { return v; }

#define LANES 16

/* a . b in a fixed order: LANES partial sums (vectorized), summed in order, then the tail. */
static inline float dot(const float *restrict a, const float *restrict b, int n)
{
    float part[LANES] = {0};
    int d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += a[d + l] * b[d + l];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += part[l];
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

#define MAX_GROUP 32  /* query heads per KV head (more: the caller falls back) */
#define MAX_HEAD_DIM 256

/* One definition per element type T: LOAD widens an element to fp32, STORE narrows. */
#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE)                                               \
    int NAME(T *out, int64_t out_stride, const T *q, int64_t q_stride, const T *k_cache,        \
             const T *v_cache, const int64_t *rows, const int64_t *block_tables,                \
             int64_t max_blocks, const int64_t *context_lens, int num_decodes, int num_heads,   \
             int num_kv_heads, int head_dim, int block_size, float scale, int window,           \
             float softcap, int num_threads)                                                    \
    {                                                                                           \
        if (num_kv_heads <= 0 || num_heads % num_kv_heads || head_dim > MAX_HEAD_DIM)           \
            return -1;                                                                          \
        const int group = num_heads / num_kv_heads;                                             \
        if (group > MAX_GROUP) return -1;                                                       \
        const int64_t token_stride = (int64_t)num_kv_heads * head_dim; /* one cache row */      \
        const int64_t block_stride = (int64_t)block_size * token_stride;                        \
        const int items = num_decodes * num_kv_heads;                                           \
        int failed = 0;                                                                         \
        _Pragma("omp parallel num_threads(num_threads) reduction(|: failed)")                   \
        {                                                                                       \
            float *scores = NULL; /* [group, n] */                                              \
            int64_t capacity = 0;                                                               \
            float qf[MAX_GROUP][MAX_HEAD_DIM];                                                  \
            float acc[MAX_GROUP][MAX_HEAD_DIM];                                                 \
            _Pragma("omp for schedule(static)")                                                 \
            for (int item = 0; item < items; item++) {                                          \
                const int b = item / num_kv_heads, g = item % num_kv_heads;                     \
                const int64_t n = context_lens[b];                                              \
                const int64_t lo = (window > 0 && n > window) ? n - window : 0;                 \
                const int64_t len = n - lo;                                                     \
                if (len <= 0) continue;                                                         \
                if (group * len > capacity) {                                                   \
                    free(scores);                                                               \
                    capacity = group * len;                                                     \
                    scores = malloc((size_t)capacity * sizeof(float));                          \
                    if (!scores) { capacity = 0; failed = 1; continue; }                        \
                }                                                                               \
                const int64_t *table = block_tables + (int64_t)b * max_blocks;                  \
                const T *q_row = q + rows[b] * q_stride + (int64_t)g * group * head_dim;        \
                for (int i = 0; i < group; i++)                                                 \
                    for (int d = 0; d < head_dim; d++) qf[i][d] = LOAD(q_row[i * head_dim + d]); \
                /* Pass 1: scores, and each head's maximum. */                                  \
                float maxes[MAX_GROUP];                                                         \
                for (int i = 0; i < group; i++) maxes[i] = -INFINITY;                           \
                for (int64_t j = lo; j < n; j++) {                                              \
                    const T *k = k_cache + table[j / block_size] * block_stride +               \
                                 (j % block_size) * token_stride + (int64_t)g * head_dim;       \
                    float kf[MAX_HEAD_DIM];                                                     \
                    for (int d = 0; d < head_dim; d++) kf[d] = LOAD(k[d]);                      \
                    for (int i = 0; i < group; i++) {                                           \
                        float s = dot(qf[i], kf, head_dim) * scale;                             \
                        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);                   \
                        scores[i * len + (j - lo)] = s;                                         \
                        if (s > maxes[i]) maxes[i] = s;                                         \
                    }                                                                           \
                }                                                                               \
                float sums[MAX_GROUP];                                                          \
                for (int i = 0; i < group; i++) {                                               \
                    float total = 0.0f;                                                         \
                    float *row = scores + i * len;                                              \
                    for (int64_t j = 0; j < len; j++) {                                         \
                        row[j] = expf(row[j] - maxes[i]);                                       \
                        total += row[j];                                                        \
                    }                                                                           \
                    sums[i] = total;                                                            \
                    memset(acc[i], 0, (size_t)head_dim * sizeof(float));                        \
                }                                                                               \
                /* Pass 2: the probability-weighted sum of the values. */                       \
                for (int64_t j = lo; j < n; j++) {                                              \
                    const T *v = v_cache + table[j / block_size] * block_stride +               \
                                 (j % block_size) * token_stride + (int64_t)g * head_dim;       \
                    float vf[MAX_HEAD_DIM];                                                     \
                    for (int d = 0; d < head_dim; d++) vf[d] = LOAD(v[d]);                      \
                    for (int i = 0; i < group; i++) {                                           \
                        const float p = scores[i * len + (j - lo)];                             \
                        for (int d = 0; d < head_dim; d++) acc[i][d] += p * vf[d];              \
                    }                                                                           \
                }                                                                               \
                T *o_row = out + rows[b] * out_stride + (int64_t)g * group * head_dim;          \
                for (int i = 0; i < group; i++) {                                               \
                    const float inv = 1.0f / sums[i];                                           \
                    for (int d = 0; d < head_dim; d++) o_row[i * head_dim + d] = STORE(acc[i][d] * inv); \
                }                                                                               \
            }                                                                                   \
            free(scores);                                                                       \
        }                                                                                       \
        return failed ? -2 : 0;                                                                 \
    }

DEFINE_PAGED_DECODE(paged_decode_f32, float, f32_id, f32_id)
DEFINE_PAGED_DECODE(paged_decode_bf16, bf16, bf16_to_f32, f32_to_bf16)
