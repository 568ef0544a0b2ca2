"""Figures with matplotlib: CAM overlays and grids, and the plots of a score report.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no
global state, no GUI backend), so the figures work the same in scripts, in the CLI and in
Jupyter, where a returned figure is displayed as it is. :func:`save_figure` writes one
figure in several formats (PNG, SVG, PDF).

Colour maps are matplotlib's own (``jet`` by default, as pytorch-grad-cam users expect;
``turbo``, ``viridis`` or any other matplotlib colour map name may be given).
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import skimage.transform

from .errors import InputDataError, RuntimeMissingError
from .formatting import band_label, ci_bounds

try:
    import matplotlib
    from matplotlib import colormaps
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - exercised only without the extra
    raise RuntimeMissingError(
        "figures need matplotlib, which is not installed; install the 'report' extra: "
        "pip install 'sp2ps-onnx[report]'"
    ) from None

DEFAULT_CMAP = "jet"
FIGURE_FORMATS = ("png", "svg", "pdf")

# SVG text stays text (searchable, small) and PDF fonts are embedded as TrueType (Type 42),
# as journals ask; a fixed SVG hash salt makes the SVG output reproducible.
_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "sp2ps",
    "pdf.fonttype": 42,
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e8ec",
    "grid.linewidth": 0.8,
    "axes.edgecolor": "#8c959f",
    "axes.labelcolor": "#24292f",
    "xtick.color": "#57606a",
    "ytick.color": "#57606a",
}


def colormap(name: str = DEFAULT_CMAP) -> Any:
    """The matplotlib colour map called ``name``, or a clear error naming the choices."""
    try:
        return colormaps[name]
    except KeyError:
        raise InputDataError(
            f"unknown colour map {name!r}; use jet (default), turbo, viridis or another "
            "matplotlib colour map name"
        ) from None


# --------------------------------------------------------------------------------------
# Images


def colorize(cam: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Map CAM values in [0, 1] to colours of ``cmap``, ``uint8 (H, W, 3)``."""
    values = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, 1.0)
    return colormap(cmap)(values, bytes=True)[..., :3]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image as ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def overlay(
    image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    """Blend a CAM (resized to the image if needed) in ``cmap`` colours over an image.

    The blend is pytorch-grad-cam's ``show_cam_on_image``: ``(1 - alpha) * image + alpha *
    heat``, as ``uint8 (H, W, 3)``.
    """
    rgb = to_rgb(image)
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape != rgb.shape[:2]:
        cam = skimage.transform.resize(cam, rgb.shape[:2], order=1, preserve_range=True)
    heat = colorize(cam, cmap).astype(np.float64)
    blended = (1 - alpha) * rgb.astype(np.float64) + alpha * heat
    return np.round(blended).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB image as PNG."""
    return iio.imwrite("<bytes>", np.ascontiguousarray(image), extension=".png")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8 RGB image as a PNG file."""
    Path(path).write_bytes(png_bytes(image))


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 image as a ``data:image/png;base64`` URI, for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def display_size(image: np.ndarray, target: int = 128) -> np.ndarray:
    """Enlarge small images by pixel repetition and shrink large ones, for viewing."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest < target:
        factor = max(1, target // longest)
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    if longest > 2 * target:
        scale = 2 * target / longest
        shape = (max(1, round(height * scale)), max(1, round(width * scale)), *image.shape[2:])
        return np.round(
            skimage.transform.resize(
                image.astype(np.float64), shape, order=1, anti_aliasing=True, preserve_range=True
            )
        ).astype(np.uint8)
    return image


# --------------------------------------------------------------------------------------
# Writing figures


class NotebookFigure(Figure):
    """A matplotlib figure that Jupyter shows as a PNG even when pyplot was never imported
    (a bare ``Figure`` only displays once the inline backend is active)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        with matplotlib.rc_context(_STYLE):
            self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches in the house style; create its axes
    inside :func:`style` so that they take the style too."""
    return NotebookFigure(figsize=(width, height), layout="constrained")


def style() -> Any:
    """A context manager that applies the house style (fonts, grid, vector text)."""
    return matplotlib.rc_context(_STYLE)


def _styled(function: Callable[..., Any]) -> Callable[..., Any]:
    """Build the figure under the report style (axes read rcParams when created)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with style():
            return function(*args, **kwargs)

    return wrapper


def check_formats(formats: Iterable[str]) -> list[str]:
    """The figure formats, each once, or a clear error for an unknown one."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise InputDataError(
            f"unknown figure format {unknown[0]!r}; choose from {', '.join(FIGURE_FORMATS)}"
        )
    return formats


def save_figure(
    figure: Figure,
    stem: str | os.PathLike[str],
    formats: Iterable[str] = ("png", "svg"),
    dpi: int = 150,
) -> list[Path]:
    """Write ``figure`` as ``stem.png``, ``stem.svg``, ``stem.pdf`` (those in ``formats``)."""
    written = []
    for fmt in check_formats(formats):
        path = Path(f"{stem}.{fmt}")
        with matplotlib.rc_context(_STYLE):
            figure.savefig(path, format=fmt, dpi=dpi, metadata=_metadata(fmt))
        written.append(path)
    return written


def _metadata(fmt: str) -> dict[str, Any] | None:
    # No creation date: the same report gives the same figure files.
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    if fmt == "png":
        return {"Software": None}
    return None


def svg_text(figure: Figure) -> str:
    """The figure as an ``<svg>`` element for inline HTML (no XML prolog).

    Its element ids are salted afresh each time: two figures inlined in one page (a
    notebook showing two reports) must not share clip-path ids.
    """
    buffer = io.StringIO()
    with matplotlib.rc_context({**_STYLE, "svg.hashsalt": uuid.uuid4().hex}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


# --------------------------------------------------------------------------------------
# CAM figures


@_styled
def cam_figure(
    image: np.ndarray,
    cam: np.ndarray,
    cmap: str = DEFAULT_CMAP,
    title: str | None = None,
    alpha: float = 0.5,
) -> Figure:
    """Input, CAM (with a colour bar) and overlay of one sample, side by side."""
    figure = new_figure(7.2, 2.6)
    axes = figure.subplots(1, 3)
    rgb = to_rgb(image)
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("input")
    shown = axes[1].imshow(np.asarray(cam, dtype=np.float64), cmap=colormap(cmap), vmin=0,
                           vmax=1, interpolation="nearest")
    axes[1].set_title("CAM")
    figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(rgb, cam, alpha=alpha, cmap=cmap), interpolation="nearest")
    axes[2].set_title("overlay")
    for axis in axes:
        _image_axis(axis)
    if title:
        figure.suptitle(title)
    return figure


def _image_axis(axis: Any) -> None:
    # No ticks at all, not just hidden ones: the layout then skips measuring tick labels,
    # which is most of the drawing time of a grid of images.
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_axis_off()


@_styled
def examples_figure(
    examples: Sequence[Any],
    class_names: Sequence[str] | None = None,
    cmap: str = DEFAULT_CMAP,
    title: str | None = None,
    compared: str = "pruned",
) -> Figure:
    """A grid, one row per kept sample: input | original CAM | compared model's CAM,
    captioned with the sample id, both predictions, the explained class and h.

    ``compared`` names the third column (``pruned``, or ``reference``/``floor``).
    """
    rows = max(1, len(examples))
    height = 1.95 * rows + (0.4 if title else 0.0)
    # One axes and one image per row, the three panels side by side in it, and a fixed grid
    # instead of the constrained layout: creating and drawing axes is most of the time of a
    # report's many grids (three axes per row took three times as long).
    figure = NotebookFigure(figsize=(5.4, height))
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02 / rows,
                           top=1 - (0.75 if title else 0.35) / height, hspace=0.3)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    for r, axis in enumerate(axes):
        _image_axis(axis)
        if r >= len(examples):
            continue
        example = examples[r]
        strip, centers = _panel_strip(
            (to_rgb(example.image), overlay(example.image, example.original_map, cmap=cmap),
             overlay(example.image, example.pruned_map, cmap=cmap)))
        axis.imshow(strip, interpolation="nearest")
        predicted = class_name(example.pred_original, class_names)
        if example.pred_pruned != example.pred_original:
            predicted += " → " + class_name(example.pred_pruned, class_names)
        target = class_name(example.target_original, class_names)
        # Captions above the panels, in the image's pixel coordinates (row -0.5 is its top).
        above = {"y": -0.04 * strip.shape[0] - 0.5, "va": "bottom", "fontsize": 7}
        axis.text(-0.5, s=f"{_short(example.sample_id)}\npred {predicted}", ha="left", **above)
        axis.text(centers[1], s=f"original · CAM of {target}", ha="center", **above)
        axis.text(centers[2], s=f"{compared} · h={example.h:.2f}", ha="center", **above)
    if title:
        figure.suptitle(title)
    return figure


def _panel_strip(panels: Sequence[np.ndarray]) -> tuple[np.ndarray, list[float]]:
    """Equal-sized RGB panels side by side with white gaps, and each panel's centre column
    (in the pixel coordinates imshow uses)."""
    height, width = panels[0].shape[:2]
    gap = np.full((height, max(1, round(0.06 * width)), 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    centers = []
    for panel in panels:
        if parts:
            parts.append(gap)
        start = sum(p.shape[1] for p in parts)
        centers.append(start + width / 2 - 0.5)
        parts.append(panel)
    return np.concatenate(parts, axis=1), centers


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def class_name(index: int | None, names: Sequence[str] | None) -> str:
    """The name of class ``index`` (its number when unnamed, "–" for none)."""
    if index is None:
        return "–"
    if names and 0 <= index < len(names):
        return str(names[index])
    return str(index)


# --------------------------------------------------------------------------------------
# Report plots


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# The band's colours: the random floor in grey (attention with nothing of the original's
# left), the references in blue; neither is one of tab10's first colours the points take.
FLOOR_STYLE = {"color": "#424a53", "linestyle": ":", "linewidth": 1.4}
REFERENCE_STYLE = {"color": "#0550ae", "linestyle": "--", "linewidth": 1.1}
REFERENCE_RANGE_COLOR = "#0969da"


def band_levels(report: Any) -> list[tuple[str, float, str]]:
    """``(label, Sp2PS, role)`` of the random floor and each reference model of ``report``
    with a finite score: the lines every Sp2PS figure draws."""
    levels = []
    for model in getattr(report, "references", None) or []:
        value = _finite(model.sp2ps)
        if value is None:
            continue
        name = "random floor" if model.role == "floor" else f"{model.info.name} (reference)"
        levels.append((name, value, model.role))
    return levels


def _draw_band(axis: Any, levels: list[tuple[str, float, str]], vertical: bool) -> list[Any]:
    """Draw the floor and reference lines (vertical ones on a horizontal Sp2PS axis), and
    shade the references' range when there are several; return the artists, labelled for
    a legend."""
    line = axis.axvline if vertical else axis.axhline
    span = axis.axvspan if vertical else axis.axhspan
    artists = [line(value, label=f"{name} {value:.3f}", zorder=1,
                    **(FLOOR_STYLE if role == "floor" else REFERENCE_STYLE))
               for name, value, role in levels]
    references = [value for _, value, role in levels if role == "reference"]
    if len(references) > 1:
        artists.append(span(min(references), max(references), color=REFERENCE_RANGE_COLOR,
                            alpha=0.08, linewidth=0, label="references' range", zorder=0))
    return artists


@_styled
def scatter_figure(report: Any) -> Figure:
    """Sp2PS against top-1 accuracy (or top-1 agreement without labels), with CI bars, and
    the band: the random floor and the reference models as horizontal lines, named in a
    legend below (several references: their range shaded)."""
    use_accuracy = report.accuracy_original is not None
    figure = new_figure(6.4, 4.3)
    axis = figure.subplots()
    palette = colormaps["tab10"]
    labels = []
    for index, model in enumerate(report.ranked()):
        name = "accuracy_pruned" if use_accuracy else "top1_agreement"
        x, y = _finite(getattr(model.result, name, None)), _finite(model.sp2ps)
        if x is None or y is None:
            continue
        ci = ci_bounds(getattr(model.result, "ci95", None))
        error = None if ci is None else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
        axis.errorbar(100 * x, y, yerr=error, fmt="o", markersize=7, capsize=4,
                      color=palette(index % 10), markeredgecolor="white", label=model.info.name,
                      zorder=3)
        labels.append((model.info.name, 100 * x, y))
    levels = band_levels(report)
    band = _draw_band(axis, levels, vertical=False)
    axis.margins(x=0.15, y=0.1)
    _place_labels(axis, labels)
    if band:
        # A legend below the axes, not labels beside the lines: it cannot collide with the
        # point labels, whatever the models' scores.
        figure.legend(handles=band, loc="outside lower center", ncols=min(3, len(band)),
                      fontsize=8, frameon=False)
    if use_accuracy:
        reference = 100 * report.accuracy_original
        axis.axvline(reference, color="#8250df", linestyle="--", linewidth=1)
        axis.annotate(f"original {reference:.1f}%", (reference, 1.0),
                      xycoords=("data", "axes fraction"), xytext=(-4, -4),
                      textcoords="offset points", ha="right", va="top", color="#8250df",
                      fontsize=8)
    axis.set_xlabel("top-1 accuracy (%)" if use_accuracy
                    else "top-1 agreement with the original (%)")
    axis.set_ylabel("Sp2PS (95% CI)")
    return figure


def _place_labels(axis: Any, labels: list[tuple[str, float, float]]) -> None:
    """Name each point to its right, moving labels apart vertically where they would overlap
    (models of similar accuracy and Sp2PS are the interesting case, not a rare one)."""
    low, high = axis.get_ylim()
    gap = 0.05 * (high - low)
    placed: list[tuple[float, float]] = []
    x_span = np.ptp([x for _, x, _ in labels]) if labels else 0.0
    for name, x, y in sorted(labels, key=lambda item: -item[2]):
        label_y = y
        while any(abs(label_y - other_y) < gap and abs(x - other_x) <= 0.25 * x_span + 5
                  for other_x, other_y in placed):
            label_y -= gap / 2
        placed.append((x, label_y))
        # A white backing keeps a label readable where a band line runs through it.
        axis.annotate(name, (x, y), xytext=(8, label_y), textcoords=("offset points", "data"),
                      va="center", fontsize=8, zorder=4,
                      bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                            "edgecolor": "none", "alpha": 0.85},
                      arrowprops=None if label_y == y else {"arrowstyle": "-", "color": "#8c959f",
                                                            "linewidth": 0.6})


@_styled
def sp2ps_bar_figure(report: Any) -> Figure:
    """Sp2PS of each pruned model, best first, with its 95% CI and its band, the random
    floor and the references as vertical lines named in a legend below."""
    ranked = report.ranked()
    levels = band_levels(report)
    has_references = any(role == "reference" for _, _, role in levels)
    figure = new_figure(6.4, 0.9 + 0.38 * max(1, len(ranked)) + (0.35 if levels else 0.0))
    axis = figure.subplots()
    names = [m.info.name for m in ranked]
    values = [_finite(m.sp2ps) or 0.0 for m in ranked]
    errors = np.zeros((2, len(ranked)))
    for i, model in enumerate(ranked):
        ci = ci_bounds(getattr(model.result, "ci95", None))
        if ci is not None:
            errors[:, i] = (max(0.0, values[i] - ci[0]), max(0.0, ci[1] - values[i]))
    cmap = colormaps["RdYlGn"]
    positions = np.arange(len(ranked))[::-1]
    axis.barh(positions, values, xerr=errors, color=[cmap(v) for v in values],
              edgecolor="#57606a", linewidth=0.5, capsize=3, zorder=2)
    for position, value, above, model in zip(positions, values, errors[1], ranked, strict=True):
        band = band_label(getattr(model, "band", None), has_references)
        axis.text(min(value + above, 1.0) + 0.015, position,
                  f"{value:.3f}" + (f"  {band}" if band else ""), va="center", fontsize=8)
    band = _draw_band(axis, levels, vertical=True)
    axis.set_yticks(positions, names)
    axis.set_xlim(0, 1.2 if levels else 1.1)
    axis.set_xlabel("Sp2PS (1 = same attention as the original)")
    axis.grid(axis="y", visible=False)
    if band:
        figure.legend(handles=band, loc="outside lower center", ncols=min(3, len(band)),
                      fontsize=8, frameon=False)
    return figure


@_styled
def per_class_figure(report: Any) -> Figure | None:
    """Mean h per class and pruned model as an annotated heat map (None without classes)."""
    ranked = report.ranked()
    per_model = [
        {int(k): float(v) for k, v in (getattr(m.result, "per_class_h", None) or {}).items()}
        for m in ranked
    ]
    classes = sorted({c for values in per_model for c in values})
    if not classes:
        return None
    table = np.array([[values.get(c, np.nan) for c in classes] for values in per_model])
    figure = new_figure(1.6 + 0.55 * len(classes), 1.0 + 0.4 * len(ranked))
    axis = figure.subplots()
    shown = axis.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.grid(False)
    labels = [class_name(c, report.class_names) for c in classes]
    axis.set_xticks(range(len(classes)), labels, rotation=40, ha="right")
    axis.set_yticks(range(len(ranked)), [m.info.name for m in ranked])
    if len(classes) <= 40:
        heat = colormaps["RdYlGn"]
        for (row, column), value in np.ndenumerate(table):
            if math.isfinite(value):
                red, green, blue, _ = heat(value)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if dark else "#1f2328")
    grouped = "true label" if report.accuracy_original is not None else "explained class"
    axis.set_xlabel(f"class ({grouped})")
    figure.colorbar(shown, ax=axis, label="mean h", fraction=0.04, pad=0.02)
    return figure
