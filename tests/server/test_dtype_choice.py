"""`--dtype auto`: bf16 on CUDA and on CPUs whose bf16 GEMMs are native and measured faster,
fp32 elsewhere; the default of ModelConfig and of `loramux serve`."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from loramux.server import dtype_choice
from loramux.server.config import DTYPES, ConfigError, ModelConfig
from loramux.server.dtype_choice import probe_cpu_dtype, resolve_dtype
from loramux.server.serve import add_serve_arguments


def test_auto_is_the_default():
    assert ModelConfig(model_dir="m", served_model_name="m").dtype == "auto"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args([]).dtype == "auto"
    assert parser.parse_args(["--dtype", "float32"]).dtype == "float32"


def test_auto_must_be_resolved_before_use():
    config = ModelConfig(model_dir="m", served_model_name="m")
    with pytest.raises(ConfigError, match="auto"):
        config.torch_dtype
    resolved = config.resolved()
    assert resolved.dtype in DTYPES and resolved.torch_dtype == DTYPES[resolved.dtype]
    explicit = ModelConfig(model_dir="m", served_model_name="m", dtype="float32")
    assert explicit.resolved() is explicit and explicit.torch_dtype == torch.float32


def test_unknown_dtype_is_rejected():
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(model_dir="m", served_model_name="m", dtype="int8")


def test_cuda_gets_bf16_without_probing(monkeypatch):
    monkeypatch.setattr(dtype_choice, "probe_cpu_dtype", lambda: pytest.fail("probed on CUDA"))
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"


def test_explicit_dtype_is_kept():
    for name in DTYPES:
        assert resolve_dtype(name, "cpu") == name


def test_cpu_without_native_bf16_gets_fp32_without_probing(monkeypatch):
    monkeypatch.setattr(dtype_choice, "_linear_seconds", lambda *a: pytest.fail("probed without native bf16"))
    choice = probe_cpu_dtype(frozenset({"avx2", "fma", "avx512f"}))
    assert choice.dtype == "float32" and "no native bf16" in choice.reason


@pytest.mark.parametrize(
    "fp32_s,bf16_s,expected",
    [(1e-3, 1e-4, "bfloat16"), (1e-4, 1e-3, "float32"), (1e-4, 0.95e-4, "float32")],  # a near tie stays fp32
)
def test_cpu_with_native_bf16_follows_the_probe(monkeypatch, fp32_s, bf16_s, expected):
    timings = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
    monkeypatch.setattr(dtype_choice, "_linear_seconds", lambda dtype, repeats: timings[dtype])
    for flags in ({"avx512_bf16"}, {"amx_bf16", "amx_tile"}):
        choice = probe_cpu_dtype(frozenset(flags))
        assert choice.dtype == expected
        assert "fp32" in choice.reason and "bf16" in choice.reason  # the figures are in the log line


def test_real_probe_is_logged(caplog):
    """On this machine: a real probe (no mock), its choice and figures in one log line."""
    with caplog.at_level(logging.INFO, logger="loramux.server.dtype_choice"):
        chosen = resolve_dtype("auto", "cpu")
    assert chosen in ("float32", "bfloat16")
    assert any(f"dtype auto -> {chosen}" in r.getMessage() for r in caplog.records)
    has_native = bool({"amx_bf16", "avx512_bf16"} & dtype_choice.cpu_flags())
    if not has_native:
        assert chosen == "float32"
