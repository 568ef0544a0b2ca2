"""The gate of ``sp2ps score --fail-under``: does every pruned model keep enough Sp2PS?

A CI job that prunes or quantises a model needs a verdict, not only a report: the rule is a
threshold on each pruned model's Sp2PS, or on the lower bound of its 95 % bootstrap
confidence interval (the stricter reading: "Sp2PS is above the threshold with 95 %
confidence"). References and the random floor are never gated: they place the scores on a
scale and are not candidates. A pruned model whose value is undefined (NaN, or no interval)
fails, since the gate cannot show it is above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputDataError
from ..formatting import gate_message
from .result import ModelScore

SP2PS = "sp2ps"
CI_LOW = "ci95_low"


@dataclass
class GateVerdict:
    """The rule and its outcome: ``failed`` lists the pruned models below the threshold
    with the value that was compared."""

    threshold: float
    statistic: str  # SP2PS or CI_LOW
    checked: list[str] = field(default_factory=list)
    failed: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed

    def message(self) -> str:
        """One line for a person reading the CI log."""
        return gate_message(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The rule and the verdict as ``results.json`` records them."""
        return {
            "rule": {"statistic": self.statistic, "threshold": self.threshold},
            "passed": self.passed,
            "checked": list(self.checked),
            "failed": [{"model": name, "value": value} for name, value in self.failed],
        }


def check_gate(models: Sequence[ModelScore], threshold: float,
               lower_bound: bool = False) -> GateVerdict:
    """Compare every pruned model of ``models`` with ``threshold`` (its Sp2PS, or with
    ``lower_bound`` the lower end of its 95 % confidence interval)."""
    if not math.isfinite(threshold):
        raise InputDataError(f"--fail-under {threshold} is not a number; give e.g. 0.85")
    verdict = GateVerdict(float(threshold), CI_LOW if lower_bound else SP2PS)
    for model in models:
        if model.role != "pruned":
            continue
        value = _value(model, lower_bound)
        verdict.checked.append(model.info.name)
        if value is None or value < threshold:
            verdict.failed.append((model.info.name, value))
    return verdict


def _value(model: ModelScore, lower_bound: bool) -> float | None:
    if lower_bound:
        ci = getattr(model.result, "ci95", None)
        value = None if ci is None else ci[0]
    else:
        value = model.sp2ps
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)
