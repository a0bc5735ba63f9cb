"""SD3 (``sd3``): diffusers' ``SD3Transformer2DModel``, joint attention over caption and patch tokens."""

from torch import nn

from srdiff.trainer.backbones.base import DenoiserSpec, TransformerBackbone, batched, register_backbone
from srdiff.trainer.backbones.base import transformer_heads


@register_backbone
class SD3(TransformerBackbone):
    """diffusers ``SD3Transformer2DModel`` (MM-DiT, Esser et al. 2024): joint attention over caption and
    patch tokens. Only the patch tokens carry the map (the joint FAM processor gives the caption tokens
    0). SD3 reads a pooled caption embedding too; where the task's text encoder gives none, the mean of
    the caption tokens serves (srdiff's choice for tiny CLIP encoders, not SD3's CLIP-L + CLIP-G pool)."""

    name = "sd3"
    conditions = frozenset({"text"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import SD3Transformer2DModel

        self.check(spec)
        if not spec.cross_attention_dim:
            raise ValueError("backbone 'sd3' needs caption embeddings: use it with task 'text'")
        return SD3Transformer2DModel(
            sample_size=spec.sample_size,
            patch_size=config.patch_size,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            num_layers=config.depth,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=transformer_heads(config),
            joint_attention_dim=spec.cross_attention_dim,
            caption_projection_dim=config.hidden_size,
            pooled_projection_dim=spec.cross_attention_dim,
            pos_embed_max_size=spec.sample_size // config.patch_size,
        )

    def forward(self, model, x, t, cond):
        context = cond.encoder_hidden_states
        pooled = cond.pooled if cond.pooled is not None else context.mean(dim=1)
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=batched(t, x)).sample
