"""Data loading and preprocessing, checked against torchvision and hand-written NumPy."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

from sp2ps_onnx.data import PRESETS, Preprocessing, open_data, parse_classes, parse_size, read_image
from sp2ps_onnx.errors import InputDataError


def fake_model(layout="NCHW", channels=1, size=(28, 28)):
    return SimpleNamespace(layout=layout, channels=channels, input_spatial_size=size, path=None)


def collect(source, batch_size=4):
    images, labels, ids = [], [], []
    for batch in source.batches(batch_size):
        assert len(batch.images) == len(batch.ids) <= batch_size
        images.extend(batch.images)
        ids.extend(batch.ids)
        if batch.labels is not None:
            labels.extend(batch.labels.tolist())
    return images, labels, ids


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Class folders whose sorted order differs from creation order, with nested files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    layout = {"zebra": 2, "Apple": 3, "mango": 1, "banana": 2}
    for name, count in layout.items():
        (root / name / "sub").mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            iio.imwrite(root / name / f"img{i}.png", image)
        iio.imwrite(root / name / "sub" / "deep.png", rng.integers(0, 256, (9, 9), dtype=np.uint8))
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_image_folder_matches_torchvision(image_folder: Path) -> None:
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(image_folder))
    source = open_data(image_folder)
    images, labels, ids = collect(source, batch_size=3)
    assert source.class_names == reference.classes
    assert source.has_labels
    assert labels == [label for _, label in reference.samples]
    assert ids == [Path(p).relative_to(image_folder).as_posix() for p, _ in reference.samples]
    for image, (path, _) in zip(images, reference.samples, strict=True):
        pil = np.asarray(reference.loader(path))  # torchvision converts to RGB
        ours = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(ours, pil)


def test_classes_option_fixes_label_order(image_folder: Path, tmp_path: Path) -> None:
    order = ["mango", "zebra", "banana", "Apple", "unused"]
    class_file = tmp_path / "classes.txt"
    class_file.write_text("\n".join(order) + "\n\n")
    for classes in (str(class_file), ",".join(order), order):
        source = open_data(image_folder, classes=classes)
        _, labels, ids = collect(source)
        assert source.class_names == order
        for label, sample_id in zip(labels, ids, strict=True):
            assert order[label] == sample_id.split("/")[0]


def test_classes_missing_subfolder_is_an_error(image_folder: Path) -> None:
    with pytest.raises(InputDataError, match="zebra"):
        open_data(image_folder, classes="Apple,banana,mango")


def test_parse_classes_rejects_duplicates_and_empty() -> None:
    with pytest.raises(InputDataError, match="more than once"):
        parse_classes("a,b,a")
    with pytest.raises(InputDataError, match="empty"):
        parse_classes(" , ")


def test_flat_folder_and_single_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("b.png", "a.jpg", "c.bmp"):
        iio.imwrite(tmp_path / name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "readme.md").write_text("x")
    source = open_data(tmp_path)
    _, labels, ids = collect(source)
    assert ids == ["a.jpg", "b.png", "c.bmp"] and labels == [] and not source.has_labels
    single = open_data([tmp_path / "c.bmp", tmp_path / "b.png"])
    images, _, ids = collect(single)
    assert ids == ["c.bmp", "b.png"]
    np.testing.assert_array_equal(images[1], iio.imread(tmp_path / "b.png"))


def test_npz_and_npy_with_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (11, 6, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 11)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "d.npy", x)
    images, labels, ids = collect(open_data(tmp_path / "d.npz"))
    np.testing.assert_array_equal(np.stack(images), x)
    assert labels == y.tolist() and ids[3] == "d.npz[3]"
    source = open_data(tmp_path / "d.npy", limit=7)
    images, labels, _ = collect(source, batch_size=3)
    assert len(source) == 7 and labels == []
    np.testing.assert_array_equal(np.stack(images), x[:7])


def manual_preprocess(pixels_hwc: np.ndarray, mean, std, layout: str) -> np.ndarray:
    x = (pixels_hwc.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return x.transpose(0, 3, 1, 2) if layout == "NCHW" else x


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_presets_and_layout_match_numpy(preset: str, layout: str) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 7, 9, 3), dtype=np.uint8)
    prep = Preprocessing.for_model(fake_model(layout, 3, (7, 9)), preset)
    expected_mean, expected_std = {
        "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "inception": (0.5, 0.5),
        "unit": (0.0, 1.0),
        "raw": (0.0, 1 / 255),
    }[preset]
    x = prep(images)
    assert x.dtype == np.float32
    expected = manual_preprocess(images, expected_mean, expected_std, layout)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-4)
    if preset == "inception":
        assert x.min() >= -1 and x.max() <= 1
    if preset == "raw":
        np.testing.assert_allclose(x, manual_preprocess(images, 0, 1, layout) * 255, rtol=1e-5)


def test_mean_std_override() -> None:
    images = np.full((2, 5, 5, 3), 200, dtype=np.uint8)
    prep = Preprocessing.for_model(
        fake_model("NHWC", 3, (5, 5)), "imagenet", mean="0.1,0.2,0.3", std="0.5"
    )
    expected = (200 / 255 - np.array([0.1, 0.2, 0.3])) / 0.5
    np.testing.assert_allclose(prep(images)[0, 2, 2], expected, rtol=1e-6)
    with pytest.raises(InputDataError, match="3 input channel"):
        Preprocessing.for_model(fake_model("NHWC", 3, (5, 5)), "unit", mean="0.1,0.2")


def test_grey_and_rgb_conversion() -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    grey_prep = Preprocessing.for_model(fake_model("NCHW", 1, (6, 6)), "unit")
    x = grey_prep(rgb)
    assert x.shape == (3, 1, 6, 6)
    # Rec. 709 luma, the weights scikit-image documents for rgb2gray.
    luma = rgb.astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(x[:, 0], np.round(luma) / 255, atol=1 / 255 + 1e-6)
    grey = rgb[..., 0]
    rgb_prep = Preprocessing.for_model(fake_model("NHWC", 3, (6, 6)), "unit")
    y = rgb_prep(grey)
    assert y.shape == (3, 6, 6, 3)
    for channel in range(3):
        np.testing.assert_allclose(y[..., channel], grey / 255, rtol=1e-6)
    rgba = np.concatenate([rgb, np.zeros((3, 6, 6, 1), np.uint8)], axis=-1)
    np.testing.assert_array_equal(rgb_prep(rgba), rgb_prep(rgb))


def test_resize_shorter_side_and_centre_crop() -> None:
    from skimage.transform import resize

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (40, 80), dtype=np.uint8)
    prep = Preprocessing.for_model(fake_model("NCHW", 1, (20, 20)), "unit")
    x, display = prep.with_display([image])
    assert x.shape == (1, 1, 20, 20) and display.shape == (1, 20, 20, 1)
    # Shorter side 40 -> 20 (scale 0.5), width 80 -> 40, centre 20 columns are 10..30.
    expected = resize(image.astype(float), (20, 40), order=1, anti_aliasing=True, preserve_range=True)
    np.testing.assert_allclose(display[0, :, :, 0], np.clip(np.round(expected[:, 10:30]), 0, 255))
    same = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    np.testing.assert_array_equal(prep.with_display([same])[1][0, :, :, 0], same)


def test_each_model_gets_its_own_layout() -> None:
    images = np.random.default_rng(6).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    nchw = Preprocessing.for_model(fake_model("NCHW", 1, (8, 8)), "unit")(images)
    nhwc = Preprocessing.for_model(fake_model("NHWC", 1, (8, 8)), "unit")(images)
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)


def test_float_arrays_pass_through_and_transpose(tmp_path: Path) -> None:
    x = np.random.default_rng(7).normal(size=(5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "pre.npy", x)
    source = open_data(tmp_path / "pre.npy")
    assert source.preprocessed
    batch = next(source.batches(8))
    nchw = Preprocessing.for_model(fake_model("NCHW", 1, (8, 8)), "imagenet")
    nhwc = Preprocessing.for_model(fake_model("NHWC", 1, (8, 8)), "imagenet")
    np.testing.assert_array_equal(nchw(batch.images), x)
    np.testing.assert_array_equal(nhwc(batch.images), x.transpose(0, 2, 3, 1))
    wrong = Preprocessing.for_model(fake_model("NCHW", 1, (9, 9)), "unit")
    with pytest.raises(InputDataError, match="does not fit the model input"):
        wrong(batch.images)


def test_channels_first_uint8_arrays_are_recognised(tmp_path: Path) -> None:
    x = np.random.default_rng(8).integers(0, 256, (3, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "cf.npz", x=x)
    batch = next(open_data(tmp_path / "cf.npz").batches(3))
    out = Preprocessing.for_model(fake_model("NHWC", 3, (6, 6)), "unit")(batch.images)
    np.testing.assert_allclose(out, x.transpose(0, 2, 3, 1) / 255, rtol=1e-6)


def test_dynamic_size_needs_size_option() -> None:
    with pytest.raises(InputDataError, match="--size"):
        Preprocessing.for_model(fake_model("NCHW", 3, (None, None)), "imagenet")
    prep = Preprocessing.for_model(fake_model("NCHW", 3, (None, None)), "imagenet", size="16,12")
    assert (prep.height, prep.width) == (16, 12)
    assert parse_size("32x24") == (32, 24) and parse_size(5) == (5, 5)
    with pytest.raises(InputDataError):
        parse_size("big")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.npz", "does not exist"),
        (lambda p: _write(p / "data.csv", b"1,2"), "unsupported format"),
        (lambda p: _write(p / "broken.png", b"not a png"), "cannot decode image file"),
        (lambda p: _npz(p / "nox.npz", images=np.zeros((2, 4, 4), np.uint8)), "no array 'x'"),
        (lambda p: _npz(p / "shape.npz", x=np.zeros((2, 4, 4, 7, 1), np.uint8)), "shape"),
        (lambda p: _npz(p / "dtype.npz", x=np.zeros((2, 4, 4), np.int32)), "dtype"),
        (
            lambda p: _npz(p / "y.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, int)),
            "labels 'y'",
        ),
        (lambda p: _write(p / "junk.npy", b"junk"), "cannot read"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "contains no images"),
    ],
)
def test_errors_are_clear(tmp_path: Path, make, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputDataError, match=match) as info:
        source = open_data(path, strict=True)
        for _ in source.batches(4):
            pass
    assert str(path.name) in str(info.value) or "empty" in str(info.value)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.jpg", b"\xff\xd8garbage")
    with pytest.raises(InputDataError, match="bad.jpg"):
        read_image(bad)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path
