"""``sp2ps score --fail-under``: exit status 4 exactly when a pruned model is below the
threshold, with the report written and the rule and verdict in results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sp2ps_onnx.cli import EXIT_GATE_FAILED, cli

MODELS = Path(__file__).resolve().parents[1] / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / f"fmnist_cnn_{name}.onnx" for name in ("mag50", "mag95")]
DATA = MODELS / "samples" / "fmnist_test.npz"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pass-cache")


def score(out: Path, cache: Path, *extra):
    args = ["score", ORIGINAL, *PRUNED, "--data", DATA, "--preset", "unit", "--limit", 48,
            "--bootstrap", 200, "--out", out, "--cache", cache, "-q", *extra]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() \
        else None
    return result, results


def test_gate_passes_and_fails_around_the_lowest_pruned_model(tmp_path, cache):
    _, plain = score(tmp_path / "plain", cache)
    values = {m["name"]: m["result"]["sp2ps"] for m in plain["models"]}
    lowest = min(values, key=values.get)
    floor = plain["band"]["floor"]
    assert floor < min(values.values())  # the floor would fail any of these thresholds

    passed, saved = score(tmp_path / "pass", cache, "--fail-under", values[lowest])
    assert passed.exit_code == 0, passed.output
    assert saved["gate"] == {"rule": {"statistic": "sp2ps", "threshold": values[lowest]},
                             "passed": True, "checked": sorted(values), "failed": []}

    above = values[lowest] + 1e-6
    failed, saved = score(tmp_path / "fail", cache, "--fail-under", above,
                          "--format", "markdown")
    assert failed.exit_code == EXIT_GATE_FAILED
    message = f"gate failed: Sp2PS is below {above:g} for 1 of 2 pruned model(s): {lowest}"
    assert message in failed.stderr
    assert message in " ".join(failed.stdout.split())  # the markdown for a CI summary
    # The report shows the verdict next to the scores, naming the model that failed.
    card = re.compile(r'gate \(--fail-under\)</div><div class="v"><span class="(\w+)">(\w+)'
                      r'</span></div><div class="s">([^<]*)</div>')
    for out, verdict, css in (("pass", "passed", "good"), ("fail", "failed", "bad")):
        found = card.search((tmp_path / out / "report.html").read_text())
        assert found is not None and found.group(1, 2) == (css, verdict)
        assert (lowest in found.group(3)) == (verdict == "failed")
    assert saved["gate"]["passed"] is False  # the report is written all the same
    assert saved["gate"]["failed"] == [{"model": lowest, "value": values[lowest]}]
    assert {m["name"]: m["result"]["sp2ps"] for m in saved["models"]} == values


def test_gate_on_the_confidence_bound_is_stricter(tmp_path, cache):
    _, plain = score(tmp_path / "plain", cache)
    results = {m["name"]: m["result"] for m in plain["models"]}
    threshold = min(r["sp2ps"] for r in results.values())
    below = sorted(name for name, r in results.items() if r["ci95"][0] < threshold)
    assert below  # a bootstrap interval has its lower end below the mean

    on_mean, _ = score(tmp_path / "mean", cache, "--fail-under", threshold)
    assert on_mean.exit_code == 0
    on_ci, saved = score(tmp_path / "ci", cache, "--fail-under", threshold, "--fail-under-ci")
    assert on_ci.exit_code == EXIT_GATE_FAILED
    assert saved["gate"]["rule"] == {"statistic": "ci95_low", "threshold": threshold}
    assert [f["model"] for f in saved["gate"]["failed"]] == below
    assert [f["value"] for f in saved["gate"]["failed"]] == [results[n]["ci95"][0] for n in below]


def test_gate_options_that_cannot_work_are_refused(tmp_path, cache):
    alone, _ = score(tmp_path / "a", cache, "--fail-under-ci")
    assert alone.exit_code == 2 and "--fail-under THRESHOLD" in alone.output
    no_interval, _ = score(tmp_path / "b", cache, "--fail-under", 0.5, "--fail-under-ci",
                           "--bootstrap", 0)
    assert no_interval.exit_code == 2 and "--bootstrap > 0" in no_interval.output


def test_check_gate_fails_undefined_values_and_never_gates_references():
    import dataclasses

    from sp2ps_onnx.scoring import (
        DataOptions,
        MetricOptions,
        RunOptions,
        check_gate,
        score_models,
    )

    report = score_models(ORIGINAL, PRUNED[:1], DATA, data_options=DataOptions(preset="unit",
                          limit=16), metric=MetricOptions(n_bootstrap=0),
                          run=RunOptions(batch_size=16))
    model, floor = report.models[0], report.floor
    assert floor.sp2ps < model.sp2ps
    threshold = (floor.sp2ps + model.sp2ps) / 2
    assert check_gate([model, floor], threshold).passed  # the floor is below, not gated
    assert not check_gate([model], threshold, lower_bound=True).passed  # no interval
    undefined = dataclasses.replace(model, result=dataclasses.replace(model.result,
                                                                      sp2ps=float("nan")))
    verdict = check_gate([undefined], 0.0)
    assert verdict.failed == [(model.info.name, None)]
    assert "(undefined)" in verdict.message()
