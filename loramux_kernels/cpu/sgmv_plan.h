/* The work split both SGMV kernels share (sgmv.c fp32, sgmv_bf16.c bf16): which shrink
 * items and which output columns each thread takes, and where the shrink results go.
 *
 * Shrink items are (slice k, segment s, rank row j), numbered slice-major; thread tid of nt
 * takes items [items * tid / nt, items * (tid + 1) / nt). The expand splits the fused
 * output columns (all slices side by side) into equal runs of whole `unit`s, so threads
 * never share a store. h, the fp32 shrink result, holds rows [h_row[s], h_row[s + 1]) of
 * slice k at offset k * rows * max_rank. The split depends only on the step's shape, so
 * every output element sees the same operations in the same order.
 */
#ifndef LORAMUX_SGMV_PLAN_H
#define LORAMUX_SGMV_PLAN_H

#include <stdint.h>
#include <stdlib.h>

#define SGMV_MAX_SLICES 8

typedef struct {
    const void *a;        /* [max_slots, max_rank, in_f] of the kernel's dtype */
    const void *b;        /* [max_slots, max_rank, out] */
    const int32_t *ranks; /* [max_slots] */
    int out_offset, out;
} SgmvSlice;

typedef struct {
    SgmvSlice slices[SGMV_MAX_SLICES];
    int num_slices, num_segs, max_rank, total_cols;
    int64_t items, rows;
    int64_t *item_start; /* [num_slices * num_segs + 1]: first item of (k, s) */
    int64_t *h_row;      /* [num_segs + 1]: first row of segment s in h */
    float *h;            /* fp32 [num_slices, rows, max_rank] */
} SgmvPlan;

/* 0, or -1 (nothing to do, too many slices, or no memory): then nothing is allocated. */
static int sgmv_plan_init(SgmvPlan *p, const int64_t *a_ptrs, const int64_t *b_ptrs, const int64_t *rank_ptrs,
                          const int32_t *out_offsets, const int32_t *out_widths, int num_slices, int max_rank,
                          const int32_t *seg_start, const int32_t *seg_end, const int32_t *seg_slot, int num_segs)
{
    if (num_slices > SGMV_MAX_SLICES || num_segs <= 0) return -1;
    p->num_slices = num_slices, p->num_segs = num_segs, p->max_rank = max_rank, p->total_cols = 0;
    for (int k = 0; k < num_slices; k++) {
        p->slices[k].a = (const void *)(intptr_t)a_ptrs[k];
        p->slices[k].b = (const void *)(intptr_t)b_ptrs[k];
        p->slices[k].ranks = (const int32_t *)(intptr_t)rank_ptrs[k];
        p->slices[k].out_offset = out_offsets[k];
        p->slices[k].out = out_widths[k];
        p->total_cols += out_widths[k];
    }
    p->item_start = malloc(sizeof(int64_t) * (num_slices * num_segs + 1));
    p->h_row = malloc(sizeof(int64_t) * (num_segs + 1));
    if (!p->item_start || !p->h_row) { free(p->item_start); free(p->h_row); return -1; }
    p->items = 0, p->rows = 0;
    for (int s = 0; s < num_segs; s++) {
        p->h_row[s] = p->rows;
        p->rows += seg_end[s] - seg_start[s];
    }
    p->h_row[num_segs] = p->rows;
    for (int k = 0; k < num_slices; k++)
        for (int s = 0; s < num_segs; s++) {
            p->item_start[k * num_segs + s] = p->items;
            p->items += p->slices[k].ranks[seg_slot[s]];
        }
    p->item_start[num_slices * num_segs] = p->items;
    p->h = malloc(sizeof(float) * (p->rows > 0 ? p->rows : 1) * max_rank * num_slices + 1);
    if (!p->h) { free(p->item_start); free(p->h_row); return -1; }
    return 0;
}

static void sgmv_plan_free(SgmvPlan *p)
{
    free(p->item_start);
    free(p->h_row);
    free(p->h);
}

/* The shrink results of slice k, segment s: [segment rows, max_rank]. */
static inline float *sgmv_plan_h(const SgmvPlan *p, int k, int s)
{
    return p->h + ((int64_t)k * p->rows + p->h_row[s]) * p->max_rank;
}

/* A thread's run of shrink items, walked one (k, s) group at a time. */
typedef struct {
    int64_t g, g1;
    int ks;
} SgmvItems;

static inline SgmvItems sgmv_items_of_thread(const SgmvPlan *p, int tid, int nt)
{
    SgmvItems it = {p->items * tid / nt, p->items * (tid + 1) / nt, 0};
    return it;
}

/* The next group of the run: rows [*j0, *j1) of slice *k, segment *s; 0 when done. */
static inline int sgmv_items_next(const SgmvPlan *p, SgmvItems *it, int *k, int *s, int *j0, int *j1)
{
    if (it->g >= it->g1) return 0;
    while (p->item_start[it->ks + 1] <= it->g) it->ks++;
    const int64_t first = p->item_start[it->ks], next = p->item_start[it->ks + 1];
    *k = it->ks / p->num_segs, *s = it->ks % p->num_segs;
    *j0 = (int)(it->g - first);
    *j1 = (int)((next < it->g1 ? next : it->g1) - first);
    it->g += *j1 - *j0;
    return 1;
}

/* Columns [*c0, *c1) of slice k that thread tid of nt owns in the expand (empty: c0 >= c1). */
static inline void sgmv_thread_columns(const SgmvPlan *p, int tid, int nt, int unit, int k, int *c0, int *c1)
{
    const int units = (p->total_cols + unit - 1) / unit;
    const int c_lo = units * tid / nt * unit, c_hi = units * (tid + 1) / nt * unit;
    int base = 0;
    for (int i = 0; i < k; i++) base += p->slices[i].out;
    const int out = p->slices[k].out;
    *c0 = c_lo - base > 0 ? c_lo - base : 0;
    *c1 = c_hi - base < out ? c_hi - base : out;
}

#endif
