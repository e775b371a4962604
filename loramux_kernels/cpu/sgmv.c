/* Segmented gather matmul for LoRA on the CPU, fp32 (the decode-heavy path).
 *
 * Semantics, for each listed segment i (slot w = seg_slot[i]) and each output slice k
 * (columns out_offsets[k] .. + out_widths[k] of y), with r = ranks_k[w]:
 *   y[seg_start[i]:seg_end[i], slice k] += seg_scale[i] * (x[rows] @ A_k[w, :r].T) @ B_k[w, :r]
 * A_k: [max_slots, max_rank, in_f] and B_k: [max_slots, max_rank, out_widths[k]], both
 * contiguous (loramux_kernels/buffers.py). x and y are row-major with the given row strides.
 * Slices share x: one call serves a fused projection (q/k/v, or gate/up).
 *
 * Why hand-written: a decode step has a few tokens per adapter, so torch spends its time
 * dispatching hundreds of tiny matmuls, and a masked dense product does work for every
 * adapter on every token. Here each adapter's A and B rows are streamed from memory once
 * per call and each token costs only its own rank.
 *
 * Parallelism: threads split the (slice, segment, rank row) items of the shrink evenly,
 * meet at one barrier, then each owns a range of output columns for the expand. Every
 * output element sees the same operations in the same order, so the result does not
 * depend on the rest of the batch or on the thread count. (Giving each thread whole
 * segments instead, with no barrier, measured no faster at decode.)
 * Links against the OpenMP runtime torch already loaded (same soname), so it shares
 * torch's threads instead of fighting them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#include "sgmv_plan.h"

#define LANES 16


/* A dot product whose summation order is fixed by the source (LANES partial sums, then
 * summed in order), so it does not depend on alignment or on the rest of the batch;
 * gcc turns the lane loop into vector FMAs. */
static inline float dot(const float *restrict a, const float *restrict b, int n)
{
    float acc[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * b[k + l];
    float sum = 0.f;
    for (int l = 0; l < LANES; l++) sum += acc[l];
    for (; k < n; k++) sum += a[k] * b[k];
    return sum;
}

/* Four dot products of rows a0..a3 with the same b, each in the same order as dot(). */
static inline void dot4(const float *restrict a0, const float *restrict a1, const float *restrict a2,
                        const float *restrict a3, const float *restrict b, int n, float out[4])
{
    float c0[LANES] = {0}, c1[LANES] = {0}, c2[LANES] = {0}, c3[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) {
            const float bv = b[k + l];
            c0[l] += a0[k + l] * bv;
            c1[l] += a1[k + l] * bv;
            c2[l] += a2[k + l] * bv;
            c3[l] += a3[k + l] * bv;
        }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int l = 0; l < LANES; l++) {
        s0 += c0[l];
        s1 += c1[l];
        s2 += c2[l];
        s3 += c3[l];
    }
    for (; k < n; k++) {
        s0 += a0[k] * b[k];
        s1 += a1[k] * b[k];
        s2 += a2[k] * b[k];
        s3 += a3[k] * b[k];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* y[t, c0:c1] += h[t, j] * B[j, c0:c1] for j < r, in order of j. Four B rows are streamed
 * at once (more memory parallelism, one y read and write per four rows); each element
 * still sees its products added one row at a time, in order. */
static inline void expand_rows(float *restrict y, int64_t y_stride, const float *restrict h,
                               int max_rank, const float *restrict b, int out, int r,
                               int t0, int t1, int c0, int c1)
{
    int j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *b0 = b + (int64_t)j * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;
        for (int t = t0; t < t1; t++) {
            float *yr = y + (int64_t)t * y_stride;
            const float *hr = h + (int64_t)(t - t0) * max_rank + j;
            const float h0 = hr[0], h1 = hr[1], h2 = hr[2], h3 = hr[3];
            #pragma omp simd
            for (int c = c0; c < c1; c++) yr[c] = (((yr[c] + h0 * b0[c]) + h1 * b1[c]) + h2 * b2[c]) + h3 * b3[c];
        }
    }
    for (; j < r; j++) {
        const float *br = b + (int64_t)j * out;
        for (int t = t0; t < t1; t++) {
            float *yr = y + (int64_t)t * y_stride;
            const float hv = h[(int64_t)(t - t0) * max_rank + j];
            #pragma omp simd
            for (int c = c0; c < c1; c++) yr[c] += hv * br[c];
        }
    }
}

/* h[t - t0, j] = scale * (x[t] . A[j]) for j in [j0, j1); four A rows at a time. */
static inline void shrink_rows(float *restrict h, int max_rank, const float *restrict x,
                               int64_t x_stride, const float *restrict a, int in_f,
                               int t0, int t1, int j0, int j1, float scale)
{
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *ar = a + (int64_t)j * in_f;
        for (int t = t0; t < t1; t++) {
            float d[4];
            dot4(ar, ar + in_f, ar + 2 * in_f, ar + 3 * in_f, x + (int64_t)t * x_stride, in_f, d);
            float *hr = h + (int64_t)(t - t0) * max_rank + j;
            hr[0] = d[0] * scale, hr[1] = d[1] * scale, hr[2] = d[2] * scale, hr[3] = d[3] * scale;
        }
    }
    for (; j < j1; j++) {
        const float *ar = a + (int64_t)j * in_f;
        for (int t = t0; t < t1; t++)
            h[(int64_t)(t - t0) * max_rank + j] = dot(ar, x + (int64_t)t * x_stride, in_f) * scale;
    }
}

void lora_sgmv_f32(float *y, int64_t y_stride, const float *x, int64_t x_stride, int in_f,
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
            const float *a = (const float *)plan.slices[k].a + (int64_t)seg_slot[s] * max_rank * in_f;
            shrink_rows(sgmv_plan_h(&plan, k, s), max_rank, x, x_stride, a, in_f, seg_start[s], seg_end[s], j0, j1,
                        seg_scale[s]);
        }
        #pragma omp barrier
        for (k = 0; k < num_slices; k++) {
            int c0, c1;
            sgmv_thread_columns(&plan, tid, nt, LANES, k, &c0, &c1);
            if (c0 >= c1) continue;
            const SgmvSlice *slice = &plan.slices[k];
            for (s = 0; s < num_segs; s++) {
                const int slot = seg_slot[s], r = slice->ranks[slot];
                if (r == 0) continue;
                const float *b = (const float *)slice->b + (int64_t)slot * max_rank * slice->out;
                expand_rows(y + slice->out_offset, y_stride, sgmv_plan_h(&plan, k, s), max_rank, b, slice->out, r,
                            seg_start[s], seg_end[s], c0, c1);
            }
        }
    }
    sgmv_plan_free(&plan);
}
