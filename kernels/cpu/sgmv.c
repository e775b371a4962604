/* Segmented gather matmul for LoRA on the CPU, fp32 (the decode-heavy path).
 *
 * Semantics, for each listed segment i with slot w = seg_slot[i] and r = ranks[w]:
 *   y[seg_start[i]:seg_end[i]] += seg_scale[i] * (x[rows] @ A[w, :r].T) @ B[w, :r]
 * A: [max_slots, max_rank, in_f], B: [max_slots, max_rank, out_f], both contiguous.
 * y and x are row-major with the given row strides (y may be a column slice of a wider
 * output: pass the slice's first element and the full row stride).
 *
 * Why hand-written: a decode step has a few tokens per adapter, so torch spends its time
 * dispatching hundreds of tiny matmuls, and a masked dense product does work for every
 * adapter on every token. Here each adapter's A and B are streamed from memory once per
 * call, each token costs only its own rank, and the per-token arithmetic order does not
 * depend on what else is in the batch (batch-invariant results).
 * Links against the OpenMP runtime torch already loaded (same soname), so it shares
 * torch's threads instead of fighting them.
 */
#include <stdint.h>
#include <stdlib.h>

#define COLUMN_BLOCK 128
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

void lora_sgmv_f32(float *restrict y, int64_t y_stride,
                   const float *restrict x, int64_t x_stride,
                   int in_f, int out_f,
                   const float *restrict A, const float *restrict B, int max_rank,
                   const int32_t *ranks,
                   const int32_t *seg_start, const int32_t *seg_end,
                   const int32_t *seg_slot, const float *seg_scale, int num_segs,
                   int num_threads)
{
    /* h rows follow the listed segments' rows, packed: h_row[i] = first row of segment i. */
    int64_t *h_row = malloc(sizeof(int64_t) * (num_segs + 1));
    int64_t *shrink_start = malloc(sizeof(int64_t) * (num_segs + 1));
    if (!h_row || !shrink_start) { free(h_row); free(shrink_start); return; }
    int64_t rows = 0, shrink_items = 0;
    for (int i = 0; i < num_segs; i++) {
        h_row[i] = rows;
        shrink_start[i] = shrink_items;
        rows += seg_end[i] - seg_start[i];
        shrink_items += ranks[seg_slot[i]];
    }
    h_row[num_segs] = rows;
    shrink_start[num_segs] = shrink_items;
    float *h = malloc(sizeof(float) * (rows > 0 ? rows : 1) * (max_rank > 0 ? max_rank : 1));
    if (!h) { free(h_row); free(shrink_start); return; }

    const int64_t a_slot = (int64_t)max_rank * in_f, b_slot = (int64_t)max_rank * out_f;
    const int num_col_blocks = (out_f + COLUMN_BLOCK - 1) / COLUMN_BLOCK;

    #pragma omp parallel num_threads(num_threads)
    {
        /* Shrink: one work item per (segment, rank row); the A row is read once and
         * dotted with every token of the segment. */
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < shrink_items; g++) {
            int i = 0;
            while (shrink_start[i + 1] <= g) i++;
            const int j = (int)(g - shrink_start[i]);
            const float *a = A + seg_slot[i] * a_slot + (int64_t)j * in_f;
            for (int t = seg_start[i]; t < seg_end[i]; t++) {
                const float *xr = x + (int64_t)t * x_stride;
                h[(h_row[i] + t - seg_start[i]) * max_rank + j] = dot(a, xr, in_f) * seg_scale[i];
            }
        }
        /* Expand: threads own column blocks of y, so no two write the same element. */
        #pragma omp for schedule(static)
        for (int cb = 0; cb < num_col_blocks; cb++) {
            const int c0 = cb * COLUMN_BLOCK;
            const int c1 = c0 + COLUMN_BLOCK < out_f ? c0 + COLUMN_BLOCK : out_f;
            for (int i = 0; i < num_segs; i++) {
                const int r = ranks[seg_slot[i]];
                const float *b = B + seg_slot[i] * b_slot;
                for (int t = seg_start[i]; t < seg_end[i]; t++) {
                    float *yr = y + (int64_t)t * y_stride;
                    const float *hr = h + (h_row[i] + t - seg_start[i]) * max_rank;
                    for (int j = 0; j < r; j++) {
                        const float *br = b + (int64_t)j * out_f;
                        const float hv = hr[j];
                        #pragma omp simd
                        for (int c = c0; c < c1; c++) yr[c] += hv * br[c];
                    }
                }
            }
        }
    }
    free(h);
    free(h_row);
    free(shrink_start);
}
