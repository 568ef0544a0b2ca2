"""Reading a score on the bundled Fashion-MNIST models: the random floor lies below every
working pruned model, an independently trained model (the Keras twin) between the floor and
the best pruned model, the decision/attention split adds up, and the faithfulness figures of
a run equal those computed directly from each model's own CAMs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx import CamModel
from sp2ps_onnx.faithfulness import FaithfulnessOptions, evaluate_faithfulness
from sp2ps_onnx.report import write_report
from sp2ps_onnx.scoring import (
    DataOptions,
    MetricOptions,
    ReferenceOptions,
    RunOptions,
    score_models,
)
from sp2ps_onnx.scoring.band import (
    ABOVE_FLOOR,
    ABOVE_REFERENCES,
    BELOW_FLOOR,
    WITHIN_REFERENCES,
    band_of,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = sorted((MODELS / "pruned").glob("*.onnx"))
KERAS = MODELS / "keras" / "fmnist_keras.onnx"  # trained on its own, in another framework
DATA = MODELS / "samples" / "fmnist_test.npz"


@pytest.fixture(scope="module")
def report():
    return score_models(
        ORIGINAL, PRUNED, DATA, data_options=DataOptions(preset="unit", limit=200),
        metric=MetricOptions(n_bootstrap=200), run=RunOptions(batch_size=50),
        references=ReferenceOptions(models=(KERAS,)),
    )


def test_the_floor_lies_below_every_working_pruned_model(report) -> None:
    floor = report.floor
    assert floor is not None and floor.role == "floor"
    by_name = {m.info.name: m for m in report.models}
    for name, model in by_name.items():
        if name.endswith("mag95"):  # a collapsed model: 4 % agreement, as random as the floor
            continue
        assert model.result.ci95[0] > floor.result.ci95[1] + 0.3, name
    # The floor really is random: its predictions agree with the original's at chance level.
    assert floor.result.top1_agreement < 0.25


def test_an_independently_trained_model_lies_between_the_floor_and_mag50(report) -> None:
    keras = next(m for m in report.references if m.role == "reference")
    mag50 = next(m for m in report.models if m.info.name.endswith("mag50"))
    assert report.floor.result.ci95[1] < keras.result.ci95[0]
    assert keras.result.ci95[1] < mag50.result.ci95[0]
    # References and the floor are never ranked.
    assert {m.info.name for m in report.ranked()} == {p.stem for p in PRUNED}


def test_each_model_s_band_is_where_its_score_lies(report) -> None:
    floor = report.floor.sp2ps
    reference = next(m for m in report.references if m.role == "reference").sp2ps
    for model in report.models:
        s = model.sp2ps
        expected = (BELOW_FLOOR if s <= floor else ABOVE_FLOOR if s < reference
                    else WITHIN_REFERENCES if s == reference else ABOVE_REFERENCES)
        assert model.band == expected == band_of(s, floor, [reference])
    data = report.to_dict()
    assert data["band"]["floor"] == floor
    assert data["band"]["positions"] == {m.info.name: m.band for m in report.models}


def test_the_split_adds_up_to_every_sample_and_to_sp2ps(report) -> None:
    for model in [*report.models, *report.references]:
        r = model.result
        assert r.same_answer_n + r.different_answer_n == r.n == 200
        rows = model.rows.columns
        same = (rows["pred_original"] == rows["pred_pruned"]) & (rows["pred_original"] >= 0)
        assert r.same_answer_n == int(same.sum())
        weighted = sum(n * v for n, v in ((r.same_answer_n, r.same_answer_sp2ps),
                                          (r.different_answer_n, r.different_answer_sp2ps)) if n)
        assert weighted / r.n == pytest.approx(r.sp2ps, abs=1e-9)
        assert r.mean_js_divergence == pytest.approx(rows["js_divergence"].mean(), abs=1e-12)
    # The same-answer examples are samples both models classify identically, lowest h first.
    for model in report.models:
        assert all(e.pred_original == e.pred_pruned for e in model.moved)
        assert [e.h for e in model.moved] == sorted(e.h for e in model.moved)


def test_no_floor_leaves_it_out() -> None:
    report = score_models(
        ORIGINAL, PRUNED[:1], DATA, data_options=DataOptions(preset="unit", limit=16),
        metric=MetricOptions(n_bootstrap=0), references=ReferenceOptions(floor=False),
    )
    assert report.references == [] and report.floor is None
    assert report.models[0].band is None


def test_a_run_s_faithfulness_equals_each_model_s_own_cams_scored_directly(tmp_path) -> None:
    report = score_models(
        ORIGINAL, PRUNED[:2], DATA, data_options=DataOptions(preset="unit", limit=12),
        metric=MetricOptions(n_bootstrap=0, faithfulness=True, seed=3),
        references=ReferenceOptions(floor=False), run=RunOptions(batch_size=12),
    )
    x = np.load(DATA)["x"][:12, None].astype(np.float32) / 255
    labels = np.load(DATA)["y"][:12]
    for path, expected in [(ORIGINAL, report.original_faithfulness),
                           *((p, m.faithfulness) for p, m in zip(PRUNED[:2], report.models,
                                                                 strict=True))]:
        model = CamModel(str(path))
        maps, targets = model.cams(x, targets=labels, size=(28, 28))
        direct = evaluate_faithfulness(x, maps, targets, model.scores,
                                       FaithfulnessOptions(seed=3, batch_size=64)).means()
        for name, value in expected.items():
            assert value == pytest.approx(direct[name], abs=1e-9), (path.name, name)
    # per_sample.csv carries every sample's figures; their means are the reported ones.
    write_report(report, tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "per_sample.csv").open()))
    for model in report.models:
        mine = [r for r in rows if r["model"] == model.info.name]
        for name, value in model.faithfulness.items():
            column = np.array([float(r[f"{name}_pruned"]) for r in mine])
            assert np.nanmean(column) == pytest.approx(value, abs=1e-9), name


def test_a_reference_that_does_not_fit_is_refused_by_its_name(tmp_path: Path) -> None:
    from sp2ps_onnx.errors import ModelMismatchError
    from tests.tiny_models import cnn

    five = tmp_path / "five_classes.onnx"
    five.write_bytes(cnn(28, classes=5).SerializeToString())
    with pytest.raises(ModelMismatchError, match="five_classes.*5 classes"):
        score_models(ORIGINAL, PRUNED[:1], DATA, data_options=DataOptions(preset="unit", limit=8),
                     references=ReferenceOptions(models=(KERAS, five)))
