"""LoRA inside a GlimpsePruneModel's base for GRPO, and the merged weights it exports and syncs.

Owns injecting LoRA adapters into the language model's Linear layers IN PLACE (peft's
`inject_adapter_in_model`: the module tree keeps its attribute paths, so the glimpse pre-pass
and the replay forward run unchanged on the adapted layers), marking only the adapters
trainable, and producing merged weights W + scale * B @ A under the base's own names (what
vLLM and an HF export load). Must not gather ZeRO-3 partitions itself: callers wrap these
functions in `deepspeed.zero.GatheredParameters`.
"""

from __future__ import annotations

import torch

from pipeline.config import LoraConfig

ADAPTER = "default"


def inject_lora(base, lora_cfg: LoraConfig) -> None:
    """Adds LoRA adapters to `base`'s language-model Linear layers and freezes all else."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    # Only the language model's Linear layers: the regex keeps the vision tower out.
    pattern = r".*language_model.*\.(" + "|".join(lora_cfg.target_modules) + ")"
    inject_adapter_in_model(PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                                           lora_dropout=lora_cfg.dropout,
                                           target_modules=pattern), base)
    for name, param in base.named_parameters():
        param.requires_grad_(".lora_" in name)


def lora_layers(module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every LoRA-adapted Linear under `module`."""
    from peft.tuners.lora.layer import Linear

    return [(name, m) for name, m in module.named_modules() if isinstance(m, Linear)]


def layer_params(layer) -> list[torch.nn.Parameter]:
    """The parameters a merge of `layer` reads (gather these first under ZeRO-3)."""
    params = [layer.base_layer.weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params + ([layer.base_layer.bias] if layer.base_layer.bias is not None else [])


def merged_weight(layer) -> torch.Tensor:
    """W + scale * B @ A of one adapted Linear (a new CPU tensor; the layer is unchanged)."""
    with torch.no_grad():
        return (layer.base_layer.weight + layer.get_delta_weight(ADAPTER)).detach().to(
            "cpu", copy=True)


def merged_state_dict(module) -> dict[str, torch.Tensor]:
    """Every weight of `module` under its un-adapted names, LoRA layers merged (CPU copies)."""
    merged = {f"{name}.weight": merged_weight(layer) for name, layer in lora_layers(module)}
    state = {}
    for key, tensor in module.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        state[clean] = merged.get(clean, tensor.detach().to("cpu", copy=True))
    return state
