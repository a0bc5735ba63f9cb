"""srdiff.FAMAttnProcessor / set_fam_attn_processor / fam_context on small randomly initialised diffusers
U-Nets: exactly diffusers' AttnProcessor2_0 when unmodulated, and equal to an independent reference
when modulated: AttnProcessor2_0 with forward hooks that scale to_k's and to_v's outputs per token by
1 + lam * (the map resized bilinearly with F.interpolate), i.e. the paper's K (1 + lam M), V (1 + lam M).

Whole-network outputs are compared with the forward table at reduce_dim = the widest convolution's
fan-in (channels x 3 x 3), the longest reduction that follows the attention layers.
"""

import pytest
import torch
import torch.nn.functional as F

import srdiff
from srdiff.processors.context import token_grid
from utils import assert_close, cpu_and_cuda

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

LAM = 0.5  # larger than the paper's 0.025 so that a wrong modulation cannot hide in rounding
FAN_IN = 64 * 9


def _unet2d(sample=(16, 16)):
    return diffusers.UNet2DModel(
        sample_size=sample, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8,
    ).eval()


def _unet2d_condition():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=16, norm_num_groups=8,
    ).eval()


def _run(model, x, t, context=None):
    return model(x, t, context).sample if context is not None else model(x, t).sample


def _inputs(model, batch=2, size=(16, 16), device="cpu"):
    x = torch.randn(batch, model.config.in_channels, *size, device=device)
    t = torch.tensor([10, 500][:batch], device=device)
    conditional = isinstance(model, diffusers.UNet2DConditionModel)
    context = torch.randn(batch, 5, 32, device=device) if conditional else None
    return x, t, context


@pytest.fixture
def device(request, monkeypatch):
    """cpu or cuda; on CUDA without TF32 convolutions, which would swamp the float32 comparisons."""
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param


def _grid(n_tokens, map_hw):
    """The layer grid among the map's halvings (a U-Net's resolutions) with n_tokens cells."""
    (H, W), k = map_hw, 0
    while (H >> k) * (W >> k) > n_tokens:
        k += 1
    assert (H >> k) * (W >> k) == n_tokens, (n_tokens, map_hw)
    return H >> k, W >> k


def _scale_hook(mfam, lam, model_hw):
    def hook(module, inputs, out):
        n_tokens = out.shape[1]
        grid = _grid(n_tokens, model_hw)
        maps = mfam if mfam.dim() == 3 else mfam[None]
        m = F.interpolate(maps[:, None].float(), size=grid, mode="bilinear", align_corners=False).flatten(1)
        return out * (1 + lam * m)[..., None].to(out.dtype)

    return hook


def _reference(model, names, mfam, lam, x, t, context, model_hw):
    """The model with its default processors and K, V scaled by hooks on the named layers."""
    modules = dict(model.named_modules())
    hooks = [getattr(modules[n], proj).register_forward_hook(_scale_hook(mfam, lam, model_hw))
             for n in names for proj in ("to_k", "to_v")]
    try:
        return _run(model, x, t, context)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("build", [_unet2d, _unet2d_condition], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_installs_on_every_self_attention_layer(build):
    model = build()
    attention = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    assert names == [n for n, m in attention.items() if not m.is_cross_attention]
    assert len(names) == 4
    for n, m in attention.items():
        processor = m.get_processor()
        assert isinstance(processor, srdiff.FAMAttnProcessor) == (n in names)
        if n not in names:
            assert isinstance(processor, AttnProcessor2_0)


def test_layer_filter_chooses_layers():
    model = _unet2d()
    names = srdiff.set_fam_attn_processor(model, layer_filter=lambda name, _: name.startswith("mid_block"))
    assert names == ["mid_block.attentions.0"]
    assert isinstance(model.down_blocks[1].attentions[0].get_processor(), AttnProcessor2_0)


@pytest.mark.parametrize("build", [_unet2d, _unet2d_condition], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_unmodulated_is_exactly_attn_processor_2_0(build):
    """Outside a context, with a None map and at lam = 0 the output is bit for bit diffusers'."""
    model = build()
    x, t, context = _inputs(model)
    with torch.no_grad():
        want = _run(model, x, t, context)
        srdiff.set_fam_attn_processor(model, lam=LAM)
        assert torch.equal(_run(model, x, t, context), want)
        with srdiff.fam_context(None):
            assert torch.equal(_run(model, x, t, context), want)
        srdiff.set_fam_attn_processor(model, lam=0.0)
        with srdiff.fam_context(torch.rand(16, 16)):
            assert torch.equal(_run(model, x, t, context), want)


@pytest.mark.parametrize("device", cpu_and_cuda(), indirect=True)
@pytest.mark.parametrize(
    "build, mfam_shape, size",
    [
        pytest.param(_unet2d, (16, 16), (16, 16), id="UNet2DModel-one-map"),
        pytest.param(_unet2d, (2, 16, 16), (16, 16), id="UNet2DModel-per-image"),
        pytest.param(_unet2d_condition, (32, 32), (8, 8), id="UNet2DConditionModel-image-space-map"),
        pytest.param(_unet2d_condition, (2, 16, 8), (8, 4), id="UNet2DConditionModel-non-square"),
    ],
)
def test_modulated_matches_prescaled_reference(build, mfam_shape, size, device):
    """On CUDA the processor runs the fused kernels (float32, exact products)."""
    model = build().to(device)
    x, t, context = _inputs(model, size=size, device=device)
    mfam = torch.rand(mfam_shape, device=device)
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    with torch.no_grad(), srdiff.fam_context(mfam):
        got = _run(model, x, t, context)
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        want = _reference(model, names, mfam, LAM, x, t, context, size)
        plain = _run(model, x, t, context)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert (got - plain).abs().max() > 1e-3, "the modulation did not change the output"


def test_triton_backend_forward_and_backward():
    """The processor on the fused kernels (interpreter on CPU): output and input gradient match the
    hook reference; backward runs after the context has exited."""
    model = _unet2d(sample=(8, 8))  # attention on 4 x 4 tokens: the interpreter is slow
    x, t, _ = _inputs(model, size=(8, 8))
    x.requires_grad_()
    mfam = torch.rand(16, 16)
    names = srdiff.set_fam_attn_processor(model, lam=LAM, backend="triton")
    with srdiff.fam_context(mfam):
        got = _run(model, x, t)
    got.square().sum().backward()
    got_grad, x.grad = x.grad, None
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    want = _reference(model, names, mfam, LAM, x, t, None, (8, 8))
    want.square().sum().backward()
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert_close(got_grad, x.grad, dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name="dx")


def test_projection_is_trained_through_the_processor():
    model = _unet2d()
    proj = srdiff.FAMProjection()
    srdiff.set_fam_attn_processor(model, lam=LAM, projection=proj)
    assert model.mid_block.attentions[0].get_processor().projection is proj
    x, t, _ = _inputs(model)
    with srdiff.fam_context(torch.rand(16, 16)):
        loss = _run(model, x, t).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.net[-1].parameters())
    assert not any(p is q for p in proj.parameters() for q in model.parameters())


def test_attention_mask_runs_the_prescaled_path():
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    attn.set_processor(srdiff.FAMAttnProcessor(LAM))
    hidden, mfam = torch.randn(2, 16, 32), torch.rand(8, 8)
    mask = torch.zeros(2, 16)
    mask[:, -3:] = -1e4
    with torch.no_grad(), srdiff.fam_context(mfam, grid=(4, 4)):  # a bare layer: no model hook knows its grid
        got = attn(hidden, attention_mask=mask)
    attn.set_processor(AttnProcessor2_0())
    s = 1 + LAM * F.interpolate(mfam[None, None], size=(4, 4), mode="bilinear", align_corners=False).flatten()
    hooks = [attn.to_k.register_forward_hook(lambda m, i, o: o * s[:, None]),
             attn.to_v.register_forward_hook(lambda m, i, o: o * s[:, None])]
    with torch.no_grad():
        want = attn(hidden, attention_mask=mask)
    for h in hooks:
        h.remove()
    assert_close(got, want, dtype=torch.float32, reduce_dim=32)


@pytest.mark.parametrize("device", cpu_and_cuda(), indirect=True)
def test_autocast_bf16(device):
    """Under autocast the modulated layers run in bf16 and land near the float32 result."""
    model = _unet2d().to(device)
    x, t, _ = _inputs(model, device=device)
    srdiff.set_fam_attn_processor(model, lam=LAM)
    mfam = torch.rand(16, 16, device=device)
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            plain = _run(model, x, t)
        with srdiff.fam_context(mfam):
            want = _run(model, x, t)
            with torch.autocast(device, dtype=torch.bfloat16):
                got = _run(model, x, t)
    assert got.dtype == plain.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err


def test_token_grid():
    assert _token_grid(64, 16, 16) == (8, 8)
    assert _token_grid(32, 16, 8) == (8, 4)
    assert _token_grid(8, 64, 32) == (4, 2)
    assert _token_grid(77, 16, 16) is None
    assert _token_grid(32, 16, 16) is None
    assert _token_grid(24, 16, 8) is None


def test_contexts_nest_and_restore():
    model = _unet2d()
    x, t, _ = _inputs(model)
    srdiff.set_fam_attn_processor(model, lam=LAM)
    a, b = torch.rand(16, 16), torch.rand(16, 16)
    with torch.no_grad():
        with srdiff.fam_context(a):
            out_a = _run(model, x, t)
        with srdiff.fam_context(b):
            out_b = _run(model, x, t)
        with srdiff.fam_context(a):
            with srdiff.fam_context(b):
                assert torch.equal(_run(model, x, t), out_b)
            assert torch.equal(_run(model, x, t), out_a)
    assert not torch.equal(out_a, out_b)


def test_bad_input():
    with pytest.raises(ValueError, match=r"mfam values must lie in \[0, 1\], got min 0 and max 2"):
        with srdiff.fam_context(torch.tensor([[0.0, 2.0]])):
            pass
    with pytest.raises(ValueError, match=r"mfam must be finite"):
        with srdiff.fam_context(torch.tensor([[0.0, float("inf")]])):
            pass
    with pytest.raises(ValueError, match=r"mfam must have 2 or 3 dims, got shape \(16,\)"):
        with srdiff.fam_context(torch.rand(16)):
            pass
    with pytest.raises(ValueError, match=r"lam must be >= 0, got -0.1"):
        srdiff.FAMAttnProcessor(-0.1)
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'cubic'"):
        srdiff.FAMAttnProcessor(mode="cubic")
    with pytest.raises(TypeError, match=r"projection must be a FAMProjection or None, got Linear"):
        srdiff.FAMAttnProcessor(projection=torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        srdiff.set_fam_attn_processor("unet")
    model = _unet2d()
    srdiff.set_fam_attn_processor(model)
    x, t, _ = _inputs(model)
    with pytest.raises(ValueError, match=r"mfam holds 3 maps but the layer sees a batch of 2"):
        with torch.no_grad(), srdiff.fam_context(torch.rand(3, 16, 16)):
            _run(model, x, t)
