"""How numbers are written for people: percentages, confidence intervals and bands.

One implementation each, shared by the text table and the HTML report
(:mod:`sp2ps_onnx.report`), the figures (:mod:`sp2ps_onnx.figures`) and the experiment
write-ups (``experiments/``). A bottom-layer module: it imports nothing from the package.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["BAND_LABELS", "MISSING", "band_label", "ci_bounds", "ci_text", "gate_message",
           "percent"]

#: What a table shows for a number that does not exist (no labels, no scores, NaN).
MISSING = "–"


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def percent(value: Any, digits: int = 1, *, suffix: str = "%", missing: str = MISSING) -> str:
    """A fraction as a percentage: ``percent(0.1234) == "12.3%"``; ``missing`` for
    ``None`` or NaN."""
    if _absent(value):
        return missing
    return f"{100 * float(value):.{digits}f}{suffix}"


def ci_bounds(value: Any) -> tuple[float, float] | None:
    """``(low, high)`` of a confidence interval given as any pair of numbers; ``None`` when
    there is none, it is not a pair of numbers, or a bound is not finite."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def ci_text(value: Any, digits: int = 3) -> str:
    """A confidence interval as ``"[low, high]"``; :data:`MISSING` when there is none."""
    bounds = ci_bounds(value)
    return MISSING if bounds is None else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


#: Short labels of the bands of :data:`sp2ps_onnx.scoring.band.BANDS`, for table columns
#: and figures (this module imports nothing from the package; tests/test_report.py checks
#: that every band has its label).
BAND_LABELS = {
    "at or below the random floor": "≤ floor",
    "above the floor, below the references": "floor–ref",
    "within the references": "≈ ref",
    "above the references": "> ref",
}


def band_label(band: str | None, has_references: bool = True) -> str:
    """A band's short label ("" for none); without reference models, "above the floor"
    has no upper end and reads "> floor"."""
    if band is None:
        return ""
    if band == "above the floor, below the references" and not has_references:
        return "> floor"
    return BAND_LABELS.get(band, band)


def gate_message(gate: dict[str, Any]) -> str:
    """One line for a person reading a CI log or a report: the ``--fail-under`` verdict as
    ``results.json`` records it (:meth:`sp2ps_onnx.scoring.gate.GateVerdict.to_dict`)."""
    rule, checked, failed = gate["rule"], gate["checked"], gate["failed"]
    what = ("the lower 95 % CI bound of Sp2PS" if rule["statistic"] == "ci95_low"
            else "Sp2PS")
    threshold = float(rule["threshold"])
    if not failed:
        return (f"gate passed: {what} of all {len(checked)} pruned model(s) is at least "
                f"{threshold:g}")
    below = ", ".join(f"{f['model']} "
                      f"({'undefined' if f['value'] is None else format(f['value'], '.4f')})"
                      for f in failed)
    return (f"gate failed: {what} is below {threshold:g} for {len(failed)} of "
            f"{len(checked)} pruned model(s): {below}")
