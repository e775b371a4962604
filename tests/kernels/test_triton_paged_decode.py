"""The Triton paged decode kernel against the dense reference (interpreter on CPU, or a GPU):
GQA, odd head sizes and block sizes, windows, soft-capping, fp32 / fp16 / bf16; and the
Triton attention backend against the torch one over a mixed prefill + decode step.
Shapes stay tiny: the interpreter is ~1000x slower than a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from loramux.kernels.attention.torch_paged import TorchPagedAttention  # noqa: E402
from loramux.kernels.attention.triton_paged import TritonPagedAttention  # noqa: E402
from loramux.kernels.triton.paged_decode import paged_decode  # noqa: E402
from tests.kernels.test_attention import dense_reference  # noqa: E402
from tests.kernels.test_paged_decode import LAYERS, _context, _decode_metadata, _paged_case  # noqa: E402

pytestmark = pytest.mark.triton

TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(4, 2, 16, 4), (3, 1, 12, 5)], ids=["gqa", "mqa-odd"])
def test_triton_paged_decode_matches_the_dense_reference(
    triton_device, dtype, layer_name, heads, kv_heads, dim, block_size
):
    layer = LAYERS[layer_name]
    context_lens = [1, 6, 37]  # 37: two BLOCK_N chunks, past every window
    q, k_cache, v_cache, tables = _paged_case(context_lens, heads, kv_heads, dim, block_size, dtype)
    rows, block_tables, lens = _decode_metadata(context_lens, tables, block_size)
    out = torch.full_like(q, float("nan"))
    on = {"device": triton_device}
    out_d = out.to(**on)
    paged_decode(
        out_d, q.to(**on), k_cache.to(**on), v_cache.to(**on), rows.to(**on), block_tables.to(**on), lens.to(**on),
        layer.scale, layer.window, layer.softcap,
    )  # fmt: skip
    out = out_d.cpu()
    for i, n in enumerate(context_lens):
        expected = dense_reference(
            q[i : i + 1].float(), _context(k_cache, tables[i], n).float(), _context(v_cache, tables[i], n).float(),
            torch.tensor([n - 1]), layer,
        )  # fmt: skip
        torch.testing.assert_close(out[i].float().reshape(1, -1), expected, **TOLERANCE[dtype])


def test_triton_backend_matches_the_torch_backend(triton_device):
    """One step of a prefill chunk and two decodes: same cache writes, same outputs."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    layer = LAYERS["window+softcap"]
    tables = [[5, 1, 7], [0, 3], [2, 4, 6]]
    starts, counts = [0, 6, 9], [5, 1, 1]
    num_tokens = sum(counts)
    q = torch.randn(num_tokens, heads, dim)
    k = torch.randn(num_tokens, kv_heads, dim)
    v = torch.randn(num_tokens, kv_heads, dim)
    base_k = torch.randn(8, block, kv_heads, dim)  # earlier context of the decodes
    base_v = torch.randn(8, block, kv_heads, dim)
    outs, caches = {}, {}
    for name, impl, device in (("triton", TritonPagedAttention(), triton_device), ("torch", TorchPagedAttention(), "cpu")):
        k_cache, v_cache = base_k.clone().to(device), base_v.clone().to(device)
        meta = impl.build_metadata(starts, counts, tables, block, [layer.window], torch.device(device))
        outs[name] = impl.forward(q.to(device), k.to(device), v.to(device), k_cache, v_cache, meta, layer).cpu()
        caches[name] = (k_cache.cpu(), v_cache.cpu())
    assert torch.equal(caches["triton"][0], caches["torch"][0])
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=1e-5)
