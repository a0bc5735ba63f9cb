"""srdiff's FAM processors on small randomly initialised diffusers U-Nets (UNet2DModel,
UNet2DConditionModel): exactly the original processor when unmodulated, equal to an independent
reference when modulated (tests/fam_reference.py: the original processors with hooks that scale
K and V), the input grid from the model's forward, gradient checkpointing, projections, the
interplay with diffusers' own switches, introspection.

Whole-network outputs are compared with the forward table at reduce_dim = the widest convolution's
fan-in (channels x 3 x 3), the longest reduction that follows the attention layers.
"""

import warnings

import pytest
import torch
from fam_reference import halving_grid, original_processors, prescaled
from srdiff_testing import assert_close, cpu_and_cuda

import srdiff
from srdiff.processors.context import token_grid

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

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


BUILDS = [pytest.param(_unet2d, id="UNet2DModel"), pytest.param(_unet2d_condition, id="UNet2DConditionModel")]


def _run(model, x, t, context=None):
    return model(x, t, context).sample if context is not None else model(x, t).sample


def _inputs(model, batch=2, size=(16, 16), device="cpu"):
    x = torch.randn(batch, model.config.in_channels, *size, device=device)
    t = torch.tensor([10, 500][:batch], device=device)
    conditional = isinstance(model, diffusers.UNet2DConditionModel)
    context = torch.randn(batch, 5, 32, device=device) if conditional else None
    return x, t, context


def _reference(model, names, mfam, x, t, context, size, lam=LAM):
    """The model with its original processors on ``names`` and K, V scaled by hooks there."""
    with original_processors(model, names), prescaled(model, names, mfam, lam, lambda n: halving_grid(n, size)):
        return _run(model, x, t, context)


@pytest.fixture
def device(request, monkeypatch):
    """cpu or cuda; on CUDA without TF32 convolutions, which would swamp the float32 comparisons."""
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param


@pytest.mark.parametrize("build", BUILDS)
def test_installs_on_every_self_attention_layer(build):
    model = build()
    attention = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    assert names == [n for n, m in attention.items() if not m.is_cross_attention]
    assert len(names) == 4
    for n, m in attention.items():
        processor = m.get_processor()
        assert isinstance(processor, srdiff.FAMAttnProcessor) == (n in names)
        assert isinstance(processor.original if n in names else processor, AttnProcessor2_0)
    assert [layer.name for layer in srdiff.fam_layers(model)] == names


def test_layer_filter_chooses_layers():
    model = _unet2d()
    names = srdiff.set_fam_attn_processor(model, layer_filter=lambda name, _: name.startswith("mid_block"))
    assert names == ["mid_block.attentions.0"]
    assert isinstance(model.down_blocks[1].attentions[0].get_processor(), AttnProcessor2_0)


@pytest.mark.parametrize("build", BUILDS)
def test_unmodulated_is_exactly_the_original(build):
    """Outside a context, with a None map, at lam = 0 and after removal: bit for bit diffusers'."""
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
        srdiff.set_fam_attn_processor(model, lam=LAM)
        restored = srdiff.remove_fam_attn_processor(model)
        assert len(restored) == 4 and srdiff.fam_layers(model) == []
        assert not model._forward_pre_hooks and not model._forward_hooks
        with srdiff.fam_context(torch.rand(16, 16)):
            assert torch.equal(_run(model, x, t, context), want)


@pytest.mark.parametrize("device", cpu_and_cuda(), indirect=True)
@pytest.mark.parametrize(
    "build, mfam_shape, size",
    [
        pytest.param(_unet2d, (16, 16), (16, 16), id="UNet2DModel-one-map"),
        pytest.param(_unet2d, (2, 16, 16), (16, 16), id="UNet2DModel-per-image"),
        pytest.param(_unet2d, (8, 12), (8, 12), id="UNet2DModel-non-square"),
        pytest.param(_unet2d_condition, (32, 32), (8, 8), id="UNet2DConditionModel-image-space-map"),
        pytest.param(_unet2d_condition, (2, 16, 8), (8, 4), id="UNet2DConditionModel-non-square"),
        pytest.param(_unet2d_condition, (12, 10), (6, 5), id="UNet2DConditionModel-odd"),
    ],
)
def test_modulated_matches_prescaled_reference(build, mfam_shape, size, device):
    """On CUDA the processor runs the fused kernels (float32, exact products). The odd 6 x 5 latent
    has a 3 x 3 grid at the second level (strided convolutions round up)."""
    model = build().to(device)
    x, t, context = _inputs(model, size=size, device=device)
    mfam = torch.rand(mfam_shape, device=device)
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    with torch.no_grad():
        with srdiff.fam_context(mfam):
            got = _run(model, x, t, context)
        assert all(layer.grid is not None for layer in srdiff.fam_layers(model))
        want = _reference(model, names, mfam, x, t, context, size)
        plain = _run(model, x, t, context)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert (got - plain).abs().max() > 1e-3, "the modulation did not change the output"


@pytest.mark.parametrize("mfam_shape", [(16, 16), (24, 16)], ids=["square-map", "transposed-map"])
def test_aspect_mismatch_is_resized_with_one_warning(mfam_shape):
    """A square or transposed map on a 16 x 24 latent: every token layer is modulated, the map
    stretched to the layer's grid as the reference does, with one warning."""
    model = _unet2d_condition()
    x, t, context = _inputs(model, size=(16, 24))
    mfam = torch.rand(mfam_shape)
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with srdiff.fam_context(mfam):
            got = _run(model, x, t, context)
            _run(model, x, t, context)
    aspect = [w for w in caught if "aspect ratio" in str(w.message)]
    assert len(aspect) == 1 and f"{mfam_shape[0]}x{mfam_shape[1]}" in str(aspect[0].message)
    assert [layer.grid for layer in srdiff.fam_layers(model)] == [(16, 24), (16, 24), (16, 24), (8, 12)]  # down, up, up, mid (module order)
    with torch.no_grad():
        want = _reference(model, names, mfam, x, t, context, (16, 24))
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)


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
    want = _reference(model, names, mfam, x, t, None, (8, 8))
    want.square().sum().backward()
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert_close(got_grad, x.grad, dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name="dx")


def _grads(model, x, t, context, mfam, *, backward_inside):
    model.zero_grad(set_to_none=True)
    with srdiff.fam_context(mfam):
        loss = _run(model, x, t, context).square().sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", BUILDS)
def test_gradient_checkpointing_recomputes_the_modulation(build):
    """With enable_gradient_checkpointing, backward inside the context, outside it and inside another
    one recompute the original forward's modulation: the gradients are those without checkpointing."""
    model = build().train()
    x, t, context = _inputs(model, size=(8, 8))
    mfam = torch.rand(8, 8)
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="per_layer")
    want = _grads(model, x, t, context, mfam, backward_inside=True)
    model.enable_gradient_checkpointing()
    inside = _grads(model, x, t, context, mfam, backward_inside=True)
    outside = _grads(model, x, t, context, mfam, backward_inside=False)
    model.zero_grad(set_to_none=True)
    with srdiff.fam_context(mfam):
        loss = _run(model, x, t, context).square().sum()
    with srdiff.fam_context(torch.rand(8, 8)):
        loss.backward()
    other = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == inside.keys() == outside.keys() == other.keys()
    assert any("fam_projection" in n for n in want)
    for n in want:
        assert torch.equal(inside[n], outside[n]) and torch.equal(inside[n], other[n]), n
        assert_close(inside[n], want[n], dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name=n)


@pytest.mark.parametrize("kind", ["per_layer", "shared"])
def test_projections_are_registered_and_saved(kind):
    model = _unet2d()
    names = srdiff.set_fam_attn_processor(model, lam=LAM, projection=kind)
    modules = dict(model.named_modules())
    projections = [modules[n].get_processor().projection for n in names]
    if kind == "per_layer":
        assert len({id(p) for p in projections}) == 4
        assert all(modules[n].fam_projection is p for n, p in zip(names, projections))
    else:
        assert all(p is model.fam_projection for p in projections)
    params = srdiff.fam_parameters(model)
    assert len(params) == len(projections[0].state_dict()) * (4 if kind == "per_layer" else 1)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in params)
    assert sum("fam_projection" in k for k in model.state_dict()) == len(params)
    assert {layer.projection for layer in srdiff.fam_layers(model)} == {kind}


def test_shared_projection_runs_once_per_forward_and_is_fresh_each_step():
    """Two optimiser steps inside one context: the projection runs once per forward (not once per
    context), the second backward works, and the second forward sees the updated projection."""
    model = _unet2d().train()
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="shared")
    proj = model.fam_projection
    calls = []
    proj.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))
    opt = torch.optim.SGD(srdiff.fam_parameters(model), lr=10.0)
    x, t, _ = _inputs(model)
    with srdiff.fam_context(torch.rand(16, 16)):
        for _ in range(2):
            opt.zero_grad()
            _run(model, x, t).square().mean().backward()
            opt.step()
    assert len(calls) == 2
    assert not torch.equal(calls[0], calls[1]), "the second forward reused the first step's projection"


def test_external_projection_is_trained_through_the_processor():
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
    assert {id(p) for p in srdiff.fam_parameters(model)} == {id(p) for p in proj.parameters()}


def test_save_pretrained_round_trip(tmp_path):
    """The per-layer projections travel in save_pretrained's state dict; from_pretrained builds the
    model without them (diffusers logs the unused weights), set_fam_attn_processor + load_state_dict
    brings them back."""
    from safetensors.torch import load_file

    model = _unet2d()
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="per_layer")
    with torch.no_grad():
        for p in srdiff.fam_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert sum("fam_projection" in k for k in state) == len(srdiff.fam_parameters(model))
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    srdiff.set_fam_attn_processor(loaded, lam=LAM, projection="per_layer")
    loaded.load_state_dict(state)
    x, t, _ = _inputs(model)
    mfam = torch.rand(16, 16)
    with torch.no_grad(), srdiff.fam_context(mfam):
        assert torch.equal(_run(loaded, x, t), _run(model, x, t))


class UserProcessor(AttnProcessor2_0):
    """A processor of the user's own: srdiff knows neither a FAM version nor its token layout."""


def test_unknown_processor_is_refused_or_skipped_and_reported():
    model = _unet2d()
    model.mid_block.attentions[0].set_processor(UserProcessor())
    with pytest.raises(ValueError, match=r"layer 'mid_block.attentions.0' runs .*UserProcessor, which "
                                         r"srdiff does not modulate: no layout is declared for it"):
        srdiff.set_fam_attn_processor(model)
    assert not any(isinstance(m.processor, srdiff.FAMAttnProcessor) for m in model.modules()
                   if isinstance(m, Attention))
    with pytest.warns(UserWarning, match=r"skipped 1 layer.*'mid_block.attentions.0': 'UserProcessor'"):
        names = srdiff.set_fam_attn_processor(model, strict=False)
    assert len(names) == 3 and "mid_block.attentions.0" not in names


def test_another_attention_backend_is_refused_with_the_way_back():
    model = _unet2d()
    model.mid_block.attentions[0].set_processor(XFormersAttnProcessor())
    with pytest.raises(ValueError, match=r"runs .*XFormersAttnProcessor, which srdiff does not modulate: it calls "
                                         r"xformers' attention; model.set_default_attn_processor\(\)"):
        srdiff.set_fam_attn_processor(model)


def test_replaced_processors_warn_at_the_next_modulated_forward():
    """set_attention_slice swaps the processors behind the installer's back: the next forward in a
    context warns instead of silently running unmodulated."""
    model = _unet2d_condition()
    srdiff.set_fam_attn_processor(model, lam=LAM)
    model.set_attention_slice(1)
    x, t, context = _inputs(model, size=(8, 8))
    with torch.no_grad(), srdiff.fam_context(torch.rand(8, 8)):
        with pytest.warns(UserWarning, match=r"4 FAM layer\(s\) now run SlicedAttnProcessor .* NOT modulated"):
            _run(model, x, t, context)


def test_fused_qkv_projections_reinstall_keeps_the_modulation():
    """fuse_qkv_projections replaces the processors (the next forward warns); installing again puts a
    FAM processor over FusedAttnProcessor2_0 that projects with the fused to_qkv."""
    model = _unet2d_condition()
    x, t, context = _inputs(model, size=(8, 8))
    mfam = torch.rand(8, 8)
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    with torch.no_grad(), srdiff.fam_context(mfam):
        want = _run(model, x, t, context)
    model.fuse_qkv_projections()
    with torch.no_grad(), srdiff.fam_context(mfam), pytest.warns(UserWarning, match=r"FusedAttnProcessor2_0"):
        _run(model, x, t, context)
    assert srdiff.set_fam_attn_processor(model, lam=LAM) == names
    processor = model.get_submodule(names[0]).get_processor()
    assert processor.fused and isinstance(processor.original, FusedAttnProcessor2_0)
    with torch.no_grad(), srdiff.fam_context(mfam):
        got = _run(model, x, t, context)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)


def test_set_default_attn_processor_raises_until_removed():
    model = _unet2d_condition()
    srdiff.set_fam_attn_processor(model)
    with pytest.raises(ValueError, match=r"FAMAttnProcessor"):
        model.set_default_attn_processor()
    srdiff.remove_fam_attn_processor(model)
    model.set_default_attn_processor()


def test_peft_lora_on_the_attention_projections():
    """LoRA adapters on to_q/to_k/to_v/to_out (added after the install) are used by the modulated path."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = _unet2d_condition()
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    x, t, context = _inputs(model, size=(8, 8))
    mfam = torch.rand(8, 8)
    with torch.no_grad():
        with srdiff.fam_context(mfam):
            got = _run(model, x, t, context)
        want = _reference(model, names, mfam, x, t, context, (8, 8))
        model.disable_adapters()
        with srdiff.fam_context(mfam):
            without = _run(model, x, t, context)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert (got - without).abs().max() > 1e-3, "the LoRA adapters were not used"


def test_introspection_and_strict_contexts():
    model = _unet2d()
    x, t, _ = _inputs(model)
    mfam = torch.rand(16, 16)
    assert srdiff.active_mfam() is None
    with srdiff.fam_context(mfam):
        assert srdiff.active_mfam() is mfam
        with srdiff.fam_context(None):
            assert srdiff.active_mfam() is None
    srdiff.set_fam_attn_processor(model, lam=0.0)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"strict=True\): the model's forward modulated no attention layer"):
            with srdiff.fam_context(mfam, strict=True):
                _run(model, x, t)
        with pytest.raises(RuntimeError, match=r"no attention layer was modulated inside the block"):
            with srdiff.fam_context(mfam, strict=True):
                pass
        srdiff.set_fam_attn_processor(model, lam=LAM)
        with srdiff.fam_context(mfam, strict=True):
            _run(model, x, t)
        assert [layer.grid for layer in srdiff.fam_layers(model)] == [(8, 8)] * 4
        _run(model, x, t)
        assert all(layer.grid is None for layer in srdiff.fam_layers(model))


def test_attention_mask_runs_the_prescaled_path():
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    attn.set_processor(srdiff.FAMAttnProcessor(LAM))
    hidden, mfam = torch.randn(2, 16, 32), torch.rand(8, 8)
    mask = torch.zeros(2, 16)
    mask[:, -3:] = -1e4
    with torch.no_grad(), srdiff.fam_context(mfam, grid=(4, 4)):  # a bare layer: no model hook knows its grid
        got = attn(hidden, attention_mask=mask)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad(), prescaled(torch.nn.ModuleDict({"attn": attn}), ["attn"], mfam, LAM, lambda n: (4, 4)):
        want = attn(hidden, attention_mask=mask)
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
    """Strided convolutions round up, patch embeddings round down; the smallest factor wins."""
    assert token_grid(64, (16, 16)) == (16 // 2, 16 // 2)
    assert token_grid(32, (16, 8)) == (8, 4)
    assert token_grid(9, (6, 5)) == (3, 3)
    assert token_grid(6, (7, 9)) == (2, 3)
    assert token_grid(96, (16, 24)) == (8, 12)
    assert token_grid(77, (16, 16)) is None


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
    with pytest.raises(ValueError, match=r"mfam must have 2 or 3 or 4 dims, got shape \(16,\)"):
        with srdiff.fam_context(torch.rand(16)):
            pass
    with pytest.raises(ValueError, match=r"grid must be None or two positive ints \(H, W\), got \(0, 4\)"):
        with srdiff.fam_context(torch.rand(4, 4), grid=(0, 4)):
            pass
    with pytest.raises(ValueError, match=r"lam must be >= 0, got -0.1"):
        srdiff.FAMAttnProcessor(-0.1)
    for cls in (srdiff.FAMAttnProcessor, srdiff.FAMJointAttnProcessor, srdiff.FAMFluxAttnProcessor):
        for lam in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match=rf"lam must be finite, got {lam}"):
                cls(lam=lam)
        with pytest.raises(TypeError, match=r"lam must be a real number, got str"):
            cls(lam="0.1")
    with pytest.raises(ValueError, match=r"lam must be finite, got inf"):
        srdiff.set_fam_attn_processor(_unet2d(), lam=float("inf"))
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'cubic'"):
        srdiff.FAMAttnProcessor(mode="cubic")
    with pytest.raises(TypeError, match=r"projection must be a FAMProjection or None, got Linear"):
        srdiff.FAMAttnProcessor(projection=torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        srdiff.set_fam_attn_processor("unet")
    with pytest.raises(ValueError, match=r"UNet2DModel has no FAM processors installed"):
        srdiff.remove_fam_attn_processor(_unet2d())
    model = _unet2d()
    with pytest.raises(ValueError, match=r"projection must be None, 'per_layer', 'shared' or a FAMProjection, "
                                         r"got 'each'"):
        srdiff.set_fam_attn_processor(model, projection="each")
    srdiff.set_fam_attn_processor(model, projection="per_layer")
    with pytest.raises(ValueError, match=r"model holds FAM projections .* from an earlier projection='per_layer'"):
        srdiff.set_fam_attn_processor(model, projection="shared")
    x, t, _ = _inputs(model)
    with pytest.raises(ValueError, match=r"mfam holds 3 maps but the layer sees a batch of 2"):
        with torch.no_grad(), srdiff.fam_context(torch.rand(3, 16, 16)):
            _run(model, x, t)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    attn.set_processor(srdiff.FAMAttnProcessor(LAM))
    with pytest.raises(ValueError, match=r"cannot place its 16 tokens on the image: the model's input grid is "
                                         r"unknown"):
        with torch.no_grad(), srdiff.fam_context(torch.rand(4, 4)):
            attn(torch.randn(1, 16, 32))


def test_deepcopy_carries_its_own_installation():
    """An EMA copy (copy.deepcopy) modulates with its own processors, hooks and projections."""
    import copy

    model = _unet2d()
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="per_layer")
    ema = copy.deepcopy(model)
    x, t, _ = _inputs(model)
    mfam = torch.rand(16, 16)
    with torch.no_grad():
        with srdiff.fam_context(mfam):
            want = _run(model, x, t)
            assert torch.equal(_run(ema, x, t), want)
        for p in srdiff.fam_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        with srdiff.fam_context(mfam):
            assert torch.equal(_run(ema, x, t), want)
            assert not torch.equal(_run(model, x, t), want)
    copied = {id(p) for p in srdiff.fam_parameters(ema)}
    assert copied and not copied & {id(p) for p in srdiff.fam_parameters(model)}
    assert [layer.grid for layer in srdiff.fam_layers(ema)] == [(8, 8)] * 4
