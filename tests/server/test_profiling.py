"""The step profiler (bench-engine --profile): every phase of a step is timed, the phases add
up to the step, the engine's output is unchanged, and detaching restores the engine; and the
step's metadata reaches the device in one copy (loramux_kernels/staging.py)."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.metadata import build_lora_batch_info
from loramux.kernels.staging import DeviceUpload
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.profiling import PHASES, attach_step_profiler
from tests.engine_fixtures import build_core
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    directory, hf = tiny_chat_model
    out = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_peft_adapter(hf, AdapterRecipe("alpha", r=8, seed=1, b_std=0.2), out)}


def _requests(tokenizer):
    ids = tokenizer("Tell me about the sea, please.", add_special_tokens=False).input_ids
    return [OfflineRequest(ids, GREEDY, None), OfflineRequest(ids[:5], GREEDY, "alpha")]


def test_profile_times_every_phase_and_leaves_the_output_unchanged(tiny_chat_model, smol_tokenizer, adapters):
    core = build_core(tiny_chat_model[0], smol_tokenizer, adapters)
    plain = [r.token_ids for r in OfflineEngine(core).generate(_requests(smol_tokenizer))]
    backends = (core.runner.model.lora_backend, core.runner.model.attention_backend)
    profiler = attach_step_profiler(core)
    profiled = [r.token_ids for r in OfflineEngine(core).generate(_requests(smol_tokenizer))]
    profiler.detach()
    assert profiled == plain
    profile = profiler.profile
    assert profile.num_steps >= GREEDY.max_tokens  # one prefill step, then decodes
    for phase in PHASES:
        assert profile.seconds[phase] > 0, phase
    # Nested phases are not counted twice: the phases add up to at most the step time.
    assert sum(profile.seconds.values()) <= profile.total_s * 1.001
    summary = profile.summary()
    assert set(summary["phases"]) == {*PHASES, "other"}
    assert summary["phases"]["forward"]["share"] > 0 and "attention" in profile.table()
    # Detached: the engine and the model's backends are as they were.
    assert (core.runner.model.lora_backend, core.runner.model.attention_backend) == backends
    assert "step" not in vars(core) and "schedule" not in vars(core.scheduler)
    steps = profile.num_steps
    OfflineEngine(core).generate(_requests(smol_tokenizer))
    assert profile.num_steps == steps


def test_cpu_steps_make_no_host_to_device_copies():
    upload = DeviceUpload("cpu")
    a = torch.arange(5, dtype=torch.int64)
    handle = upload.add(a)
    upload.send()
    assert upload.get(handle) is a and upload.num_copies == 0


def test_upload_refuses_misuse():
    upload = DeviceUpload("cpu")
    with pytest.raises(RuntimeError, match="before send"):
        upload.get(upload.add(torch.zeros(1)))
    upload.send()
    with pytest.raises(RuntimeError, match="after send"):
        upload.add(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_copy_carries_pieces_of_every_dtype_to_the_device():
    upload = DeviceUpload("cuda")
    pieces = [torch.arange(3, dtype=torch.int32), torch.tensor([1.5, -2.0]), torch.arange(7, dtype=torch.int64).view(7, 1)]
    handles = [upload.add(p) for p in pieces]
    upload.send()
    assert upload.num_copies == 1
    for piece, handle in zip(pieces, handles):
        got = upload.get(handle)
        assert got.device.type == "cuda" and got.dtype == piece.dtype and torch.equal(got.cpu(), piece)
    info = build_lora_batch_info([0, -1, 0], [2, 1, 3], device="cuda")
    assert info.seg_indptr.device.type == "cuda" and info.seg_indptr.tolist() == [0, 2, 3, 6]
