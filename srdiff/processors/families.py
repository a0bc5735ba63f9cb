"""The one table of attention families: for each diffusers attention processor, how srdiff modulates it
or why it does not; for each model class, how its input shows where the image tokens lie; which layers
a model's image map never reaches.

* :data:`HOOK_LAYOUTS`: processors on the hook path (:mod:`srdiff.processors.hooks`): where the layer's
  keys and values come from and where its text tokens sit. Processors with a FAM version (the fused
  path) name what they replace themselves (:data:`srdiff.processors.table.FAM_PROCESSORS`); where a
  family has both, the FAM processor is used unless ``set_fam_attn_processor(path="hook")``.
* :data:`REFUSED`: processors srdiff knows and does not modulate, each with its reason.
* :data:`MODEL_INPUTS`: model classes whose input the default reader does not understand.
* :data:`UNMODULATED_BLOCKS`, :data:`UNMODULATED_LAYERS`: temporal and text-only attention layers.

A processor in none of these tables is refused as unknown (``strict=False`` skips it and says so): a
layout is declared, never guessed.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from srdiff.processors.inputs import InputSpec, read_ltx, read_packed_shapes, read_token_list


@dataclass(frozen=True)
class Source:
    """A module of the attention layer whose output is (part of) the keys or values that enter attention.

    ``module``: its name under the layer (dotted for a processor's own layers). ``token_dim``: the token
    axis of its output ((B, N, C) and (B, N, H, D): 1; (B, H, N, D): 2). ``chunk``: the output is
    [q | k | v | ...] in blocks of ``attn.inner_dim`` channels (a fused projection) and block ``chunk``
    is the one to scale."""

    module: str
    token_dim: int = 1
    chunk: int | None = None


def qkv_sources(norm_dim: int = 2, norm: str | None = "norm_k", fused: bool | Callable[[nn.Module], bool] = False):
    """The (key, value) sources of the common layout: the key is ``norm``'s output (token axis
    ``norm_dim``) where the layer has that norm, else ``to_k``'s (or block 1 of a fused ``to_qkv``); the
    value is ``to_v``'s (or block 2 of ``to_qkv``). ``fused``: whether the processor projects with
    ``to_qkv`` (True for diffusers' Fused* processors; a predicate on the layer for the newer
    attention classes, which carry ``fused_projections``)."""

    def sources(attn: nn.Module) -> tuple[Source, Source]:
        is_fused = fused(attn) if callable(fused) else fused
        value = Source("to_qkv", chunk=2) if is_fused else Source("to_v")
        if norm is not None and getattr(attn, norm, None) is not None:
            return Source(norm, norm_dim), value
        return (Source("to_qkv", chunk=1) if is_fused else Source("to_k")), value

    return sources


def _custom_diffusion_sources(attn: nn.Module) -> tuple[Source, Source]:
    """CustomDiffusion's processors project K and V with their own trained layers when ``train_kv``."""
    if attn.processor.train_kv:
        return Source("processor.to_k_custom_diffusion"), Source("processor.to_v_custom_diffusion")
    return Source("to_k"), Source("to_v")


def _fused_projections(attn: nn.Module) -> bool:
    return bool(getattr(attn, "fused_projections", False))


@dataclass(frozen=True)
class TokenLayout:
    """How one family's layer holds its keys and values.

    ``sources``: ``attn -> (key Source, value Source)``. ``text``: whether the projected tokens hold text
    beside the image: ``"none"`` (image tokens only, after the layer's ``leading_tokens``), ``"first"``
    (text, then the model's image tokens: single-stream blocks) or ``"last"`` (the image tokens, then
    text or padding); with text, the image token count comes from the model's declared patch grid or
    its packed positions."""

    sources: Callable[[nn.Module], tuple[Source, Source]]
    text: str = "none"


_AP = "diffusers.models.attention_processor."
_TF = "diffusers.models.transformers."

# processor (qualified name) -> layout. Token axes of the key norm read from each processor's code.
HOOK_LAYOUTS: dict[str, TokenLayout] = {
    _AP + "AttnProcessor2_0": TokenLayout(qkv_sources(2)),
    _AP + "FusedAttnProcessor2_0": TokenLayout(qkv_sources(2, fused=True)),
    # diffusers' AttnProcessor, SlicedAttnProcessor and the PAG self-attention processors do not apply norm_k
    _AP + "AttnProcessor": TokenLayout(qkv_sources(norm=None)),
    _AP + "SlicedAttnProcessor": TokenLayout(qkv_sources(norm=None)),
    _AP + "PAGIdentitySelfAttnProcessor2_0": TokenLayout(qkv_sources(norm=None)),
    _AP + "PAGCFGIdentitySelfAttnProcessor2_0": TokenLayout(qkv_sources(norm=None)),
    _AP + "CustomDiffusionAttnProcessor": TokenLayout(_custom_diffusion_sources),
    _AP + "CustomDiffusionAttnProcessor2_0": TokenLayout(_custom_diffusion_sources),
    _AP + "JointAttnProcessor2_0": TokenLayout(qkv_sources(2)),
    _AP + "FusedJointAttnProcessor2_0": TokenLayout(qkv_sources(2, fused=True)),
    _AP + "HunyuanAttnProcessor2_0": TokenLayout(qkv_sources(2)),
    _AP + "FusedHunyuanAttnProcessor2_0": TokenLayout(qkv_sources(2, fused=True)),
    # AuraFlow's single-stream blocks call attention on [text, image] (text first); its joint ones on the image
    _AP + "AuraFlowAttnProcessor2_0": TokenLayout(qkv_sources(1), text="first"),
    _AP + "FusedAuraFlowAttnProcessor2_0": TokenLayout(qkv_sources(1, fused=True), text="first"),
    _AP + "LuminaAttnProcessor2_0": TokenLayout(qkv_sources(1)),
    # CogVideoX and CogView3-Plus project [text, image] in one go
    _AP + "CogVideoXAttnProcessor2_0": TokenLayout(qkv_sources(2), text="first"),
    _AP + "FusedCogVideoXAttnProcessor2_0": TokenLayout(qkv_sources(2, fused=True), text="first"),
    _TF + "transformer_cogview4.CogView4AttnProcessor": TokenLayout(qkv_sources(2), text="first"),
    _TF + "transformer_z_image.ZSingleStreamAttnProcessor": TokenLayout(qkv_sources(1), text="last"),
    _AP + "AllegroAttnProcessor2_0": TokenLayout(qkv_sources(2)),
    _TF + "transformer_wan.WanAttnProcessor": TokenLayout(qkv_sources(1, fused=_fused_projections)),
    _TF + "transformer_flux.FluxAttnProcessor": TokenLayout(qkv_sources(1, fused=_fused_projections), text="first"),
    _TF + "transformer_flux2.Flux2AttnProcessor": TokenLayout(qkv_sources(1, fused=_fused_projections), text="first"),
    _TF + "transformer_flux2.Flux2ParallelSelfAttnProcessor": TokenLayout(
        lambda attn: (Source("norm_k", 1), Source("to_qkv_mlp_proj", chunk=2)), text="first"),
    _TF + "transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0": TokenLayout(qkv_sources(1), text="last"),
    _AP + "SanaLinearAttnProcessor2_0": TokenLayout(qkv_sources(1)),
    _TF + "transformer_hidream_image.HiDreamAttnProcessor": TokenLayout(qkv_sources(1, norm="k_rms_norm"), text="last"),
    _TF + "transformer_lumina2.Lumina2AttnProcessor2_0": TokenLayout(qkv_sources(1), text="first"),
}

# processor (qualified name) -> why srdiff does not modulate it. Processors of another attention backend
# compute the same attention as a processor srdiff modulates; the user chose the backend, so srdiff says
# how to switch rather than switching silently.
_BACKEND = ("it calls {} attention; model.set_default_attn_processor() (or set_attn_processor with the "
            "model's SDPA processor) before installing gives srdiff's kernels instead")
REFUSED: dict[str, str] = {
    **{_AP + name: _BACKEND.format("xformers'") for name in (
        "XFormersAttnProcessor", "XFormersJointAttnProcessor", "XFormersAttnAddedKVProcessor",
        "CustomDiffusionXFormersAttnProcessor", "IPAdapterXFormersAttnProcessor")},
    _AP + "AttnProcessorNPU": _BACKEND.format("torch_npu's"),
    _AP + "XLAFlashAttnProcessor2_0": _BACKEND.format("XLA's flash"),
    _AP + "XLAFluxFlashAttnProcessor2_0": _BACKEND.format("XLA's flash"),
}

# model class name -> how its input shows the image tokens (models not here: InputSpec()).
MODEL_INPUTS: dict[str, InputSpec] = {
    "UNetSpatioTemporalConditionModel": InputSpec(frames_dim=1),
    "CogVideoXTransformer3DModel": InputSpec(frames_dim=1),
    "QwenImageTransformer2DModel": InputSpec(read=read_packed_shapes),
    "ZImageTransformer2DModel": InputSpec(read=read_token_list),
    "LTXVideoTransformer3DModel": InputSpec(read=read_ltx),
    "Lumina2Transformer2DModel": InputSpec(text_lengths=lambda kwargs: _mask_lengths(kwargs, "encoder_attention_mask")),
}

# Temporal attention: attention layers inside these blocks attend across the frames of each pixel; a
# spatial map has no value for a frame token, so they are never modulated.
UNMODULATED_BLOCKS: dict[str, str] = {
    "TransformerTemporalModel": "temporal attention (across frames)",
    "AnimateDiffTransformer3D": "temporal attention (across frames)",
    "TemporalBasicTransformerBlock": "temporal attention (across frames)",
}

# model class name -> {layer name fragment: reason}: layers of a model that see no image tokens.
UNMODULATED_LAYERS: dict[str, dict[str, str]] = {
    "LatteTransformer3DModel": {"temporal_transformer_blocks": "temporal attention (across frames)"},
    "Lumina2Transformer2DModel": {"context_refiner": "text-only attention (the caption refiner)"},
    "ZImageTransformer2DModel": {"context_refiner": "text-only attention (the caption refiner)"},
}


def _mask_lengths(kwargs: dict, name: str):
    """Per-sample valid lengths of a (B, L) prefix mask argument, or None without one."""
    mask = kwargs.get(name)
    return None if mask is None else mask.sum(dim=1)


def unmodulated_reason(model: nn.Module, name: str) -> str | None:
    """Why layer ``name`` of ``model`` is never modulated (temporal or text-only attention), or None."""
    for fragment, reason in UNMODULATED_LAYERS.get(type(model).__name__, {}).items():
        if fragment in name.split("."):
            return reason
    parts = name.split(".")
    for i in range(1, len(parts)):
        owner = type(model.get_submodule(".".join(parts[:i]))).__name__
        if owner in UNMODULATED_BLOCKS:
            return UNMODULATED_BLOCKS[owner]
    return None


def input_spec(model: nn.Module) -> InputSpec:
    return MODEL_INPUTS.get(type(model).__name__, InputSpec())
