"""SchedulerConfig validation."""

import dataclasses
import math

import pytest

from loramux.scheduler.config import SchedulerConfig, SchedulerConfigError


def test_defaults_are_valid_and_frozen():
    config = SchedulerConfig()
    assert config.block_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 3  # type: ignore[misc]


def test_eos_ids_are_frozen_from_any_iterable():
    config = SchedulerConfig(eos_token_ids=[2, 3, 2])  # type: ignore[arg-type]
    assert config.eos_token_ids == frozenset({2, 3})


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_num_batched_tokens", 0),
        ("max_num_seqs", 0),
        ("num_kv_blocks", 0),
        ("block_size", 0),
        ("max_model_len", 1),
        ("max_loras", 0),
        ("long_prefill_token_threshold", -1),
        ("starvation_bound_s", 0.0),
        ("starvation_bound_s", math.nan),
        ("eos_token_ids", frozenset({-1})),
        ("eos_token_ids", frozenset({"2"})),
    ],
)
def test_out_of_range_values_are_rejected(field, value):
    with pytest.raises(SchedulerConfigError):
        SchedulerConfig(**{field: value})


def test_one_full_length_request_must_fit_in_the_kv_cache():
    SchedulerConfig(num_kv_blocks=8, block_size=16, max_model_len=128)
    with pytest.raises(SchedulerConfigError, match="num_kv_blocks"):
        SchedulerConfig(num_kv_blocks=7, block_size=16, max_model_len=128)


def test_infinite_starvation_bound_disables_the_barrier():
    assert SchedulerConfig(starvation_bound_s=math.inf).starvation_bound_s == math.inf


def test_scheduler_package_is_pure_python():
    import subprocess
    import sys

    code = (
        "import sys, loramux.scheduler, loramux.scheduler.scheduler\n"
        "rooms = ('torch', 'triton', 'loramux.server', 'loramux.kernels', 'loramux.adapter_store')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in rooms or '.'.join(m.split('.')[:2]) in rooms]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
