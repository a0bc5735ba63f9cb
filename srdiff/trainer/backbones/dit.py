"""DiT (``dit``): diffusers' ``DiTTransformer2DModel``, class-conditional by adaLN-Zero."""

import torch
from torch import nn

from srdiff.trainer.backbones.base import DenoiserSpec, TransformerBackbone, batched, register_backbone
from srdiff.trainer.backbones.base import transformer_heads


@register_backbone
class DiT(TransformerBackbone):
    """diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023): patch tokens (``patch_size``), ``depth``
    blocks of width ``hidden_size``, adaLN-Zero conditioning on timestep and class.

    DiT always takes a class: an unconditional task trains it with one class (label 0). Its label
    embedding's own dropout (10 %, drawn from the global RNG in train mode) is switched off, because the
    class task drops labels itself, keyed by (seed, step): the embedding table keeps its null row, which
    is the null class ``num_classes``.
    """

    name = "dit"
    conditions = frozenset({"class"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        self.check(spec)
        model = DiTTransformer2DModel(
            num_attention_heads=transformer_heads(config),
            attention_head_dim=config.attention_head_dim,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            num_layers=config.depth,
            sample_size=spec.sample_size,
            patch_size=config.patch_size,
            num_embeds_ada_norm=spec.num_classes or 1,
            norm_num_groups=1,
        )
        return _without_label_dropout(model)

    def forward(self, model, x, t, cond):
        labels = cond.class_labels
        if labels is None:
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return model(x, timestep=batched(t, x), class_labels=labels).sample

    def plain_copy(self, model: nn.Module) -> nn.Module:
        return _without_label_dropout(super().plain_copy(model))


def _without_label_dropout(model: nn.Module) -> nn.Module:
    """``model`` with its diffusers ``LabelEmbedding`` dropout off (its table keeps the null row)."""
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model
