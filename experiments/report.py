"""The report stage: ``results.md`` and its figures from the cached manifest and scores."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sp2ps_onnx.formatting import MISSING, ci_text, percent

from .config import StudyConfig
from .photos import shrink_png
from .scoring import ScoreStore

Log = Callable[[str], None]
METHOD_LABELS = {"random-filter": "random filter", "l1-filter": "L1 filter",
                 "magnitude": "global magnitude"}
METHOD_COLORS = {"random-filter": "tab:gray", "l1-filter": "tab:blue", "magnitude": "tab:purple"}
ARCH_LABELS = {"torch-vgg": "PyTorch VGG-style", "torch-resnet": "PyTorch ResNet-style",
               "keras-vgg": "Keras VGG-style"}
REFERENCE_STYLE = {  # name suffix, label, colour, line style
    "ceiling": ("noise ceiling", "tab:green", "--"),
    "retrain": ("independent retrain", "tab:orange", "--"),
    "cascade-all": ("random (all layers re-initialised)", "tab:red", ":"),
}
DROP = 0.15  # an Sp2PS drop that counts as "attention moved"
ACCURACY_BAND = 1.0  # percentage points that count as "accuracy kept"


# --------------------------------------------------------------------------------------
# Formatting helpers


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: Any, digits: int = 2) -> str:
    """Percentages in the write-up's tables: the columns name the unit, so no % sign."""
    return percent(value, digits, suffix="")


def _score_and_ci(record: dict | None) -> str:
    if not record or record.get("sp2ps") is None:
        return MISSING
    ci = record.get("ci95")
    return f"{record['sp2ps']:.3f}" + (f" {ci_text(ci)}" if ci else "")


def _size(size: Any) -> str:
    if size is None:
        return "–"
    return f"{size / 1024:.1f} KB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.2f} MB"


def _method_label(method: str) -> str:
    return {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}.get(method, method)


def _slug(method: str) -> str:
    return method.replace("+", "p")


# --------------------------------------------------------------------------------------
# Gathering


def _rows(manifest: Any, store: ScoreStore, config: StudyConfig) -> list[dict[str, Any]]:
    """One row per scored (non-original) model with its scores by CAM method."""
    rows = []
    for entry in manifest.entries.values():
        if entry.kind == "original" or entry.arch not in config.architectures:
            continue
        scores = {m: store.get(entry.name, m) for m in config.cam_methods}
        base = {m: store.get(entry.arch, m) for m in config.cam_methods}
        rows.append({"entry": entry, "scores": scores, "base": base})
    return rows


def _main(row: dict[str, Any], config: StudyConfig) -> dict[str, Any] | None:
    record = row["scores"].get(config.cam_methods[0])
    return record if record and record.get("sp2ps") is not None else None


def _references(store: ScoreStore, arch: str, method: str) -> dict[str, dict | None]:
    return {
        "ceiling": store.get(f"{arch}-ceiling", method),
        "retrain": store.get(f"{arch}-retrain", method),
        "cascade-all": store.get(f"{arch}-cascade-all", method),
    }


def _delta_accuracy(record: dict | None) -> float | None:
    if not record or record.get("accuracy") is None or record.get("accuracy_original") is None:
        return None
    return 100 * (record["accuracy"] - record["accuracy_original"])


# --------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_lines(ax, references: dict[str, dict | None], vertical: bool = False) -> None:
    for key, (label, color, style) in REFERENCE_STYLE.items():
        record = references.get(key)
        if record and record.get("sp2ps") is not None:
            draw = ax.axvline if vertical else ax.axhline
            draw(record["sp2ps"], color=color, linestyle=style, linewidth=1, label=label)


def rate_figure(rows: list[dict], store: ScoreStore, config: StudyConfig, method: str,
                path: Path) -> None:
    """Sp2PS against pruning rate per method, without and with fine-tuning, per architecture."""
    plt = _plt()
    archs = list(config.architectures)
    fig, axes = plt.subplots(len(archs), 2, figsize=(8, 2.6 * len(archs)), squeeze=False,
                             sharex=True, sharey=True)
    for i, arch in enumerate(archs):
        references = _references(store, arch, method)
        for j, finetuned in enumerate((False, True)):
            ax = axes[i, j]
            for pruning in config.methods:
                points = sorted(
                    (r["entry"].rate, r["scores"][method]) for r in rows
                    if r["entry"].arch == arch and r["entry"].kind == "pruned"
                    and r["entry"].method == pruning and r["entry"].finetuned == finetuned
                    and r["scores"].get(method) and r["scores"][method].get("sp2ps") is not None
                )
                if not points:
                    continue
                x = [p[0] for p in points]
                y = [p[1]["sp2ps"] for p in points]
                low = [p[1]["sp2ps"] - (p[1]["ci95"] or [p[1]["sp2ps"]] * 2)[0] for p in points]
                high = [(p[1]["ci95"] or [p[1]["sp2ps"]] * 2)[1] - p[1]["sp2ps"] for p in points]
                ax.errorbar(x, y, yerr=[low, high], marker="o", markersize=3, capsize=2,
                            color=METHOD_COLORS.get(pruning), label=METHOD_LABELS.get(pruning))
            _reference_lines(ax, references)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"{ARCH_LABELS.get(arch, arch)}, "
                         f"{'fine-tuned' if finetuned else 'no fine-tune'}", fontsize=9)
            if i == len(archs) - 1:
                ax.set_xlabel("pruning rate (%)")
            if j == 0:
                ax.set_ylabel(f"Sp2PS ({_method_label(method)})")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def accuracy_figure(rows: list[dict], store: ScoreStore, config: StudyConfig, method: str,
                    path: Path) -> None:
    """Test accuracy against Sp2PS, every scored model, per architecture."""
    plt = _plt()
    archs = list(config.architectures)
    fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.6), squeeze=False,
                             sharey=True)
    for i, arch in enumerate(archs):
        ax = axes[0, i]
        for row in rows:
            entry, record = row["entry"], row["scores"].get(method)
            if entry.arch != arch or not record or record.get("sp2ps") is None:
                continue
            if entry.kind == "pruned":
                ax.scatter(record["sp2ps"], 100 * record["accuracy"], s=14,
                           color=METHOD_COLORS.get(entry.method),
                           marker="o" if entry.finetuned else "x")
            elif entry.kind == "deploy":
                ax.scatter(record["sp2ps"], 100 * record["accuracy"], s=60, marker="*",
                           color="black")
                ax.annotate(entry.method, (record["sp2ps"], 100 * record["accuracy"]),
                            fontsize=6, xytext=(3, -8), textcoords="offset points")
        _reference_lines(ax, _references(store, arch, method), vertical=True)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(ARCH_LABELS.get(arch, arch), fontsize=9)
        ax.set_xlabel(f"Sp2PS ({_method_label(method)})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%)")
    plt_handles = [
        plt.Line2D([], [], color=METHOD_COLORS[m], marker="o", linestyle="", label=METHOD_LABELS[m])
        for m in config.methods
    ] + [
        plt.Line2D([], [], color="black", marker="x", linestyle="", label="no fine-tune"),
        plt.Line2D([], [], color="black", marker="o", linestyle="", label="fine-tuned"),
        plt.Line2D([], [], color="black", marker="*", linestyle="", label="deployment artifact"),
    ] + [
        plt.Line2D([], [], color=c, linestyle=s, label=label)
        for label, c, s in REFERENCE_STYLE.values()
    ]
    fig.legend(handles=plt_handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def examples_figure(cases: list[dict], store: ScoreStore, method: str, path: Path) -> bool:
    """The worst samples of each case: image, original CAM, pruned CAM, with h."""
    from sp2ps_onnx.figures import overlay

    from .fmnist import CLASS_NAMES

    loaded = []
    for case in cases:
        file = store.example_path(case["entry"].name, method)
        if file.is_file():
            loaded.append((case, np.load(file)))
    if not loaded:
        return False
    plt = _plt()
    per = min(3, min(len(d["h"]) for _, d in loaded))
    fig, axes = plt.subplots(len(loaded), 3 * per, figsize=(1.25 * 3 * per, 1.5 * len(loaded)),
                             squeeze=False)
    for row, (case, data) in enumerate(loaded):
        for k in range(per):
            image = data["image"][k]
            label = int(data["label"][k])
            cells = [
                (image[..., 0] if image.shape[-1] == 1 else image,
                 f"{CLASS_NAMES[label] if label >= 0 else '?'}"),
                (overlay(image, data["original_map"][k]),
                 f"original → {CLASS_NAMES[int(data['pred_original'][k])]}"),
                (overlay(image, data["pruned_map"][k]),
                 f"h={float(data['h'][k]):.2f} → {CLASS_NAMES[int(data['pred_pruned'][k])]}"),
            ]
            for c, (picture, title) in enumerate(cells):
                ax = axes[row, 3 * k + c]
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
                ax.set_title(title, fontsize=5.5)
                ax.axis("off")
        axes[row, 0].text(-0.15, 0.5, case["entry"].name, fontsize=6, rotation=90,
                          transform=axes[row, 0].transAxes, va="center", ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    shrink_png(path)
    return True


# --------------------------------------------------------------------------------------
# Analysis


def _spearman(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None, None
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def cross_framework(rows: list[dict], config: StudyConfig, method: str) -> list[dict]:
    """For each pruning method and fine-tune setting: the Spearman correlation between the
    PyTorch VGG's and the Keras VGG's Sp2PS over the pruning rates, and over all recipes."""
    def table(arch: str) -> dict[tuple, float]:
        return {
            (r["entry"].method, r["entry"].rate, r["entry"].finetuned): r["scores"][method]["sp2ps"]
            for r in rows
            if r["entry"].arch == arch and r["entry"].kind == "pruned"
            and r["scores"].get(method) and r["scores"][method].get("sp2ps") is not None
        }

    torch_table, keras_table = table("torch-vgg"), table("keras-vgg")
    common = sorted(set(torch_table) & set(keras_table))
    out = []
    for pruning in config.methods:
        for finetuned in (False, True):
            keys = [k for k in common if k[0] == pruning and k[2] == finetuned]
            rho, p = _spearman([torch_table[k] for k in keys], [keras_table[k] for k in keys])
            out.append({"method": pruning, "finetuned": finetuned, "n": len(keys), "rho": rho,
                        "p": p, "torch": [torch_table[k] for k in keys],
                        "keras": [keras_table[k] for k in keys], "rates": [k[1] for k in keys]})
    rho, p = _spearman([torch_table[k] for k in common], [keras_table[k] for k in common])
    out.append({"method": "all recipes", "finetuned": None, "n": len(common), "rho": rho, "p": p})
    return out


def _ci_overlap(a: dict, b: dict) -> bool:
    if not a.get("ci95") or not b.get("ci95"):
        return True
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


# --------------------------------------------------------------------------------------
# Environment


def machine_description() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    import os

    return f"{model}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("sp2ps-onnx", "onnx", "onnxruntime", "numpy", "scipy", "scikit-image", "torch",
                 "torch-pruning", "tensorflow-cpu", "tensorflow", "keras", "tf2onnx",
                 "efficientnet-lite-pytorch", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------
# results.md


def write_results(config: StudyConfig, cache: Path, manifest: Any, out: Path, runs: dict,
                  log: Log) -> Path:
    store = ScoreStore(cache)
    rows = _rows(manifest, store, config)
    figures = out / "figures" / "study"
    main_method = config.cam_methods[0]
    lines: list[str] = []
    add = lines.append
    scored = [r for r in rows if _main(r, config)]
    add("# Does Sp2PS see what accuracy misses? The pruning study")
    add("")
    add("Generated by `python -m experiments.study` ([experiments/](../experiments/)); "
        "every number below comes from the run described in [How these numbers were "
        "produced](#how-these-numbers-were-produced). " + (
            "**This is a smoke run on a tiny subset: the numbers mean nothing.**"
            if config.smoke else ""))
    add("")
    frameworks = sorted({r["entry"].framework for r in scored})
    add(f"**{len(scored)} models scored** against their originals "
        f"({', '.join(frameworks)}; pruned, reference and deployment models), each with "
        f"{' and '.join(_method_label(m) for m in config.cam_methods)} on "
        f"{_n_test(store, config)} Fashion-MNIST test images, plus EfficientNet-Lite0 on real photos.")
    add("")

    discussion = _discussion(rows, store, config, figures, main_method)
    add("## Findings")
    add("")
    add("Computed from the tables below by the report stage.")
    add("")
    lines.extend(discussion)
    add("")
    notes = Path(__file__).with_name("discussion.md")
    if notes.is_file() and not config.smoke:
        add("## Discussion")
        add("")
        add(notes.read_text().strip())
        add("")

    lines.extend(_reference_section(config, store, manifest, main_method))
    lines.extend(_figure_sections(rows, store, config, figures))
    lines.extend(_cross_framework_section(rows, config))
    lines.extend(_deployment_section(rows, config, main_method))
    # Real photos
    photos_file = cache / "photos.json"
    if photos_file.is_file():
        lines.extend(_photos_section(json.loads(photos_file.read_text()), config))

    lines.extend(_every_model_section(rows, config, main_method))
    lines.extend(_provenance(config, store, runs))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _reference_section(config: StudyConfig, store: ScoreStore, manifest: Any,
                       main_method: str) -> list[str]:
    """Base models and reference points: noise ceiling, independent retrain, cascade."""
    lines: list[str] = []
    add = lines.append
    add("## Base models and reference points")
    add("")
    add("The *noise ceiling* scores the original against itself with Gaussian noise of "
        f"σ = {config.noise_sigma} (pixel range [0, 1]) added to each input; the *independent "
        "retrain* is the same architecture trained from another seed; the *cascade* "
        "re-initialises the Conv/Linear weights of the top layers, from the classifier down "
        "(Adebayo et al. 2018), and its last step (all layers) is the *random* floor.")
    add("")
    header = "| architecture | model | accuracy % | " + " | ".join(
        f"Sp2PS {_method_label(m)} [95 % CI]" for m in config.cam_methods) + " | top-1 agreement % |"
    add(header)
    add("|" + "---|" * (header.count("|") - 1))
    for arch in config.architectures:
        base = store.get(arch, main_method)
        if base is None:
            continue
        add(f"| {ARCH_LABELS.get(arch, arch)} | original ({base['parameters']:,} parameters) | "
            f"{_pct(base.get('accuracy'))} | " + " | ".join("1 (by definition)" for _ in
                                                             config.cam_methods) + " | 100 |")
        reference_names = [f"{arch}-ceiling", f"{arch}-retrain"] + [
            e.name for e in manifest.entries.values()
            if e.arch == arch and e.method.startswith("cascade-")]
        for name in reference_names:
            records = [store.get(name, m) for m in config.cam_methods]
            if not records[0]:
                continue
            entry = manifest.entries.get(name)
            label = (entry.note if entry and entry.method.startswith("cascade") else
                     name.removeprefix(arch + "-"))
            if name.endswith("ceiling"):
                label = f"noise ceiling (σ = {config.noise_sigma})"
            elif name.endswith("retrain"):
                label = f"independent retrain ({entry.note if entry else ''})"
            else:
                label = f"cascade: {label}"
            add(f"| | {label} | {_pct(records[0].get('accuracy'))} | "
                + " | ".join(_score_and_ci(r) for r in records)
                + f" | {_pct(records[0].get('top1_agreement'), 1)} |")
    add("")

    return lines


def _figure_sections(rows: list[dict], store: ScoreStore, config: StudyConfig,
                     figures: Path) -> list[str]:
    """Sp2PS against pruning rate and accuracy against Sp2PS, one figure per CAM method."""
    lines: list[str] = []
    add = lines.append
    add("## Sp2PS against pruning rate")
    add("")
    add("Error bars: 95 % bootstrap CI. Lines: noise ceiling (green), independent retrain "
        "(orange), all layers randomised (red).")
    add("")
    for method in config.cam_methods:
        rate_figure(rows, store, config, method, figures / f"rate_{_slug(method)}.png")
        add(f"![Sp2PS against rate, {_method_label(method)}](figures/study/rate_{_slug(method)}.png)")
        add("")
    add("## Accuracy against Sp2PS")
    add("")
    for method in config.cam_methods:
        accuracy_figure(rows, store, config, method, figures / f"accuracy_{_slug(method)}.png")
        add(f"![Accuracy against Sp2PS, {_method_label(method)}]"
            f"(figures/study/accuracy_{_slug(method)}.png)")
        add("")

    return lines


def _cross_framework_section(rows: list[dict], config: StudyConfig) -> list[str]:
    """PyTorch VGG against Keras VGG under the same recipes."""
    lines: list[str] = []
    add = lines.append
    add("## Cross-framework check: PyTorch VGG vs Keras VGG")
    add("")
    add("The same recipes (method, rate, fine-tune) applied to the PyTorch and the Keras "
        "model of the same architecture. ρ is the Spearman correlation between the two "
        "frameworks' Sp2PS over the rates (5 points per row, so |ρ| = 1 has p = 0.017 at "
        "best); the last row correlates all recipes at once.")
    add("")
    for method in config.cam_methods:
        add(f"**{_method_label(method)}**")
        add("")
        add("| pruning | fine-tuned | rates | Sp2PS PyTorch | Sp2PS Keras | Spearman ρ | p |")
        add("|---|---|---|---|---|---|---|")
        for item in cross_framework(rows, config, method):
            if item["finetuned"] is None:
                add(f"| {item['method']} | | {item['n']} recipes | | | {_f(item['rho'], 2)} | "
                    f"{_f(item['p'], 3)} |")
                continue
            add(f"| {METHOD_LABELS.get(item['method'])} | {'yes' if item['finetuned'] else 'no'} "
                f"| {', '.join(map(str, item['rates']))} | "
                f"{', '.join(_f(v, 2) for v in item['torch'])} | "
                f"{', '.join(_f(v, 2) for v in item['keras'])} | {_f(item['rho'], 2)} | "
                f"{_f(item['p'], 3)} |")
        add("")

    return lines


def _deployment_section(rows: list[dict], config: StudyConfig, main_method: str) -> list[str]:
    """The deployment artifacts and what the engine made of them."""
    lines: list[str] = []
    add = lines.append
    add("## Deployment artifacts")
    add("")
    add("| framework | architecture | artifact | accuracy % | Δaccuracy pts | top-1 agreement % | "
        + " | ".join(f"Sp2PS {_method_label(m)} [95 % CI]" for m in config.cam_methods)
        + " | size | how it was made / what happened |")
    add("|" + "---|" * (8 + len(config.cam_methods) - 1))
    for row in rows:
        entry = row["entry"]
        if entry.kind != "deploy":
            continue
        record = row["scores"].get(main_method) or {}
        errors = {m: (row["scores"].get(m) or {}).get("error") for m in config.cam_methods}
        note = entry.note
        base = row["base"].get(main_method) or {}
        if base.get("softmax_cut") and record and not record.get("softmax_cut"):
            note += (f"; **engine limitation**: the original's score is its logits (Softmax "
                     f"`{base['softmax_cut']}` cut off) but for this artifact the engine "
                     f"explains `{record.get('score_tensor')}`, the output *after* the "
                     "quantized Softmax: the two CAMs explain different quantities, so this "
                     "Sp2PS is not comparable")
        if any(errors.values()):
            note += "; **engine error**: " + "; ".join(
                f"{_method_label(m)}: `{e}`" for m, e in errors.items() if e)
        add(f"| {entry.framework} | {ARCH_LABELS.get(entry.arch, entry.arch)} | {entry.method} | "
            f"{_pct(record.get('accuracy'))} | {_f(_delta_accuracy(record), 2)} | "
            f"{_pct(record.get('top1_agreement'), 1)} | "
            + " | ".join(_score_and_ci(row["scores"].get(m)) for m in config.cam_methods)
            + f" | {_size(record.get('file_size'))} | {note} |")
    add("")

    return lines


def _every_model_section(rows: list[dict], config: StudyConfig, main_method: str) -> list[str]:
    """One row per scored model."""
    lines: list[str] = []
    add = lines.append
    add("## Every scored model")
    add("")
    add("Accuracy and top-1 agreement on the scored test images; Δaccuracy in percentage "
        "points against the original; sparsity = exactly-zero Conv/Gemm weights (for "
        "quantized weights: values at the zero point); size = ONNX file.")
    add("")
    add("| model | framework | architecture | method | rate % | fine-tuned | accuracy % | "
        "Δaccuracy pts | top-1 agreement % | "
        + " | ".join(f"Sp2PS {_method_label(m)} [95 % CI] | spatial | spectral"
                     for m in config.cam_methods)
        + " | parameters | sparsity % | size |")
    add("|" + "---|" * (12 + 3 * len(config.cam_methods)))
    order = {"pruned": 0, "reference": 1, "deploy": 2}
    for row in sorted(rows, key=lambda r: (config.architectures.index(r["entry"].arch),
                                           order.get(r["entry"].kind, 3), r["entry"].method,
                                           r["entry"].finetuned, r["entry"].rate or 0)):
        entry = row["entry"]
        record = row["scores"].get(main_method) or {}
        cells = []
        for m in config.cam_methods:
            r = row["scores"].get(m) or {}
            if r.get("error"):
                cells.append(f"error: {str(r['error'])[:80]} | – | –")
            else:
                cells.append(f"{_score_and_ci(r)} | {_f(r.get('mean_spatial'))} | "
                             f"{_f(r.get('mean_spectral'))}")
        parameters = record.get("parameters")
        add(f"| `{entry.name}` | {entry.framework} | {ARCH_LABELS.get(entry.arch, entry.arch)} | "
            f"{METHOD_LABELS.get(entry.method, entry.method)} | {entry.rate or ''} | "
            f"{'yes' if entry.finetuned else ('no' if entry.kind == 'pruned' else '')} | "
            f"{_pct(record.get('accuracy'))} | {_f(_delta_accuracy(record), 2)} | "
            f"{_pct(record.get('top1_agreement'), 1)} | " + " | ".join(cells)
            + f" | {'' if parameters is None else f'{parameters:,}'} | "
              f"{_f(record.get('sparsity'), 1)} | {_size(record.get('file_size'))} |")
    add("")

    return lines


def _n_test(store: ScoreStore, config: StudyConfig) -> str:
    for arch in config.architectures:
        record = store.get(arch, config.cam_methods[0])
        if record and record.get("n"):
            return f"{record['n']:,}"
    return "the"


def _photos_section(photos: dict, config: StudyConfig) -> list[str]:
    lines = ["## Real photos: EfficientNet-Lite0 (ImageNet weights)", ""]
    lines.append(
        f"{len(photos['photos'])} photos that ship with scikit-image, scikit-learn and "
        "matplotlib, each explained for the original's top-1 class ("
        + ", ".join(f"{p}: *{c}*" for p, c in sorted(photos.get("classes", {}).items()))
        + "). Global magnitude pruning of every Conv/Linear weight without fine-tuning, and "
        "ONNX Runtime static int8 QDQ. With 7 samples the CIs are wide: this part shows "
        "the pipeline on a real ImageNet model and real artifacts, not a statistic.")
    lines.append("")
    if "error" in photos.get("models", {}):
        for method, error in photos["models"]["error"].items():
            lines.append(f"- {_method_label(method)}: **engine error** `{error}`")
        lines.append("")
    methods = [m for m in config.cam_methods]
    lines.append("| model | parameters | sparsity % | size | top-1 agreement % | "
                 + " | ".join(f"Sp2PS {_method_label(m)} [95 % CI] | spatial | spectral"
                              for m in methods) + " |")
    lines.append("|" + "---|" * (5 + 3 * len(methods)))
    for name, model in photos.get("models", {}).items():
        if name == "error":
            continue
        cells = []
        for m in methods:
            r = model["methods"].get(m) or {}
            cells.append(f"{_score_and_ci(r)} | {_f(r.get('mean_spatial'))} | {_f(r.get('mean_spectral'))}")
        first = model["methods"].get(methods[0]) or {}
        lines.append(f"| {name} ({model['note']}) | {model.get('parameters', 0):,} | "
                     f"{_f(model.get('sparsity'), 1)} | {_size(model.get('file_size'))} | "
                     f"{_pct(first.get('top1_agreement'), 0)} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in methods:
        lines.append(f"![EfficientNet-Lite0 CAMs, {_method_label(m)}](figures/study/photos_{_slug(m)}.png)")
        lines.append("")
    return lines


def _provenance(config: StudyConfig, store: ScoreStore, runs: dict) -> list[str]:
    lines = ["## How these numbers were produced", ""]
    lines.append(f"- Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
                 f"{machine_description()} (shared with other jobs while it ran).")
    if runs:
        lines.append("- Stages (command, finish time, duration):")
        for stage, info in runs.items():
            lines.append(f"  - `{stage}`: `{info['command']}`, finished {info['finished']}, "
                         f"{info['seconds']:.0f} s")
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".")
    lines.append(
        f"- Training: full Fashion-MNIST training split ({'subset of ' + str(config.train_images) if config.train_images else '60,000'} images), "
        f"{config.epochs:g} epochs, batch {config.batch_size}, Adam lr {config.learning_rate:g} "
        f"with cosine decay, no augmentation; fine-tuning after pruning: "
        f"{config.finetune_fraction:g} of an epoch "
        f"({int(config.finetune_fraction * (config.train_images or 60000)):,} images), "
        f"Adam lr {config.finetune_learning_rate:g}, cosine; magnitude masks kept during "
        "fine-tuning. Seeds: base "
        f"{config.seed}, retrain {config.seed + config.retrain_seed_offset}.")
    lines.append(
        f"- Scoring: `sp2ps_onnx.scoring.score_models(original, pruned, test.npz, "
        f"cam=CamOptions(target='label'), data_options=DataOptions(preset='unit'), "
        f"metric=MetricOptions(n_bootstrap={config.n_bootstrap}, seed={config.seed}), "
        f"run=RunOptions(batch_size={config.score_batch}), "
        "references=ReferenceOptions(floor=False))`, i.e. what `sp2ps score --preset unit "
        "--target label --no-floor` runs; Sp2PS v1 (SSIM + spectral TV similarity, harmonic "
        "mean per sample, mean over samples; see docs/metric.md).")
    lines.append("- Configuration: `" + json.dumps(
        {k: v for k, v in config.to_dict().items() if k != "extra"}) + "`")
    lines.append("")
    return lines


def _discussion(rows: list[dict], store: ScoreStore, config: StudyConfig, figures: Path,
                method: str) -> list[str]:
    """Data-driven findings; each claim is computed from the table below."""
    lines: list[str] = []
    pruned = [r for r in rows if r["entry"].kind == "pruned" and _main(r, config)]
    if not pruned:
        return ["No pruned model was scored."]
    lines += _kept_accuracy_moved_attention(rows, pruned, store, config, figures, method)
    lines += _ranking_by_accuracy_and_sp2ps(pruned, config)
    lines += _down_to_retrain_level(pruned, store, config, method)
    lines += _where_the_metric_does_not_separate(pruned, store, config, method)
    return lines


def _kept_accuracy_moved_attention(rows: list[dict], pruned: list[dict], store: ScoreStore,
                                   config: StudyConfig, figures: Path,
                                   method: str) -> list[str]:
    """Finding 1: pruned models that keep their accuracy while their attention moved."""
    lines: list[str] = []
    cases = []
    for row in pruned:
        record = _main(row, config)
        delta = _delta_accuracy(record)
        if delta is not None and abs(delta) <= ACCURACY_BAND and record["sp2ps"] <= 1 - DROP:
            cases.append({"entry": row["entry"], "record": record, "delta": delta})
    cases.sort(key=lambda c: c["record"]["sp2ps"])
    lines.append(f"**Accuracy kept, attention moved.** {len(cases)} of {len(pruned)} pruned "
                 f"models stay within {ACCURACY_BAND:g} point of their original's accuracy while "
                 f"their Sp2PS ({_method_label(method)}) is {1 - DROP:.2f} or less, i.e. dropped "
                 f"by {DROP} or more from the 1 of the original against itself"
                 + (":" if cases else "."))
    lines.append("")
    for case in cases[:12]:
        entry, record = case["entry"], case["record"]
        ceiling = store.get(f"{entry.arch}-ceiling", method) or {}
        retrain = store.get(f"{entry.arch}-retrain", method) or {}
        lines.append(f"- `{entry.name}`: Δaccuracy {case['delta']:+.2f} pts, Sp2PS "
                     f"{_score_and_ci(record)} (ceiling {_f(ceiling.get('sp2ps'))}, independent retrain "
                     f"{_f(retrain.get('sp2ps'))})")
    if len(cases) > 12:
        lines.append(f"- … and {len(cases) - 12} more (see the full table).")
    lines.append("")
    pictured = cases[:3]
    if not cases:
        kept = []
        for row in rows:
            record = _main(row, config)
            delta = _delta_accuracy(record)
            if (record and delta is not None and abs(delta) <= ACCURACY_BAND
                    and row["entry"].kind in ("pruned", "reference")):
                kept.append({"entry": row["entry"], "record": record, "delta": delta})
        kept.sort(key=lambda c: c["record"]["sp2ps"])
        pruned_kept = [c for c in kept if c["entry"].kind == "pruned"]
        if pruned_kept:
            lines.append("The lowest Sp2PS among the pruned models that keep their accuracy "
                         "within that band: " + "; ".join(
                             f"`{c['entry'].name}` {c['record']['sp2ps']:.3f} "
                             f"(Δaccuracy {c['delta']:+.2f} pts)" for c in pruned_kept[:4]) + ".")
        retrains = [c for c in kept if c["entry"].method == "retrain"]
        if retrains:
            lines.append("The independent retrains are the clearest case of kept accuracy and "
                         "moved attention: " + "; ".join(
                             f"`{c['entry'].name}` Δaccuracy {c['delta']:+.2f} pts, Sp2PS "
                             f"{c['record']['sp2ps']:.3f}" for c in retrains) + ".")
        lines.append("")
        pictured = (pruned_kept[:2] + retrains[:1])
    if pictured and examples_figure(pictured, store, method,
                                    figures / "kept_accuracy_moved_attention.png"):
        lines.append("The least similar samples of " + ", ".join(
            f"`{c['entry'].name}`" for c in pictured) + " (test image, the original's CAM, "
                     "the other model's CAM; both explain the true class; → is each model's "
                     "prediction):")
        lines.append("")
        lines.append("![samples](figures/study/kept_accuracy_moved_attention.png)")
        lines.append("")
    return lines


def _ranking_by_accuracy_and_sp2ps(pruned: list[dict], config: StudyConfig) -> list[str]:
    """Finding 2: pruning methods ranked by accuracy and by Sp2PS."""
    lines: list[str] = []
    lines.append("**Ranking methods by accuracy and by Sp2PS.** Mean over rates of each "
                 "pruning method (fine-tuned and not):")
    lines.append("")
    lines.append("| architecture | fine-tuned | rank by accuracy (mean %) | rank by Sp2PS (mean) | "
                 "Spearman ρ(accuracy, Sp2PS) over these models |")
    lines.append("|---|---|---|---|---|")
    for arch in config.architectures:
        for finetuned in (False, True):
            group = [r for r in pruned if r["entry"].arch == arch
                     and r["entry"].finetuned == finetuned]
            if not group:
                continue
            by_method = {}
            for m in config.methods:
                members = [_main(r, config) for r in group if r["entry"].method == m]
                if members:
                    by_method[m] = (np.mean([x["accuracy"] for x in members]),
                                    np.mean([x["sp2ps"] for x in members]))
            by_accuracy = sorted(by_method, key=lambda m: -by_method[m][0])
            by_sp2ps = sorted(by_method, key=lambda m: -by_method[m][1])
            rho, _ = _spearman([_main(r, config)["accuracy"] for r in group],
                               [_main(r, config)["sp2ps"] for r in group])
            lines.append(
                f"| {ARCH_LABELS.get(arch, arch)} | {'yes' if finetuned else 'no'} | "
                + " > ".join(f"{METHOD_LABELS[m]} ({100 * by_method[m][0]:.1f})"
                             for m in by_accuracy) + " | "
                + " > ".join(f"{METHOD_LABELS[m]} ({by_method[m][1]:.2f})" for m in by_sp2ps)
                + f" | {_f(rho, 2)} |")
    lines.append("")
    return lines


def _down_to_retrain_level(pruned: list[dict], store: ScoreStore, config: StudyConfig,
                           method: str) -> list[str]:
    """Finding 3: pruned models whose Sp2PS falls to the independent-retrain level."""
    lines: list[str] = []
    lines.append("**Where Sp2PS falls to the independent-retrain level.** Pruned models whose "
                 "Sp2PS is at or below that of a model of the same architecture trained from "
                 "another seed, i.e. whose attention is no closer to the original's than an "
                 "unrelated model's:")
    lines.append("")
    for arch in config.architectures:
        retrain = store.get(f"{arch}-retrain", method)
        if not retrain or retrain.get("sp2ps") is None:
            continue
        below = [r for r in pruned if r["entry"].arch == arch
                 and _main(r, config)["sp2ps"] <= retrain["sp2ps"]]
        names = ", ".join(
            f"`{r['entry'].name.removeprefix(arch + '-')}` ({_f(_main(r, config)['sp2ps'], 2)}, "
            f"acc {_pct(_main(r, config)['accuracy'], 1)} %)"
            for r in sorted(below, key=lambda r: _main(r, config)["sp2ps"]))
        lines.append(f"- {ARCH_LABELS.get(arch, arch)} (retrain {_f(retrain['sp2ps'])}, "
                     f"accuracy {_pct(retrain.get('accuracy'), 1)} %): "
                     f"{len(below)} of {len([r for r in pruned if r['entry'].arch == arch])}"
                     + (f": {names}" if names else ""))
    lines.append("")
    return lines


def _where_the_metric_does_not_separate(pruned: list[dict], store: ScoreStore,
                                        config: StudyConfig, method: str) -> list[str]:
    """Finding 4: pairs of models whose confidence intervals overlap."""
    lines: list[str] = []
    lines.append("**Where the metric does not separate cases.**")
    lines.append("")
    for arch in config.architectures:
        group = [r for r in pruned if r["entry"].arch == arch]
        references = _references(store, arch, method)
        retrain, random = references.get("retrain"), references.get("cascade-all")
        pairs = overlapping = 0
        confusable = []
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                ra, rb = _main(a, config), _main(b, config)
                pairs += 1
                if _ci_overlap(ra, rb):
                    overlapping += 1
                    gap = abs(ra["accuracy"] - rb["accuracy"]) * 100
                    if gap >= 5:
                        confusable.append((gap, a["entry"].name, b["entry"].name, ra, rb))
        text = (f"- {ARCH_LABELS.get(arch, arch)}: {overlapping} of {pairs} pairs of pruned "
                f"models have overlapping 95 % CIs")
        if confusable:
            gap, a, b, ra, rb = max(confusable)
            text += (f"; {len(confusable)} of those pairs differ by 5 points of accuracy or "
                     f"more (largest: `{a}` {_pct(ra['accuracy'], 1)} % vs `{b}` "
                     f"{_pct(rb['accuracy'], 1)} %, Sp2PS {ra['sp2ps']:.3f} vs {rb['sp2ps']:.3f})")
        if retrain and random and retrain.get("sp2ps") is not None and random.get("sp2ps") is not None:
            text += (f". Independent retrain {retrain['sp2ps']:.3f} vs all-random "
                     f"{random['sp2ps']:.3f}"
                     + (" — their CIs overlap, so Sp2PS cannot tell a well-trained unrelated "
                        "model from a random one here" if _ci_overlap(retrain, random) else ""))
        lines.append(text + ".")
    return lines
