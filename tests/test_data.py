"""srdiff.data: value ranges checked (never clamped), tensor files that fail with their name and shape,
single image files, and a split that needs an image on each side."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from srdiff import data


def _save(tmp_path, obj, name="images.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_unit_range_float_passes_unchanged(recwarn):
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(data.to_unit_range(x), x)
    assert not recwarn.list


def test_uint8_is_divided_by_255_with_a_warning():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    with pytest.warns(UserWarning, match=r"uint8 values read as 0\.\.255"):
        out = data.to_unit_range(x)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))


def test_minus_one_to_one_is_mapped_with_a_warning():
    x = torch.tensor([-1.0, 0.0, 0.5]).view(1, 1, 1, 3)
    with pytest.warns(UserWarning, match=r"values in \[-1, 0\.5\] read as \[-1, 1\]"):
        out = data.to_unit_range(x)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.75]).view(1, 1, 1, 3))


@pytest.mark.parametrize(
    "values, match",
    [
        pytest.param(torch.full((2, 3, 4, 4), 200.0), r"dtype torch\.float32, values in \[200, 200\]", id="float-0-255"),
        pytest.param(torch.full((2, 3, 4, 4), 1.5), r"values in \[1\.5, 1\.5\]", id="above-one"),
        pytest.param(torch.full((2, 3, 4, 4), -2.0), r"values in \[-2, -2\]", id="below-minus-one"),
        pytest.param(torch.ones(2, 3, 4, 4, dtype=torch.int64), r"dtype torch\.int64", id="int64"),
        pytest.param(torch.tensor([0.5, float("nan")]).view(1, 1, 1, 2), "must be finite", id="nan"),
    ],
)
def test_out_of_range_values_are_refused_with_name_shape_dtype(values, match):
    with pytest.raises(ValueError, match=match) as info:
        data.to_unit_range(values, "'x.pt'")
    assert "'x.pt'" in str(info.value) and str(tuple(values.shape)) in str(info.value)


def test_tensor_file_out_of_range_names_the_file_and_is_not_clamped(tmp_path):
    path = _save(tmp_path, torch.full((3, 1, 8, 8), 255.0))
    with pytest.raises(ValueError, match=r"images\.pt.*shape \(3, 1, 8, 8\), dtype torch\.float32, values in \[255, 255\]"):
        data.load_images(path, 8, 1)


def test_tensor_file_uint8_and_resize_and_channels(tmp_path):
    path = _save(tmp_path, torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="uint8"):
        images = data.load_images(path, 8, 3)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images, torch.ones(2, 3, 8, 8))


@pytest.mark.parametrize(
    "obj, match",
    [
        pytest.param(torch.rand(3, 8, 8), r"got shape \(3, 8, 8\) \(torch\.float32\); one image \(C, H, W\)\? save x\[None\]",
                     id="3d"),
        pytest.param(torch.rand(2, 8, 8, 3), r"C = 1 or 3, got shape \(2, 8, 8, 3\); channels-last", id="channels-last"),
        pytest.param(torch.rand(0, 1, 8, 8), r"holds no images: shape \(0, 1, 8, 8\)", id="empty"),
        pytest.param({"images": torch.rand(2, 1, 8, 8)}, "must hold one .* tensor, got a dict", id="dict"),
    ],
)
def test_tensor_file_wrong_content_names_what_it_holds(tmp_path, obj, match):
    path = _save(tmp_path, obj)
    with pytest.raises(ValueError, match=match) as info:
        data.load_images(path, 8, 1)
    assert str(path) in str(info.value)


def _write_text(path):
    path.write_text("hello\n")


def _write_empty(path):
    path.write_bytes(b"")


def _write_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a", "b")


def _write_numpy_pickle(path):
    path.write_bytes(pickle.dumps({"a": np.zeros(3)}, protocol=2))


@pytest.mark.parametrize("write, match", [
    (_write_text, "torch.load failed with KeyError"),
    (_write_empty, "torch.load failed with EOFError"),
    (_write_zip, "torch.load failed with RuntimeError"),
    (_write_numpy_pickle, "holds objects other than tensors, which are not unpickled"),
], ids=["text", "empty", "zip", "pickle"])
def test_non_torch_file_is_a_clear_value_error(tmp_path, write, match):
    path = tmp_path / "notes.dat"
    write(path)
    with pytest.raises(ValueError, match=match) as info:
        data.load_images(path, 8, 1)
    assert f"{str(path)!r} is not a tensor file" in str(info.value)


def test_single_image_file_and_folder_names(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    pixels = np.full((12, 10, 3), 255, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sub" / "b.png")
    Image.fromarray(pixels).save(tmp_path / "a.png")
    images, names = data.read_images(tmp_path / "a.png", 8, 1)
    assert images.shape == (1, 1, 8, 8) and names == ["a"]
    torch.testing.assert_close(images, torch.ones(1, 1, 8, 8))
    images, names = data.read_images(tmp_path, 8, 3)
    assert images.shape == (2, 3, 8, 8) and names == ["a", "sub__b"]
    images, names = data.read_images(_save(tmp_path, torch.rand(3, 1, 8, 8)), 8, 1)
    assert names == ["0000", "0001", "0002"]


def test_unreadable_single_image_file_is_an_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        data.read_images(path, 8, 1)


def test_missing_source_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'digits', a folder, an image file or a tensor file, got .*nowhere"):
        data.load_images(tmp_path / "nowhere", 8, 1)


@pytest.mark.parametrize("n, holdout, need", [(1, 0.2, 2), (0, 0.2, 2), (3, 0.9, 5)])
def test_split_needs_an_image_on_each_side(n, holdout, need):
    with pytest.raises(ValueError, match=rf"{n} image\(s\) cannot be split .* holdout={holdout}: at least {need}"):
        data.split(torch.arange(n), holdout)
    train, held = data.split(torch.arange(need), holdout)
    assert len(train) >= 1 and len(held) >= 1 and len(train) + len(held) == need
