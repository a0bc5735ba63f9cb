"""U-ViT (``uvit``): :class:`srdiff.UViT`, time and class as tokens, long skips."""

from torch import nn

from srdiff.trainer.backbones.base import DenoiserSpec, TransformerBackbone, batched, register_backbone
from srdiff.trainer.backbones.base import transformer_heads


@register_backbone
class UViT(TransformerBackbone):
    """:class:`srdiff.UViT` (Bao et al. 2023, "All are Worth Words"): time (and class) as tokens, long
    skips between in- and out-blocks, patch embedding; ``depth`` (even) blocks besides the middle one,
    width ``hidden_size``. Its in- and out-blocks are modulated, the middle block not, the leading
    tokens get 0, as in the authors' code."""

    name = "uvit"
    conditions = frozenset({"class"})
    blocks = ("in_blocks", "mid_block", "out_blocks")

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from srdiff.models.uvit import UViT as UViTModel

        self.check(spec)
        return UViTModel(sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.out_channels,
                         patch_size=config.patch_size, width=config.hidden_size, depth=config.depth,
                         heads=transformer_heads(config), num_classes=spec.num_classes or 0, lam=config.lam_r)

    def forward(self, model, x, t, cond):
        return model(x, batched(t, x), class_labels=cond.class_labels).sample
