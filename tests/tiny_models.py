"""Tiny randomly initialised diffusers models of every attention family srdiff modulates, with their
inputs and the test's own statement of where each modulated layer's image keys lie (the
:class:`fam_reference.Keys` the attention-level reference scales).

One :class:`Family` per model class (and per processor variant a model can be switched to). Sizes are
latent (H, W) (or (F, H, W) for videos); every family has a square and a non-square size, chosen so the
patch grids differ in both directions. Models are kept to one or two blocks of width 16-32: the whole
family suite must stay a small part of ``make test`` on two cores.
"""

import dataclasses
from collections.abc import Callable

import torch
from fam_reference import Keys, halving_grid

diffusers = __import__("diffusers")


@dataclasses.dataclass(frozen=True)
class Family:
    """``build()`` -> model (eval mode); ``inputs(size, batch)`` -> forward kwargs; ``keys(size, batch)``
    -> Keys for every modulated layer (applied to all, unless ``keys_for`` picks per layer name);
    ``grad_input``: the kwarg whose gradient the tests compare; ``sizes``: (square, non-square);
    ``fused``: srdiff has a FAM processor for it (compared with the hook path); ``reference``: how the
    modulated model is checked ("attention": scaled at the SDPA call; "projections": the test's own
    projection hooks, for families whose attention is not SDPA; "attention-2_0": at the SDPA call of
    ``AttnProcessor2_0`` run in place of a processor that computes the same attention without SDPA:
    ``AttnProcessor``, ``SlicedAttnProcessor``); ``compile``: a reason when
    ``torch.compile(fullgraph=True)`` is not tested (diffusers' model itself breaks the graph, or the
    graph would repeat another family's model and FAM code: compiling a U-Net costs 10-25 s of CI);
    ``prepare``: run on the built model (switch processors, fuse projections); ``lam``: the modulation
    strength the tests use (far above the paper's 0.025, so that a misplaced modulation cannot hide in
    rounding; larger where a model's random adaLN gates shrink its attention output);
    ``per_image_maps``: the reference test uses one map per image (else one map for the batch)."""

    name: str
    build: Callable
    inputs: Callable
    keys: Callable
    sizes: tuple
    grad_input: str = "hidden_states"
    fused: bool = False
    reference: str = "attention"
    compile: str | None = None
    prepare: Callable | None = None
    keys_for: Callable | None = None
    batch: int = 2
    lam: float = 0.5
    per_image_maps: bool = True

    def model(self):
        model = self.build().eval()
        if self.prepare is not None:
            self.prepare(model)
        return model

    def layer_keys(self, names, size, batch):
        spec = self.keys(size, batch)
        return {n: (self.keys_for(n, spec) if self.keys_for else spec) for n in names}


def _image(batch, channels, size):
    return torch.randn(batch, channels, *size)


def _steps(batch):
    return torch.linspace(10, 900, batch).long()


def _patch(size, p=2):
    return (size[0] // p, size[1] // p)


# ------------------------------------------------------------------------------------------ U-Nets

def _unet2d_condition():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )


def _unet_inputs(size, batch):
    return {"sample": _image(batch, 4, size), "timestep": _steps(batch),
            "encoder_hidden_states": torch.randn(batch, 5, 16)}


def _unet_keys(size, batch):
    return Keys(grid=lambda n: halving_grid(n, size))


UNET = dict(build=_unet2d_condition, inputs=_unet_inputs, keys=_unet_keys, sizes=((8, 8), (8, 12)), grad_input="sample")


def _set_processor(name, self_attention_only=False):
    """prepare(model): diffusers' processor ``name`` on every attention layer (or every self-attention
    layer: PAG pipelines set their processor on the self-attention layers they perturb)."""
    def prepare(model):
        from diffusers.models import attention_processor

        for m in model.modules():
            if isinstance(m, attention_processor.Attention) and not (self_attention_only and m.is_cross_attention):
                m.set_processor(getattr(attention_processor, name)())

    return prepare


# ------------------------------------------------------------------------------------- transformers

def _pixart():
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        cross_attention_dim=16, out_channels=4, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, use_additional_conditions=False, caption_channels=None, num_embeds_ada_norm=8,
    )


def _pixart_inputs(size, batch):
    return {"hidden_states": _image(batch, 4, size), "timestep": _steps(batch),
            "encoder_hidden_states": torch.randn(batch, 5, 16), "added_cond_kwargs": {"aspect_ratio": None,
                                                                                      "resolution": None}}


def _patch_keys(p=2, **kw):
    return lambda size, batch: Keys(grid=_patch(size, p), **kw)


def _sana():
    return diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8,
    )


def _text_inputs(text_dim, latent=None):
    """inputs(size, batch) of a model called with (hidden_states, 5 caption tokens, timestep);
    ``latent(batch, channels, size)`` makes the hidden states (default: an image)."""
    def inputs(size, batch):
        return {"hidden_states": (latent or _image)(batch, 4, size),
                "encoder_hidden_states": torch.randn(batch, 5, text_dim), "timestep": _steps(batch)}

    return inputs


def _hunyuan_dit():
    return diffusers.HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate",
    )


def _hunyuan_dit_inputs(size, batch):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    grid = _patch(size)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), grid), grid, use_real=True)
    return {"hidden_states": _image(batch, 4, size), "encoder_hidden_states": torch.randn(batch, 4, 8),
            "text_embedding_mask": torch.ones(batch, 4), "encoder_hidden_states_t5": torch.randn(batch, 4, 8),
            "text_embedding_mask_t5": torch.ones(batch, 4), "timestep": _steps(batch).float(),
            "image_meta_size": torch.tensor([[64, 64, 16, 16, 0, 0]] * batch, dtype=torch.float32),
            "style": torch.zeros(batch, dtype=torch.long), "image_rotary_emb": rope}


def _auraflow():
    return diffusers.AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )


def _lumina_next():
    return diffusers.LuminaNextDiT2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_attention_heads=3,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
        cross_attention_dim=16, scaling_factor=1.0,
    )


def _lumina_next_inputs(size, batch):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(8, 64, 64, linear_factor=1.0, ntk_factor=1.0)
    return {"hidden_states": _image(batch, 4, size), "encoder_hidden_states": torch.randn(batch, 5, 16),
            "timestep": torch.rand(batch), "encoder_mask": torch.ones(batch, 5), "image_rotary_emb": rope,
            "cross_attention_kwargs": {}}


def _lumina2():
    return diffusers.Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=16,
    )


LUMINA2_TEXT = (5, 3)  # valid caption tokens per sample (a padded batch: the image follows each sample's own)


def _lumina2_inputs(size, batch):
    mask = torch.zeros(batch, 5, dtype=torch.bool)
    for i in range(batch):
        mask[i, :LUMINA2_TEXT[i % 2]] = True
    return {"hidden_states": _image(batch, 4, size), "encoder_hidden_states": torch.randn(batch, 5, 16),
            "timestep": torch.rand(batch), "encoder_attention_mask": mask}


def _lumina2_keys(size, batch):
    return Keys(grid=_patch(size), text="first",
                text_lengths=torch.tensor([LUMINA2_TEXT[i % 2] for i in range(batch)]))


def _lumina2_layer_keys(name, keys):
    """The noise refiner attends over the image alone; the joint layers over caption and image."""
    return Keys(grid=keys.grid) if name.startswith("noise_refiner") else keys


def _cogview3():
    return diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8,
    )


def _cogview_inputs(size, batch):
    hw = torch.tensor([size[0] * 8, size[1] * 8])
    return {"hidden_states": _image(batch, 4, size), "encoder_hidden_states": torch.randn(batch, 5, 8),
            "original_size": hw.repeat(batch, 1), "target_size": hw.repeat(batch, 1),
            "crop_coords": torch.zeros(batch, 2), "timestep": _steps(batch)}


def _cogview4():
    return diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4,
    )


def _qwenimage():
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )


def _qwen_inputs(size, batch):
    h, w = size
    return {"hidden_states": torch.randn(batch, h * w, 16), "encoder_hidden_states": torch.randn(batch, 5, 16),
            "encoder_hidden_states_mask": torch.ones(batch, 5, dtype=torch.long), "timestep": torch.rand(batch),
            "img_shapes": [(1, h, w)] * batch}


def _token_keys(**kw):
    return lambda size, batch: Keys(grid=tuple(size), **kw)


def _hidream():
    return diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1), force_inference_output=True,
    )


def _hidream_inputs(size, batch):
    return {"hidden_states": _image(batch, 4, size), "encoder_hidden_states_t5": torch.randn(batch, 5, 8),
            "encoder_hidden_states_llama3": torch.randn(2, batch, 5, 4), "pooled_embeds": torch.randn(batch, 8),
            "timesteps": _steps(batch)}


def _flux2():
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    )


def _flux2_inputs(size, batch):
    h, w = size
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))
    return {"hidden_states": torch.randn(batch, h * w, 4), "encoder_hidden_states": torch.randn(batch, 5, 16),
            "img_ids": ids[None].expand(batch, -1, -1), "txt_ids": text_ids[None].expand(batch, -1, -1),
            "timestep": torch.rand(batch), "guidance": torch.ones(batch)}


def _zimage():
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=1,
        n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )


def _zimage_inputs(size, batch):
    return {"x": [torch.randn(16, 1, *size) for _ in range(batch)],
            "cap_feats": [torch.randn(5, 16) for _ in range(batch)], "t": torch.rand(batch)}


_SAME_AS_2_0 = "the FAM processor of UNet2DCondition-AttnProcessor2_0 (compiled there) with another scale"
FAMILIES = [
    Family("UNet2DCondition-AttnProcessor2_0", fused=True, **UNET),
    Family("UNet2DCondition-AttnProcessor", fused=True, reference="attention-2_0", prepare=_set_processor("AttnProcessor"),
           compile=_SAME_AS_2_0, **UNET),
    Family("UNet2DCondition-SlicedAttnProcessor", fused=True, reference="attention-2_0",
           prepare=lambda m: m.set_attention_slice(1), compile=_SAME_AS_2_0, **UNET),
    Family("PixArt", _pixart, _pixart_inputs, _patch_keys(), ((8, 8), (8, 12)), fused=True),
    Family("Sana", _sana, _text_inputs(8), _patch_keys(1), ((4, 4), (4, 6)), fused=True, reference="projections"),
    Family("HunyuanDiT", _hunyuan_dit, _hunyuan_dit_inputs, _patch_keys(), ((8, 8), (8, 12))),
    # 8 register tokens precede the image in both streams: they get 0, as the text does
    Family("AuraFlow", _auraflow, _text_inputs(16), _patch_keys(text="first"), ((8, 8), (8, 12)), lam=4.0),
    Family("LuminaNext", _lumina_next, _lumina_next_inputs, _patch_keys(), ((8, 8), (8, 12))),
    Family("Lumina2", _lumina2, _lumina2_inputs, _lumina2_keys, ((8, 8), (8, 12)), fused=True,
           keys_for=_lumina2_layer_keys,
           compile="diffusers' Lumina2 reads the caption lengths on the host (.tolist())"),
    Family("CogView3Plus", _cogview3, _cogview_inputs, _patch_keys(text="first"), ((8, 8), (8, 12))),
    Family("CogView4", _cogview4, _cogview_inputs, _patch_keys(text="first"), ((8, 8), (8, 12))),
    Family("QwenImage", _qwenimage, _qwen_inputs, _token_keys(text="first"), ((4, 4), (4, 6)), fused=True),
    Family("HiDream", _hidream, _hidream_inputs, _patch_keys(text="last"), ((8, 8), (8, 12)), fused=True,
           compile="diffusers' HiDream routes its MoE experts with data-dependent shapes"),
    Family("Flux2", _flux2, _flux2_inputs, _token_keys(text="first"), ((4, 4), (4, 6)), fused=True),
    Family("ZImage", _zimage, _zimage_inputs, _patch_keys(text="last"), ((8, 8), (8, 12)), grad_input="x",
           compile="diffusers' Z-Image enters a context manager dynamo does not support"),
]


# --------------------------------------------------------------------------------------------- video
# Sizes are (F, H, W) of the latent video. Spatial layers of the video U-Nets and Latte see the frames
# folded into the batch (B * F); the full-attention transformers see one (f, h, w) grid per video.

def _video(batch, channels, size, frames_first=False):
    frames, h, w = size
    return torch.randn(batch, frames, channels, h, w) if frames_first else torch.randn(batch, channels, frames, h, w)


def _frames_first_video(batch, channels, size):
    return _video(batch, channels, size, frames_first=True)


def _unet3d():
    return diffusers.UNet3DConditionModel(
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8, attention_head_dim=4,
        out_channels=4, in_channels=4, layers_per_block=1, sample_size=8,
    )


def _unet3d_inputs(size, batch):
    return {"sample": _video(batch, 4, size), "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(batch, 4, 8)}


def _unet_motion():
    return diffusers.UNetMotionModel(
        block_out_channels=(16, 32), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=16, num_attention_heads=2,
        out_channels=4, in_channels=4, layers_per_block=1, sample_size=8,
    )


def _unet_motion_inputs(size, batch):  # the text per frame, as AnimateDiff's pipeline passes it
    return {"sample": _video(batch, 4, size), "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(batch * size[0], 4, 16)}


def _unet_svd():
    return diffusers.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=2, out_channels=4, in_channels=4, layers_per_block=1, sample_size=8,
        projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8,
    )


def _unet_svd_inputs(size, batch):
    return {"sample": _video(batch, 4, size, frames_first=True), "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(batch, 1, 16),
            "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]).repeat(batch, 1)}


def _frame_keys(size, batch):
    """Spatial layers of a video U-Net: the frame's grid at each level, frames folded into the batch."""
    frames, h, w = size
    return Keys(grid=lambda n: halving_grid(n, (h, w)), frames=frames)


def _latte():
    return diffusers.LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=8,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2,
    )


def _latte_inputs(size, batch):
    return {"hidden_states": _video(batch, 4, size), "encoder_hidden_states": torch.randn(batch, 5, 8),
            "timestep": _steps(batch), "enable_temporal_attentions": True}


def _latte_keys(size, batch):
    frames, h, w = size
    return Keys(grid=(h // 2, w // 2), frames=frames)


def _wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _video_keys(pt=1, p=2, **kw):
    return lambda size, batch: Keys(grid=(size[0] // pt, size[1] // p, size[2] // p), **kw)


def _allegro():
    return diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
    )


def _cogvideox():
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, patch_size_t=None,
        temporal_compression_ratio=4, max_text_seq_length=5,
    )


VIDEO_SIZES = ((2, 8, 8), (3, 8, 12))
VIDEO = [
    Family("UNet3DCondition", _unet3d, _unet3d_inputs, _frame_keys, VIDEO_SIZES, grad_input="sample", fused=True),
    Family("UNetMotion", _unet_motion, _unet_motion_inputs, _frame_keys, VIDEO_SIZES, grad_input="sample", fused=True,
           compile="the input layout, spatial placement and FAM processor of UNet3DCondition (compiled there)"),
    Family("UNetSpatioTemporal", _unet_svd, _unet_svd_inputs, _frame_keys, VIDEO_SIZES, grad_input="sample",
           fused=True),
    Family("Latte", _latte, _latte_inputs, _latte_keys, ((2, 8, 8), (2, 8, 12)), fused=True),  # fixed video_length
    Family("Wan", _wan, _text_inputs(16, _video), _video_keys(), VIDEO_SIZES),
    Family("Allegro", _allegro, _text_inputs(8, _video), _video_keys(), VIDEO_SIZES),
    Family("CogVideoX", _cogvideox, _text_inputs(8, _frames_first_video), _video_keys(text="first"), VIDEO_SIZES),
]
FAMILIES += VIDEO


# ------------------------------------------------------------- more image families and variants

def _sd3(dual_attention_layers=(0,)):
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=dual_attention_layers,
    )


def _sd3_inputs(size, batch):
    return {"hidden_states": _image(batch, 4, size), "timestep": _steps(batch),
            "encoder_hidden_states": torch.randn(batch, 5, 16), "pooled_projections": torch.randn(batch, 8)}


def _dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )


def _dit_inputs(size, batch):
    return {"hidden_states": _image(batch, 4, size), "timestep": _steps(batch),
            "class_labels": torch.arange(batch) % 10}


def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )


def _packed_ids(size, columns=3):
    h, w = size
    ids = torch.zeros(h, w, columns)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return ids.reshape(-1, columns)


def _flux_inputs(size, batch):
    h, w = size
    return {"hidden_states": torch.randn(batch, h * w, 4), "encoder_hidden_states": torch.randn(batch, 5, 16),
            "pooled_projections": torch.randn(batch, 8), "timestep": torch.rand(batch),
            "img_ids": _packed_ids(size), "txt_ids": torch.zeros(5, 3)}


def _chroma():
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )


def _chroma_inputs(size, batch):
    inputs = _flux_inputs(size, batch)
    del inputs["pooled_projections"]
    return inputs


def _custom_diffusion(model):
    """CustomDiffusion's processors, with trained K/V on the self-attention layers too."""
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

    for m in model.modules():
        if isinstance(m, Attention):
            dim = m.to_q.out_features
            m.set_processor(CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=dim,
                cross_attention_dim=None if not m.is_cross_attention else m.to_k.in_features))


MORE = [
    Family("DiT", _dit, _dit_inputs, _patch_keys(), ((8, 8), (6, 6)), fused=True),  # diffusers' DiT: square only
    Family("SD3", _sd3, _sd3_inputs, _patch_keys(text="last"), ((8, 8), (8, 12)), fused=True),
    # diffusers' FusedJointAttnProcessor2_0 needs text in every call: SD3 without SD3.5's image-only attention
    Family("SD3-fused-qkv", lambda: _sd3(dual_attention_layers=()), _sd3_inputs, _patch_keys(text="last"),
           ((8, 8), (8, 12)), prepare=lambda m: m.fuse_qkv_projections()),
    Family("Flux", _flux, _flux_inputs, _token_keys(text="first"), ((4, 4), (4, 6)), fused=True),
    Family("Chroma", _chroma, _chroma_inputs, _token_keys(text="first"), ((4, 4), (4, 6)), fused=True),
    # PAG: one map for the whole batch (the hook path sees the original and perturbed parts apart)
    Family("UNet2DCondition-PAG", fused=True, reference="projections", batch=4, per_image_maps=False,
           prepare=_set_processor("PAGIdentitySelfAttnProcessor2_0", True),
           **UNET),
    Family("UNet2DCondition-PAG-CFG", fused=True, reference="projections", batch=3, per_image_maps=False,
           prepare=_set_processor("PAGCFGIdentitySelfAttnProcessor2_0", True),
           compile="the FAM processor of UNet2DCondition-PAG (compiled there)", **UNET),
    Family("UNet2DCondition-CustomDiffusion", prepare=_custom_diffusion,
           compile="the hook path (compiled on every transformer family with a hook layout)", **UNET),
]
FAMILIES += MORE


# ------------------------------------------------- fused projections (fuse_qkv_projections())

def _fused(family: Family) -> Family:
    """``family`` after ``fuse_qkv_projections()``: one to_qkv (or a fused processor) in place of to_q/k/v."""
    def prepare(model):
        if family.prepare is not None:
            family.prepare(model)
        model.fuse_qkv_projections()

    return dataclasses.replace(family, name=f"{family.name}-fused-qkv", prepare=prepare,
                               compile=f"the graph of {family.name} with one projection in place of three (CI time)")


FAMILIES += [_fused(f) for f in FAMILIES if f.name in ("PixArt", "HunyuanDiT", "AuraFlow", "CogVideoX", "Flux", "Wan")]
