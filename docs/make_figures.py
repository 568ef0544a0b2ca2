"""Regenerate the README figures from the bundled models.

    .venv/bin/python docs/make_figures.py            # docs/cam_example.png
    .venv/bin/python docs/make_figures.py --report   # also the report and its screenshot

``docs/cam_example.png``: a few Fashion-MNIST test images with CAMs of the original model
(several methods) and Grad-CAM of two pruned models, each captioned with its Sp2PS h.
``--report`` runs ``sp2ps score`` on the bundled models and screenshots ``report.html`` with
headless Chromium into ``docs/report_screenshot.png``. The figures are drawn with
:mod:`sp2ps_onnx.figures`, the module the reports use.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
DOCS = REPO / "docs"


def cam_example(path: Path, samples: tuple[int, ...] = (0, 1, 2, 7)) -> None:
    from sp2ps_onnx import CamModel
    from sp2ps_onnx.figures import new_figure, overlay, save_figure, style
    from sp2ps_onnx.metric import sp2ps

    archive = np.load(MODELS / "samples" / "fmnist_test.npz")
    names = (MODELS / "samples" / "classes.txt").read_text().split()
    # One sample per class, the first of each of a few classes.
    wanted = [int(np.flatnonzero(archive["y"] == c)[0]) for c in samples]
    images = archive["x"][wanted]
    labels = archive["y"][wanted]
    x = images.astype(np.float32)[:, None] / 255.0  # the "unit" preset, NCHW
    original = CamModel(str(MODELS / "fmnist_cnn.onnx"))
    columns: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    reference, targets = original.cams(x, method="gradcam", targets=labels)
    columns.append(("original\nGrad-CAM", reference, None))
    for method, title in (("gradcam++", "Grad-CAM++"), ("scorecam", "Score-CAM"),
                          ("layercam", "LayerCAM")):
        maps, _ = original.cams(x, method=method, targets=targets)
        columns.append((f"original\n{title}", maps, None))
    for stem, title in (("fmnist_cnn_mag80", "80% magnitude"),
                        ("fmnist_cnn_l1filter50", "50% filters")):
        pruned = CamModel(str(MODELS / "pruned" / f"{stem}.onnx"))
        maps, _ = pruned.cams(x, method="gradcam", targets=targets)
        h = sp2ps(reference, maps).h
        columns.append((f"pruned {title}\nGrad-CAM", maps, h))
    rows = len(images)
    figure = new_figure(1.55 * (1 + len(columns)), 1.75 * rows)
    with style():
        axes = figure.subplots(rows, 1 + len(columns))
    for r in range(rows):
        axes[r, 0].imshow(images[r], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[r, 0].set_ylabel(names[labels[r]].replace("_", "/"), fontsize=9)
        for c, (title, maps, h) in enumerate(columns, start=1):
            axes[r, c].imshow(overlay(images[r][:, :, None], maps[r]), interpolation="nearest")
            if h is not None:
                axes[r, c].set_xlabel(f"h = {h[r]:.2f}", fontsize=8)
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
        axis.spines[:].set_visible(False)
    save_figure(figure, path.with_suffix(""), ["png"], dpi=130)


def report_screenshot(path: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="sp2ps-docs-")) / "report"
    # The README's command: the PyTorch original against its pruned variants, with the
    # Keras twin (trained on its own) as a reference model.
    pruned = sorted((MODELS / "pruned").glob("*.onnx"))
    subprocess.run(
        [sys.executable, "-m", "sp2ps_onnx.cli", "score", "models/fmnist_cnn.onnx",
         *(p.relative_to(REPO).as_posix() for p in pruned),
         "--data", "models/samples/fmnist_test.npz", "--preset", "unit",
         "--classes", "models/samples/classes.txt", "--reference",
         "models/keras/fmnist_keras.onnx", "--out", str(out), "--quiet"],
        check=True, cwd=REPO,
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix="sp2ps-chromium-")
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={path}",
         "--window-size=1400,2200", (out / "report.html").as_uri()],
        check=True, capture_output=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="also the report screenshot")
    args = parser.parse_args()
    cam_example(DOCS / "cam_example.png")
    print(f"wrote {DOCS / 'cam_example.png'}")
    if args.report:
        out = report_screenshot(DOCS / "report_screenshot.png")
        print(f"wrote {DOCS / 'report_screenshot.png'} (report in {out})")


if __name__ == "__main__":
    main()
