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
#include "bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif


static inline float f32_id(float v) { return v; }

#define LANES 16

/* a . b in a fixed order: LANES partial sums (vectorized), folded pairwise (each fold is
 * one vector add, not LANES dependent scalar adds), then the tail. */
static inline float dot(const float *restrict a, const float *restrict b, int n)
{
    float part[LANES] = {0};
    int d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += a[d + l] * b[d + l];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) part[l] += part[l + width];
    float s = part[0];
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

/* exp(x) for x <= 0 (a score minus its row's maximum), in plain arithmetic the compiler
 * vectorizes (libm's expf is a scalar call per score): Cephes' expf, range reduction by
 * n ln2 in two parts and a degree-6 polynomial, within 2 ulp of expf; x below -87 gives
 * exp(-87) (1.6e-38, nothing beside the maximum's exp(0) = 1 in a softmax sum). Built
 * without -ffast-math, so the compiler keeps these operations as written. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    /* n = round(x / ln2): adding and taking away 1.5 * 2^23 rounds to nearest (exact for
     * |x / ln2| < 2^22), in two adds the compiler vectorizes, unlike floorf */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * z + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

#ifdef __AVX512F__
/* 16 elements widened to fp32 (bf16: the bits shifted up, exact). */
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const bf16 *p) { return bf16x16_to_f32(p); }
/* The same sum as dot(): a lane-wise FMA chain over 16-wide chunks, folded by halves. */
static inline float dot16(const float *restrict a, const __m512 *restrict b, int chunks)
{
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), b[0]);
    for (int c = 1; c < chunks; c++) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * c), b[c], s);
    return _mm512_reduce_add_ps(s);
}
#define VECTOR_LOOPS 1
#else
#define VECTOR_LOOPS 0
#endif

#define MAX_GROUP 32  /* query heads per KV head (more: the caller falls back) */
#define MAX_HEAD_DIM 256

/* One definition per element type T: LOAD widens an element to fp32, STORE narrows. */
#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE, LOAD16)                                               \
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
        const int vector = VECTOR_LOOPS && head_dim % 16 == 0;                                  \
        const int chunks = head_dim / 16;                                                       \
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
                    VECTOR_K_ROW(LOAD16)                                                        \
                    if (!vector) for (int d = 0; d < head_dim; d++) kf[d] = LOAD(k[d]);         \
                    for (int i = 0; i < group; i++) {                                           \
                        float s = (vector ? VECTOR_DOT(i) : dot(qf[i], kf, head_dim)) * scale;  \
                        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);                   \
                        scores[i * len + (j - lo)] = s;                                         \
                        if (s > maxes[i]) maxes[i] = s;                                         \
                    }                                                                           \
                }                                                                               \
                float sums[MAX_GROUP];                                                          \
                for (int i = 0; i < group; i++) {                                               \
                    float total = 0.0f;                                                         \
                    float *row = scores + i * len;                                              \
                    const float max_i = maxes[i];                                               \
                    for (int64_t j = 0; j < len; j++) row[j] = exp_nonpositive(row[j] - max_i); \
                    for (int64_t j = 0; j < len; j++) total += row[j];                          \
                    sums[i] = total;                                                            \
                    memset(acc[i], 0, (size_t)head_dim * sizeof(float));                        \
                }                                                                               \
                /* Pass 2: the probability-weighted sum of the values. */                       \
                for (int64_t j = lo; j < n; j++) {                                              \
                    const T *v = v_cache + table[j / block_size] * block_stride +               \
                                 (j % block_size) * token_stride + (int64_t)g * head_dim;       \
                    if (vector) {                                                               \
                        VECTOR_V_ROW(LOAD16)                                                    \
                        continue;                                                               \
                    }                                                                           \
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

/* The AVX-512 forms of the row loops (head_dim a multiple of 16): a K row widened once into
 * registers and dotted with each query head; a V row widened once and added, weighted,
 * into each head's accumulator. Same sums, same order as the portable loops. */
#if VECTOR_LOOPS
#define VECTOR_K_ROW(LOAD16)                                                                    \
    __m512 kv[MAX_HEAD_DIM / 16];                                                               \
    if (vector) for (int c = 0; c < chunks; c++) kv[c] = LOAD16(k + 16 * c);
#define VECTOR_DOT(i) dot16(qf[i], kv, chunks)
#define VECTOR_V_ROW(LOAD16)                                                                    \
    __m512 vv[MAX_HEAD_DIM / 16];                                                               \
    for (int c = 0; c < chunks; c++) vv[c] = LOAD16(v + 16 * c);                                \
    for (int i = 0; i < group; i++) {                                                           \
        const __m512 p = _mm512_set1_ps(scores[i * len + (j - lo)]);                           \
        for (int c = 0; c < chunks; c++)                                                        \
            _mm512_storeu_ps(acc[i] + 16 * c, _mm512_fmadd_ps(p, vv[c], _mm512_loadu_ps(acc[i] + 16 * c))); \
    }
#else
#define VECTOR_K_ROW(LOAD16)
#define VECTOR_DOT(i) 0.0f
#define VECTOR_V_ROW(LOAD16)
#endif

DEFINE_PAGED_DECODE(paged_decode_f32, float, f32_id, f32_id, load16_f32)
DEFINE_PAGED_DECODE(paged_decode_bf16, bf16, bf16_to_f32, f32_to_bf16, load16_bf16)
