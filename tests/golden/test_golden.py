"""The golden run (see run_golden.py) as part of the default suite: 16 requests, 8 adapters."""

from __future__ import annotations

from tests.engine_fixtures import default_model_or_skip
from tests.golden.run_golden import LOGIT_ATOL, run_golden


def test_golden_batch_matches_transformers_peft(tmp_path):
    model_dir = default_model_or_skip()
    results = run_golden(model_dir, tmp_path)
    assert len(results) == 16
    for r in results:
        assert r.match, f"{r.request_id} ({r.adapter}): token mismatch at step {r.first_mismatch}"
        assert r.max_abs_logit_diff <= LOGIT_ATOL, f"{r.request_id}: logits differ by {r.max_abs_logit_diff}"
    # Every adapter moves the logits: a match is not two no-ops agreeing.
    assert min(r.adapter_effect for r in results if r.adapter) > 0.05
