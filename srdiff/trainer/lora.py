"""LoRA (Hu et al. 2021) on a diffusers denoiser's attention projections through peft, as diffusers'
``train_text_to_image_lora.py`` does: the base weights frozen, rank-``r`` adapters on ``to_q``, ``to_k``,
``to_v`` and ``to_out.0`` of every attention layer (self and cross). The FAM processors call those
projections like any other processor does, so they compose with the adapters unchanged."""

import copy

import torch
from torch import nn

from srdiff._checks import check_int

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """Freeze ``model`` and give it trainable LoRA adapters of ``rank`` (alpha = rank, B = 0 at the start,
    so the model's output is unchanged until training moves them). A model without any of
    :data:`LORA_TARGETS` raises ``ValueError`` naming ``lora_rank``."""
    from peft import LoraConfig

    check_int("lora_rank", rank, 1)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(LORA_TARGETS)]
    if not targets or not hasattr(model, "add_adapter"):
        raise ValueError(f"lora_rank={rank} needs attention layers with {list(LORA_TARGETS)} in a diffusers model; "
                         f"{type(model).__name__} has none")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=list(LORA_TARGETS)))
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, in the key format ``StableDiffusionPipeline.load_lora_weights`` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def base_copy(model: nn.Module) -> nn.Module:
    """A fresh model of ``model``'s class and config holding its base weights (adapters left out) and the
    library's default attention processors."""
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    clean = type(model).from_config(copy.deepcopy(model.config))
    clean.load_state_dict(state)
    return clean
