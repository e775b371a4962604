"""Random PEFT LoRA adapters made with peft itself, for tests, the golden run and benchmarks."""

from __future__ import annotations

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
    peft_model.save_pretrained(out)
    peft_model.unload()  # restores the base modules in place
    return out
