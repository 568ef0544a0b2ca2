"""What goes into a report of a :class:`~sp2ps_onnx.scoring.ScoreReport`, and where.

:func:`write_report` fills a directory with ``results.json`` (every number, the full
configuration, package versions, SHA-256 of each model), ``per_sample.csv``,
``report.html`` and ``figures/``. The HTML page is the jinja2 template
``templates/report.html.j2`` rendered with autoescaping; it is self-contained (inline CSS,
the scatter plot as inline SVG, CAM images as base64 PNG, no JavaScript). The figures
(:mod:`sp2ps_onnx.figures`, matplotlib) are written as PNG and SVG, and PDF on request.
:func:`format_table` renders the ranking for the terminal, :func:`notebook_html` for Jupyter.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputDataError, RuntimeMissingError
from .formatting import band_label, ci_bounds, ci_text, gate_message, percent

# jinja2 (with markupsafe), matplotlib and .figures (which needs matplotlib) are the
# optional 'report' extra: they are imported inside the functions that need them, so the
# text and CSV outputs work without them.

FORMATS = ("table", "json", "csv", "markdown")


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


ROLE_LABELS = {"floor": "random floor", "reference": "reference", "original": "original"}
"""How a row that is not a ranked pruned model is labelled after its name."""

FAITHFULNESS_COLUMNS = {
    "deletion_auc": "deletion ↓",
    "insertion_auc": "insertion ↑",
    "cam_mult_change": "CAM × image",
    "road_morf": "ROAD MoRF ↓",
    "road_lerf": "ROAD LeRF",
    "road_combined": "ROAD comb. ↑",
}
"""The faithfulness figures of a model's own CAM (docs/metric.md), in the order shown, with
the direction in which a CAM is more faithful."""


def _has_references(report: Any) -> bool:
    return any(m.role == "reference" for m in getattr(report, "references", []) or [])


def _faithfulness_keys(report: Any) -> list[str]:
    """The faithfulness figures any model of ``report`` has, known ones first."""
    found: dict[str, None] = {}
    sources = [getattr(report, "original_faithfulness", None)]
    sources += [getattr(m, "faithfulness", None)
                for m in [*report.models, *(getattr(report, "references", []) or [])]]
    for values in sources:
        found.update(dict.fromkeys(values or {}))
    return [k for k in FAITHFULNESS_COLUMNS if k in found] + sorted(
        k for k in found if k not in FAITHFULNESS_COLUMNS)


def _faithfulness_values(values: dict[str, Any] | None, keys: list[str]) -> dict[str, Any]:
    values = values or {}
    return {key: None if values.get(key) is None else float(values[key]) for key in keys}


_RESULT_FIELDS = ("mean_spatial", "mean_spectral", "median_h", "p05_h", "attention_lost")
_SPLIT_FIELDS = ("top1_agreement", "mean_js_divergence", "same_answer_n", "same_answer_sp2ps",
                 "different_answer_n", "different_answer_sp2ps", "same_answer_gap_share")


def _row_keys(faithfulness: list[str]) -> list[str]:
    return ["rank", "model", "role", "band", "sp2ps", "ci95_low", "ci95_high", *_RESULT_FIELDS,
            "accuracy", *_SPLIT_FIELDS, *faithfulness, "parameters", "sparsity_percent",
            "file_size_bytes", "n"]


def _model_row(model: Any, rank: int | None, faithfulness: list[str]) -> dict[str, Any]:
    result = model.result
    ci = ci_bounds(_field(result, "ci95"))
    row = {
        "rank": rank,
        "model": model.info.name,
        "role": getattr(model, "role", "pruned"),
        "band": getattr(model, "band", None),
        "sp2ps": _field(result, "sp2ps"),
        "ci95_low": None if ci is None else ci[0],
        "ci95_high": None if ci is None else ci[1],
        **{name: _field(result, name) for name in _RESULT_FIELDS},
        "accuracy": _field(result, "accuracy_pruned"),
        **{name: _field(result, name) for name in _SPLIT_FIELDS},
        **_faithfulness_values(getattr(model, "faithfulness", None), faithfulness),
        "parameters": model.info.parameters,
        "sparsity_percent": model.info.sparsity,
        "file_size_bytes": model.info.file_size,
        "n": _field(result, "n"),
    }
    return {key: row[key] for key in _row_keys(faithfulness)}


def ranking_rows(report: Any) -> list[dict[str, Any]]:
    """One dict per pruned model, ranked by Sp2PS: every number the table shows and more
    (the band's full text, the decision/attention split, the faithfulness figures)."""
    keys = _faithfulness_keys(report)
    return [_model_row(model, rank, keys) for rank, model in enumerate(report.ranked(), start=1)]


def reference_rows(report: Any) -> list[dict[str, Any]]:
    """One dict per reference model (the random floor first), with ``rank`` ``None``:
    references put the ranking on a scale and are never ranked themselves."""
    keys = _faithfulness_keys(report)
    return [_model_row(model, None, keys) for model in getattr(report, "references", []) or []]


def original_row(report: Any) -> dict[str, Any]:
    """The original model as a row of the same columns: its accuracy, size and
    faithfulness; the comparisons with itself are left empty, not assumed."""
    original = report.original
    keys = _faithfulness_keys(report)
    return {
        **dict.fromkeys(_row_keys(keys)),
        "model": original.name,
        "role": "original",
        "accuracy": report.accuracy_original,
        **_faithfulness_values(getattr(report, "original_faithfulness", None), keys),
        "parameters": original.parameters,
        "sparsity_percent": original.sparsity,
        "file_size_bytes": original.file_size,
        "n": report.n,
    }


def _split(value: Any, count: Any) -> str:
    if not count:
        return "–"
    return f"{_num(value)} ({int(count):,})"


def _display(row: dict[str, Any], has_references: bool, faithfulness: list[str]) -> dict[str, str]:
    """A row's cells as text: the ranked ones numbered, the others labelled by role."""
    role = row["role"]
    name = row["model"] if role == "pruned" else f"{row['model']} ({ROLE_LABELS[role]})"
    original = role == "original"
    ci = None if row["ci95_low"] is None else (row["ci95_low"], row["ci95_high"])
    return {
        "#": str(row["rank"]) if row["rank"] is not None else "–",
        "model": name,
        # The original against itself: 1 by definition, shown as the top of the scale.
        "Sp2PS": "1.000" if original else _num(row["sp2ps"]),
        "95% CI": "" if original else ci_text(ci),
        "band": band_label(row["band"], has_references),
        "spatial": "" if original else _num(row["mean_spatial"]),
        "spectral": "" if original else _num(row["mean_spectral"]),
        "p05 h": "" if original else _num(row["p05_h"]),
        "accuracy": percent(row["accuracy"]),
        "top-1 agree": "" if original else percent(row["top1_agreement"]),
        "JS div": "" if original else _num(row["mean_js_divergence"]),
        "same answer (n)": _split(row["same_answer_sp2ps"], row["same_answer_n"]),
        "different answer (n)": _split(row["different_answer_sp2ps"], row["different_answer_n"]),
        "gap on same": "" if original else percent(row["same_answer_gap_share"], 0),
        "params": _num(row["parameters"]),
        "zeros": f"{row['sparsity_percent']:.1f}%",
        "size": human_size(row["file_size_bytes"]),
        **{FAITHFULNESS_COLUMNS.get(key, key): _num(row[key]) for key in faithfulness},
    }


# The blocks of the text and markdown tables: (columns, the columns the aligned text table
# leaves out to stay within ~110 characters; markdown has them all).
_RANKING = (["#", "model", "Sp2PS", "95% CI", "band", "spatial", "spectral", "p05 h", "accuracy",
             "top-1 agree", "JS div", "params", "zeros", "size"],
            {"spatial", "spectral", "p05 h", "params"})
_SPLIT = ["model", "same answer (n)", "different answer (n)", "gap on same"]
_LEFT = {"model", "band", "95% CI"}
_ORIGINAL_KEYS = {"model", "role", "accuracy", "parameters", "sparsity_percent",
                  "file_size_bytes", "n"}


def _block(headers: list[str], cells: list[dict[str, str]], fmt: str) -> list[str]:
    table = [[row.get(h, "") for h in headers] for row in cells]
    right = [h not in _LEFT for h in headers]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
        return lines
    widths = [max(len(r[i]) for r in [headers, *table]) for i in range(len(headers))]
    lines = []
    for n, row in enumerate([headers, *table]):
        lines.append("  ".join(c.rjust(w) if r else c.ljust(w)
                               for c, w, r in zip(row, widths, right, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def correlation_text(report: Any) -> str | None:
    """The rank correlations of Sp2PS with accuracy and agreement across the run's pruned
    models, as one sentence (``None`` when there are none)."""
    correlations = getattr(report, "correlations", None) or {}
    parts = [f"vs {what} ρ = {value:.2f}"
             for what, key in (("accuracy", "sp2ps_vs_accuracy"),
                               ("top-1 agreement", "sp2ps_vs_agreement"))
             if (value := correlations.get(key)) is not None and math.isfinite(value)]
    if not parts:
        return None
    return (f"Spearman rank correlation across the {correlations.get('models')} pruned models: "
            f"Sp2PS {', '.join(parts)} (near 1: Sp2PS orders the models as their outputs do).")


def band_text(report: Any) -> str | None:
    """What the band column is measured against (``None`` without floor and references)."""
    floor = getattr(report, "floor", None)
    references = [m for m in getattr(report, "references", []) or [] if m.role == "reference"]
    if floor is None and not references:
        return None
    against = []
    if floor is not None:
        against.append(f"the random floor ({_num(floor.sp2ps)})")
    if references:
        levels = ", ".join(f"{m.info.name} {_num(m.sp2ps)}" for m in references)
        against.append(f"the reference{'s' if len(references) > 1 else ''} ({levels})")
    if references:
        labels = ["≤ floor", "floor–ref: between the floor and the lowest reference",
                  "≈ ref: within the references' range", "> ref"]
    else:
        labels = ["≤ floor", "> floor"]
    # No-break spaces keep each label on one line when the sentence is wrapped.
    labels = [label.replace(" ", "\u00a0") for label in labels]
    return f"band: where Sp2PS lies against {' and '.join(against)}: {'; '.join(labels)}."


SPLIT_CAPTION = (
    "Decision vs attention: Sp2PS over the samples both models give the same class (same "
    "answer) and over the others, with their counts; gap on same: the share of the gap "
    "1 − Sp2PS that the same-answer samples make up (near 100%: the attention moved while "
    "the decisions stayed)."
)
FAITHFULNESS_CAPTION = (
    "Faithfulness of each model's own CAM, means over the samples (docs/metric.md); arrows "
    "point to the more faithful side. Compare each model with the original's row."
)


STAGE_CAPTION = (
    "Where pruning moved the attention: Sp2PS at the last map of each resolution stage, "
    "finest first (95% CI), the stages of both models matched by resolution; the last "
    "stage is the default layer (the ranking's, unless --layer names another)."
)


def stage_table(report: Any) -> dict[str, Any] | None:
    """Sp2PS per resolution stage of every compared model (the references, then the
    ranked pruned models); ``None`` when the run scored one layer only."""
    models = [*(getattr(report, "references", None) or []), *report.ranked()]
    if not models or not getattr(models[0], "stages", None):
        return None
    headers = [f"{h}x{w}" for h, w in (stage.resolution for stage in models[0].stages)]
    rows = []
    for model in models:
        role = getattr(model, "role", "pruned")
        cells = []
        for stage in model.stages:
            ci = stage.result.ci95
            cells.append(_num(stage.sp2ps) + ("" if ci is None
                                               else f" [{_num(ci[0])}, {_num(ci[1])}]"))
        rows.append({"name": model.info.name, "css": "" if role == "pruned" else "ref",
                     "role_label": "" if role == "pruned" else ROLE_LABELS[role],
                     "cells": cells,
                     "scores": [_score_class(stage.sp2ps) for stage in model.stages]})
    layers = [stage.original_layer for stage in models[0].stages]
    return {"headers": headers, "layers": layers, "rows": rows}


def _stage_block(report: Any, fmt: str) -> list[str]:
    table = stage_table(report)
    if table is None:
        return []
    headers = ["model", *(f"{h} ({table['layers'][k]})" if fmt == "markdown" else h
                          for k, h in enumerate(table["headers"]))]
    cells = [{"model": row["name"] + (f" ({row['role_label']})" if row["role_label"] else ""),
              **dict(zip(headers[1:], row["cells"], strict=True))} for row in table["rows"]]
    return [*_wrap(STAGE_CAPTION), "", *_block(headers, cells, fmt)]


def _wrap(text: str, width: int = 100) -> list[str]:
    lines = textwrap.wrap(text, width, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines]


def format_table(report: Any, fmt: str = "table") -> str:
    """The ranking as ``table`` (aligned text), ``json``, ``csv`` or ``markdown``.

    Every format has the original, the reference rows (random floor, ``--reference``
    models; labelled, never ranked) and the ranked pruned models. JSON and CSV carry every
    number: the band's full text, the decision/attention split, the mean Jensen-Shannon
    divergence, the faithfulness figures and (JSON) the rank correlations. The text table
    keeps the columns that fit ~110 characters; markdown has them all. JSON and markdown
    also carry the ``--fail-under`` verdict when the run had one.
    """
    rows = ranking_rows(report)
    references = reference_rows(report)
    original = original_row(report)
    keys = _faithfulness_keys(report)
    if fmt == "json":
        payload = {
            # The original's own numbers only; its comparisons with itself are not measured.
            "original": {k: v for k, v in original.items() if k in _ORIGINAL_KEYS or k in keys},
            "n": report.n,
            "method": report.config.get("method"),
            "target": report.config.get("target"),
            "models": rows,
            "references": references,
            "band": {
                "floor": next((r["sp2ps"] for r in references if r["role"] == "floor"), None),
                "references": {r["model"]: r["sp2ps"] for r in references
                               if r["role"] == "reference"},
            },
            "correlations": getattr(report, "correlations", None) or {},
        }
        if getattr(report, "gate", None):
            payload["gate"] = report.gate
        stage_scores = {m.info.name: [stage.to_dict() for stage in m.stages]
                        for m in [*report.ranked(), *(getattr(report, "references", None) or [])]
                        if getattr(m, "stages", None)}
        if stage_scores:
            payload["stages"] = stage_scores
        return json.dumps(_clean(payload), indent=2)
    if fmt == "csv":
        # The ranked models first (the first row is the best), then the original and the
        # references, told apart by 'role'.
        everything = [*rows, original, *references]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(everything[0]))
        writer.writeheader()
        for row in everything:
            writer.writerow({k: "" if v is None else v for k, v in _clean(row).items()})
        return buffer.getvalue().rstrip("\n")
    if fmt not in ("table", "markdown"):
        raise InputDataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    has_references = _has_references(report)
    cells = [_display(row, has_references, keys) for row in [original, *references, *rows]]
    headers, wide = _RANKING
    if fmt == "table":
        headers = [h for h in headers if h not in wide]
    if not references:
        headers = [h for h in headers if h != "band"]
    blocks = [_block(headers, cells, fmt)]
    blocks.append([*_wrap(SPLIT_CAPTION), "", *_block(_SPLIT, cells[1:], fmt)])
    if keys:
        blocks.append([*_wrap(FAITHFULNESS_CAPTION), "",
                       *_block(["model", *(FAITHFULNESS_COLUMNS.get(k, k) for k in keys)],
                               cells, fmt)])
    stages = _stage_block(report, fmt)
    if stages:
        blocks.append(stages)
    # The terminal gets the gate's verdict from the CLI, right after the table; markdown
    # (pasted into a CI summary) carries it itself.
    gate = getattr(report, "gate", None) if fmt == "markdown" else None
    notes = [line for text in (band_text(report), correlation_text(report),
                               gate_message(gate) if gate else None) if text
             for line in _wrap(text)]
    if notes:
        blocks.append(notes)
    summary = (
        f"Sp2PS ({report.config.get('spatial')}+{report.config.get('spectral')}, "
        f"{report.config.get('aggregation')}) of {len(rows)} pruned model(s) vs "
        f"{report.original.name}, {report.n} samples, {report.config.get('method')}, "
        f"target={report.config.get('target')}"
    )
    body = "\n\n".join("\n".join(block) for block in blocks)
    # Markdown starts with its table, so that it pastes into a document as one.
    return body if fmt == "markdown" else summary + "\n" + body


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
# HTML


REPORT_PACKAGES = ("matplotlib", "jinja2")
"""What the report and the figures need: the ``report`` extra."""


def check_report_packages(hint: str = "") -> None:
    """Raise :class:`RuntimeMissingError` naming the ``report`` extra when a package the
    report needs is missing; call it before long work whose end is a report."""
    missing = [name for name in REPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeMissingError(
            f"the report and figures need {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install the 'report' "
            f"extra: pip install 'sp2ps-onnx[report]'{hint}"
        )


def _environment() -> Any:
    check_report_packages()
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("sp2ps_onnx", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )


def _score_class(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return ""
    return "good" if value >= 0.9 else "mid" if value >= 0.75 else "bad"


_SCORE_COLORS = {"good": "#2da44e", "mid": "#d4a72c", "bad": "#cf222e"}


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _band_marks(report: Any) -> list[dict[str, str]]:
    """Ticks of the floor and the references on the score bars of the HTML tables."""
    marks = []
    for model in getattr(report, "references", None) or []:
        value = model.sp2ps
        if math.isfinite(value):
            marks.append({"left": f"{100 * max(0.0, min(1.0, value)):.1f}",
                          "css": "floor" if model.role == "floor" else "refmark",
                          "title": f"{model.info.name}: {_num(value)}"})
    return marks


def _html_row(row: dict[str, Any], report: Any, has_references: bool) -> dict[str, Any]:
    """One table row as display strings, shared by the page and the notebook view."""
    score = row["sp2ps"]
    finite = score is not None and math.isfinite(score)
    css = _score_class(score)
    delta = None
    if row["accuracy"] is not None and report.accuracy_original is not None:
        delta = f"{100 * (row['accuracy'] - report.accuracy_original):+.1f}"
    ci = None if row["ci95_low"] is None else (row["ci95_low"], row["ci95_high"])
    role = row["role"]
    return {
        "rank": "–" if row["rank"] is None else row["rank"],
        "model": row["model"],
        "role": role,
        "role_label": "" if role == "pruned" else ROLE_LABELS[role],
        "anchor": _anchor(row["model"]),
        "css": css,
        "sp2ps": _num(score),
        "bar_width": f"{100 * max(0.0, min(1.0, score)) if finite else 0.0:.1f}",
        "bar_color": _SCORE_COLORS.get(css, "#8c959f") if role == "pruned" else "#8c959f",
        "ci": ci_text(ci),
        "band": band_label(row["band"], has_references),
        "band_text": row["band"] or "",
        "spatial": _num(row["mean_spatial"]),
        "spectral": _num(row["mean_spectral"]),
        "p05_h": _num(row["p05_h"]),
        "accuracy": percent(row["accuracy"]),
        "delta": delta,
        "top1": percent(row["top1_agreement"]),
        "js": _num(row["mean_js_divergence"]),
        "same": _split(row["same_answer_sp2ps"], row["same_answer_n"]),
        "different": _split(row["different_answer_sp2ps"], row["different_answer_n"]),
        "gap_same": percent(row["same_answer_gap_share"], 0),
        "parameters": _num(row["parameters"]),
        "sparsity": f"{row['sparsity_percent']:.1f}%",
        "size": human_size(row["file_size_bytes"]),
    }


def _table_rows(report: Any) -> list[dict[str, Any]]:
    """The ranked pruned models as display strings."""
    has_references = _has_references(report)
    return [_html_row(row, report, has_references) for row in ranking_rows(report)]


def _reference_table_rows(report: Any) -> list[dict[str, Any]]:
    """The random floor and the reference models as display strings (never ranked)."""
    has_references = _has_references(report)
    return [_html_row(row, report, has_references) for row in reference_rows(report)]


def _original_row(report: Any) -> dict[str, Any]:
    original = report.original
    return {
        "name": original.name,
        "accuracy": percent(report.accuracy_original),
        "parameters": _num(original.parameters),
        "sparsity": f"{original.sparsity:.1f}%",
        "size": human_size(original.file_size),
    }


def _faithfulness_table(report: Any) -> dict[str, Any] | None:
    """The faithfulness figures of the original, the references and the ranked models
    (``None`` when the run has none)."""
    keys = _faithfulness_keys(report)
    if not keys:
        return None
    rows = [original_row(report), *reference_rows(report), *ranking_rows(report)]
    return {
        "headers": [FAITHFULNESS_COLUMNS.get(key, key) for key in keys],
        "rows": [{"name": row["model"],
                  "role_label": "" if row["role"] == "pruned" else ROLE_LABELS[row["role"]],
                  "css": "" if row["role"] == "pruned" else "ref",
                  "cells": [_num(row[key]) for key in keys]} for row in rows],
    }


def _markup(text: str) -> Any:
    from markupsafe import Markup

    return Markup(text)


def _scatter_svg(report: Any) -> Any:
    from .figures import scatter_figure, svg_text

    return _markup(svg_text(scatter_figure(report)))


def _heat_color(value: float | None) -> str:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if value is None or not math.isfinite(value):
        return "#f6f8fa"
    red, green, blue, _ = colormaps["RdYlGn"](float(value))
    # Blended halfway towards white, so the numbers stay readable on every cell.
    return to_hex(((1 + red) / 2, (1 + green) / 2, (1 + blue) / 2))


def _per_class(report: Any, ranked: list[Any]) -> dict[str, Any] | None:
    per_model = [
        {int(k): float(v) for k, v in (_field(m.result, "per_class_h") or {}).items()}
        for m in ranked
    ]
    classes = sorted({c for values in per_model for c in values})
    if not classes or len(classes) > 40:
        return None
    from .figures import class_name

    return {
        "grouped_by": "true label" if report.accuracy_original is not None else "explained class",
        "classes": [class_name(c, report.class_names) for c in classes],
        "rows": [
            {
                "name": model.info.name,
                "cells": [{"color": _heat_color(values.get(c)), "text": _num(values.get(c), 2)}
                          for c in classes],
            }
            for model, values in zip(ranked, per_model, strict=True)
        ],
    }


def _sample(example: Any, names: list[str] | None, cmap: str) -> dict[str, Any]:
    from .figures import class_name, display_size, overlay, png_data_uri, to_rgb

    images = (to_rgb(example.image), overlay(example.image, example.original_map, cmap=cmap),
              overlay(example.image, example.pruned_map, cmap=cmap))
    target = class_name(example.target_original, names)
    if example.target_pruned != example.target_original:
        target += " / " + class_name(example.target_pruned, names)
    return {
        "images": [{"uri": png_data_uri(display_size(image)), "alt": alt}
                   for image, alt in zip(images, ("input", "original CAM", "pruned CAM"),
                                         strict=True)],
        "css": _score_class(example.h),
        "h": _num(example.h),
        "spatial": _num(example.spatial),
        "spectral": _num(example.spectral),
        "label": None if example.label is None else class_name(example.label, names),
        "target": target,
        "pred_original": class_name(example.pred_original, names),
        "pred_pruned": class_name(example.pred_pruned, names),
        "flip": example.pred_pruned != example.pred_original,
        "id": example.sample_id,
    }


def _section(model: Any, report: Any, cmap: str, has_references: bool) -> dict[str, Any]:
    """One compared model's part of the page: its numbers and its sample grids."""
    result = model.result
    role = getattr(model, "role", "pruned")
    groups = [("lowest h", model.worst, ""), ("highest h", model.best, "")]
    moved = getattr(model, "moved", None) or []
    # The grid is left out where nothing was kept (no examples asked for); it stays, with
    # its note, where the models never gave the same answer.
    if moved or _field(result, "same_answer_n") == 0:
        groups.append(("same answer, attention moved", moved, "wide moved"))
    return {
        "name": model.info.name,
        "role": role,
        "role_label": "" if role == "pruned" else ROLE_LABELS[role],
        "anchor": _anchor(model.info.name),
        "css": _score_class(model.sp2ps),
        "sp2ps": _num(model.sp2ps),
        "band": band_label(getattr(model, "band", None), has_references),
        "band_text": getattr(model, "band", None) or "",
        "accuracy": percent(_field(result, "accuracy_pruned")),
        "top1": percent(_field(result, "top1_agreement")),
        "js": _num(_field(result, "mean_js_divergence")),
        "attention_lost": percent(_field(result, "attention_lost")),
        "same": _split(_field(result, "same_answer_sp2ps"), _field(result, "same_answer_n")),
        "different": _split(_field(result, "different_answer_sp2ps"),
                            _field(result, "different_answer_n")),
        "gap_same": percent(_field(result, "same_answer_gap_share"), 0),
        "sparsity": f"{model.info.sparsity:.1f}%",
        "groups": [
            {"title": title, "css": css, "compared": role,
             "samples": [_sample(e, report.class_names, cmap) for e in examples]}
            for title, examples, css in groups
        ],
    }


def _gate_card(gate: dict[str, Any]) -> dict[str, str]:
    """The ``--fail-under`` verdict: what CI decided on this run, next to the scores."""
    rule = gate["rule"]
    what = "CI low" if rule["statistic"] == "ci95_low" else "Sp2PS"
    if gate["passed"]:
        sub = f"{what} ≥ {rule['threshold']:g} for all {len(gate['checked'])} pruned model(s)"
    else:
        sub = (f"{what} < {rule['threshold']:g}: "
               + ", ".join(failed["model"] for failed in gate["failed"]))
    return {"key": "gate (--fail-under)", "value": "passed" if gate["passed"] else "failed",
            "css": "good" if gate["passed"] else "bad", "sub": sub}


def render_html(report: Any, cmap: str = "jet") -> str:
    """The self-contained HTML report, CAMs drawn in the colour map ``cmap``."""
    from .figures import colorize, png_data_uri

    config = report.config
    ranked = report.ranked()
    original = report.original
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
    cards = [
        {"key": "original", "value": original.name, "css": "",
         "sub": f"accuracy {percent(report.accuracy_original)} · {_num(original.parameters)} params"},
        {"key": "pruned models", "value": str(len(ranked)), "css": "",
         "sub": f"scored on {report.n:,} samples"},
    ]
    if ranked:
        for key, model in (("best Sp2PS", ranked[0]), ("lowest Sp2PS", ranked[-1])):
            cards.append({"key": key, "value": _num(model.sp2ps), "css": _score_class(model.sp2ps),
                          "sub": model.info.name})
    floor = getattr(report, "floor", None)
    if floor is not None:
        cards.append({"key": "random floor", "value": _num(floor.sp2ps), "css": "",
                      "sub": "the original with randomised weights"})
    others = [m for m in getattr(report, "references", None) or [] if m.role == "reference"]
    if others:
        values = [m.sp2ps for m in others]
        value = (_num(values[0]) if len(others) == 1
                 else f"{_num(min(values))}–{_num(max(values))}")
        cards.append({"key": "reference" + ("s" if len(others) > 1 else ""), "value": value,
                      "css": "", "sub": ", ".join(m.info.name for m in others)})
    gate = getattr(report, "gate", None)
    if gate:
        cards.append(_gate_card(gate))
    has_references = bool(others)
    sections = [_section(model, report, cmap, has_references) for model in ranked]
    reference_sections = [_section(model, report, cmap, has_references)
                          for model in getattr(report, "references", None) or []]
    versions = config.get("versions", {}) or {}
    context = {
        "original": _original_row(report),
        "config": {k: config.get(k) for k in ("spatial", "spectral", "aggregation")},
        "chips": [(k, str(v)) for k, v in chips if v],
        "cards": cards,
        "notes": list(getattr(report, "notes", []) or []),
        "rows": _table_rows(report),
        "references": _reference_table_rows(report),
        "has_band": bool(getattr(report, "references", None)),
        "has_references": _has_references(report),
        "band_marks": _band_marks(report),
        "band_text": band_text(report),
        "correlation_text": correlation_text(report),
        "faithfulness": _faithfulness_table(report),
        "stages": stage_table(report),
        "stage_caption": STAGE_CAPTION,
        "reference_sections": reference_sections,
        "x_what": "accuracy" if report.accuracy_original is not None else "top-1 agreement",
        "scatter_svg": _scatter_svg(report),
        "cmap": cmap,
        "legend_uri": png_data_uri(colorize(np.tile(np.linspace(0, 1, 160), (10, 1)), cmap)),
        "per_class": _per_class(report, ranked),
        "sections": sections,
        "provenance": [
            {"name": info.name, "sha256": info.sha256 or "–", "layer": str(info.layer),
             "layout": str(info.layout)}
            for info in [original, *(m.info for m in report.models),
                         *(m.info for m in getattr(report, "references", None) or [])]
        ],
        "conversions": list(config.get("conversions") or []),
        "results_json": json.dumps(_clean(report.to_dict()), indent=2, default=str),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {
            "package": versions.get("sp2ps-onnx"),
            "onnxruntime": versions.get("onnxruntime") or versions.get("onnxruntime-gpu"),
            "onnx": versions.get("onnx"),
        },
        "seconds": f"{report.seconds:.1f}",
    }
    return _environment().get_template("report.html.j2").render(context)


def notebook_html(report: Any) -> str:
    """The ranking (with the reference rows, the band and the split) and the scatter plot
    as an HTML fragment, for Jupyter."""
    return _environment().get_template("notebook.html.j2").render(
        original=_original_row(report),
        rows=_table_rows(report),
        references=_reference_table_rows(report),
        has_band=bool(getattr(report, "references", None)),
        band_text=band_text(report),
        correlation_text=correlation_text(report),
        n=f"{report.n:,}",
        config={k: report.config.get(k)
                for k in ("method", "target", "spatial", "spectral", "aggregation")},
        scatter_svg=_scatter_svg(report),
    )


# --------------------------------------------------------------------------------------
# Files


PER_SAMPLE_COLUMNS = ["model", "role", "index", "id", "label", "label_name", "target_original",
                      "target_pruned", "pred_original", "pred_pruned", "spatial", "spectral", "h",
                      "confidence_original", "confidence_pruned", "js_divergence", "fault"]
"""The columns of ``per_sample.csv``: one row per (compared model, sample), the pruned
models first, then the random floor and the references (``role``)."""


def write_figures(
    report: Any,
    directory: str | os.PathLike[str],
    formats: Iterable[str] = ("png", "svg"),
    cmap: str = "jet",
) -> list[Path]:
    """Write the report's figures into ``directory`` in each of ``formats``.

    ``sp2ps_vs_accuracy`` and ``sp2ps_by_model`` (both with the band: the random floor and
    the references as lines), ``per_class_h`` (when there are classes), and per pruned
    model ``<name>_worst``, ``<name>_best`` (input, original CAM, pruned CAM of the samples
    with the lowest and highest h) and, when there are any, ``<name>_moved`` (same answer,
    attention moved: the lowest h among the samples both models classify identically).
    The reference models' samples are on the HTML page only.
    """
    from .figures import (
        examples_figure,
        per_class_figure,
        save_figure,
        scatter_figure,
        sp2ps_bar_figure,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    formats = list(dict.fromkeys(formats))
    written = save_figure(scatter_figure(report), directory / "sp2ps_vs_accuracy", formats)
    written += save_figure(sp2ps_bar_figure(report), directory / "sp2ps_by_model", formats)
    per_class = per_class_figure(report)
    if per_class is not None:
        written += save_figure(per_class, directory / "per_class_h", formats)
    # Sample grids of the pruned models only: the references' are on the page, and each
    # grid file costs about as much as scoring a model on a few hundred images.
    for model in report.models:
        name = _anchor(model.info.name)
        groups = [("worst", "lowest h", model.worst), ("best", "highest h", model.best)]
        moved = getattr(model, "moved", None) or []
        if moved:
            groups.append(("moved", "same answer, attention moved", moved))
        for kind, title, examples in groups:
            figure = examples_figure(examples, report.class_names, cmap=cmap,
                                     title=f"{model.info.name}: {title}",
                                     compared=getattr(model, "role", "pruned"))
            written += save_figure(figure, directory / f"{name}_{kind}", formats)
    return written


def write_report(
    report: Any,
    directory: str | os.PathLike[str],
    formats: Iterable[str] = ("png", "svg"),
    cmap: str = "jet",
) -> Path:
    """Write results.json, per_sample.csv, report.html and figures/ into ``directory``.

    ``formats`` are the figure formats (``png``, ``svg``, ``pdf``); ``cmap`` colours the CAMs.
    """
    from .figures import check_formats, class_name, colormap

    # An unknown colour map or format fails before any file is written.
    colormap(cmap)
    formats = check_formats(formats)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = _clean(report.to_dict())
    data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (directory / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    compared = [*report.models, *(getattr(report, "references", None) or [])]
    # Columns beyond the fixed ones (each model's faithfulness figures, when measured).
    extra = [key for model in compared[:1] for row in model.rows[:1] for key in row
             if key not in PER_SAMPLE_COLUMNS]
    with open(directory / "per_sample.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*PER_SAMPLE_COLUMNS, *extra])
        writer.writeheader()
        for model in compared:
            for row in model.rows:
                writer.writerow(
                    {
                        **{k: ("" if v is None else v) for k, v in row.items()},
                        "role": getattr(model, "role", "pruned"),
                        "label_name": ""
                        if row.get("label") is None
                        else class_name(row["label"], report.class_names),
                    }
                )
    write_figures(report, directory / "figures", formats, cmap)
    (directory / "report.html").write_text(render_html(report, cmap=cmap), encoding="utf-8")
    return directory / "report.html"


CHECKPOINT_DIR = ".sp2ps-rows"
"""The folder under ``--out`` that holds the rows of a run until its report replaces it."""


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
        # The rows of an interrupted run (CHECKPOINT_DIR) alone do not make an output.
        if any(p.name != CHECKPOINT_DIR for p in target.iterdir()):
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
