"""Rendering a :class:`~sp2ps_onnx.scoring.ScoreReport`: files, HTML, figures and tables.

:func:`write_report` fills a directory with ``results.json`` (every number, the full
configuration, package versions, SHA-256 of each model), ``per_sample.csv``,
``report.html`` (self-contained: inline CSS, images as base64 PNG, the plot as inline SVG,
no JavaScript) and ``figures/`` (the plot as SVG and PNG, one PNG grid of worst and best
samples per model). :func:`format_table` renders the ranking for the terminal.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputDataError

FORMATS = ("table", "json", "csv", "markdown")

# The classic "jet" colour map as piecewise-linear control points (position, value) per
# channel: dark blue -> blue -> cyan -> yellow -> red -> dark red.
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


# --------------------------------------------------------------------------------------
# Images


def colorize(cam: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to jet colours, ``uint8 (H, W, 3)``."""
    values = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, 1.0)
    channels = [
        np.interp(values, [p for p, _ in points], [v for _, v in points]) for points in _JET
    ]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image as ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a CAM (resized to the image if needed) in jet colours over an image."""
    rgb = to_rgb(image)
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape != rgb.shape[:2]:
        from skimage.transform import resize

        cam = resize(cam, rgb.shape[:2], order=1, preserve_range=True)
    heat = colorize(cam).astype(np.float64)
    blended = (1 - alpha) * rgb.astype(np.float64) + alpha * heat
    return np.round(blended).astype(np.uint8)


def display_size(image: np.ndarray, target: int = 128) -> np.ndarray:
    """Enlarge small images by pixel repetition and shrink large ones, for viewing."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest < target:
        factor = max(1, target // longest)
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    if longest > 2 * target:
        from skimage.transform import resize

        scale = 2 * target / longest
        shape = (max(1, round(height * scale)), max(1, round(width * scale)), *image.shape[2:])
        return np.round(
            resize(image.astype(np.float64), shape, order=1, anti_aliasing=True, preserve_range=True)
        ).astype(np.uint8)
    return image


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 image as PNG."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", np.ascontiguousarray(image), extension=".png")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8 image as a PNG file."""
    Path(path).write_bytes(png_bytes(image))


def _data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def example_grid(examples: Sequence[Any], cell: int = 112, gap: int = 6) -> np.ndarray:
    """A raster grid, one row per example: input | original CAM | pruned CAM."""
    if not examples:
        return np.full((cell, 3 * cell + 2 * gap, 3), 255, dtype=np.uint8)
    tiles = []
    for example in examples:
        row = [
            to_rgb(example.image),
            overlay(example.image, example.original_map),
            overlay(example.image, example.pruned_map),
        ]
        tiles.append([_fit_cell(t, cell) for t in row])
    height = len(tiles) * cell + (len(tiles) - 1) * gap
    width = 3 * cell + 2 * gap
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = r * (cell + gap), c * (cell + gap)
            grid[top : top + cell, left : left + cell] = tile
    return grid


def _fit_cell(image: np.ndarray, cell: int) -> np.ndarray:
    from skimage.transform import resize

    order = 0 if max(image.shape[:2]) < cell else 1
    resized = resize(
        image.astype(np.float64), (cell, cell, 3), order=order, anti_aliasing=order == 1,
        preserve_range=True,
    )
    return np.round(resized).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Numbers


def _field(result: Any, name: str) -> Any:
    value = getattr(result, name, None)
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _pct(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.{digits}f}%"


def _ci(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return low, high


def _ci_text(value: Any) -> str:
    ci = _ci(value)
    return "–" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def human_size(size: int | None) -> str:
    """Bytes as B/KB/MB/GB."""
    if size is None:
        return "–"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def ranking_rows(report: Any) -> list[dict[str, Any]]:
    """One dict per pruned model, ranked by Sp2PS: the numbers the table shows."""
    rows = []
    for rank, model in enumerate(report.ranked(), start=1):
        result = model.result
        ci = _ci(_field(result, "ci95"))
        rows.append(
            {
                "rank": rank,
                "model": model.info.name,
                "sp2ps": _field(result, "sp2ps"),
                "ci95_low": None if ci is None else ci[0],
                "ci95_high": None if ci is None else ci[1],
                "mean_spatial": _field(result, "mean_spatial"),
                "mean_spectral": _field(result, "mean_spectral"),
                "median_h": _field(result, "median_h"),
                "p05_h": _field(result, "p05_h"),
                "accuracy": _field(result, "accuracy_pruned"),
                "top1_agreement": _field(result, "top1_agreement"),
                "parameters": model.info.parameters,
                "sparsity_percent": model.info.sparsity,
                "file_size_bytes": model.info.file_size,
                "n": _field(result, "n"),
            }
        )
    return rows


def format_table(report: Any, fmt: str = "table") -> str:
    """The ranking as ``table`` (aligned text), ``json``, ``csv`` or ``markdown``."""
    rows = ranking_rows(report)
    if fmt == "json":
        payload = {
            "original": {
                "model": report.original.name,
                "accuracy": report.accuracy_original,
                "parameters": report.original.parameters,
                "sparsity_percent": report.original.sparsity,
                "file_size_bytes": report.original.file_size,
            },
            "n": report.n,
            "method": report.config.get("method"),
            "target": report.config.get("target"),
            "models": rows,
        }
        return json.dumps(_clean(payload), indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue().rstrip("\n")
    if fmt not in ("table", "markdown"):
        raise InputDataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    headers = ["#", "model", "Sp2PS", "95% CI", "spatial", "spectral", "p05 h", "accuracy",
               "top-1 agree", "params", "zeros", "size"]
    body = [
        [
            str(row["rank"]),
            row["model"],
            _num(row["sp2ps"]),
            _ci_text(None if row["ci95_low"] is None else (row["ci95_low"], row["ci95_high"])),
            _num(row["mean_spatial"]),
            _num(row["mean_spectral"]),
            _num(row["p05_h"]),
            _pct(row["accuracy"]),
            _pct(row["top1_agreement"]),
            _num(row["parameters"]),
            f"{row['sparsity_percent']:.1f}%",
            human_size(row["file_size_bytes"]),
        ]
        for row in rows
    ]
    original = report.original
    reference = [
        "–", f"{original.name} (original)", "1.000", "", "", "", "",
        _pct(report.accuracy_original), "", _num(original.parameters),
        f"{original.sparsity:.1f}%", human_size(original.file_size),
    ]
    right = {0, 2, 4, 5, 6, 7, 8, 9, 10, 11}
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|")
        for cells in [reference, *body]:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)
    table = [headers, reference, *body]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for n, cells in enumerate(table):
        lines.append(
            "  ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    summary = (
        f"Sp2PS ({report.config.get('spatial')}+{report.config.get('spectral')}, "
        f"{report.config.get('aggregation')}) of {len(rows)} pruned model(s) vs {original.name}, "
        f"{report.n} samples, {report.config.get('method')}, target={report.config.get('target')}"
    )
    return summary + "\n" + "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------
# Scatter plot


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = max(high - low, 1e-9)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = start
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _plot_points(report: Any) -> tuple[list[dict[str, Any]], str, float | None]:
    use_accuracy = report.accuracy_original is not None
    points = []
    for model in report.ranked():
        x = _field(model.result, "accuracy_pruned" if use_accuracy else "top1_agreement")
        y = _field(model.result, "sp2ps")
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        points.append({"name": model.info.name, "x": 100 * x, "y": y,
                       "ci": _ci(_field(model.result, "ci95"))})
    label = "top-1 accuracy (%)" if use_accuracy else "top-1 agreement with the original (%)"
    reference = 100 * report.accuracy_original if use_accuracy else None
    return points, label, reference


def scatter_svg(report: Any, width: int = 640, height: int = 420) -> str:
    """Sp2PS against accuracy (or top-1 agreement without labels) as an SVG string."""
    points, x_label, reference = _plot_points(report)
    left, right, top, bottom = 64, 150, 24, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p["x"] for p in points] + ([reference] if reference is not None else [])
    ys = [p["y"] for p in points] + [v for p in points if p["ci"] for v in p["ci"]]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 100.0)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    x_pad = max((x_high - x_low) * 0.08, 0.5)
    y_pad = max((y_high - y_low) * 0.08, 0.01)
    x_low, x_high = max(0.0, x_low - x_pad), min(100.0, x_high + x_pad)
    y_low, y_high = max(0.0, y_low - y_pad), min(1.0, y_high + y_pad)
    if y_high - y_low < 0.02:
        y_low, y_high = max(0.0, y_high - 0.05), min(1.0, y_low + 0.05) if y_low + 0.05 <= 1 else 1.0

    def px(x: float) -> float:
        return left + (x - x_low) / max(x_high - x_low, 1e-9) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / max(y_high - y_low, 1e-9)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="Sp2PS versus {x_label}" '
        'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="12">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" '
        'stroke="#d0d7de"/>',
    ]
    for tick in _nice_ticks(x_low, x_high):
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                     'stroke="#eaeef2"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle" '
                     f'fill="#57606a">{tick:g}</text>')
    for tick in _nice_ticks(y_low, y_high):
        y = py(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                     'stroke="#eaeef2"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" '
                     f'fill="#57606a">{tick:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 14}" text-anchor="middle" '
                 f'fill="#24292f">{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" '
                 'text-anchor="middle" fill="#24292f">Sp2PS</text>')
    if reference is not None:
        x = px(reference)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                     'stroke="#8250df" stroke-dasharray="5 4"/>')
        parts.append(f'<text x="{x - 4:.1f}" y="{top + plot_h - 8}" text-anchor="end" '
                     f'fill="#8250df">original {reference:.1f}%</text>')
    placed: list[float] = []
    for index, point in enumerate(points):
        x, y = px(point["x"]), py(point["y"])
        color = _PALETTE[index % len(_PALETTE)]
        if point["ci"]:
            y1, y2 = py(point["ci"][0]), py(point["ci"][1])
            parts.append(f'<line x1="{x:.1f}" y1="{y1:.1f}" x2="{x:.1f}" y2="{y2:.1f}" '
                         f'stroke="{color}" stroke-width="2" opacity="0.6"/>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}" '
                     'stroke="white" stroke-width="1.5"><title>'
                     f'{html.escape(point["name"])}: Sp2PS {point["y"]:.3f}, '
                     f'{point["x"]:.1f}%</title></circle>')
        label_y = y + 4
        while any(abs(label_y - other) < 13 for other in placed):
            label_y += 13
        placed.append(label_y)
        parts.append(f'<text x="{x + 10:.1f}" y="{label_y:.1f}" fill="#24292f">'
                     f'{html.escape(point["name"])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#bf8700", "#8250df", "#1b7c83", "#e16f24",
            "#6e7781", "#a475f9", "#d1242f"]


def scatter_png(report: Any, width: int = 640, height: int = 420) -> np.ndarray:
    """A raster version of :func:`scatter_svg` (axes, grid, points, CI bars; no text)."""
    from skimage.draw import disk, line

    points, _, reference = _plot_points(report)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 40, 20, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    image[top : top + plot_h, left : left + plot_w] = (250, 251, 252)
    xs = [p["x"] for p in points] + ([reference] if reference is not None else [])
    ys = [p["y"] for p in points] + [v for p in points if p["ci"] for v in p["ci"]]
    x_low, x_high = (min(xs) - 1, max(xs) + 1) if xs else (0.0, 100.0)
    y_low, y_high = (min(ys) - 0.02, max(ys) + 0.02) if ys else (0.0, 1.0)

    def px(x: float) -> int:
        return int(round(left + (x - x_low) / max(x_high - x_low, 1e-9) * (plot_w - 1)))

    def py(y: float) -> int:
        return int(round(top + (1 - (y - y_low) / max(y_high - y_low, 1e-9)) * (plot_h - 1)))

    for tick in _nice_ticks(x_low, x_high):
        image[top : top + plot_h, px(tick)] = (234, 238, 242)
    for tick in _nice_ticks(y_low, y_high):
        image[py(tick), left : left + plot_w] = (234, 238, 242)
    image[top + plot_h - 1, left : left + plot_w] = (87, 96, 106)
    image[top : top + plot_h, left] = (87, 96, 106)
    if reference is not None:
        x = px(reference)
        for y in range(top, top + plot_h, 8):
            image[y : y + 4, x] = (130, 80, 223)
    for index, point in enumerate(points):
        color = tuple(int(_PALETTE[index % len(_PALETTE)][i : i + 2], 16) for i in (1, 3, 5))
        x, y = px(point["x"]), py(point["y"])
        if point["ci"]:
            rr, cc = line(py(point["ci"][0]), x, py(point["ci"][1]), x)
            image[np.clip(rr, 0, height - 1), np.clip(cc, 0, width - 1)] = color
        rr, cc = disk((y, x), 6, shape=image.shape[:2])
        image[rr, cc] = color
    return image


# --------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
header p.lead { margin: 0 0 14px; color: var(--muted); font-size: 15px; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 8px; }
.chip { background: var(--bg); border: 1px solid var(--line); border-radius: 999px;
  padding: 2px 10px; font-size: 12px; color: var(--muted); }
.chip b { color: var(--fg); font-weight: 600; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; }
.card .s { color: var(--muted); font-size: 12px; }
table.rank { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.rank th, table.rank td { padding: 7px 10px; border-bottom: 1px solid var(--line);
  text-align: right; white-space: nowrap; }
table.rank th { background: var(--bg); font-size: 12px; color: var(--muted); font-weight: 600; }
table.rank td.name, table.rank th.name { text-align: left; }
table.rank tr.ref td { color: var(--muted); background: #fbfbfc; font-style: italic; }
.bar { display: inline-block; vertical-align: middle; width: 90px; height: 8px;
  background: #eaeef2; border-radius: 4px; margin-left: 8px; overflow: hidden; }
.bar > span { display: block; height: 100%; border-radius: 4px; }
.score { font-weight: 600; }
.good { color: #1a7f37; } .mid { color: #9a6700; } .bad { color: #cf222e; }
.delta { color: var(--muted); font-size: 12px; margin-left: 4px; }
.plot { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.plot figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.note { color: var(--muted); max-width: 460px; }
.model { border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin: 18px 0; }
.model-head { display: flex; justify-content: space-between; align-items: baseline; flex-wrap: wrap;
  gap: 8px; margin-bottom: 10px; }
.model-head .stats { color: var(--muted); font-size: 13px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.pair h4 { margin: 6px 0 8px; font-size: 13px; text-transform: uppercase; letter-spacing: .05em;
  color: var(--muted); }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; }
.sample { border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff; }
.sample .imgs { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.sample img { width: 100%; image-rendering: pixelated; border-radius: 4px; display: block;
  background: #000; }
.sample .lbl { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; font-size: 10px;
  color: var(--muted); text-align: center; text-transform: uppercase; letter-spacing: .04em; }
.sample .cap { font-size: 12px; margin-top: 4px; font-variant-numeric: tabular-nums; }
.sample .cap .id { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  display: block; }
.flip { color: #cf222e; font-weight: 600; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; }
.legend img { width: 160px; height: 10px; border-radius: 3px; }
details { margin-top: 10px; } summary { cursor: pointer; color: var(--accent); }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px;
  overflow: auto; font-size: 12px; }
table.heat td { text-align: center; min-width: 56px; }
table.heat th { text-align: center; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
@media (max-width: 900px) { .pair { grid-template-columns: 1fr; } }
"""


def _score_class(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return ""
    return "good" if value >= 0.9 else "mid" if value >= 0.75 else "bad"


def _class_name(index: int | None, names: list[str] | None) -> str:
    if index is None:
        return "–"
    if names and 0 <= index < len(names):
        return names[index]
    return str(index)


def _sample_card(example: Any, names: list[str] | None) -> str:
    images = [
        to_rgb(example.image),
        overlay(example.image, example.original_map),
        overlay(example.image, example.pruned_map),
    ]
    tags = "".join(
        f'<img src="{_data_uri(display_size(img))}" alt="{alt}">'
        for img, alt in zip(images, ("input", "original CAM", "pruned CAM"), strict=True)
    )
    flip = example.pred_pruned != example.pred_original
    prediction = (
        f'pred {html.escape(_class_name(example.pred_original, names))} → '
        f'<span class="{"flip" if flip else ""}">'
        f'{html.escape(_class_name(example.pred_pruned, names))}</span>'
    )
    label = (
        f"label {html.escape(_class_name(example.label, names))} · "
        if example.label is not None
        else ""
    )
    target = html.escape(_class_name(example.target_original, names))
    if example.target_pruned != example.target_original:
        target += " / " + html.escape(_class_name(example.target_pruned, names))
    return (
        '<div class="sample"><div class="lbl"><span>input</span><span>original</span>'
        f'<span>pruned</span></div><div class="imgs">{tags}</div><div class="cap">'
        f'<b class="{_score_class(example.h)}">h {_num(example.h)}</b> · s {_num(example.spatial)}'
        f' · f {_num(example.spectral)}<br>{label}CAM of {target}<br>{prediction}'
        f'<span class="id" title="{html.escape(example.sample_id)}">'
        f"{html.escape(example.sample_id)}</span></div></div>"
    )


def render_html(report: Any) -> str:
    """The self-contained HTML report."""
    config = report.config
    names = report.class_names
    ranked = report.ranked()
    rows = ranking_rows(report)
    original = report.original
    esc = html.escape
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chips = [
        ("method", config.get("method")),
        ("target", config.get("target")),
        ("samples", f"{report.n:,}"),
        ("spatial", config.get("spatial")),
        ("spectral", config.get("spectral")),
        ("aggregation", config.get("aggregation")),
        ("preset", config.get("preset")),
        ("layer", config.get("original_layer")),
        ("data", config.get("data")),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Sp2PS report – {esc(original.name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<header><h1>Sp2PS report</h1>",
        '<p class="lead">Do the pruned models still look where the original looked? '
        "Sp2PS is the harmonic mean of the spatial (" + esc(str(config.get("spatial")))
        + ") and spectral (" + esc(str(config.get("spectral")))
        + ") similarity between each pruned model's class activation maps and the "
        "original's; 1 means identical attention.</p>",
        '<div class="chips">'
        + "".join(
            f'<span class="chip">{esc(k)} <b>{esc(str(v))}</b></span>' for k, v in chips if v
        )
        + "</div></header>",
    ]
    best = ranked[0] if ranked else None
    cards = [
        ("original", esc(original.name),
         f"accuracy {_pct(report.accuracy_original)} · {_num(original.parameters)} params"),
        ("pruned models", str(len(ranked)), f"scored on {report.n:,} samples"),
    ]
    if best is not None:
        cards.append(("best Sp2PS", f'<span class="{_score_class(best.sp2ps)}">'
                      f"{_num(best.sp2ps)}</span>", esc(best.info.name)))
        worst = ranked[-1]
        cards.append(("lowest Sp2PS", f'<span class="{_score_class(worst.sp2ps)}">'
                      f"{_num(worst.sp2ps)}</span>", esc(worst.info.name)))
    out.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div>'
        f'<div class="s">{s}</div></div>' for k, v, s in cards) + "</div>")

    out.append("<h2>Ranking</h2>")
    out.append('<table class="rank"><thead><tr><th>#</th><th class="name">model</th>'
               "<th>Sp2PS</th><th>95% CI</th><th>spatial</th><th>spectral</th><th>p05 h</th>"
               "<th>accuracy</th><th>top-1 agree</th><th>params</th><th>zero weights</th>"
               "<th>file size</th></tr></thead><tbody>")
    out.append(
        f'<tr class="ref"><td>–</td><td class="name">{esc(original.name)} (original)</td>'
        f"<td>1.000</td><td></td><td></td><td></td><td></td>"
        f"<td>{_pct(report.accuracy_original)}</td><td></td><td>{_num(original.parameters)}</td>"
        f"<td>{original.sparsity:.1f}%</td><td>{human_size(original.file_size)}</td></tr>"
    )
    for row in rows:
        score = row["sp2ps"]
        width = 0.0 if score is None or not math.isfinite(score) else max(0.0, min(1.0, score))
        color = {"good": "#2da44e", "mid": "#d4a72c", "bad": "#cf222e"}.get(
            _score_class(score), "#8c959f")
        accuracy = _pct(row["accuracy"])
        if row["accuracy"] is not None and report.accuracy_original is not None:
            delta = 100 * (row["accuracy"] - report.accuracy_original)
            accuracy += f'<span class="delta">{delta:+.1f}</span>'
        ci = None if row["ci95_low"] is None else (row["ci95_low"], row["ci95_high"])
        out.append(
            f'<tr><td>{row["rank"]}</td><td class="name"><a href="#m-{_anchor(row["model"])}">'
            f'{esc(row["model"])}</a></td>'
            f'<td><span class="score {_score_class(score)}">{_num(score)}</span>'
            f'<span class="bar"><span style="width:{100 * width:.1f}%;background:{color}">'
            f"</span></span></td><td>{_ci_text(ci)}</td>"
            f'<td>{_num(row["mean_spatial"])}</td><td>{_num(row["mean_spectral"])}</td>'
            f'<td>{_num(row["p05_h"])}</td><td>{accuracy}</td>'
            f'<td>{_pct(row["top1_agreement"])}</td><td>{_num(row["parameters"])}</td>'
            f'<td>{row["sparsity_percent"]:.1f}%</td><td>{human_size(row["file_size_bytes"])}</td>'
            "</tr>"
        )
    out.append("</tbody></table>")

    x_what = "accuracy" if report.accuracy_original is not None else "top-1 agreement"
    out.append(f"<h2>Sp2PS vs {x_what}</h2>")
    out.append(
        f'<div class="plot"><figure>{scatter_svg(report)}</figure><div class="note">'
        f"<p>Each point is a pruned model; the vertical bar is its bootstrap 95% confidence "
        f"interval. Accuracy alone can hide a model that is right for other reasons: two "
        f"models with the same {x_what} can differ a lot in Sp2PS, i.e. in whether they "
        f"still attend to the same image regions as the original.</p>"
        f"<p>The per-sample score is <i>h</i> = harmonic mean of spatial similarity <i>s</i> "
        f"and spectral similarity <i>f</i> of the two CAMs; Sp2PS aggregates <i>h</i> over "
        f"the test set ({esc(str(config.get('aggregation')))}).</p>"
        f'<div class="legend">CAM colours: low<img src="{_data_uri(_legend())}" alt="">high'
        "</div></div></div>"
    )

    out.extend(_per_class_table(ranked, names, report.accuracy_original is not None))

    out.append("<h2>Where the models look: worst and best samples</h2>")
    for model in ranked:
        result = model.result
        out.append(
            f'<section class="model" id="m-{_anchor(model.info.name)}"><div class="model-head">'
            f"<h3>{esc(model.info.name)}</h3><div class=\"stats\">Sp2PS "
            f'<b class="{_score_class(model.sp2ps)}">{_num(model.sp2ps)}</b> · accuracy '
            f"{_pct(_field(result, 'accuracy_pruned'))} · top-1 agreement "
            f"{_pct(_field(result, 'top1_agreement'))} · attention lost "
            f"{_pct(_field(result, 'attention_lost'))} · zero weights "
            f"{model.info.sparsity:.1f}%</div></div>"
        )
        out.append('<div class="pair">')
        for title, examples in (("lowest h", model.worst), ("highest h", model.best)):
            out.append(f"<div><h4>{title}</h4><div class=\"samples\">")
            out.extend(_sample_card(example, names) for example in examples)
            out.append("</div></div>")
        out.append("</div></section>")

    results_json = json.dumps(_clean(report.to_dict()), indent=2, default=str)
    out.append("<h2>Configuration and provenance</h2>")
    out.append("<table class=\"rank\"><thead><tr><th class=\"name\">model</th>"
               "<th class=\"name\">SHA-256</th><th>layer</th><th>layout</th></tr></thead><tbody>")
    for info in [original, *(m.info for m in report.models)]:
        out.append(
            f'<tr><td class="name">{esc(info.name)}</td><td class="name"><code>'
            f"{esc(info.sha256 or '–')}</code></td><td>{esc(str(info.layer))}</td>"
            f"<td>{esc(str(info.layout))}</td></tr>"
        )
    out.append("</tbody></table>")
    out.append(f"<details><summary>results.json</summary><pre>{esc(results_json)}</pre></details>")
    versions = config.get("versions", {})
    out.append(
        f"<footer>Generated {created} by sp2ps-onnx {esc(str(versions.get('sp2ps-onnx')))} "
        f"(onnxruntime {esc(str(versions.get('onnxruntime') or versions.get('onnxruntime-gpu')))}"
        f", onnx {esc(str(versions.get('onnx')))}) in {report.seconds:.1f} s. Sp2PS: Renza &amp; "
        "Ballesteros, <i>Informatics</i> 2023, 10(3):72.</footer>"
    )
    out.append("</main></body></html>")
    return "\n".join(out)


def _heat_background(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "#f6f8fa"
    hue = 120 * min(1.0, max(0.0, (value - 0.3) / 0.7))
    return f"hsl({hue:.0f}, 70%, 86%)"


def _per_class_table(ranked: list[Any], names: list[str] | None, has_labels: bool) -> list[str]:
    per_model = [
        {int(k): float(v) for k, v in (_field(m.result, "per_class_h") or {}).items()}
        for m in ranked
    ]
    classes = sorted({c for values in per_model for c in values})
    if not classes or len(classes) > 40:
        return []
    grouped_by = "true label" if has_labels else "explained class"
    out = [
        "<h2>Mean h per class</h2>",
        f'<p class="note">Samples grouped by {grouped_by}: where does pruning move the '
        "attention most?</p>",
        '<div style="overflow-x:auto"><table class="rank heat"><thead><tr>'
        '<th class="name">model</th>'
        + "".join(f"<th>{html.escape(_class_name(c, names))}</th>" for c in classes)
        + "</tr></thead><tbody>",
    ]
    for model, values in zip(ranked, per_model, strict=True):
        cells = "".join(
            f'<td style="background:{_heat_background(values.get(c))}">'
            f"{_num(values.get(c), 2)}</td>"
            for c in classes
        )
        out.append(f'<tr><td class="name">{html.escape(model.info.name)}</td>{cells}</tr>')
    out.append("</tbody></table></div>")
    return out


def _legend() -> np.ndarray:
    ramp = np.tile(np.linspace(0, 1, 160), (10, 1))
    return colorize(ramp)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


# --------------------------------------------------------------------------------------
# Files


PER_SAMPLE_COLUMNS = ["model", "index", "id", "label", "label_name", "target_original",
                      "target_pruned", "pred_original", "pred_pruned", "spatial", "spectral", "h"]


def write_report(report: Any, directory: str | os.PathLike[str]) -> Path:
    """Write results.json, per_sample.csv, report.html and figures/ into ``directory``."""
    directory = Path(directory)
    figures = directory / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    data = _clean(report.to_dict())
    data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (directory / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    with open(directory / "per_sample.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_SAMPLE_COLUMNS)
        writer.writeheader()
        for model in report.models:
            for row in model.rows:
                writer.writerow(
                    {
                        **{k: ("" if v is None else v) for k, v in row.items()},
                        "label_name": ""
                        if row.get("label") is None
                        else _class_name(row["label"], report.class_names),
                    }
                )
    (figures / "sp2ps_vs_accuracy.svg").write_text(scatter_svg(report))
    write_png(figures / "sp2ps_vs_accuracy.png", scatter_png(report))
    for model in report.models:
        name = _anchor(model.info.name)
        write_png(figures / f"{name}_worst.png", example_grid(model.worst))
        write_png(figures / f"{name}_best.png", example_grid(model.best))
    (directory / "report.html").write_text(render_html(report), encoding="utf-8")
    return directory / "report.html"


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], marker: str = "results.json", force: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; on success it replaces ``target``.

    On failure (an exception, Ctrl-C) the temporary directory is removed, so no partial
    output is left and an earlier output survives. An existing non-empty ``target`` is
    replaced only with ``force`` and only if it holds ``marker`` (an earlier output of this
    tool); a folder of anything else is never replaced. Otherwise :class:`InputDataError`
    is raised before any work.
    """
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise InputDataError(
                f"output {target} exists and is not a directory; choose another --out"
            )
        if any(target.iterdir()):
            if not (target / marker).exists():
                raise InputDataError(
                    f"output directory {target} exists and is not an earlier sp2ps output "
                    f"(no {marker}); choose another --out or empty it"
                )
            if not force:
                raise InputDataError(
                    f"output directory {target} already holds an earlier sp2ps output; pass "
                    "--force to replace it, or choose another --out"
                )
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
        os.replace(target, old / "previous")
    try:
        os.replace(temporary, target)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", target)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
