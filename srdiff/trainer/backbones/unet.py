"""The diffusers U-Nets: ``UNet2DModel`` (``unet``) and ``UNet2DConditionModel`` (``unet-cond``), with
attention blocks at the levels ``attention_levels`` marks."""

from torch import nn

from srdiff.diffusion.schedules import make_scheduler
from srdiff.trainer.backbones.base import Backbone, DenoiserSpec, register_backbone

UNET_OPTIONS = ("block_out_channels", "attention_levels", "layers_per_block", "attention_head_dim",
                "norm_num_groups")


def _unet_kwargs(config, spec: DenoiserSpec, attention: str) -> dict:
    """What both diffusers U-Nets take from the config and the spec; ``{attention}DownBlock2D`` /
    ``{attention}UpBlock2D`` at the levels ``config.attention_levels`` marks, plain blocks elsewhere."""
    return dict(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple(f"{attention if a else ''}DownBlock2D" for a in config.attention_levels),
        up_block_types=tuple(f"{attention if a else ''}UpBlock2D" for a in reversed(config.attention_levels)),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=spec.num_classes + 1 if spec.num_classes else None,
    )


class _DiffusersUNet(Backbone):
    """What both U-Nets share: their options and their check, the ``unet/`` folder."""

    options = UNET_OPTIONS
    folder = "unet"
    blocks = ("down_blocks", "mid_block", "up_blocks")

    def check_options(self, config) -> None:
        channels, levels = config.block_out_channels, config.attention_levels
        if not channels or min(channels) < 1:
            raise ValueError(f"block_out_channels must be positive channel counts, got {channels!r}")
        if len(levels) != len(channels):
            raise ValueError(f"attention_levels needs one entry per level of block_out_channels {channels}, "
                             f"got {levels}")
        if any(c % config.norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups must divide every entry of block_out_channels {channels}, got "
                             f"{config.norm_num_groups!r}")


@register_backbone
class UNet(_DiffusersUNet):
    """diffusers ``UNet2DModel``: self-attention at the levels ``config.attention_levels`` marks; class
    labels through its ``num_class_embeds`` table (one extra row: the null class). Unconditional models
    export as ``DDPMPipeline`` (pixels) or ``LDMPipeline`` (with the VAE)."""

    name = "unet"
    conditions = frozenset({"class"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import UNet2DModel

        self.check(spec)
        return UNet2DModel(**_unet_kwargs(config, spec, "Attn"), attention_head_dim=config.attention_head_dim)

    def size_multiple(self, config) -> tuple[int, str]:
        """``UNet2DModel`` halves the side at every level but the last and adds each skip back at its size."""
        levels = len(config.block_out_channels)
        return 2 ** (levels - 1), (f"its {levels} levels (block_out_channels {tuple(config.block_out_channels)}) "
                                   f"halve the side {levels - 1} times")

    def forward(self, model, x, t, cond):
        if cond.class_labels is None:
            return model(x, t).sample
        return model(x, t, class_labels=cond.class_labels).sample

    def pipeline(self, clean, config, *, condition=None, vae=None, text_encoder=None, tokenizer=None):
        from diffusers import DDPMPipeline, LDMPipeline

        if condition is not None:
            return None
        if vae is None:
            return DDPMPipeline(unet=clean, scheduler=make_scheduler(config, "ddpm"))
        return LDMPipeline(vqvae=vae, unet=clean, scheduler=make_scheduler(config, "ddim"))


@register_backbone
class ConditionUNet(_DiffusersUNet):
    """diffusers ``UNet2DConditionModel``: self- and cross-attention (``CrossAttn*Block2D``) at the marked
    levels. Text: caption embeddings as cross-attention keys. Class labels: its ``num_class_embeds``
    table; without a caption the cross-attention attends to one zero token. Starts from a local Stable
    Diffusion UNet; latent text-to-image models export as ``StableDiffusionPipeline``."""

    name = "unet-cond"
    conditions = frozenset({"class", "text"})

    def build(self, config, spec: DenoiserSpec) -> nn.Module:
        from diffusers import UNet2DConditionModel

        self.check(spec)
        head_dim = config.attention_head_dim
        return UNet2DConditionModel(
            **_unet_kwargs(config, spec, "CrossAttn"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            attention_head_dim=tuple(c // head_dim for c in config.block_out_channels),  # diffusers: heads
            cross_attention_dim=spec.cross_attention_dim or head_dim,
        )

    def size_multiple(self, config) -> tuple[int, str]:
        return 1, "its up blocks upsample to each skip's own size"

    def from_pretrained(self, folder) -> nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder)

    def forward(self, model, x, t, cond):
        context = cond.encoder_hidden_states
        if context is None:
            context = x.new_zeros(x.shape[0], 1, model.config.cross_attention_dim)
        return model(x, t, encoder_hidden_states=context, class_labels=cond.class_labels).sample

    def pipeline(self, clean, config, *, condition=None, vae=None, text_encoder=None, tokenizer=None):
        from diffusers import StableDiffusionPipeline

        if condition != "text" or vae is None:
            return None
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=clean,
                                       scheduler=make_scheduler(config, "ddim"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
