"""srdiff.UViT: the compact U-ViT. Shapes and configuration, exactly plain attention when
unmodulated, and in a fam_context equal to the same network with hooks that scale the in- and
out-blocks' keys and values (tests/fam_reference.py; the middle block unscaled, the leading
time/class tokens scaled by 1), forward and backward; checkpointing, saving, torch.compile.

Outputs are compared with the forward table at reduce_dim = the MLP's hidden width (4 x 32), the
longest reduction after the attention layers.
"""

import copy

import pytest
import torch
from fam_reference import checkpointing_gradients, prescaled
from srdiff_testing import assert_close

import srdiff
from srdiff.models import UViT, UViTConfig

LAM = 0.5
FAN_IN = 128


def _uvit(size=(8, 12), **kwargs):
    options = {"sample_size": size, "in_channels": 3, "patch_size": 2, "width": 32, "depth": 4, "heads": 2, "lam": LAM}
    return UViT(UViTConfig(**{**options, **kwargs})).eval()


def _modulated_names(model):
    return [f"{part}.{i}.attn" for part in ("in_blocks", "out_blocks") for i in range(model.config.depth // 2)]


def _reference(model, mfam, *args, **kwargs):
    with prescaled(model, _modulated_names(model), mfam, LAM, lambda n: model.grid,
                   leading=model.config.extra_tokens):
        return model(*args, **kwargs).sample


def test_shapes_tokens_and_config():
    model = _uvit(num_classes=5)
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([3, 700])
    assert model(x, t).sample.shape == (2, 3, 8, 12)
    assert model(x, 5, class_labels=torch.tensor([0, 4])).sample.shape == (2, 3, 8, 12)
    assert model.pos_embed.shape == (1, 2 + 4 * 6, 32)  # class and time tokens, then the 4 x 6 patches
    assert len(model.in_blocks) == len(model.out_blocks) == 2
    assert model.out_blocks[0].skip_linear is not None and model.in_blocks[0].skip_linear is None
    unconditional = _uvit(out_channels=6)
    assert unconditional.config.extra_tokens == 1 and unconditional(x, t).sample.shape == (2, 6, 8, 12)
    with pytest.raises(ValueError, match=r"class_labels given but the model is unconditional"):
        unconditional(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"sample must be \(B, 3, 8, 12\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t)


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": 3}, r"depth must be an even int >= 2"),
    ({"sample_size": 9}, r"sample_size must be positive ints divisible by patch_size=2, got 9"),
    ({"heads": 3}, r"heads must divide width, got width=32, heads=3"),
    ({"fam_projection": "each"}, r"fam_projection must be one of"),
    ({"depth": 0}, r"depth must be an int >= 2, got 0"),
    ({"lam": -1.0}, r"lam must be >= 0"),
    ({"lam": float("inf")}, r"lam must be finite, got inf"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _uvit(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 32.0}, r"width must be an int, got 32.0 \(float\)"),
    ({"lam": "0.1"}, r"lam must be a real number, got str"),
])
def test_bad_config_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        _uvit(**kwargs)


def test_unmodulated_is_plain_attention_exactly():
    model = _uvit(num_classes=3)
    x, t, y = torch.randn(2, 3, 8, 12), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        want = model(x, t, class_labels=y).sample
        with srdiff.fam_context(None):
            assert torch.equal(model(x, t, class_labels=y).sample, want)
        zero = _uvit(num_classes=3, lam=0.0)
        zero.load_state_dict(model.state_dict())
        with srdiff.fam_context(torch.rand(8, 12)):
            assert torch.equal(zero(x, t, class_labels=y).sample, want)


@pytest.mark.parametrize("num_classes, mfam_shape", [(0, (16, 24)), (4, (2, 8, 12))],
                         ids=["unconditional-image-space-map", "class-conditional-per-image"])
def test_modulated_matches_prescaled_reference(num_classes, mfam_shape):
    """In- and out-blocks modulated, the middle block not, leading tokens unscaled; forward and dx."""
    model = _uvit(num_classes=num_classes)
    x = torch.randn(2, 3, 8, 12, requires_grad=True)
    t = torch.tensor([3, 700])
    y = torch.tensor([1, 3]) if num_classes else None
    mfam = torch.rand(mfam_shape)
    with srdiff.fam_context(mfam, strict=True):
        got = model(x, t, class_labels=y).sample
    assert [layer.grid for layer in srdiff.fam_layers(model)] == [(4, 6)] * 4
    assert [layer.name for layer in srdiff.fam_layers(model)] == _modulated_names(model)
    got.square().sum().backward()
    got_grad, x.grad = x.grad, None
    want = _reference(model, mfam, x, t, class_labels=y)
    want.square().sum().backward()
    with torch.no_grad():
        plain = model(x, t, class_labels=y).sample
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert_close(got_grad, x.grad, dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name="dx")
    assert (got - plain).abs().max() > 1e-3, "the modulation did not change the output"


@pytest.mark.parametrize("kind", ["per_layer", "shared"])
def test_projections_train_and_are_saved(kind, tmp_path):
    from dataclasses import asdict

    model = _uvit(fam_projection=kind).train()
    params = srdiff.fam_parameters(model)
    assert len(params) == 6 * (4 if kind == "per_layer" else 1)
    assert {layer.projection for layer in srdiff.fam_layers(model)} == {kind}
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([3, 700])
    opt = torch.optim.SGD(params, lr=1.0)
    with srdiff.fam_context(torch.rand(8, 12)):
        for _ in range(2):  # two steps in one context: the projection runs afresh each forward
            opt.zero_grad()
            model(x, t).sample.square().mean().backward()
            assert all(p.grad is not None for p in params)
            opt.step()
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, tmp_path / "uvit.pt")
    saved = torch.load(tmp_path / "uvit.pt")
    loaded = UViT.from_config(saved["config"]).eval()
    loaded.load_state_dict(saved["state_dict"])
    model.save_pretrained(tmp_path / "pretrained")
    pretrained = UViT.from_pretrained(tmp_path / "pretrained").eval()
    assert pretrained.config == model.config
    ema = copy.deepcopy(model).eval()
    model.eval()
    mfam = torch.rand(8, 12)
    with torch.no_grad(), srdiff.fam_context(mfam):
        want = model(x, t).sample
        for other in (loaded, pretrained, ema):
            assert torch.equal(other(x, t).sample, want)


def test_gradient_checkpointing_in_and_out_of_context():
    model = _uvit(fam_projection="per_layer").train()
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([3, 700])
    mfam = torch.rand(8, 12)

    want, inside, outside = checkpointing_gradients(model, mfam, lambda m: m(x, t))
    assert want.keys() == inside.keys() == outside.keys()
    for n in want:
        assert torch.equal(inside[n], outside[n]), n
        assert_close(inside[n], want[n], dtype=torch.float32, pass_="bwd", reduce_dim=FAN_IN, name=n)


def test_compile_fullgraph_no_recompile_per_map():
    import torch._dynamo

    model = _uvit(size=(8, 8), fam_projection="shared")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for i in range(3):
            with srdiff.fam_context(torch.rand(8, 8)), torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(x, t).sample
                want = model(x, t).sample
            assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    torch._dynamo.reset()


def test_set_fam_attn_processor_resets_lam_and_projection():
    """The trainer's one call works on UViT too: it re-sets the blocks' lam and projection (here an
    external one) and remove_fam_attn_processor puts the model's own FAM layers back."""
    model = _uvit(lam=0.1)
    x, t = torch.randn(2, 3, 8, 12), torch.tensor([3, 700])
    mfam = torch.rand(8, 12)
    with torch.no_grad(), srdiff.fam_context(mfam):
        own = model(x, t).sample
    projection = srdiff.FAMProjection()
    names = srdiff.set_fam_attn_processor(model, lam=LAM, projection=projection)
    assert names == _modulated_names(model)
    assert {(layer.lam, layer.projection) for layer in srdiff.fam_layers(model)} == {(LAM, "external")}
    with torch.no_grad():
        with srdiff.fam_context(mfam):
            got = model(x, t).sample
        want = _reference(model, mfam, x, t)
    assert_close(got, want, dtype=torch.float32, reduce_dim=FAN_IN)
    assert srdiff.remove_fam_attn_processor(model) == names
    with torch.no_grad(), srdiff.fam_context(mfam):
        assert torch.equal(model(x, t).sample, own)
