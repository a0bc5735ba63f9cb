"""FAM processors on small randomly initialised diffusers transformers: DiT (class-conditional,
AttnProcessor2_0 on patch tokens), SD3 (JointAttnProcessor2_0: image tokens first, text tokens
after them, plus SD3.5's image-only second attention) and Flux (FluxAttnProcessor: packed image
tokens, text first; single-stream blocks see both concatenated). Each layer's grid is the patch grid
(H // p, W // p) of the input, given to the reference independently of the processors' search.

Outputs are compared with the forward table at reduce_dim = the widest linear layer's fan-in (the
feed-forward's hidden width), the longest reduction after the attention layers.
"""

import contextlib

import pytest
import torch
from fam_reference import checkpointing_gradients, original_processors, prescaled
from srdiff_testing import assert_close

import srdiff

diffusers = pytest.importorskip("diffusers")

LAM = 0.5
PATCH = 2
FAN_IN = 64  # 4 x the width 16: the feed-forward's hidden layer


def _dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=PATCH, num_embeds_ada_norm=10, norm_num_groups=4,
    ).eval()


def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=PATCH, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,),
    ).eval()


BUILDS = [pytest.param(_dit, id="DiT"), pytest.param(_sd3, id="SD3")]


def _inputs(model, size, batch=2):
    x = torch.randn(batch, 4, *size)
    t = torch.tensor([10, 500][:batch])
    if isinstance(model, diffusers.DiTTransformer2DModel):
        return {"hidden_states": x, "timestep": t, "class_labels": torch.tensor([1, 7][:batch])}
    return {"hidden_states": x, "timestep": t, "encoder_hidden_states": torch.randn(batch, 5, 16),
            "pooled_projections": torch.randn(batch, 8)}


def _patch_grid(size):
    return lambda n: (size[0] // PATCH, size[1] // PATCH)


def _reference(model, names, maps, inputs, size):
    """Original processors, K and V of each named layer scaled with ``maps[name]`` (image tokens only:
    the text stream's add_k_proj/add_v_proj are not hooked, so text keys keep s = 1)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(original_processors(model, names))
        for name in names:
            stack.enter_context(prescaled(model, [name], maps[name], LAM, _patch_grid(size)))
        return model(**inputs).sample


@pytest.mark.parametrize("build", BUILDS)
def test_installs_on_the_self_and_joint_layers(build):
    model = build()
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    if isinstance(model, diffusers.SD3Transformer2DModel):
        want, family = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"], \
            srdiff.FAMJointAttnProcessor
    else:
        want, family = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], srdiff.FAMAttnProcessor
    assert names == want
    assert all(isinstance(model.get_submodule(n).processor, family) for n in names)


@pytest.mark.parametrize("build", BUILDS)
def test_unmodulated_is_exactly_the_original(build):
    model = build()
    inputs = _inputs(model, (8, 8))
    with torch.no_grad():
        want = model(**inputs).sample
        srdiff.set_fam_attn_processor(model, lam=LAM)
        assert torch.equal(model(**inputs).sample, want)
        srdiff.set_fam_attn_processor(model, lam=0.0)
        with srdiff.fam_context(torch.rand(8, 8)):
            assert torch.equal(model(**inputs).sample, want)


@pytest.mark.parametrize("build, mfam_shape, size", [
    pytest.param(_dit, (16, 16), (8, 8), id="DiT-image-space-map"),
    pytest.param(_dit, (2, 6, 6), (6, 6), id="DiT-per-image-odd-grid"),
    pytest.param(_sd3, (16, 16), (8, 8), id="SD3-image-space-map"),
    pytest.param(_sd3, (2, 8, 12), (8, 12), id="SD3-non-square-per-image"),
    pytest.param(_sd3, (6, 10), (6, 10), id="SD3-odd-grid"),
])
def test_modulated_matches_prescaled_reference_with_gradients(build, mfam_shape, size):
    """Forward and input gradient equal the prescaled-K/V reference; 6 x 6 and 6 x 10 latents have
    3 x 3 and 3 x 5 patch grids. (diffusers' DiTTransformer2DModel unpatchifies square grids only,
    so DiT is tested on square latents.)"""
    model = build()
    inputs = _inputs(model, size)
    x = inputs["hidden_states"].requires_grad_()
    mfam = torch.rand(mfam_shape)
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    with srdiff.fam_context(mfam):
        got = model(**inputs).sample
    assert [layer.grid for layer in srdiff.fam_layers(model)] == [_patch_grid(size)(0)] * len(names)
    got.square().sum().backward()
    got_grad, x.grad = x.grad, None
    want = _reference(model, names, dict.fromkeys(names, mfam), inputs, size)
    want.square().sum().backward()
    with torch.no_grad():
        plain = model(**inputs).sample
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert_close(got_grad, x.grad, dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name="dx")
    assert (got - plain).abs().max() > 1e-3, "the modulation did not change the output"


@pytest.mark.parametrize("build", BUILDS)
def test_per_layer_projection_matches_reference(build):
    """Each layer applies its own projection (perturbed away from the identity) to the map."""
    model = build()
    size = (8, 12) if isinstance(model, diffusers.SD3Transformer2DModel) else (8, 8)
    inputs = _inputs(model, size)
    names = srdiff.set_fam_attn_processor(model, lam=LAM, projection="per_layer")
    with torch.no_grad():
        for p in srdiff.fam_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        mfam = torch.rand(size)
        maps = {n: model.get_submodule(n).fam_projection(mfam) for n in names}
        assert not torch.equal(maps[names[0]], maps[names[1]])
        with srdiff.fam_context(mfam):
            got = model(**inputs).sample
        want = _reference(model, names, maps, inputs, size)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)


@pytest.mark.parametrize("build", BUILDS)
def test_gradient_checkpointing_in_and_out_of_context(build):
    model = build().train()
    size = (8, 12) if isinstance(model, diffusers.SD3Transformer2DModel) else (8, 8)
    inputs = _inputs(model, size)
    mfam = torch.rand(size)
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="shared")

    want, inside, outside = checkpointing_gradients(model, mfam, lambda m: m(**inputs))  # DiT drops labels at random
    assert want.keys() == inside.keys() == outside.keys() and "fam_projection.net.4.weight" in want
    for n in want:
        assert torch.equal(inside[n], outside[n]), n
        assert_close(inside[n], want[n], dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name=n)


def test_compile_fullgraph_no_recompile_per_map():
    """torch.compile(fullgraph=True) traces the hooks and processors (a graph break would raise) and
    a new map in a new context reuses the graph (error_on_recompile)."""
    import torch._dynamo

    model = _dit()
    inputs = _inputs(model, (8, 8))
    srdiff.set_fam_attn_processor(model, lam=LAM, projection="shared")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for i in range(3):
            mfam = torch.rand(8, 8)
            with srdiff.fam_context(mfam), torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(**inputs).sample
                want = model(**inputs).sample
            assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    torch._dynamo.reset()


def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()


def _flux_inputs(grid, batch=2, n_text=5):
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return {"hidden_states": torch.randn(batch, h * w, 4), "encoder_hidden_states": torch.randn(batch, n_text, 16),
            "pooled_projections": torch.randn(batch, 8), "timestep": torch.tensor([0.1, 0.5][:batch]),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(n_text, 3)}


def test_flux_dual_and_single_stream_blocks():
    """Unmodulated exactly FluxAttnProcessor; modulated equal to the reference, in which the dual
    block's image keys (norm_k output, (B, N, H, D)) and values are scaled and the single block's
    text+image keys get 1 for the 5 text tokens in front; the grid comes from img_ids."""
    model = _flux()
    grid = (4, 6)
    inputs = _flux_inputs(grid)
    inputs["hidden_states"].requires_grad_()
    mfam = torch.rand(8, 12)
    with torch.no_grad():
        want_plain = model(**inputs).sample
    names = srdiff.set_fam_attn_processor(model, lam=LAM)
    assert names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, want_plain)
    with srdiff.fam_context(mfam):
        got = model(**inputs).sample
    assert [layer.grid for layer in srdiff.fam_layers(model)] == [grid, grid]
    got.square().sum().backward()
    x = inputs["hidden_states"]
    got_grad, x.grad = x.grad, None
    with contextlib.ExitStack() as stack:
        stack.enter_context(original_processors(model, names))
        stack.enter_context(prescaled(model, names[:1], mfam, LAM, lambda n: grid, key_token_dim=1))
        stack.enter_context(prescaled(model, names[1:], mfam, LAM, lambda n: grid, leading=5, key_token_dim=1))
        want = model(**inputs).sample
    want.square().sum().backward()
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert_close(got_grad, x.grad, dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name="dx")
    assert (got - want_plain).abs().max() > 1e-3, "the modulation did not change the output"
