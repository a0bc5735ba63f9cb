"""srdiff.FlawHighlighter: FAMs against pytorch-grad-cam, state restoration, batches, bad inputs,
persistence, training, and the ``srdiff highlighter train`` / ``srdiff fam`` commands.

FAMs are float32 Grad-CAM maps of float32 models, so the float32 row of the shared tolerance table
applies; the reduction behind one pixel is C*h*w of the target layer.
"""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import srdiff
from srdiff import cli
from srdiff.highlighter import FlawHighlighter
from srdiff_testing import assert_close, cpu_and_cuda, strided


def _small(**kwargs):
    kwargs = {"in_channels": 1, "image_size": 32, "width": 8, **kwargs}
    return FlawHighlighter("small", **kwargs)


def _grad_cam(hl, layer_names, images):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = [hl.net.get_submodule(n) for n in layer_names]
    with GradCAM(model=hl, target_layers=layers) as cam:
        return torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(1)] * len(images)))


def _reduce_dim(hl, layer, images):
    out = {}
    handle = hl.net.get_submodule(layer).register_forward_hook(lambda m, i, o: out.update(shape=o.shape))
    with torch.no_grad():
        hl.eval()(images)
    handle.remove()
    return out["shape"][1] * out["shape"][2] * out["shape"][3]


@pytest.mark.parametrize(
    "make, layers, shape",
    [
        pytest.param(lambda: _small(), ["features.stage3"], (3, 1, 32, 32), id="small-map-lse-32px"),
        pytest.param(lambda: _small(head="linear", pool="avg"), ["features.stage3"], (2, 1, 32, 32), id="small-linear-avg"),
        pytest.param(lambda: _small(head="mlp", pool="max", hidden=16), ["features.stage2", "features.stage3"],
                     (2, 1, 29, 37), id="small-mlp-max-two-layers-29x37"),
        pytest.param(lambda: FlawHighlighter("vgg16", in_channels=3, image_size=32, map_stride=8), ["features.29"],
                     (2, 3, 32, 32), id="vgg16-stride8-32px"),
        pytest.param(lambda: FlawHighlighter("resnet18", in_channels=3, image_size=48), ["layer3"], (2, 3, 48, 48),
                     id="resnet18-layer3"),
    ],
)
def test_fam_matches_pytorch_grad_cam(make, layers, shape):
    """Same model, layers and target (class 1): the maps pytorch-grad-cam's GradCAM computes."""
    hl = make()
    hl.target_layers = layers
    for m in hl.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    images = torch.rand(shape)
    ours = hl.fam(images, mirror=False)
    expected = _grad_cam(hl, layers, images)
    assert ours.shape == (shape[0], shape[2], shape[3]) and ours.dtype == torch.float32
    reduce_dim = max(_reduce_dim(hl, layer, images) for layer in layers)
    assert_close(ours, expected, dtype=torch.float32, reduce_dim=reduce_dim, name="FAM vs pytorch-grad-cam")
    assert ours.min() >= 0 and ours.max() <= 1


def test_mirrored_fam_is_the_geometric_mean_with_the_mirror_image():
    """mirror=True: sqrt(GradCAM(x) * flip(GradCAM(flip(x)))), min-max scaled, from pytorch-grad-cam's maps."""
    from srdiff.reference.gradcam import minmax_normalize

    hl = _small()
    images = torch.rand(3, 1, 32, 32)
    plain = _grad_cam(hl, ["features.stage3"], images)
    mirrored = _grad_cam(hl, ["features.stage3"], images.flip(-1)).flip(-1)
    expected = minmax_normalize((plain * mirrored).sqrt())
    n = _reduce_dim(hl, "features.stage3", images)
    assert_close(hl.fam(images), expected, dtype=torch.float32, reduce_dim=n, name="mirrored FAM")


def test_fam_restores_modes_flags_and_grads():
    hl = _small(dropout=0.2)
    hl.train()
    hl.net.head.eval()  # a mixed state must come back as it was
    hl.net.features.stage1[0].weight.requires_grad_(False)
    sentinel = torch.full_like(hl.net.features.stage2[1].weight, 7.0)
    hl.net.features.stage2[1].weight.grad = sentinel.clone()
    modes = {name: m.training for name, m in hl.named_modules()}
    flags = {name: p.requires_grad for name, p in hl.named_parameters()}
    stats = {k: v.clone() for k, v in hl.state_dict().items()}

    images = torch.rand(4, 1, 32, 32)
    fams = hl.fam(images)

    assert {name: m.training for name, m in hl.named_modules()} == modes
    assert {name: p.requires_grad for name, p in hl.named_parameters()} == flags
    assert torch.equal(hl.net.features.stage2[1].weight.grad, sentinel)
    assert all(p.grad is None for n, p in hl.named_parameters() if n != "net.features.stage2.1.weight")
    for k, v in hl.state_dict().items():  # BatchNorm running statistics untouched (eval mode inside)
        assert torch.equal(v, stats[k]), k
    assert not images.requires_grad and images.grad is None
    assert not fams.requires_grad


def test_fam_under_no_grad_and_with_frozen_parameters():
    hl = _small().eval()
    images = torch.rand(3, 1, 32, 32)
    expected = hl.fam(images)
    hl.requires_grad_(False)
    with torch.no_grad():
        got = hl.fam(images)
    assert_close(got, expected, dtype=torch.float32, name="frozen, no_grad")
    assert not any(p.requires_grad for p in hl.parameters())


def test_fam_is_per_image_and_chunking_changes_nothing():
    """Batch size changes only the convolutions' summation order (oneDNN picks per shape)."""
    hl = _small()
    images = torch.rand(5, 1, 32, 32)
    whole = hl.fam(images)
    n = _reduce_dim(hl, "features.stage3", images)
    assert_close(hl.fam(images, batch_size=2), whole, dtype=torch.float32, reduce_dim=n, name="chunked")
    assert_close(hl.fam(images[3:4]), whole[3:4], dtype=torch.float32, reduce_dim=n, name="single image")
    assert_close(hl.fam(strided(images)), whole, dtype=torch.float32, reduce_dim=n, name="strided input")


def test_fam_at_the_images_own_size_and_mfam():
    hl = _small()
    images = torch.rand(3, 1, 45, 27)
    fams = hl.fam(images)
    assert fams.shape == (3, 45, 27)
    mfam = hl.mfam(images)
    assert mfam.shape == (45, 27)
    assert_close(mfam, fams.mean(dim=0), dtype=torch.float32, reduce_dim=3, name="mFAM")


def test_empty_batch():
    hl = _small()
    assert hl.fam(torch.rand(0, 1, 32, 32)).shape == (0, 32, 32)
    with pytest.raises(ValueError, match="at least one image"):
        hl.mfam(torch.rand(0, 1, 32, 32))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fam_stays_on_the_images_device(device):
    hl = _small().to(device)
    images = torch.rand(2, 1, 32, 32, device=device)
    fams = hl.fam(images)
    assert fams.device == images.device and fams.shape == (2, 32, 32)
    if device == "cuda":
        assert_close(fams, hl.cpu().fam(images.cpu()), dtype=torch.float32, reduce_dim=32 * 8 * 8, name="cuda vs cpu")


BAD_FAM_INPUTS = [
    pytest.param(lambda: torch.rand(2, 3, 32, 32), ValueError, r"images must have 1 channels .* got shape \(2, 3, 32, 32\)", id="channels"),
    pytest.param(lambda: torch.rand(1, 32, 32), ValueError, r"images must have 4 dims, got shape \(1, 32, 32\)", id="rank"),
    pytest.param(lambda: [[0.5]], TypeError, "images must be a torch.Tensor, got list", id="not-tensor"),
    pytest.param(lambda: torch.ones(2, 1, 32, 32, dtype=torch.uint8), TypeError, "images must be a floating-point tensor, got dtype torch.uint8", id="uint8"),
    pytest.param(lambda: torch.rand(2, 1, 1, 32), ValueError, "at least 2x2 pixels", id="one-row"),
]


@pytest.mark.parametrize("make, error, message", BAD_FAM_INPUTS)
def test_bad_images_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        _small().fam(make())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param({"target_layers": ["features.stage9"]}, ValueError, "target layer 'features.stage9' is not a submodule", id="missing-layer"),
        pytest.param({"target_layers": []}, ValueError, "target_layers must name at least one layer", id="no-layer"),
        pytest.param({"in_channels": 2}, ValueError, "in_channels must be 1 or 3, got 2", id="channels"),
        pytest.param({"image_size": 4}, ValueError, "image_size must be an int >= 8, got 4", id="size"),
        pytest.param({"pool": "median"}, ValueError, "pool must be one of", id="pool"),
        pytest.param({"std": 0.0}, ValueError, "std > 0", id="std"),
    ],
)
def test_bad_construction_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        _small(**kwargs)


def test_unknown_backbone_and_custom_module_without_layers():
    with pytest.raises(ValueError, match="backbone must be one of .* got 'resnet1000'"):
        FlawHighlighter("resnet1000")
    with pytest.raises(ValueError, match="target_layers must name at least one layer of backbone 'custom'"):
        FlawHighlighter(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(TypeError, match="backbone must be a name or an nn.Module, got int"):
        FlawHighlighter(3)


def test_custom_module_and_non_feature_map_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    hl = FlawHighlighter(net, in_channels=3, image_size=16, target_layers=["1"])
    assert hl.fam(torch.rand(2, 3, 16, 16)).shape == (2, 16, 16)
    hl.target_layers = ["3"]
    with pytest.raises(ValueError, match=r"target layer output must be a \(B, C, h, w\) tensor, got \(\d+, 8\)"):
        hl.fam(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="custom nn.Module backbone"):
        FlawHighlighter.from_config(hl.config)


def test_network_must_return_two_logits():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    hl = FlawHighlighter(net, in_channels=1, image_size=16, target_layers=["1"])
    with pytest.raises(ValueError, match=r"must return \(B, 2\) logits .* got shape \(\d+, 3\)"):
        hl.fam(torch.rand(2, 1, 16, 16))


def test_config_save_load_roundtrip(tmp_path):
    hl = _small(head="map", pool="max", target_layers=["features.stage2", "features.stage3"])
    for p in hl.parameters():
        p.data.normal_()
    config = hl.config
    assert json.loads(json.dumps(config)) == config  # primitives only
    path = tmp_path / "sub" / "hl.pt"
    hl.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["hl.pt"]  # no temporary left behind
    loaded = FlawHighlighter.load(path)
    assert loaded.config == config
    images = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.eval()(images), hl.eval()(images))
    assert_close(loaded.fam(images), hl.fam(images), dtype=torch.float32, name="loaded FAM")


def test_save_is_atomic(tmp_path, monkeypatch):
    hl = _small()
    path = tmp_path / "hl.pt"
    hl.save(path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _small(width=4).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hl.pt"]


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="is not a FlawHighlighter checkpoint"):
        FlawHighlighter.load(path)


def test_load_backbone_weights_from_a_local_torchvision_state_dict(tmp_path):
    """torchvision's VGG16 layout (``features.N.*`` plus a classifier that is ignored)."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    hl = FlawHighlighter("vgg16", in_channels=1, image_size=32, map_stride=8)
    hl.load_backbone_weights(path)
    for i in (0, 17, 28):
        assert torch.equal(hl.net.features[i].weight, features[i].weight)


def test_fit_history_and_steps():
    hl = _small()
    real, fake = torch.rand(20, 1, 24, 24) * 0.5, torch.rand(16, 1, 40, 40) * 0.5 + 0.5
    history = hl.fit(real, fake, epochs=2, batch_size=8, progress=False, seed=0)
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) >= {"loss", "accuracy", "balanced_accuracy", "roc_auc", "train_loss", "lr", "steps"}
    assert not hl.training
    before = {k: v.clone() for k, v in hl.state_dict().items()}
    short = hl.fit(real, fake, steps=3, batch_size=8, progress=False)
    assert len(short) == 1 and short[0]["steps"] == 3
    assert any(not torch.equal(v, before[k]) for k, v in hl.state_dict().items())


def test_fit_learns_an_easy_task():
    """Bright vs dark images: a few epochs must separate them (a trainer that cannot learn fails here)."""
    hl = _small()
    real = torch.rand(64, 1, 32, 32) * 0.4
    fake = torch.rand(64, 1, 32, 32) * 0.4 + 0.6
    history = hl.fit(real, fake, epochs=3, batch_size=16, progress=False, seed=0)
    assert history[-1]["accuracy"] == 1.0 and history[-1]["roc_auc"] == 1.0
    assert bool((hl.predict(fake) > 0.5).all()) and bool((hl.predict(real) < 0.5).all())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param({"epochs": 2, "steps": 2}, ValueError, "give epochs or steps, not both", id="both"),
        pytest.param({"epochs": 0}, ValueError, "epochs must be an int >= 1, got 0", id="epochs"),
        pytest.param({"batch_size": 1}, ValueError, "batch_size must be >= 2", id="batch"),
        pytest.param({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\)", id="val"),
    ],
)
def test_fit_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        _small().fit(torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32), progress=False, **kwargs)


def test_fit_bad_images():
    with pytest.raises(ValueError, match="fake must have 1 channels"):
        _small().fit(torch.rand(4, 1, 32, 32), torch.rand(4, 3, 32, 32), steps=1, progress=False)
    with pytest.raises(ValueError, match="need at least 2 real and 2 fake images, got 1 real"):
        _small().fit(torch.rand(1, 1, 32, 32), torch.rand(4, 1, 32, 32), steps=1, progress=False)


def test_public_name_and_lazy_import():
    assert srdiff.FlawHighlighter is FlawHighlighter


def _write_folder(folder, n, size=20, broken=()):
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        pixels = (torch.rand(size, size + 3, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    for name in broken:
        (folder / name).write_bytes(b"not an image")


def test_cli_train_then_fam_skips_unreadable_files(tmp_path):
    _write_folder(tmp_path / "real", 6)
    _write_folder(tmp_path / "fake", 6, size=30)
    ckpt = tmp_path / "hl.pt"
    assert cli.main(["highlighter", "train", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--out", str(ckpt), "--image-size", "16", "--width", "4", "--epochs", "1", "--batch-size", "4",
                     "--quiet", "--history", str(tmp_path / "history.json")]) == 0
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1
    _write_folder(tmp_path / "images", 3, size=25, broken=("broken.png", "empty.jpg"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["fam", "--highlighter", str(ckpt), "--images", str(tmp_path / "images"),
                         "--out", str(tmp_path / "out")]) == 0
    skipped = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(skipped) == 2 and any("broken.png" in m for m in skipped) and any("empty.jpg" in m for m in skipped)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert (out / "contact-sheet.png").is_file() and (out / "mfam.png").is_file()
    mfam = torch.load(out / "mfam.pt", weights_only=True)
    assert mfam.shape == (16, 16) and 0 <= mfam.min() and mfam.max() <= 1


def test_cli_train_on_planted_digits(tmp_path):
    ckpt = tmp_path / "hl.pt"
    assert cli.main(["highlighter", "train", "--real", "digits", "--fake", "planted:checkerboard", "--out", str(ckpt),
                     "--channels", "1", "--image-size", "16", "--width", "4", "--epochs", "1", "--quiet"]) == 0
    hl = FlawHighlighter.load(ckpt)
    assert hl.config["in_channels"] == 1 and hl.config["image_size"] == 16
