"""Triton SGMV / BGMV LoRA kernels for the CUDA path (one kernel per module).

    common.py        LoraSliceTable (the slices' buffers as one device table), SgmvTiles,
                     kernel configs and input checks
    sgmv_shrink.py   h = x @ A.T per segment           (prefill, mixed batches)
    sgmv_expand.py   y += scale * h @ B per segment    (one launch for all output slices)
    bgmv_shrink.py   the same shrink, one adapter per token (decode)
    bgmv_expand.py   the same expand, one adapter per token (decode)

Only loramux_kernels/triton_backend.py imports these modules; nothing on the CPU path does, so CPU
serving never needs Triton. This package's __init__ imports nothing.
"""
