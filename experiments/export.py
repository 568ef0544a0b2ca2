"""The export stage: the cache's scores become the committed raw data of the study.

``experiments/data/`` (a few MB, in git) holds everything results.md is generated from:

* ``models.csv``: one row per scored model (pruned, independent retrain, int8 artifact,
  random floor, the bundled case) with its accuracy, agreement, JS divergence, Sp2PS and CI,
  the decision/attention split, size and sparsity;
* ``bases.csv``: the base models (architecture, seed, accuracy, training time);
* ``photos.csv``: EfficientNet-Lite0's h per photo and model, ``photo_models.csv`` their
  summaries;
* ``samples/NAME.csv``: the per-sample rows (index, label, predictions, h) of the models in
  the pairs results.md shows with pictures;
* ``study.json``: the configuration, the stage timings, the machine and package versions.

The pictures of the pairs need the models' CAMs, so they are drawn here (from the cached
ONNX files) into ``OUT/figures/study``; every other figure is drawn from the data by the
report stage.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import analysis, nets
from .config import StudyConfig
from .fmnist import CLASS_NAMES
from .models import base_name
from .scoring import ScoreStore, retrain_key

Log = Callable[[str], None]
MODEL_COLUMNS = ("name", "arch", "seed", "base", "kind", "method", "rate", "finetuned",
                 "accuracy", "accuracy_original", "accuracy_recalibrated", "top1_agreement",
                 "js_divergence", "sp2ps", "ci_low", "ci_high", "mean_spatial", "mean_spectral",
                 "median_h", "same_answer_n", "same_answer_sp2ps", "different_answer_sp2ps",
                 "gap_share", "band", "parameters", "sparsity", "file_size", "n", "error")
BASE_COLUMNS = ("name", "arch", "seed", "accuracy", "parameters", "file_size", "train_seconds")
SAMPLE_COLUMNS = ("index", "label", "pred_original", "pred", "h", "spatial", "spectral")
PACKAGES = ("sp2ps-onnx", "onnx", "onnxruntime", "numpy", "scipy", "scikit-image", "torch",
            "torch-pruning", "tensorflow-cpu", "keras", "tf2onnx", "efficientnet-lite-pytorch",
            "matplotlib")


def _row(name: str, record: dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
    record = record or {}
    ci = record.get("ci95") or (None, None)
    row = {**fields, "name": name}
    for column in MODEL_COLUMNS:
        if column not in row and column in record:
            row[column] = record[column]
    row.update(ci_low=ci[0], ci_high=ci[1], js_divergence=record.get("mean_js_divergence"),
               gap_share=record.get("same_answer_gap_share"), error=record.get("error"))
    if record.get("sha256") is None and record.get("sp2ps") is None and not row.get("error"):
        row["error"] = "not scored"
    return row


def model_rows(config: StudyConfig, manifest: Any, store: ScoreStore) -> list[dict[str, Any]]:
    """Every scored model as a row of ``models.csv``, in a stable order."""
    rows = []
    for arch in config.architectures:
        for k in range(config.seeds):
            base = base_name(arch, k)
            if base not in manifest.entries:
                continue
            common = dict(arch=arch, base=base, seed=k)
            original = store.get(base) or {}
            for entry in sorted((e for e in manifest.entries.values() if e.base == base),
                                key=lambda e: (e.kind, e.method, e.rate or 0, e.finetuned)):
                rows.append(_row(entry.name, store.get(entry.name), **common, kind=entry.kind,
                                 method=entry.method, rate=entry.rate, finetuned=entry.finetuned,
                                 accuracy_recalibrated=entry.extra.get("accuracy_recalibrated")))
            for j in range(config.seeds):
                if j != k and base_name(arch, j) in manifest.entries:
                    key = retrain_key(base_name(arch, j), base)
                    rows.append(_row(key, store.get(key), **common, kind="reference",
                                     method="retrain", finetuned=False))
            rows.append(_row(f"{base}-floor", store.get(f"{base}-floor"), **common, kind="floor",
                             method="random-floor", finetuned=False))
            for row in rows:
                if row["base"] == base and row.get("accuracy_original") is None:
                    row["accuracy_original"] = original.get("accuracy")
    bundled = store.get("bundled-l1filter25")
    if bundled is not None:
        rows.append(_row("bundled-l1filter25", bundled, arch="bundled-cnn", base="bundled",
                         seed=0, kind="bundled", method="l1-filter", rate=25, finetuned=True))
        rows.append(_row("bundled-floor", store.get("bundled-floor"), arch="bundled-cnn",
                         base="bundled", seed=0, kind="floor", method="random-floor",
                         finetuned=False))
    return rows


def base_rows(config: StudyConfig, manifest: Any, store: ScoreStore) -> list[dict[str, Any]]:
    rows = []
    for arch in config.architectures:
        for k in range(config.seeds):
            entry = manifest.entries.get(base_name(arch, k))
            if entry is None:
                continue
            record = store.get(entry.name) or {}
            rows.append({"name": entry.name, "arch": arch, "seed": k,
                         "accuracy": record.get("accuracy"),
                         "parameters": record.get("parameters"),
                         "file_size": record.get("file_size"),
                         "train_seconds": entry.extra.get("train_seconds")})
    return rows


def photo_tables(cache: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per photo and model, per model) from the photos stage's JSON."""
    path = cache / "photos.json"
    if not path.is_file():
        return [], []
    photos = json.loads(path.read_text())
    per_photo, per_model = [], []
    for name, model in photos["models"].items():
        ci = model.get("ci95") or (None, None)
        per_model.append({"name": name, "note": model["note"], "sp2ps": model["sp2ps"],
                          "ci_low": ci[0], "ci_high": ci[1],
                          "top1_agreement": model["top1_agreement"],
                          "sparsity": model["sparsity"], "parameters": model["parameters"],
                          "file_size": model["file_size"]})
        for photo, value in sorted(model["per_photo"].items()):
            per_photo.append({"photo": photo, "model": name, "h": value["h"],
                              "class_original": photos["classes"].get(photo),
                              "same_top1": value["pred"] == photos["original_pred"][photo]})
    return per_photo, per_model


def environment() -> dict[str, Any]:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    versions = {}
    for package in PACKAGES:  # the ones installed
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": model, "cores": os.cpu_count(), "system": f"{platform.system()} "
            f"{platform.release()}", "python": platform.python_version(), "versions": versions}


def export_stage(data: dict, config: StudyConfig, cache: Path, manifest: Any, data_dir: Path,
                 out: Path, log: Log) -> None:
    store = ScoreStore(cache)
    rows = model_rows(config, manifest, store)
    analysis.write_table(data_dir / "models.csv", rows, MODEL_COLUMNS)
    analysis.write_table(data_dir / "bases.csv", base_rows(config, manifest, store), BASE_COLUMNS)
    per_photo, per_model = photo_tables(cache)
    if per_model:
        analysis.write_table(data_dir / "photos.csv", per_photo,
                             ("photo", "model", "h", "class_original", "same_top1"))
        analysis.write_table(data_dir / "photo_models.csv", per_model,
                             ("name", "note", "sp2ps", "ci_low", "ci_high", "top1_agreement",
                              "sparsity", "parameters", "file_size"))
    runs_path = cache / "runs.json"
    (data_dir / "study.json").write_text(json.dumps({
        "config": config.to_dict(),
        "runs": json.loads(runs_path.read_text()) if runs_path.is_file() else {},
        "environment": environment(),
        "nets": nets.description(),
        "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=1) + "\n")
    # Re-read what was written, so the pairs chosen here are the ones the report finds.
    table = analysis.read_table(data_dir / "models.csv")
    analysis.write_table(data_dir / "pairs.csv", [
        {"first": p.ordered[0]["name"], "second": p.ordered[1]["name"], "base": p.base,
         "sp2ps_gap": p.sp2ps_gap, "accuracy_gap_pts": p.accuracy_gap,
         "agreement_gap_pts": p.agreement_gap}
        for p in analysis.pairs_within(table, max(analysis.TOLERANCES))],
        ("first", "second", "base", "sp2ps_gap", "accuracy_gap_pts", "agreement_gap_pts"))
    samples = data_dir / "samples"
    for old in samples.glob("*.csv"):
        old.unlink()
    for index, pair in enumerate(analysis.shown_pairs(table)):
        high, low = pair.ordered
        loaded = {}
        for row in (high, low):
            with np.load(store.sample_path(row["name"])) as stored:
                loaded[row["name"]] = {k: stored[k] for k in stored.files}
            analysis.write_table(samples / f"{row['name']}.csv", [
                dict(zip(SAMPLE_COLUMNS, values, strict=True))
                for values in zip(*(loaded[row["name"]][c].tolist() for c in SAMPLE_COLUMNS),
                                  strict=True)], SAMPLE_COLUMNS)
        picks = analysis.typical_samples(loaded[high["name"]], loaded[low["name"]])
        figure = out / "figures" / "study" / f"pair{index + 1}.png"
        if len(picks) == 0:  # the report says so instead of showing a picture
            figure.unlink(missing_ok=True)
            log(f"pair {high['name']} / {low['name']}: no image all three classify correctly")
            continue
        _pair_figure(data, manifest, store, pair, picks, loaded, figure, config)
        log(f"pair {high['name']} / {low['name']}: Δ Sp2PS {pair.sp2ps_gap:.3f}, {figure}")
    log(f"wrote {data_dir}")


def _model_path(manifest: Any, name: str) -> str:
    if "-vs-" in name:
        name = name.split("-vs-")[0]
    return manifest.entries[name].path


def _pair_figure(data: dict, manifest: Any, store: ScoreStore, pair: analysis.Pair,
                 picks: np.ndarray, loaded: dict, path: Path, config: StudyConfig) -> None:
    """Rows: typical samples; columns: the image, the original's CAM, each model's CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sp2ps_onnx import CamModel
    from sp2ps_onnx.data import Preprocessing
    from sp2ps_onnx.figures import overlay

    from .photos import shrink_png

    high, low = pair.ordered
    names = [pair.base, high["name"], low["name"]]
    images = data["x_test"][picks]
    maps = []
    for name in names:
        model = CamModel(_model_path(manifest, name), providers=["CPUExecutionProvider"])
        x = Preprocessing.for_model(model, "unit")(images)
        maps.append(model.cams(x, method=config.cam_method, targets=data["y_test"][picks])[0])
    fig, axes = plt.subplots(len(picks), 4, figsize=(7.6, 2.0 * len(picks)), squeeze=False)
    labels = ["image (label)", f"original\n{pair.base}", f"{high['name']}\nSp2PS "
              f"{high['sp2ps']:.2f}", f"{low['name']}\nSp2PS {low['sp2ps']:.2f}"]
    for row, sample in enumerate(picks):
        grey = np.repeat(images[row][..., None], 3, axis=2)
        cells = [grey] + [overlay(grey, m[row]) for m in maps]
        h = [None, None, loaded[high["name"]]["h"][sample], loaded[low["name"]]["h"][sample]]
        for col, image in enumerate(cells):
            axis = axes[row, col]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(labels[col], fontsize=9)
            if col == 0:
                axis.set_ylabel(f"#{sample}\n{CLASS_NAMES[int(data['y_test'][sample])]}",
                                fontsize=9)
            elif h[col] is not None:
                axis.set_xlabel(f"h = {h[col]:.2f}", fontsize=9)
    fig.suptitle(f"Accuracy within {pair.accuracy_gap:.2f} pts, agreement within "
                 f"{pair.agreement_gap:.2f} pts, Sp2PS {pair.sp2ps_gap:.2f} apart "
                 "(typical samples all three classify correctly)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    shrink_png(path)
