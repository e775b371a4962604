"""Random PEFT LoRA adapters made with peft itself, for tests, the golden run and benchmarks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    r: int
    target_modules: list[str] | str = "all-linear"
    lora_alpha: float = 16.0
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    seed: int = 0
    b_std: float = 0.02  # PEFT starts lora_B at zero; a random B makes the adapter visible
    use_dora: bool = False
    ensure_weight_tying: bool = False
    # DoRA's magnitude starts at the base weight's row norms; a relative jitter of this size
    # makes it differ from them as a trained one does
    magnitude_jitter: float = 0.0
    # PEFT starts lora_embedding_A at zero: with this std it is random (embed_tokens targets)
    embedding_a_std: float = 1.0

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=self.layers_to_transform,
            use_dora=self.use_dora,
            ensure_weight_tying=self.ensure_weight_tying,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )


def make_peft_adapter(base_model, recipe: AdapterRecipe, directory: Path) -> Path:
    """Wrap `base_model` (left unchanged), randomize A and B, save to directory/recipe.name."""
    torch.manual_seed(recipe.seed)
    peft_model = get_peft_model(base_model, recipe.lora_config())
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, recipe.b_std)
            elif "lora_embedding_A" in name:
                param.normal_(0.0, recipe.embedding_a_std)
            elif "lora_magnitude_vector" in name and recipe.magnitude_jitter:
                param.mul_(1.0 + recipe.magnitude_jitter * torch.randn_like(param))
    out = directory / recipe.name
    # Without the copies of the base embedding / lm_head PEFT would save beside their
    # adapters (vocab x hidden each; tests/adapter_store/test_format.py covers them).
    peft_model.save_pretrained(out, save_embedding_layers=False)
    peft_model.unload()  # restores the base modules in place
    return out


# Plain LoRA of mixed ranks and target forms, for tiny models of every family.
RECIPES = [
    AdapterRecipe("all-r8", r=8, seed=1, b_std=0.1),
    AdapterRecipe("qv-r4", r=4, target_modules=["q_proj", "v_proj"], seed=2, b_std=0.1),
    AdapterRecipe(
        "pattern-r16",
        r=16,
        target_modules=r".*\.(k_proj|o_proj|down_proj)",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 3.0},
        seed=3,
        b_std=0.1,
    ),
    AdapterRecipe("rslora-mlp", r=6, target_modules=["gate_proj", "up_proj"], use_rslora=True, seed=4, b_std=0.1),
    AdapterRecipe(
        "layer1-only", r=5, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], lora_alpha=7.5, seed=5, b_std=0.1
    ),
]


def family_recipes(kind: str) -> list[AdapterRecipe]:
    """RECIPES in the module names of the family's checkpoint (Phi-3 packs q/k/v and gate/up)."""
    if kind != "phi3":
        return RECIPES
    packed = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def rename(targets):
        if isinstance(targets, str):
            return targets.replace("k_proj", "qkv_proj")
        return sorted({packed.get(t, t) for t in targets})

    return [
        dataclasses.replace(r, target_modules=rename(r.target_modules)) if r.target_modules != "all-linear" else r
        for r in RECIPES
    ]


# DoRA, and adapters on embed_tokens / lm_head, in module names every family has
# (Phi-3's "all-linear" means its fused qkv_proj / gate_up_proj).
ADAPTER_KIND_RECIPES = [
    AdapterRecipe("dora-all", r=4, lora_alpha=8, use_dora=True, magnitude_jitter=0.2, seed=1, b_std=0.1),
    AdapterRecipe("plain-o-down", r=8, target_modules=["o_proj", "down_proj"], seed=2, b_std=0.1),
    AdapterRecipe("embed-head", r=6, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "o_proj"], seed=3, b_std=0.1),
    AdapterRecipe(
        "dora-head-r-pattern",
        r=5,
        lora_alpha=5,
        target_modules=["lm_head", "down_proj"],
        rank_pattern={"lm_head": 3},
        use_dora=True,
        magnitude_jitter=0.2,
        seed=4,
        b_std=0.1,
    ),
]
