"""TritonLoraBackend: the add_lora protocol, its SGMV/BGMV dispatch, and the model forward."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

import loramux.kernels.triton_backend as triton_backend  # noqa: E402
from loramux.kernels.backend import select_backend  # noqa: E402
from loramux.kernels.metadata import build_lora_batch_info  # noqa: E402
from loramux.kernels.reference import add_lora_reference  # noqa: E402
from loramux.kernels.triton_backend import BGMV_MAX_SEG_LEN, TritonLoraBackend  # noqa: E402
from tests.kernels.layouts import LAYOUTS, segment_layout  # noqa: E402
from tests.kernels.test_triton_kernels import TOLERANCES, Case  # noqa: E402

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_matches_reference(triton_device, layout):
    """The backend's own dispatch over every layout, a fused qkv-like projection, mixed ranks."""
    seqs = segment_layout(layout, 14, seed=8)
    case = Case(seqs, 200, [64, 32, 32], [16, 16, 16], torch.float32, triton_device, seed=8)
    backend = TritonLoraBackend()
    backend.prepare(case.info)
    backend.add_lora(case.y, case.x, case.slices, case.info)
    torch.testing.assert_close(case.y.cpu(), case.expected_y, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("bgmv_max_seg_len", [0, 1000], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_segment_scales(triton_device, bgmv_max_seg_len, dtype):
    seqs = [(0, 2), (0, 1), (2, 3), (-1, 1), (5, 2)]
    case = Case(seqs, 200, [40, 24], [8, 8], dtype, triton_device, seed=9, scales=[1.0, 0.25, 2.0, 1.0, -0.5])
    backend = TritonLoraBackend(bgmv_max_seg_len)
    backend.prepare(case.info)
    backend.add_lora(case.y, case.x, case.slices, case.info)
    torch.testing.assert_close(case.y.float().cpu(), case.expected_y, **TOLERANCES[dtype])


def test_dispatch_rule(triton_device):
    """BGMV iff the longest segment has at most BGMV_MAX_SEG_LEN tokens; all-base runs nothing."""
    backend = TritonLoraBackend()
    short = build_lora_batch_info([0, 1, 0, 2], [BGMV_MAX_SEG_LEN, 1, 2, 3], device=triton_device)
    backend.prepare(short)
    plan = backend.step_plan(short)
    assert plan.active and plan.use_bgmv and plan.tiles is None and plan.token_scales is None
    assert backend.step_plan(short) is plan  # planned once per step
    long = build_lora_batch_info([0, 1], [BGMV_MAX_SEG_LEN + 1, 1], device=triton_device)
    with pytest.raises(RuntimeError, match="prepare"):
        backend.step_plan(long)  # not prepared: no hidden re-planning
    backend.prepare(long)
    plan = backend.step_plan(long)
    assert plan.active and not plan.use_bgmv and plan.tiles.num_tiles == 2
    for info in (build_lora_batch_info([-1, -1], [3, 9], device=triton_device), build_lora_batch_info([], [], device=triton_device)):
        backend.prepare(info)
        assert not backend.step_plan(info).active


def test_all_base_step_launches_nothing(triton_device, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched for a step without adapters")

    for name in ("sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"):
        monkeypatch.setattr(triton_backend, name, fail)
    case = Case(segment_layout("all_base", 8), 200, [40], [8], torch.float32, triton_device)
    before = case.y.clone()
    backend = TritonLoraBackend()
    backend.prepare(case.info)
    backend.add_lora(case.y, case.x, case.slices, case.info)
    assert torch.equal(case.y, before)


def test_slice_table_is_cached(triton_device):
    case = Case(segment_layout("zipf", 6), 64, [32, 16], [8, 8], torch.float32, triton_device)
    backend = TritonLoraBackend()
    table = backend.slice_table(tuple(case.slices))
    assert backend.slice_table(tuple(case.slices)) is table
    assert backend.slice_table(list(case.slices)) is table
    assert table.out_offsets == (0, 32) and table.total_out == 48
    assert table.aligned  # 64 inputs, 32 + 16 outputs: the vectorized path
    odd = Case(segment_layout("zipf", 6), 200, [32], [8], torch.float32, triton_device)
    assert not backend.slice_table(odd.slices).aligned  # 200 inputs: scalar loads


def test_select_backend_by_name():
    backend = select_backend(torch.device("cpu"), torch.float32, name="triton")
    assert isinstance(backend, TritonLoraBackend) and backend.name == "triton"


def test_cpu_auto_selection_never_imports_triton_backend(tmp_path):
    """On a CPU device, name="auto" picks the CPU backend and never imports our Triton code."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from loramux.kernels.backend import select_backend\n"
        f"backend = select_backend(torch.device('cpu'), torch.float32, cache_dir=Path({str(tmp_path)!r}))\n"
        "assert backend.name in ('cpu', 'torch'), backend.name\n"
        "loaded = [m for m in sys.modules if m == 'loramux.kernels.triton_backend' or m.startswith('loramux.kernels.triton.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_only_kernel_files_import_triton():
    """CPU serving must not need Triton: only the Triton backend's own files import it."""
    pattern = re.compile(r"^\s*(import triton\b|from triton\b)", re.MULTILINE)
    offenders = []
    for room in ("server", "scheduler", "adapter_store", "loramux_kernels", "clients"):
        for path in sorted((REPO / room).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("loramux_kernels/triton/") or rel == "loramux_kernels/triton_backend.py":
                continue
            if pattern.search(path.read_text()):
                offenders.append(rel)
    assert not offenders


# --- the model forward: Triton backend against the torch backend ---------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]
NUM_STEPS = 3


class _RecordingBackend(TritonLoraBackend):
    """Records which path each step took."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def prepare(self, info):
        super().prepare(info)
        plan = self.step_plan(info)
        if plan.active:
            self.paths.append("bgmv" if plan.use_bgmv else "sgmv")


def test_runner_forward_matches_torch_backend(tmp_path, triton_device):
    """A mixed batch (adapters of ranks 8, 4 and 16-with-a-rank-2-pattern, plus base requests)
    gives the same logits through the Triton kernels as through the torch backend."""
    from loramux.adapter_store.device_slots import write_adapter_to_slot
    from loramux.adapter_store.format import load_adapter
    from loramux.scheduler.request import BASE_SLOT, Request
    from loramux.scheduler.sampling_params import SamplingParams
    from loramux.server.models.loader import load_model
    from loramux.server.runner.model_runner import ModelRunner
    from tests.peft_adapters import AdapterRecipe, make_peft_adapter
    from tests.tiny_models import generate_static, save_tiny_model

    recipes = [
        AdapterRecipe("all-r8", r=8, seed=1, b_std=0.1),
        AdapterRecipe("qv-r4", r=4, target_modules=["q_proj", "v_proj"], seed=2, b_std=0.1),
        AdapterRecipe(
            "pattern-r16",
            r=16,
            target_modules=r".*\.(k_proj|o_proj|down_proj)",
            rank_pattern={"down_proj": 2},
            seed=3,
            b_std=0.1,
        ),
    ]
    hf = save_tiny_model(tmp_path / "base", "llama")
    adapter_dirs = [make_peft_adapter(hf, recipe, tmp_path / "adapters") for recipe in recipes]

    def run(backend):
        model = load_model(
            tmp_path / "base", backend, device=triton_device, max_lora_slots=len(recipes) + 1, max_lora_rank=16
        )
        spec = model.spec.base_model_spec()
        for slot, (recipe, directory) in enumerate(zip(recipes, adapter_dirs), start=1):
            write_adapter_to_slot(model.lora_buffers(), slot, load_adapter(recipe.name, directory, spec, max_rank=16))
        runner = ModelRunner(model, num_kv_blocks=64, block_size=4)
        plan = [(slot, p) for p in (PROMPTS[0], PROMPTS[2]) for slot in (1, 2, 3, BASE_SLOT)] + [(2, PROMPTS[1])]
        requests = [
            Request(f"r{i}", list(p), SamplingParams(max_tokens=NUM_STEPS, temperature=0), adapter_slot=slot)
            for i, (slot, p) in enumerate(plan)
        ]
        return generate_static(runner, requests, NUM_STEPS)

    triton = _RecordingBackend()
    ours = run(triton)
    expected = run(select_backend(triton_device, torch.float32, name="torch"))
    assert triton.paths == ["sgmv"] + ["bgmv"] * (NUM_STEPS - 1)  # prefill, then decodes
    for request_id, logits in expected.items():
        torch.testing.assert_close(torch.stack(ours[request_id]).cpu(), torch.stack(logits).cpu(), atol=1e-4, rtol=0)


def test_dora_and_vocab_adapters_through_triton(tmp_path, triton_device):
    """DoRA (rescale after the Triton LoRA delta), embed_tokens and lm_head adapters, mixed
    with plain LoRA and base requests: the Triton backend serves them as peft computes them."""
    from tests.models.peft_batch import assert_matches_peft
    from tests.models.test_adapter_kinds import run_batch

    requests, ours, peft, model = run_batch(tmp_path, "llama", "triton", device=triton_device)
    assert model.lora_backend.name == "triton"
    assert_matches_peft(requests, ours, peft)
