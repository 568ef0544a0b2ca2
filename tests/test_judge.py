"""Sp2PSJudge: one candidate at a time gives what score_models gives the same candidate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from sp2ps_onnx.errors import InputDataError, ModelMismatchError
from sp2ps_onnx.scoring import (
    CamOptions,
    DataOptions,
    MetricOptions,
    ReferenceOptions,
    RunOptions,
    Sp2PSJudge,
    score_models,
)
from sp2ps_onnx.scoring.batch import BatchScorer

MODELS = Path(__file__).resolve().parents[1] / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = sorted((MODELS / "pruned").glob("*.onnx"))
DATA = MODELS / "samples" / "fmnist_test.npz"
OPTIONS = {"data_options": DataOptions(preset="unit", limit=60),
           "metric": MetricOptions(n_bootstrap=200, examples=2),
           "run": RunOptions(batch_size=16)}


def assert_same_score(got, expected, position: bool = True) -> None:
    """Every field of two ModelScores is equal: info, numbers, band, rows, examples
    (``position=False``: but for the rows' ``model`` column, the model's position in a run
    of several)."""
    assert got.info == expected.info
    assert got.role == expected.role and got.band == expected.band
    assert got.result.to_dict() == expected.result.to_dict()
    assert got.faithfulness == expected.faithfulness
    assert got.rows.columns.keys() == expected.rows.columns.keys()
    for column, values in got.rows.columns.items():
        if column == "model" and not position:
            continue
        np.testing.assert_array_equal(values, expected.rows.columns[column], err_msg=column)
    for mine, theirs in ((got.worst, expected.worst), (got.best, expected.best),
                         (got.moved, expected.moved)):
        assert [e.index for e in mine] == [e.index for e in theirs]
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a.pruned_map, b.pruned_map)
            np.testing.assert_array_equal(a.original_map, b.original_map)
            np.testing.assert_array_equal(a.image, b.image)


def test_judge_equals_score_models_for_every_bundled_pruned_model(monkeypatch):
    judge = Sp2PSJudge(ORIGINAL, DATA, **OPTIONS)
    report = score_models(ORIGINAL, PRUNED, DATA, **OPTIONS)
    assert [m.info.name for m in judge.references] == [m.info.name for m in report.references]
    assert judge.references[0].result.to_dict() == report.references[0].result.to_dict()

    ran = []
    cams = BatchScorer._cams
    monkeypatch.setattr(BatchScorer, "_cams", lambda self, model, x, targets: (
        ran.append(model is self.original), cams(self, model, x, targets))[1])
    for path, expected in zip(PRUNED, report.models, strict=True):
        assert_same_score(judge.score(path), expected, position=False)
    assert ran and not any(ran)  # the original never ran again: 4 batches x 5 candidates
    assert len(ran) == 4 * len(PRUNED)


def test_bytes_and_modelproto_candidates_equal_score_models_on_the_proto():
    options = {**OPTIONS, "references": ReferenceOptions(floor=False),
               "cam": CamOptions(target="original")}
    judge = Sp2PSJudge(ORIGINAL, DATA, **options)
    proto = onnx.load(str(PRUNED[0]))
    expected = score_models(ORIGINAL, [proto], DATA, **options).models[0]
    assert expected.band is None and judge.references == []
    assert_same_score(judge.score(proto), expected)
    assert_same_score(judge.score(PRUNED[0].read_bytes()), expected)


def test_judge_with_a_disk_cache_starts_without_the_original(tmp_path, monkeypatch):
    options = {**OPTIONS, "run": RunOptions(batch_size=16, cache=tmp_path)}
    first = Sp2PSJudge(ORIGINAL, DATA, **options)
    assert first.cache.stats.misses == 8  # original and floor, 4 batches
    ran = []
    cams = BatchScorer._cams
    monkeypatch.setattr(BatchScorer, "_cams", lambda self, model, x, targets: (
        ran.append(model is self.original), cams(self, model, x, targets))[1])
    second = Sp2PSJudge(ORIGINAL, DATA, **options)
    assert ran == [] and second.cache.stats.hits == 8
    assert_same_score(second.score(PRUNED[2]), first.score(PRUNED[2]))


def test_judge_refuses_what_it_cannot_do():
    with pytest.raises(InputDataError, match="checkpoint= or ray="):
        Sp2PSJudge(ORIGINAL, DATA, run=RunOptions(checkpoint="x"))
    judge = Sp2PSJudge(ORIGINAL, DATA, data_options=DataOptions(preset="unit", limit=8),
                       references=ReferenceOptions(floor=False))
    other = onnx.load(str(PRUNED[0]))
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    with pytest.raises(ModelMismatchError):
        judge.score(other)


def test_a_candidate_with_its_own_layout_gets_its_own_preprocessing():
    keras = MODELS / "keras" / "fmnist_keras_mag70.onnx"  # NHWC, the original is NCHW
    judge = Sp2PSJudge(ORIGINAL, DATA, **OPTIONS)
    assert_same_score(judge.score(keras), score_models(ORIGINAL, [keras], DATA, **OPTIONS).models[0])
