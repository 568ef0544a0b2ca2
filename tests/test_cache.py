"""The pass cache (sp2ps_onnx.scoring.cache): a run against a cached original gives the same
numbers, to the last bit, as a run that computes everything; a changed key or a damaged
file is recomputed, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx.scoring import CamOptions, DataOptions, MetricOptions, RunOptions, score_models
from sp2ps_onnx.scoring.batch import BatchScorer

MODELS = Path(__file__).resolve().parents[1] / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = sorted((MODELS / "pruned").glob("*.onnx"))
DATA = MODELS / "samples" / "fmnist_test.npz"
DATA_OPTIONS = DataOptions(preset="unit", limit=48)
METRIC = MetricOptions(n_bootstrap=200, examples=2)


def _score(pruned, cache=None, **kwargs):
    run = RunOptions(batch_size=16, cache=cache)
    options = {"data_options": DATA_OPTIONS, "metric": METRIC, **kwargs}
    return score_models(ORIGINAL, pruned, DATA, run=run, **options)


def _same(a, b) -> None:
    """Every row column and every reported number of two runs' models are identical."""
    assert [m.info.name for m in a.models] == [m.info.name for m in b.models]
    for left, right in zip(a.models + a.references, b.models + b.references, strict=True):
        assert left.result.to_dict() == right.result.to_dict()
        for column, values in left.rows.columns.items():
            np.testing.assert_array_equal(values, right.rows.columns[column], err_msg=column)
        for x, y in zip(left.worst + left.best, right.worst + right.best, strict=True):
            assert x.index == y.index
            np.testing.assert_array_equal(x.original_map, y.original_map)


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes that ran, per role: the original, and every other model."""
    ran = {"original": 0, "other": 0}
    cams = BatchScorer._cams

    def counted(self, model, x, targets):
        ran["original" if model is self.original else "other"] += 1
        return cams(self, model, x, targets)

    monkeypatch.setattr(BatchScorer, "_cams", counted)
    return ran


def test_cached_original_gives_identical_numbers_and_skips_its_pass(tmp_path, passes):
    truth = _score(PRUNED[1:2])  # no cache at all
    first = _score(PRUNED[:1], cache=tmp_path)  # fills the cache
    assert first.config["cache"]["misses"] == 2 * 3  # original and floor, 3 batches
    passes.update(original=0, other=0)

    second = _score(PRUNED[1:2], cache=tmp_path)  # a new candidate
    assert passes == {"original": 0, "other": 3}  # only the candidate ran
    assert second.config["cache"] == {"directory": str(tmp_path), "hits": 6, "misses": 0,
                                      "corrupt": 0}
    _same(truth, second)


def test_a_changed_key_recomputes(tmp_path, passes):
    _score(PRUNED[:1], cache=tmp_path)
    other_method = _score(PRUNED[:1], cache=tmp_path, cam=CamOptions(method="gradcam++"))
    assert other_method.config["cache"]["hits"] == 0
    _same(_score(PRUNED[:1], cam=CamOptions(method="gradcam++")), other_method)

    # Another seed changes the random floor but not the original: only the floor reruns.
    reseeded = _score(PRUNED[:1], cache=tmp_path,
                      metric=MetricOptions(n_bootstrap=200, examples=2, seed=5))
    assert reseeded.config["cache"]["hits"] == 3 and reseeded.config["cache"]["misses"] == 3

    # Other preprocessing: the input tensors differ, so nothing is reused.
    normalised = _score(PRUNED[:1], cache=tmp_path,
                        data_options=DataOptions(preset="unit", mean=0.3, std=0.5, limit=48))
    assert normalised.config["cache"]["hits"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_a_damaged_file_is_recomputed_not_trusted(tmp_path, damage, passes):
    truth = _score(PRUNED[:1], cache=tmp_path)
    files = sorted(tmp_path.glob("*/*.npz"))
    assert len(files) == 6
    victim = files[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip":  # a bit flipped inside the stored arrays (npz members are stored)
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 3]))
    else:  # a valid entry under another entry's name
        victim.write_bytes(files[1].read_bytes())
    passes.update(original=0, other=0)

    again = _score(PRUNED[:1], cache=tmp_path)
    assert again.config["cache"]["corrupt"] == 1 and again.config["cache"]["hits"] == 5
    _same(truth, again)
    # The damaged entry was rewritten: a third run reads everything back.
    assert _score(PRUNED[:1], cache=tmp_path).config["cache"]["hits"] == 6


def test_cli_second_run_with_a_new_model_reads_the_cache(tmp_path, passes):
    from click.testing import CliRunner

    from sp2ps_onnx.cli import cli

    def score(pruned, *extra):
        args = ["score", ORIGINAL, pruned, "--data", DATA, "--preset", "unit", "--limit", 32,
                "--batch-size", 16, "--bootstrap", 100, "--format", "json", "-q", *extra]
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    cache = tmp_path / "cache"
    score(PRUNED[0], "--no-report", "--cache", cache)
    passes.update(original=0, other=0)
    cached = score(PRUNED[1], "--out", tmp_path / "report", "--cache", cache)
    assert passes == {"original": 0, "other": 2}
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["config"]["cache"]["hits"] == 4 and saved["config"]["cache"]["misses"] == 0
    fresh = score(PRUNED[1], "--no-report")
    assert cached["models"] == fresh["models"] and cached["references"] == fresh["references"]


def test_faithfulness_figures_are_cached_with_the_pass(tmp_path, passes):
    metric = MetricOptions(n_bootstrap=0, examples=0, faithfulness=True)
    options = {"data_options": DataOptions(preset="unit", limit=16), "metric": metric}
    truth = _score(PRUNED[:1], **options)
    _score(PRUNED[1:2], cache=tmp_path, **options)
    without = _score(PRUNED[:1], cache=tmp_path, **{**options, "metric": METRIC})
    assert without.config["cache"]["hits"] == 0  # a pass without the figures is another entry
    passes.update(original=0, other=0)
    cached = _score(PRUNED[:1], cache=tmp_path, **options)
    assert passes["original"] == 0 and cached.config["cache"]["hits"] == 2
    assert cached.original_faithfulness == truth.original_faithfulness
    assert cached.original_faithfulness is not None
    _same(truth, cached)
    assert cached.models[0].faithfulness == truth.models[0].faithfulness
