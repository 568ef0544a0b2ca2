"""The two steps of a scoring run: the per-batch kernel's rows, and the aggregation that turns
rows in any order into the numbers (checked against the streaming accumulator on the maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx import CamModel
from sp2ps_onnx.errors import Sp2PSError
from sp2ps_onnx.metric import Sp2PSAccumulator
from sp2ps_onnx.scoring import (
    BatchOutput,
    DataOptions,
    MetricOptions,
    RunOptions,
    aggregate,
    concat_rows,
    score_models,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = MODELS / "pruned" / "fmnist_cnn_mag80.onnx"
DATA = MODELS / "samples" / "fmnist_test.npz"


@pytest.fixture(scope="module")
def report():
    return score_models(
        ORIGINAL,
        [PRUNED],
        DATA,
        data_options=DataOptions(preset="unit", limit=48),
        metric=MetricOptions(n_bootstrap=300, seed=2, examples=3, aggregation="class-weighted"),
        run=RunOptions(batch_size=16),
    )


def test_aggregates_equal_the_streaming_accumulator_over_the_maps(report) -> None:
    archive = np.load(DATA)
    x, y = archive["x"][:48, None].astype(np.float32) / 255, archive["y"][:48]
    original, pruned = CamModel(str(ORIGINAL)), CamModel(str(PRUNED))
    maps_o, targets, scores_o = original.cams(x, targets=y, return_scores=True)
    maps_p, _, scores_p = pruned.cams(x, targets=targets, return_scores=True)
    accumulator = Sp2PSAccumulator(aggregation="class-weighted", n_bootstrap=300, seed=2)
    accumulator.update(maps_o, maps_p, y, targets=targets, original_scores=scores_o,
                       pruned_scores=scores_p)
    expected, got = accumulator.result(), report.models[0].result
    for key in ("sp2ps", "mean_spatial", "mean_spectral", "attention_lost", "top1_agreement",
                "accuracy_original", "accuracy_pruned", "mean_abs_confidence_change",
                "class_weighted_h", "harmonic_of_means", "median_h", "p05_h"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), abs=1e-6), key
    assert got.per_class_h.keys() == expected.per_class_h.keys()
    # The accumulator keeps float32 per-sample values for its CI; the rows keep float64.
    assert got.ci95 == pytest.approx(expected.ci95, abs=1e-6)


def split(report) -> tuple[dict, list]:
    table = report.models[0].rows.columns
    return table, [report.models[0].worst + report.models[0].best]


def test_rows_in_any_order_give_the_same_numbers(report) -> None:
    table, candidates = split(report)
    rng = np.random.default_rng(0)
    order = rng.permutation(table["index"].size)
    shuffled = {key: value[order] for key, value in table.items()}
    chunks = np.array_split(np.arange(order.size), 5)
    parts = [{key: value[c] for key, value in shuffled.items()} for c in chunks]
    again = aggregate(concat_rows(parts[::-1]), candidates, ["p"],
                      MetricOptions(aggregation="class-weighted", n_bootstrap=300, seed=2,
                                    examples=3), expected=48)
    mine, theirs = again.results[0].to_dict(), report.models[0].result.to_dict()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert mine[key] == pytest.approx(value, abs=1e-12), key
        elif key not in ("per_sample", "ci95", "config"):
            assert mine[key] == value, key
    assert again.results[0].ci95 == report.models[0].result.ci95
    assert [e.index for e in again.worst[0]] == [e.index for e in report.models[0].worst]


@pytest.mark.parametrize("fault", ["duplicate", "missing"])
def test_a_lost_or_duplicated_row_is_an_error(report, fault: str) -> None:
    table, candidates = split(report)
    keep = np.arange(table["index"].size)
    keep = np.append(keep, 7) if fault == "duplicate" else np.delete(keep, 7)
    broken = {key: value[keep] for key, value in table.items()}
    with pytest.raises(Sp2PSError, match="twice" if fault == "duplicate" else "lost"):
        aggregate(broken, candidates, ["p"], MetricOptions(n_bootstrap=0), expected=48)


def test_batch_output_round_trips_through_bytes(report) -> None:
    table, _ = split(report)
    output = BatchOutput(dict(table), [report.models[0].worst])
    back = BatchOutput.from_bytes(output.to_bytes())
    for key in table:  # NaN-aware: faithfulness columns are NaN unless asked for
        np.testing.assert_array_equal(back.rows[key], table[key], err_msg=key)
    for a, b in zip(back.examples[0], output.examples[0], strict=True):
        assert (a.index, a.h, a.sample_id, a.label) == (b.index, b.h, b.sample_id, b.label)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.pruned_map, b.pruned_map)
