"""Every attention family srdiff modulates, on tiny random models (tests/tiny_models.py): installed on
the layers it should be, exact when unmodulated, equal to an independent reference when modulated
(forward and input gradient, square and non-square grids, the FAM processor and the hook path alike),
under gradient checkpointing, and under ``torch.compile(fullgraph=True)`` (``aot_eager`` on CPU);
video models modulate their spatial self-attention and never their temporal attention.

The reference (tests/fam_reference.py) scales K and V where the family's attention consumes them (each
SDPA call of a modulated layer), with the image keys as the test states them (``Family.keys``), or for
families whose attention is not an SDPA call (Sana's linear attention) with the test's own projection
hooks. Outputs are compared with the shared table at reduce_dim = the model's widest fan-in (the longest
reduction after the attention layers).
"""

import contextlib

import pytest
import torch
from fam_reference import (
    assert_modulated,
    checkpointing_gradients,
    original_processors,
    prescaled,
    scaled_attention,
)
from tiny_models import FAMILIES
from srdiff_testing import assert_close

import srdiff

from diffusers.models.attention_processor import AttnProcessor2_0

IDS = [f.name for f in FAMILIES]


def _output(out) -> torch.Tensor:
    sample = out.sample if hasattr(out, "sample") else out[0]
    return torch.stack(sample) if isinstance(sample, list) else sample  # Z-Image: one tensor per sample


def _fan_in(model) -> int:
    """The widest reduction of the model's linear and convolution layers."""
    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widths += [m.weight[0].numel() for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return max(widths)


def _with_grad(inputs, name):
    """``inputs`` with the tensor (or list of tensors) ``name`` requiring grad; returns (inputs, leaves)."""
    value = inputs[name]
    leaves = [t.detach().requires_grad_() for t in (value if isinstance(value, list) else [value])]
    inputs = {**inputs, name: leaves if isinstance(value, list) else leaves[0]}
    return inputs, leaves


def _forward_backward(model, inputs, family):
    """Output and the gradient of sum(output^2) with respect to the family's input."""
    inputs, leaves = _with_grad(inputs, family.grad_input)
    out = _output(model(**inputs))
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return out.detach(), torch.cat([g.flatten() for g in grads])


@contextlib.contextmanager
def _reference(model, family, names, mfam, size, batch):
    """The model with the processors its FAM layers replaced, K and V scaled by the test's reference."""
    keys = family.layer_keys(names, size, batch)
    with contextlib.ExitStack() as stack:
        fused = [n for n in names if isinstance(model.get_submodule(n).processor, srdiff.processors.FAMLayer)]
        stack.enter_context(original_processors(model, fused))
        hooked = [n for n in names if n not in fused]
        saved = {n: getattr(model.get_submodule(n), "_srdiff_fam_hook") for n in hooked}
        for n in hooked:  # the hook path's hooks stay attached but see no active layer
            saved[n].detach()
        if family.reference == "attention-2_0":
            stack.enter_context(processors_replaced(model, names, AttnProcessor2_0))
        try:
            if family.reference == "projections":
                grid = keys[names[0]].grid
                stack.enter_context(prescaled(model, names, mfam, family.lam,
                                              grid if callable(grid) else lambda n: grid, key_token_dim=1))
            else:
                stack.enter_context(scaled_attention(model, keys, mfam, family.lam))
            yield
        finally:
            for n in hooked:
                saved[n].attach(model.get_submodule(n))


@contextlib.contextmanager
def processors_replaced(model, names, factory):
    """Inside the block the named layers run ``factory()`` processors."""
    saved = {n: model.get_submodule(n).processor for n in names}
    for n in names:
        model.get_submodule(n).processor = factory()
    try:
        yield
    finally:
        for n, processor in saved.items():
            model.get_submodule(n).processor = processor


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_unmodulated_is_exactly_the_original(family):
    """Outside a context, at lam = 0 inside one, and after removal: bit for bit diffusers' output."""
    model = family.model()
    inputs = family.inputs(family.sizes[0], family.batch)
    mfam = torch.rand(16, 16)
    with torch.no_grad():
        want = _output(model(**inputs))
        names = srdiff.set_fam_attn_processor(model, lam=family.lam)
        assert names, "no layer was modulated"
        paths = {layer.path for layer in srdiff.fam_layers(model)}
        assert paths == ({"fused"} if family.fused else {"hook"}), paths
        assert torch.equal(_output(model(**inputs)), want)
        srdiff.set_fam_attn_processor(model, lam=0.0)
        with srdiff.fam_context(mfam):
            assert torch.equal(_output(model(**inputs)), want)
        srdiff.set_fam_attn_processor(model, lam=family.lam, path="hook")
        assert torch.equal(_output(model(**inputs)), want)
        srdiff.remove_fam_attn_processor(model)
        with srdiff.fam_context(mfam):
            assert torch.equal(_output(model(**inputs)), want)


CASES = [pytest.param(f, size, path, id=f"{f.name}-{'x'.join(map(str, size))}-{path}")
         for f in FAMILIES for size in f.sizes for path in (("auto", "hook") if f.fused else ("auto",))]


@pytest.mark.parametrize("family, size, path", CASES)
def test_modulated_matches_the_reference(family, size, path):
    """Forward and input gradient equal the reference's on a square and a non-square grid; a map of
    another size than the input is resized to every layer's grid."""
    model = family.model()
    inputs = family.inputs(size, family.batch)
    frames = size[0] if len(size) == 3 else None
    # video: one map per video on the square size, one per frame on the other
    per_frame = frames is not None and size != family.sizes[0]
    maps = (family.batch,) if family.per_image_maps else ()
    mfam = torch.rand(*maps, frames, 12, 12) if per_frame else torch.rand(*maps, 12, 12)
    names = srdiff.set_fam_attn_processor(model, lam=family.lam, path=path)
    with srdiff.fam_context(mfam):
        got, got_dx = _forward_backward(model, inputs, family)
    assert all(layer.grid is not None for layer in srdiff.fam_layers(model))
    with _reference(model, family, names, mfam, size, family.batch):
        want, want_dx = _forward_backward(model, inputs, family)
    plain, _ = _forward_backward(model, inputs, family)
    fan_in = _fan_in(model)
    assert_close(got, want, dtype=torch.float32, reduce_dim=fan_in)
    assert_close(got_dx, want_dx, dtype=torch.float32, pass_="bwd", reduce_dim=fan_in, name="dx")
    assert_modulated(got, plain, fan_in)


CHECKPOINTED = [f for f in FAMILIES if getattr(f.build(), "_supports_gradient_checkpointing", False)]


@pytest.mark.parametrize("family", CHECKPOINTED, ids=[f.name for f in CHECKPOINTED])
def test_gradient_checkpointing_replays_the_modulation(family):
    """With enable_gradient_checkpointing, the backward recomputes each block with the map of its forward:
    parameter gradients (the shared projection's included) equal each other whether the backward runs
    inside or after the context, and those without checkpointing within the backward table."""
    model = family.model().train()
    inputs = family.inputs(family.sizes[1], family.batch)
    mfam = torch.rand(family.batch, 12, 12) if family.per_image_maps else torch.rand(12, 12)
    srdiff.set_fam_attn_processor(model, lam=family.lam, projection="shared")
    want, inside, outside = checkpointing_gradients(model, mfam, lambda m: SampleOf(m(**inputs)))
    assert want.keys() == inside.keys() == outside.keys() and "fam_projection.net.4.weight" in want
    fan_in = _fan_in(model)
    for n in want:
        assert torch.equal(inside[n], outside[n]), n
        assert_close(inside[n], want[n], dtype=torch.float32, pass_="bwd", reduce_dim=fan_in, name=n)


class SampleOf:
    """A model output whose ``.sample`` is the family's output tensor (what checkpointing_gradients reads)."""

    def __init__(self, out):
        self.sample = _output(out)


COMPILED = [pytest.param(f, id=f.name, marks=[pytest.mark.slow] + (
    [pytest.mark.skip(reason=f.compile)] if f.compile else [])) for f in FAMILIES]


@pytest.mark.parametrize("family", COMPILED)
def test_compile_fullgraph_without_recompiles_per_map(family):
    """torch.compile(fullgraph=True) traces the model hook, the placement of the image tokens and the
    family's path (a graph break would raise); a new map in a new context reuses the graph
    (error_on_recompile); the compiled output equals the eager one."""
    import torch._dynamo

    model = family.model()
    size = family.sizes[1]
    inputs = family.inputs(size, family.batch)
    srdiff.set_fam_attn_processor(model, lam=family.lam)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    fan_in = _fan_in(model)
    with torch.no_grad():
        for i in range(2):
            mfam = torch.rand(family.batch, 12, 12) if family.per_image_maps else torch.rand(12, 12)
            with srdiff.fam_context(mfam), torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = _output(compiled(**inputs))
                want = _output(model(**inputs))
            assert_close(got, want, dtype=torch.float32, reduce_dim=fan_in)
    torch._dynamo.reset()


# Where diffusers' video models keep their temporal attention (across the frames of one pixel or patch)
TEMPORAL = {"UNet3DCondition": ("transformer_in", "temp_attentions"), "UNetMotion": ("motion_modules",),
            "UNetSpatioTemporal": ("temporal_transformer_blocks",), "Latte": ("temporal_transformer_blocks",)}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in TEMPORAL], ids=list(TEMPORAL))
def test_only_spatial_self_attention_is_modulated(family):
    """Video models alternating spatial and temporal attention: the modulated layers are exactly the
    spatial self-attention layers; no temporal layer (a spatial map has no value for a frame token)."""
    model = family.model()
    spatial = [n for n, m in model.named_modules() if hasattr(m, "processor") and not m.is_cross_attention
               and not set(TEMPORAL[family.name]) & set(n.split("."))]
    temporal = [n for n, m in model.named_modules() if hasattr(m, "processor")
                and set(TEMPORAL[family.name]) & set(n.split("."))]
    assert spatial and temporal
    assert srdiff.set_fam_attn_processor(model, lam=family.lam) == spatial
    assert [layer.name for layer in srdiff.fam_layers(model)] == spatial
