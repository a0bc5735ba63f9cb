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
