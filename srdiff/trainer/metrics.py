"""Sample quality without downloads: FID and KID (torchmetrics) on the features of a small network trained
locally on the real data, plus k-NN precision/recall (Kynkaanniemi et al. 2019, k=3 as the authors report).

No Inception weights can be fetched here, so the default feature network is a small CNN trained once
on the real training images and cached: as a digit classifier when labels exist, else on a
self-supervised rotation task (0/90/180/270 degrees), which needs no labels. Its held-out accuracy is
reported with every evaluation, because FID on a weak feature network means little. With
``inception_weights`` (a local torch-fidelity InceptionV3 file) the usual Inception features are used.
Numbers from different feature networks are not comparable with each other or with published FIDs.
"""

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srdiff.trainer.checkpoint import save_atomic

FEATURE_NET_VERSION = 1  # bump when FeatureNet or its training changes (invalidates caches)


class FeatureNet(nn.Module):
    """(N, C, H, W) images in [0, 1] -> (N, num_features) features; ``classify`` adds a linear head."""

    def __init__(self, in_channels: int, num_classes: int, num_features: int = 128):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, num_features, 3, stride=2, padding=1), nn.GroupNorm(8, num_features), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() * 2 - 1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))


def _rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(len(images))
    return rotated, labels


def train_feature_net(
    train: torch.Tensor,
    train_labels: torch.Tensor | None,
    test: torch.Tensor,
    test_labels: torch.Tensor | None,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
) -> tuple[FeatureNet, dict]:
    """Train a :class:`FeatureNet` (classes if labels are given, else rotations); returns it and
    ``{"task", "accuracy"}`` measured on ``test``."""
    task = "classes" if train_labels is not None else "rotation"
    if train_labels is None:
        train, train_labels = _rotations(train)
        test, test_labels = _rotations(test)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(train.shape[1], num_classes)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=gen)
            for i in range(0, len(train), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(net.classify(train[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([net.classify(test[i : i + 512]).argmax(1) for i in range(0, len(test), 512)])
    return net, {"task": task, "accuracy": float((pred == test_labels).float().mean())}


def cached_feature_net(key: dict, cache_dir: str, build) -> tuple[FeatureNet, dict]:
    """Load the feature network cached under ``key`` or ``build()`` it and cache it."""
    digest = hashlib.sha256(json.dumps({**key, "version": FEATURE_NET_VERSION}, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"features-{digest[:16]}.pt"
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureNet(state["in_channels"], state["num_classes"])
        net.load_state_dict(state["model"])
        return net.eval().requires_grad_(False), {**state["info"], "cached": str(path)}
    net, info = build()
    save_atomic({"model": net.state_dict(), "in_channels": net.body[0].in_channels,
                 "num_classes": net.head.out_features, "info": info}, path)
    return net, {**info, "cached": str(path)}


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall: the fraction of fake features inside some real feature's k-NN ball
    (precision), and of real features inside some fake feature's ball (recall). real, fake: (N, F)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"need more than k={k} real and fake samples, got {len(real)} and {len(fake)}")

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def coverage(ref, query):
        r = radii(ref)
        return float((torch.cdist(query, ref) <= r[None]).any(dim=1).float().mean())

    real, fake = real.double(), fake.double()
    return coverage(real, fake), coverage(fake, real)


def _features(net: nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(images[i : i + batch]).double() for i in range(0, len(images), batch)])


def evaluate(fake: torch.Tensor, real: torch.Tensor, net: nn.Module, *, k: int = 3,
             kid_subsets: int = 50) -> dict:
    """FID, KID (mean and std over subsets) and k-NN precision/recall of ``fake`` against ``real``.

    fake, real: (N, C, H, W) in [0, 1]. ``net`` maps images to features (a :class:`FeatureNet`, or an
    ``inception_net``).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=net, normalize=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=net, subsets=kid_subsets,
                                      subset_size=min(1000, len(fake), len(real)), normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), 512):
            fid.update(images[i : i + 512], real=is_real)
            kid.update(images[i : i + 512], real=is_real)
    kid_mean, kid_std = kid.compute()
    precision, recall = knn_precision_recall(_features(net, real), _features(net, fake), k=k)
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "precision": precision,
        "recall": recall,
        "n_real": len(real),
        "n_fake": len(fake),
    }


class _InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (2048-d pool features) on [0, 1] images, from a local weights file."""

    def __init__(self, weights_path: str):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:
            raise ValueError("inception_weights needs torch-fidelity: pip install torch-fidelity") from exc
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net((images * 255).byte())


def feature_network(config, train, train_labels, test, test_labels) -> tuple[nn.Module, dict]:
    """The network whose features FID/KID/PR use, per ``config`` (cached local CNN or Inception)."""
    if config.inception_weights is not None:
        if not Path(config.inception_weights).is_file():
            raise ValueError(f"inception_weights {config.inception_weights!r} is not a file")
        return _InceptionFeatures(config.inception_weights).eval(), {"task": "inception", "accuracy": None}
    key = {"data": config.data, "image_size": config.image_size, "channels": config.channels,
           "holdout": config.holdout, "seed": config.seed, "epochs": config.feature_epochs,
           "labels": train_labels is not None, "n": len(train)}
    return cached_feature_net(
        key, config.cache_dir,
        lambda: train_feature_net(train, train_labels, test, test_labels, epochs=config.feature_epochs,
                                  seed=config.seed),
    )


def evaluate_generator(config, generate, n: int, train_images, train_labels, holdout_images, holdout_labels) -> dict:
    """Evaluate ``generate(n)`` ((n, C, H, W) in [0, 1]) against the held-out images with the feature
    network for ``config``; the result carries the feature network's task and held-out accuracy."""
    net, info = feature_network(config, train_images, train_labels, holdout_images, holdout_labels)
    start = time.perf_counter()
    fake = generate(n)
    seconds = time.perf_counter() - start
    return {**evaluate(fake, holdout_images, net), "feature_net": info, "sampling_seconds": seconds}
