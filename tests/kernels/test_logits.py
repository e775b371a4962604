"""lm_head_logits: fp32 logits of a bf16 lm_head, the likeliest candidates exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramux.kernels.logits import REFINE_TOP, lm_head_logits


def test_fp32_is_a_plain_linear():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 64, generator=gen), torch.randn(300, 64, generator=gen)
    assert torch.equal(lm_head_logits(hidden, weight), F.linear(hidden, weight))


def test_bf16_top_candidates_are_exact_fp32_dot_products():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 96, generator=gen).bfloat16()
    weight = torch.randn(500, 96, generator=gen).bfloat16()
    exact = hidden.float() @ weight.float().T  # [7, 500]
    logits = lm_head_logits(hidden, weight)
    assert logits.dtype == torch.float32 and logits.shape == (7, 500)
    top = logits.topk(REFINE_TOP, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), atol=1e-4, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # The rest stays the bf16 linear's (rounded) values.
    plain = F.linear(hidden, weight).float()
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(logits[mask], plain[mask])


def test_bf16_near_ties_follow_fp32():
    """Two tokens whose logits differ by less than a bf16 step: the argmax is fp32's."""
    hidden = torch.ones(1, 2, dtype=torch.bfloat16)
    weight = torch.tensor([[10.0, 10.0], [10.0, 10.0625], [1.0, 1.0]], dtype=torch.bfloat16)  # 20 vs 20.0625
    assert F.linear(hidden, weight).float()[0, 0] == F.linear(hidden, weight).float()[0, 1]  # rounded: a tie
    assert lm_head_logits(hidden, weight).argmax(-1).item() == 1
    assert lm_head_logits(hidden[:0], weight).shape == (0, 3)
