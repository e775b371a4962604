/* Segmented gather matmul for LoRA on the CPU, bf16 activations and slot buffers, fp32
 * accumulation (the decode-heavy path of a bf16 model).
 *
 * Semantics, for each listed segment i (slot w = seg_slot[i]) and each output slice k
 * (columns out_offsets[k] .. + out_widths[k] of y), with r = ranks_k[w]:
 *   y[seg_start[i]:seg_end[i], slice k] += seg_scale[i] * (x[rows] @ A_k[w, :r].T) @ B_k[w, :r]
 * x, y, A_k [max_slots, max_rank, in_f] and B_k [max_slots, max_rank, out_widths[k]] are
 * bf16 (raw uint16 bits); the shrink result h and each token's delta are fp32, and y is
 * rounded to bf16 once per element (y + delta), not once per rank row.
 *
 * Two builds of the same loops, chosen by the compiler flags (-march=native):
 * - with AVX512-BF16, the shrink uses VDPBF16PS (32 bf16 products per instruction into 16
 *   fp32 lanes) and rounding uses VCVTNEPS2BF16;
 * - without it, bf16 is widened to fp32 by a 16-bit shift (exact) and gcc vectorizes the
 *   fp32 loops; rounding is round-to-nearest-even in integer code.
 * AMX tiles are not used here: a decode segment has a few rows, far below a tile's 16, and
 * the step is bound by reading the slot buffers; long segments (prefill) go to torch, whose
 * oneDNN matmuls use AMX where present (loramux_kernels/cpu_backend.py).
 *
 * Parallelism and determinism as in sgmv.c: threads split the (slice, segment, rank row)
 * items of the shrink evenly, meet at one barrier, then each owns a range of output
 * columns for the expand. Every output element sees the same operations in the same
 * order, whatever the rest of the batch or the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "sgmv_plan.h"
#include "bf16.h"
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

#define LANES 16



/* 1 if this build uses AVX512-BF16 instructions (for the backend's log line and tests). */
int lora_sgmv_bf16_uses_dpbf16(void) { return HAVE_DPBF16; }

#if HAVE_DPBF16
static inline __m512bh load_bh(const bf16 *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }
static inline __m512bh load_bh_tail(const bf16 *p, int n)
{
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), (const void *)p);
}
#endif

/* out[q] = A[q] . x for four rows A[0..3] of length n, in a fixed order (32-element
 * chunks into 16 fp32 lanes, lanes summed in order, then the tail). */
static inline void dot4(const bf16 *restrict a0, const bf16 *restrict a1, const bf16 *restrict a2,
                        const bf16 *restrict a3, const bf16 *restrict x, int n, float out[4],
                        const bf16 *prefetch)
{
#if HAVE_DPBF16
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        if (prefetch) /* 4 lines of the next 4 x n block per 32 columns: all of it by the end */
            for (int q = 0; q < 4; q++) _mm_prefetch((const char *)(prefetch + 4 * k + 32 * q), _MM_HINT_T0);
        const __m512bh xv = load_bh(x + k);
        c0 = _mm512_dpbf16_ps(c0, load_bh(a0 + k), xv);
        c1 = _mm512_dpbf16_ps(c1, load_bh(a1 + k), xv);
        c2 = _mm512_dpbf16_ps(c2, load_bh(a2 + k), xv);
        c3 = _mm512_dpbf16_ps(c3, load_bh(a3 + k), xv);
    }
    if (k < n) {
        const int m = n - k;
        const __m512bh xv = load_bh_tail(x + k, m);
        c0 = _mm512_dpbf16_ps(c0, load_bh_tail(a0 + k, m), xv);
        c1 = _mm512_dpbf16_ps(c1, load_bh_tail(a1 + k, m), xv);
        c2 = _mm512_dpbf16_ps(c2, load_bh_tail(a2 + k, m), xv);
        c3 = _mm512_dpbf16_ps(c3, load_bh_tail(a3 + k, m), xv);
    }
    out[0] = _mm512_reduce_add_ps(c0);
    out[1] = _mm512_reduce_add_ps(c1);
    out[2] = _mm512_reduce_add_ps(c2);
    out[3] = _mm512_reduce_add_ps(c3);
#else
    float c[4][LANES] = {{0}};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) {
            const float xv = bf16_to_f32(x[k + l]);
            c[0][l] += bf16_to_f32(a0[k + l]) * xv;
            c[1][l] += bf16_to_f32(a1[k + l]) * xv;
            c[2][l] += bf16_to_f32(a2[k + l]) * xv;
            c[3][l] += bf16_to_f32(a3[k + l]) * xv;
        }
    float s[4] = {0};
    for (int q = 0; q < 4; q++)
        for (int l = 0; l < LANES; l++) s[q] += c[q][l];
    for (; k < n; k++) {
        const float xv = bf16_to_f32(x[k]);
        s[0] += bf16_to_f32(a0[k]) * xv;
        s[1] += bf16_to_f32(a1[k]) * xv;
        s[2] += bf16_to_f32(a2[k]) * xv;
        s[3] += bf16_to_f32(a3[k]) * xv;
    }
    memcpy(out, s, sizeof s);
#endif
}

/* h[t - t0, j] = scale * (x[t] . A[j]) for j in [j0, j1). A rows past j1 are never read:
 * a remainder group of fewer than four rows repeats its last row (results dropped). */
static void shrink_rows(float *restrict h, int max_rank, const bf16 *restrict x, int64_t x_stride,
                        const bf16 *restrict a, int in_f, int t0, int t1, int j0, int j1, float scale)
{
    for (int j = j0; j < j1; j += 4) {
        const int n = j1 - j < 4 ? j1 - j : 4;
        const bf16 *r0 = a + (int64_t)j * in_f;
        const bf16 *r1 = a + (int64_t)(j + (n > 1 ? 1 : 0)) * in_f;
        const bf16 *r2 = a + (int64_t)(j + (n > 2 ? 2 : n - 1)) * in_f;
        const bf16 *r3 = a + (int64_t)(j + n - 1) * in_f;
        for (int t = t0; t < t1; t++) {
            float d[4];
            /* The first token's pass fetches the next rows ahead (the hardware prefetcher
             * stops at each 4 KiB page; these blocks are a few pages each). */
            const bf16 *next = t == t0 && j + 4 < j1 ? a + (int64_t)(j + 4) * in_f : NULL;
            dot4(r0, r1, r2, r3, x + (int64_t)t * x_stride, in_f, d, next);
            float *hr = h + (int64_t)(t - t0) * max_rank + j;
            for (int q = 0; q < n; q++) hr[q] = d[q] * scale;
        }
    }
}

/* For each token t of a segment and each column c in [c0, c1):
 *   y[t, c] = bf16(y[t, c] + sum_j h[t, j] * B[j, c])   (the sum in fp32, in order of j)
 * Rank rows outside, columns inside: each row of B is read as one long run of up to
 * EXPAND_COLS columns (what the hardware prefetcher streams best; a block of a few
 * columns across all r rows was r short streams at once), into fp32 sums for up to
 * EXPAND_TOKENS tokens that stay in L1/L2. Every sum still adds j = 0, 1, ... in order.
 * Rows of B are fetched EXPAND_PREFETCH_ROWS ahead: a row of a thread's columns is read in
 * less time than a trip to memory (2 rows ahead: ~15% faster than none; 4: the same). */
enum { EXPAND_COLS = 1024, EXPAND_TOKENS = 8, EXPAND_PREFETCH_ROWS = 2 };

static void expand_segment(bf16 *restrict y, int64_t y_stride, const float *restrict h, int max_rank,
                           const bf16 *restrict b, int out, int r, int t0, int t1, int c0, int c1)
{
#if HAVE_DPBF16
    float acc[EXPAND_TOKENS][EXPAND_COLS] __attribute__((aligned(64)));
    for (int cb = c0; cb < c1; cb += EXPAND_COLS) {
        const int n = c1 - cb < EXPAND_COLS ? c1 - cb : EXPAND_COLS;
        const int full = n / LANES * LANES, tail = n - full;
        for (int tb = t0; tb < t1; tb += EXPAND_TOKENS) {
            const int nt = t1 - tb < EXPAND_TOKENS ? t1 - tb : EXPAND_TOKENS;
            for (int t = 0; t < nt; t++) memset(acc[t], 0, sizeof(float) * n);
            for (int j = 0; j < r; j++) {
                const bf16 *br = b + (int64_t)j * out + cb;
                float hj[EXPAND_TOKENS];
                for (int t = 0; t < nt; t++) hj[t] = h[(int64_t)(tb + t - t0) * max_rank + j];
                const bf16 *ahead = j + EXPAND_PREFETCH_ROWS < r ? br + (int64_t)EXPAND_PREFETCH_ROWS * out : NULL;
                for (int c = 0; c < full; c += LANES) {
                    if (ahead && !(c & (2 * LANES - 1))) _mm_prefetch((const char *)(ahead + c), _MM_HINT_T0);
                    const __m512 bv = bf16x16_to_f32(br + c);
                    for (int t = 0; t < nt; t++)
                        _mm512_store_ps(acc[t] + c, _mm512_fmadd_ps(_mm512_set1_ps(hj[t]), bv, _mm512_load_ps(acc[t] + c)));
                }
                if (tail) {
                    const __m512 bv = bf16x16_to_f32_tail(br + full, tail);
                    for (int t = 0; t < nt; t++)
                        _mm512_store_ps(acc[t] + full, _mm512_fmadd_ps(_mm512_set1_ps(hj[t]), bv, _mm512_load_ps(acc[t] + full)));
                }
            }
            for (int t = 0; t < nt; t++) {
                bf16 *yr = y + (int64_t)(tb + t) * y_stride + cb;
                int c = 0;
                for (; c + 2 * LANES <= n; c += 2 * LANES) {
                    const __m512 y0 = _mm512_add_ps(bf16x16_to_f32(yr + c), _mm512_load_ps(acc[t] + c));
                    const __m512 y1 = _mm512_add_ps(bf16x16_to_f32(yr + c + LANES), _mm512_load_ps(acc[t] + c + LANES));
                    _mm512_storeu_si512((void *)(yr + c), (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
                }
                for (; c < n; c += LANES) {
                    const int m = n - c < LANES ? n - c : LANES;
                    const __m512 y0 = _mm512_add_ps(bf16x16_to_f32_tail(yr + c, m), _mm512_load_ps(acc[t] + c));
                    _mm256_mask_storeu_epi16((void *)(yr + c), (__mmask16)((1u << m) - 1), (__m256i)_mm512_cvtneps_pbh(y0));
                }
            }
        }
    }
#else
    enum { BLOCK = 64 };
    for (int cb = c0; cb < c1; cb += BLOCK) {
        const int n = c1 - cb < BLOCK ? c1 - cb : BLOCK;
        for (int t = t0; t < t1; t++) {
            const float *hr = h + (int64_t)(t - t0) * max_rank;
            bf16 *yr = y + (int64_t)t * y_stride + cb;
            float acc[BLOCK] = {0};
            for (int j = 0; j < r; j++) {
                const float hv = hr[j];
                const bf16 *br = b + (int64_t)j * out + cb;
                #pragma omp simd
                for (int c = 0; c < n; c++) acc[c] += hv * bf16_to_f32(br[c]);
            }
            for (int c = 0; c < n; c++) yr[c] = f32_to_bf16(bf16_to_f32(yr[c]) + acc[c]);
        }
    }
#endif
}

void lora_sgmv_bf16(bf16 *y, int64_t y_stride, const bf16 *x, int64_t x_stride, int in_f,
                    const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *rank_ptrs,
                    const int32_t *out_offsets, const int32_t *out_widths, int num_slices,
                    int max_rank,
                    const int32_t *seg_start, const int32_t *seg_end, const int32_t *seg_slot,
                    const float *seg_scale, int num_segs, int num_threads)
{
    SgmvPlan plan;
    if (sgmv_plan_init(&plan, a_ptrs, b_ptrs, rank_ptrs, out_offsets, out_widths, num_slices, max_rank,
                       seg_start, seg_end, seg_slot, num_segs))
        return;
    #pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        SgmvItems run = sgmv_items_of_thread(&plan, tid, nt);
        int k, s, j0, j1;
        while (sgmv_items_next(&plan, &run, &k, &s, &j0, &j1)) {
            const bf16 *a = (const bf16 *)plan.slices[k].a + (int64_t)seg_slot[s] * max_rank * in_f;
            shrink_rows(sgmv_plan_h(&plan, k, s), max_rank, x, x_stride, a, in_f, seg_start[s], seg_end[s], j0, j1,
                        seg_scale[s]);
        }
        #pragma omp barrier
        for (k = 0; k < num_slices; k++) {
            int c0, c1;
            sgmv_thread_columns(&plan, tid, nt, 2 * LANES, k, &c0, &c1);
            if (c0 >= c1) continue;
            const SgmvSlice *slice = &plan.slices[k];
            for (s = 0; s < num_segs; s++) {
                const int slot = seg_slot[s], r = slice->ranks[slot];
                if (r == 0) continue;
                const bf16 *b = (const bf16 *)slice->b + (int64_t)slot * max_rank * slice->out;
                expand_segment(y + slice->out_offset, y_stride, sgmv_plan_h(&plan, k, s), max_rank, b, slice->out, r,
                            seg_start[s], seg_end[s], c0, c1);
            }
        }
    }
    sgmv_plan_free(&plan);
}
