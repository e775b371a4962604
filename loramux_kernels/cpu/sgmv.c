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

#define LANES 16

typedef struct {
    const float *a;       /* [max_slots, max_rank, in_f] */
    const float *b;       /* [max_slots, max_rank, out] */
    const int32_t *ranks; /* [max_slots] */
    int out_offset, out;
} Slice;

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
    Slice slices[8];
    if (num_slices > 8 || num_segs <= 0) return;
    for (int k = 0; k < num_slices; k++) {
        slices[k].a = (const float *)(intptr_t)a_ptrs[k];
        slices[k].b = (const float *)(intptr_t)b_ptrs[k];
        slices[k].ranks = (const int32_t *)(intptr_t)rank_ptrs[k];
        slices[k].out_offset = out_offsets[k];
        slices[k].out = out_widths[k];
    }
    /* Phase 1 (shrink): work items are (slice, segment, rank row), split evenly.
     * Phase 2 (expand): each thread owns a contiguous range of the fused output columns. */
    int64_t *item_start = malloc(sizeof(int64_t) * (num_slices * num_segs + 1));
    int64_t *h_row = malloc(sizeof(int64_t) * (num_segs + 1));
    int total_cols = 0;
    for (int k = 0; k < num_slices; k++) total_cols += slices[k].out;
    int64_t items = 0, rows = 0;
    for (int s = 0; s < num_segs; s++) {
        h_row[s] = rows;
        rows += seg_end[s] - seg_start[s];
    }
    h_row[num_segs] = rows;
    for (int k = 0; k < num_slices; k++)
        for (int s = 0; s < num_segs; s++) {
            item_start[k * num_segs + s] = items;
            items += slices[k].ranks[seg_slot[s]];
        }
    item_start[num_slices * num_segs] = items;
    /* h for slice k, segment s: rows h_row[s].., at offset k * rows * max_rank. */
    float *h = malloc(sizeof(float) * (rows > 0 ? rows : 1) * max_rank * num_slices + 1);
    if (!item_start || !h_row || !h) { free(item_start); free(h_row); free(h); return; }
    #pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t g0 = items * tid / nt, g1 = items * (tid + 1) / nt;
        int ks = 0;
        while (g0 < g1 && item_start[ks + 1] <= g0) ks++;
        for (int64_t g = g0; g < g1;) {
            while (item_start[ks + 1] <= g) ks++;
            const int k = ks / num_segs, s = ks % num_segs;
            const int64_t j0 = g - item_start[ks];
            const int64_t j1 = (item_start[ks + 1] < g1 ? item_start[ks + 1] : g1) - item_start[ks];
            const int slot = seg_slot[s];
            shrink_rows(h + ((int64_t)k * rows + h_row[s]) * max_rank, max_rank, x, x_stride,
                        slices[k].a + (int64_t)slot * max_rank * in_f, in_f,
                        seg_start[s], seg_end[s], (int)j0, (int)j1, seg_scale[s]);
            g += j1 - j0;
        }
        #pragma omp barrier
        const int units = (total_cols + LANES - 1) / LANES;
        const int c_lo = units * tid / nt * LANES, c_hi = units * (tid + 1) / nt * LANES;
        int base = 0;
        for (int k = 0; k < num_slices; k++) {
            const int out = slices[k].out;
            const int c0 = c_lo - base > 0 ? c_lo - base : 0;
            const int c1 = c_hi - base < out ? c_hi - base : out;
            base += out;
            if (c0 >= c1) continue;
            for (int s = 0; s < num_segs; s++) {
                const int slot = seg_slot[s], r = slices[k].ranks[slot];
                if (r == 0) continue;
                expand_rows(y + slices[k].out_offset, y_stride, h + ((int64_t)k * rows + h_row[s]) * max_rank,
                            max_rank, slices[k].b + (int64_t)slot * max_rank * out, out, r,
                            seg_start[s], seg_end[s], c0, c1);
            }
        }
    }
    free(item_start);
    free(h_row);
    free(h);
}
