"""The 8 adapters every server of bench-peers serves: ranks 8/16/32, all seven projections.

Made with peft (random A, random non-zero B, fixed seeds, alpha = 2r) into
$LORAMUX_HOME/peers/adapters once; loramux and vLLM read them as PEFT directories,
llama.cpp as GGUFs converted from them.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import make_bench_adapters
from bench.peers.setup_steps import Marker, peers_home

PEER_RANKS = (8, 16, 32, 8, 16, 32, 8, 16)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX, SEED = "peer", 1300


def adapter_root() -> Path:
    return peers_home() / "adapters"


def ensure_peer_adapters(model_dir: Path, root: Path | None = None) -> dict[str, Path]:
    """The peers' adapters (name -> PEFT directory), made once per model and recipe."""
    root = adapter_root() if root is None else root
    settings = {"model": str(model_dir), "ranks": list(PEER_RANKS), "targets": list(TARGET_MODULES),
                "prefix": PREFIX, "seed": SEED}
    marker = Marker(root.parent / f"{root.name}.done", settings)  # beside: the directory holds adapters only
    names = [f"{PREFIX}-{i}-r{rank}" for i, rank in enumerate(PEER_RANKS)]
    if not marker.done():
        made = make_bench_adapters(model_dir, root, PREFIX, PEER_RANKS, SEED, target_modules=list(TARGET_MODULES))
        assert made == names, (made, names)
        marker.mark()
    return {name: root / name for name in names}
