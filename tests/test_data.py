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
    with pytest.warns(UserWarning, match=r"a.png' is 10x12: resized .* cutting its edges"):
        images, names = data.read_images(tmp_path / "a.png", 8, 1)
    assert images.shape == (1, 1, 8, 8) and names == ["a"]
    torch.testing.assert_close(images, torch.ones(1, 1, 8, 8))
    with pytest.warns(UserWarning, match=r"2 images in 1 size\(s\) \(10x12 \(2\)\): .* the 2 non-square one\(s\)"):
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


# ---------------------------------------------------------------------- image files: depth, palettes, alpha, sizes
def _png(path, pixels, **save):
    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def test_sixteen_bit_grey_is_read_as_0_to_65535(tmp_path, recwarn):
    """16-bit PNG greys used to load all white (Pillow's convert("L") clips them at 255)."""
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    path = _png(tmp_path / "deep.png", levels)
    expected = torch.from_numpy(levels.astype(np.float32) / 65535)
    torch.testing.assert_close(data.read_image_file(path, 2, 1), expected[None], rtol=0, atol=0)
    torch.testing.assert_close(data.read_image_file(path, 2, 3), expected.expand(3, 2, 2), rtol=0, atol=0)
    ramp = _png(tmp_path / "ramp.png", (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    torch.testing.assert_close(data.read_image_file(ramp, 8, 1).mean(), torch.tensor(31.5 * 1000 / 65535))
    assert not recwarn.list


def test_palette_images_are_read_through_their_colours(tmp_path):
    from PIL import Image

    colours = np.array([[200, 10, 30], [0, 128, 255], [255, 255, 0]], dtype=np.uint8)
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = Image.fromarray(index, mode="P")
    palette.putpalette(colours.flatten().tolist())
    path = _png(tmp_path / "palette.png", palette)
    rgb = torch.from_numpy(colours[index].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(data.read_image_file(path, 2, 3), rgb, rtol=0, atol=0)
    grey = np.asarray(Image.fromarray(colours[index]).convert("L"), dtype=np.float32) / 255
    torch.testing.assert_close(data.read_image_file(path, 2, 1), torch.from_numpy(grey)[None], rtol=0, atol=0)


def test_transparent_pixels_are_composited_onto_white_and_counted(tmp_path):
    black = np.zeros((2, 2, 4), dtype=np.uint8)
    black[..., 3] = [[0, 128], [255, 255]]  # transparent, half, opaque, opaque
    _png(tmp_path / "folder" / "a.png", black)
    _png(tmp_path / "folder" / "b.png", np.dstack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2), 255, np.uint8)]))
    with pytest.warns(UserWarning, match=r"folder'?: 1 of 2 image\(s\) have transparent pixels: composited onto white"):
        images = data.load_images(tmp_path / "folder", 2, 1)
    torch.testing.assert_close(images[0, 0], torch.tensor([[1.0, 127 / 255], [0.0, 0.0]]), rtol=0, atol=1 / 255)
    assert torch.equal(images[1], torch.zeros(1, 2, 2))  # opaque alpha changes nothing
    keyed = _png(tmp_path / "keyed.png", np.zeros((2, 2), np.uint8), transparency=0)  # grey with a tRNS colour
    with pytest.warns(UserWarning, match=r"keyed.png'?: 1 of 1 image\(s\) have transparent pixels"):
        assert torch.equal(data.read_image_file(keyed, 2, 1), torch.ones(1, 2, 2))


def test_mixed_sizes_are_resized_with_one_notice_that_counts_them(tmp_path, recwarn):
    square = np.zeros((8, 8), np.uint8)
    for name in ("a", "b"):
        _png(tmp_path / "same" / f"{name}.png", square)
    assert data.load_images(tmp_path / "same", 4, 1).shape == (2, 1, 4, 4) and not recwarn.list
    _png(tmp_path / "same" / "wide.png", np.zeros((8, 12), np.uint8))
    _png(tmp_path / "same" / "big.png", np.zeros((16, 16), np.uint8))
    with pytest.warns(UserWarning) as caught:
        assert data.load_images(tmp_path / "same", 4, 1).shape == (4, 1, 4, 4)
    (message,) = [str(w.message) for w in caught]
    assert message.endswith("4 images in 3 size(s) (8x8 (2), 16x16 (1), 12x8 (1)): each resized (shorter side to "
                            "4) and centre-cropped to 4x4, cutting the edges of the 1 non-square one(s)"), message
    with pytest.warns(UserWarning, match=r"wide.png' is 12x8: resized .* cutting its edges"):
        data.read_image_file(tmp_path / "same" / "wide.png", 4, 1)


# ---------------------------------------------------------------------- class labels
def _class_folder(root, classes=("cat", "cat", "dog")):
    for i, name in enumerate(classes):
        _png(root / name / f"{i}.png", np.full((4, 4), 40 * i, np.uint8))
    return root


def test_class_subfolders_are_the_labels(tmp_path):
    from srdiff.labels import load_labelled

    images, labels, names = load_labelled(_class_folder(tmp_path / "pets"), 4, 1)
    assert images.shape == (3, 1, 4, 4) and labels.tolist() == [0, 0, 1] and names == ["cat", "dog"]
    _, labels, names = load_labelled(_class_folder(tmp_path / "digits", ("7", "3", "7")), 4, 1, "folders")
    assert labels.tolist() == [3, 7, 7] and names is None  # whole-number folders are those classes
    _png(tmp_path / "pets" / "stray.png", np.zeros((4, 4), np.uint8))
    assert load_labelled(tmp_path / "pets", 4, 1)[1] is None  # no ImageFolder layout: no labels under 'auto'
    with pytest.raises(ValueError, match=r"labels='folders' needs the ImageFolder layout .* 1 image\(s\) of .* sit "
                                         r"in its root, e.g. 'stray.png'"):
        load_labelled(tmp_path / "pets", 4, 1, "folders")
    assert load_labelled(_class_folder(tmp_path / "again"), 4, 1, "none")[1] is None


def test_labels_files_for_folders_and_tensor_files(tmp_path):
    import json

    from srdiff.labels import load_labelled

    folder = _class_folder(tmp_path / "pets")
    (tmp_path / "pets.csv").write_text("file_name,label\ndog/2.png,bird\ncat/0.png,ant\ncat/1.png,bird\n")
    _, labels, names = load_labelled(folder, 4, 1, str(tmp_path / "pets.csv"))
    assert labels.tolist() == [0, 1, 1] and names == ["ant", "bird"]
    (folder / "cat" / "broken.png").write_bytes(b"not a png")  # skipped with a warning: its line is passed over
    with open(tmp_path / "pets.csv", "a") as f:
        f.write("cat/broken.png,ant\n")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        assert load_labelled(folder, 4, 1, str(tmp_path / "pets.csv"))[1].tolist() == [0, 1, 1]
    tensors = _save(tmp_path, torch.rand(3, 1, 4, 4))
    lines = [json.dumps({"index": i, "label": label}) for i, label in ((2, 5), (0, 1), (1, 5))]
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    _, labels, names = load_labelled(tensors, 4, 1, str(tmp_path / "labels.jsonl"))
    assert labels.tolist() == [1, 5, 5] and names is None


@pytest.mark.parametrize("source, labels, text, match", [
    pytest.param("folder", "l.csv", "file_name,label\ncat/0.png,a\ncat/1.png,b\n",
                 r"gives no label for 1 of 3 images, e.g. file_name 'dog/2.png'", id="missing"),
    pytest.param("folder", "l.csv", "file_name,label\ncat/0.png,a\ncat/1.png,b\ndog/2.png,a\ncat/9.png,c\n",
                 r"l.csv, line 5 names file_name 'cat/9.png', which is not an image of the data", id="unknown-image"),
    pytest.param("folder", "l.csv", "file_name,label\ncat/0.png,a\ncat/0.png,b\n",
                 r"l.csv, line 3 names file_name 'cat/0.png' a second time", id="twice"),
    pytest.param("folder", "l.csv", "name,class\ncat/0.png,a\n", r"line 2 must give 'file_name' and 'label'",
                 id="columns"),
    pytest.param("tensor", "l.jsonl", '{"index": 3, "label": 1}\n',
                 r"names index 3, which is not an image of the data \(3 images, indices 0..2\)", id="index-range"),
    pytest.param("tensor", "l.jsonl", '{"index": 0, "label": 1\n', r"l.jsonl, line 1 is not JSON", id="not-json"),
    pytest.param("tensor", "folders", None, r"labels='folders' needs an image folder", id="folders-of-a-file"),
    pytest.param("digits", "l.csv", "", r"labels='.*l.csv' is for image folders and tensor files; data 'digits'",
                 id="builtin"),
    pytest.param("folder", "gone.csv", None, r"labels file '.*gone.csv' does not exist", id="no-file"),
    pytest.param("folder", "labels.txt", None, r"labels must be one of \('auto', 'folders', 'none'\) or a .csv / "
                 r".jsonl file, got '.*labels.txt'", id="kind"),
])
def test_bad_labels_are_refused_naming_the_file_and_line(tmp_path, source, labels, text, match):
    from srdiff.labels import load_labelled

    sources = {"folder": lambda: _class_folder(tmp_path / "pets"), "digits": lambda: "digits",
               "tensor": lambda: _save(tmp_path, torch.rand(3, 1, 8, 8))}
    if text is not None:
        (tmp_path / labels).write_text(text)
    labels = labels if labels in ("auto", "folders", "none") else str(tmp_path / labels)
    with pytest.raises(ValueError, match=match):
        load_labelled(sources[source](), 8, 1, labels)
