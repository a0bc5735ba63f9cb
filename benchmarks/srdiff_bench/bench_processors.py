"""The two paths of the FAM processors on whole diffusers models: ``fused`` (srdiff's FAM processor,
K and V scaled inside ``srdiff.fam_attention`` / ``fam_linear_attention``) vs ``hook`` (forward hooks
scale the projections' outputs, the family's own attention runs), with ``plain`` (the model's own
processors, unmodulated) as the floor, in the same run.

One small model per family with a fused processor srdiff ships (the self-attention U-Net, SD3's joint
attention, Flux's packed dual/single-stream blocks, Sana's linear attention): two blocks of width 64
on a 32x32 latent, batch 2, a random map at lam = 0.025 inside ``fam_context``. ``fwd`` is a no-grad
forward (sampling); ``fwd+bwd`` adds the backward of sum(out^2) to the parameters and the input
(training).
"""

import pytest
import torch

from srdiff_bench.common import DEVICE, QUICK, measure, require_module

OP = "fam_processors"
PROVIDERS = ["plain", "fused", "hook"]
LAM = 0.025
BATCH, LATENT = 2, (16, 16) if QUICK else (32, 32)


def _unet():
    import diffusers

    model = diffusers.UNet2DConditionModel(
        sample_size=LATENT[0], in_channels=4, out_channels=4, block_out_channels=(64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=32, norm_num_groups=16)
    inputs = {"sample": torch.randn(BATCH, 4, *LATENT), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(BATCH, 8, 64)}
    return model, inputs, "sample"


def _sd3():
    import diffusers

    model = diffusers.SD3Transformer2DModel(
        sample_size=LATENT[0], patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=LATENT[0])
    inputs = {"hidden_states": torch.randn(BATCH, 4, *LATENT), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(BATCH, 8, 64), "pooled_projections": torch.randn(BATCH, 32)}
    return model, inputs, "hidden_states"


def _flux():
    import diffusers

    h, w = LATENT[0] // 2, LATENT[1] // 2  # Flux packs 2x2 latent patches into one token
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    inputs = {"hidden_states": torch.randn(BATCH, h * w, 16), "encoder_hidden_states": torch.randn(BATCH, 8, 64),
              "pooled_projections": torch.randn(BATCH, 32), "timestep": torch.tensor([0.1, 0.5]),
              "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(8, 3)}
    return model, inputs, "hidden_states"


def _sana():
    import diffusers

    model = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        sample_size=LATENT[0])
    inputs = {"hidden_states": torch.randn(BATCH, 4, *LATENT), "encoder_hidden_states": torch.randn(BATCH, 8, 64),
              "timestep": torch.tensor([10, 500])}
    return model, inputs, "hidden_states"


MODELS = {"UNet2DCondition": _unet, "SD3": _sd3, "Flux": _flux, "Sana": _sana}


def _forward(model, inputs):
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("family", list(MODELS))
def test_fam_processors(benchmark, family, mode, provider):
    import srdiff

    case = dict(op=OP, provider=provider, mode=mode, dtype=torch.float32,
                shape={"model": family, "B": BATCH, "latent": list(LATENT)})
    require_module("diffusers", **case)
    torch.manual_seed(0)
    model, inputs, x_name = MODELS[family]()
    model = model.to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    if provider != "plain":
        srdiff.set_fam_attn_processor(model, lam=LAM, path="auto" if provider == "fused" else "hook")
        assert {layer.path for layer in srdiff.fam_layers(model)} == {provider}
    mfam = torch.rand(BATCH, *LATENT, device=DEVICE)
    x = inputs[x_name]

    def step():
        with srdiff.fam_context(mfam):
            if mode == "fwd":
                with torch.no_grad():
                    return _forward(model, inputs)
            leaf = x.detach().requires_grad_()
            out = _forward(model, {**inputs, x_name: leaf})
            out.square().sum().backward()
            return out

    measure(benchmark, step, **case)
