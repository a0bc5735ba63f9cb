"""The networks a :class:`~srdiff.highlighter.FlawHighlighter` can wrap, and their Grad-CAM target layers.

Built in: ``"small"``, a plain CNN for 16-64 px images, and ``"vgg16"`` / ``"vgg16_bn"``, torchvision's
convolutional features as in the paper. Both end in :class:`Head`, which turns the features into one
real/fake score ``s`` and returns the logits ``(-s/2, s/2)``: the "fake" logit is then the margin
itself, so its Grad-CAM carries no component common to both classes. Any other torchvision
classification model (by name) or a user ``nn.Module`` that returns (B, 2) logits works too, with the
target layers named.
"""

import math
from collections import OrderedDict

import torch
import torch.nn as nn

BUILTIN = ("small", "vgg16", "vgg16_bn")
POOLS = ("avg", "max", "lse")
HEADS = ("map", "linear", "mlp")
LSE_SHARPNESS = 4.0

# Default target layers of the torchvision families a user is likely to name (pytorch-grad-cam's choices).
TORCHVISION_TARGETS = {"resnet": ["layer4"], "resnext": ["layer4"], "wide_resnet": ["layer4"], "densenet": ["features"],
                       "mobilenet": ["features"], "efficientnet": ["features"], "convnext": ["features"]}

# VGG16's max pools sit at these indices of ``features``; the last (30) is always dropped, the head pools.
_VGG_POOLS = (4, 9, 16, 23)


class Head(nn.Module):
    """(B, C, h, w) features -> one fake-vs-real score s per image -> logits (-s/2, s/2).

    kind:
        ``"map"``: a 1x1 convolution without bias scores every position, m(p) = w . A(p), and s pools
        m over positions. The Grad-CAM of the fake logit is then ReLU(m), min-max scaled: the map of
        positive fake evidence itself, all zeros where there is none.
        ``"linear"``: s = w . pool(A) + b (a CAM network); ``"mlp"``: the authors' two-layer MLP
        (``hidden`` units) on pool(A).
    pool: ``"avg"``, ``"max"`` or ``"lse"``, log-mean-exp with sharpness ``LSE_SHARPNESS``: a smooth
        maximum, so one flawed region can decide the image while every position gets gradient.
    """

    def __init__(self, channels: int, pool: str = "lse", kind: str = "map", hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        self.pool_kind, self.kind = pool, kind
        if kind == "map":
            self.score = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, 1, 1, bias=False))
        elif kind == "linear":
            self.score = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, 1))
        else:
            self.score = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C)."""
        flat = x.flatten(2)
        if self.pool_kind == "avg":
            return flat.mean(dim=2)
        if self.pool_kind == "max":
            return flat.amax(dim=2)
        return (torch.logsumexp(LSE_SHARPNESS * flat, dim=2) - math.log(flat.shape[2])) / LSE_SHARPNESS

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        s = self.pool(self.score(features)) if self.kind == "map" else self.score(self.pool(features))
        return torch.cat([-0.5 * s, 0.5 * s], dim=1)


class ConvClassifier(nn.Module):
    """``features`` (images -> (B, C, h, w)) then ``head`` ((B, C, h, w) -> (B, 2) logits)."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def small_features(in_channels: int, width: int = 32, stages: int = 3) -> nn.Sequential:
    """``stages`` stages of two 3x3 conv-BN-ReLU, 2x2 max pool between stages, widths doubling from
    ``width``. Named ``stage1``..``stageN``; stage k runs at stride 2^(k-1) (8x8 for stage 3 at 32 px)."""
    layers, cin = OrderedDict(), in_channels
    for k in range(stages):
        cout = width * 2**k
        block = ([nn.MaxPool2d(2)] if k else []) + _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout)
        layers[f"stage{k + 1}"] = nn.Sequential(*block)
        cin = cout
    return nn.Sequential(layers)


def vgg16_features(batch_norm: bool = False, map_stride: int = 16) -> nn.Sequential:
    """torchvision's VGG16(-BN) ``features`` without its last pool, randomly initialised, 3 input channels.

    map_stride: 16 (torchvision's last conv: 2x2 at 32 px, 14x14 at 224 px), 8 or 4: the last one or
    two of the remaining pools become ``nn.Identity`` so that the last convolutions keep a finer map
    (4x4 or 8x8 at 32 px). Module indices, hence state-dict keys, stay torchvision's, so a local
    ImageNet state dict still loads.
    """
    from torchvision.models.vgg import cfgs, make_layers

    # torchvision's VGG16 layers and initialisation, without building its 120M-parameter classifier.
    features = make_layers(cfgs["D"], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    features = features[: len(features) - 1]
    pool_idx = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    keep = {16: 4, 8: 3, 4: 2}[map_stride]
    for i in pool_idx[keep:]:
        features[i] = nn.Identity()
    return features


def build(backbone: str, *, in_channels: int, width: int, stages: int, map_stride: int, pool: str, head: str,
          hidden: int, dropout: float) -> tuple[nn.Module, list[str]]:
    """The network for a built-in or torchvision ``backbone`` name, and its default target layers."""
    if backbone == "small":
        features = small_features(in_channels, width, stages)
        channels, targets = width * 2 ** (stages - 1), [f"features.stage{stages}"]
    elif backbone in ("vgg16", "vgg16_bn"):
        features = vgg16_features(backbone == "vgg16_bn", map_stride)
        channels, targets = 512, [f"features.{len(features) - 1}"]
    else:
        return torchvision_classifier(backbone), default_targets(backbone)
    return ConvClassifier(features, Head(channels, pool, head, hidden, dropout)), targets


def torchvision_classifier(name: str) -> nn.Module:
    """Any torchvision classification model by name, randomly initialised, with 2 outputs."""
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ValueError(f"backbone must be one of {BUILTIN}, a torchvision classification model or an nn.Module, got {name!r}")
    return models.get_model(name, weights=None, num_classes=2)


def default_targets(name: str) -> list[str]:
    for family, targets in TORCHVISION_TARGETS.items():
        if name.startswith(family):
            return list(targets)
    return []
