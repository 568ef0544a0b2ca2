"""Interrupted runs resume to the same numbers; NaN/Inf outputs and constant CAMs are counted.

The resume test kills a real scoring process (SIGKILL, no chance to clean up) after it has
saved a few chunks of rows, resumes with ``sp2ps score --resume`` and compares every number
of results.json and every per-sample row with an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sp2ps_onnx import CamModel
from sp2ps_onnx.cli import cli
from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.metric import sp2ps
from sp2ps_onnx.report import CHECKPOINT_DIR
from sp2ps_onnx.scoring import CamOptions, DataOptions, MetricOptions, RunOptions, score_models

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx", MODELS / "pruned" / "fmnist_cnn_l1filter50.onnx"]
DATA = MODELS / "samples" / "fmnist_test.npz"
OPTIONS = ["--preset", "unit", "--limit", 160, "--batch-size", 8, "--bootstrap", 200,
           "--seed", 3]

# Runs score_models as the CLI would, slowed down per batch so that it can be killed midway.
KILLED_RUN = """
import time
from pathlib import Path
from sp2ps_onnx.scoring import CamOptions, DataOptions, MetricOptions, RunOptions, score_models
score_models({original!r}, {pruned!r}, {data!r},
             data_options=DataOptions(preset="unit", limit=160),
             metric=MetricOptions(n_bootstrap=200, seed=3),
             run=RunOptions(batch_size=8, checkpoint=Path({out!r}) / {checkpoint!r},
                            checkpoint_every=0, progress=lambda done, total: time.sleep(0.15)))
print("finished")
"""


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def numbers(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    return {"n": data["n"], "faults": data["model_faults"],
            "models": [(m["name"], m["result"]) for m in data["models"]]}


def per_sample(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "per_sample.csv").open()))


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    result = invoke("score", ORIGINAL, *PRUNED, "--data", DATA, *OPTIONS, "--out", whole, "-q")
    assert result.exit_code == 0, result.output

    out = tmp_path / "resumed"
    script = KILLED_RUN.format(original=str(ORIGINAL),
                               pruned=[str(p) for p in PRUNED], data=str(DATA), out=str(out),
                               checkpoint=CHECKPOINT_DIR)
    # `python -c` in ROOT imports the checkout's sp2ps_onnx (the working folder is on sys.path).
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)
    rows = out / CHECKPOINT_DIR
    deadline = time.monotonic() + 120
    while len(list(rows.glob("rows-*.npz"))) < 4 and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = len(list(rows.glob("rows-*.npz")))
    assert 4 <= saved < 20  # 160 samples in batches of 8: 20 chunks when complete
    assert not (out / "results.json").exists()

    # Without --resume the saved rows are not thrown away.
    refused = invoke("score", ORIGINAL, *PRUNED, "--data", DATA, *OPTIONS, "--out", out, "-q")
    assert refused.exit_code != 0 and "--resume" in refused.output
    assert len(list(rows.glob("rows-*.npz"))) == saved

    resumed = invoke("score", ORIGINAL, *PRUNED, "--data", DATA, *OPTIONS, "--out", out,
                     "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert numbers(out) == numbers(whole)
    assert per_sample(out) == per_sample(whole)
    assert not rows.exists()  # the finished report replaced the saved rows


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    out = tmp_path / "out"
    score_models(
        ORIGINAL,
        PRUNED[:1],
        DATA,
        data_options=DataOptions(preset="unit", limit=16),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(batch_size=8, checkpoint=out / CHECKPOINT_DIR),
    )
    result = invoke("score", ORIGINAL, PRUNED[0], "--data", DATA, "--preset", "unit", "--limit",
                    16, "--batch-size", 8, "--method", "hirescam", "--out", out, "--resume", "-q")
    assert result.exit_code != 0
    assert "options" in result.output and "same models, data and options" in result.output


class Faulty:
    """A real CamModel whose outputs are replaced for some samples of DATA (found by their
    preprocessed pixels: batches may be scored side by side, in any order)."""

    def __init__(self, model: CamModel, nonfinite=(), constant=()) -> None:
        self.model, self.nonfinite, self.constant = model, set(nonfinite), set(constant)
        self.rewritten = model.rewritten
        images = np.load(DATA)["x"][:, None].astype(np.float32) / 255
        self.index_of = {image.tobytes(): i for i, image in enumerate(images)}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def cams(self, x, **kwargs):
        maps, targets, scores = self.model.cams(x, **kwargs)
        maps, scores = maps.copy(), scores.copy()
        for i, image in enumerate(np.asarray(x, dtype=np.float32)):
            index = self.index_of[image.tobytes()]
            if index in self.nonfinite:
                scores[i, 0] = np.nan
            if index in self.constant:
                maps[i] = 0.0
        return maps, targets, scores


def test_nonfinite_outputs_and_constant_cams_get_defined_values(tmp_path: Path) -> None:
    kwargs = dict(cam=CamOptions(target="original"),
                  data_options=DataOptions(preset="unit", limit=24), metric=MetricOptions(n_bootstrap=0), run=RunOptions(batch_size=8))
    clean = score_models(ORIGINAL, PRUNED[:1], DATA, **kwargs)
    clean_rows = list(clean.models[0].rows)
    pruned = Faulty(CamModel(str(PRUNED[0])), nonfinite={3}, constant={5})
    original = Faulty(CamModel(str(ORIGINAL)), nonfinite={10})
    report = score_models(original, [pruned], DATA, **kwargs)

    assert report.model_faults["counts"] == {"original_nonfinite": 1, "pruned_nonfinite": 1,
                                       "original_constant_cam": 0, "pruned_constant_cam": 1}
    listed = {(f["fault"], f["index"]) for f in report.model_faults["samples"]}
    assert listed == {("original_nonfinite", 10), ("pruned_nonfinite", 3),
                      ("pruned_constant_cam", 5)}
    rows = list(report.models[0].rows)
    assert rows[3]["h"] == 0.0 and rows[3]["pred_pruned"] == -1 and rows[3]["fault"]
    # A constant pruned CAM is scored by the metric itself against the original's CAM.
    maps_o, targets = CamModel(str(ORIGINAL)).cams(
        np.load(DATA)["x"][5:6, None].astype(np.float32) / 255)
    expected = sp2ps(maps_o, np.zeros_like(maps_o)).h[0]
    assert rows[5]["h"] == pytest.approx(expected, abs=1e-12)
    # The sample without a reference CAM is left out: Sp2PS is the mean h of the others.
    kept = [r["h"] for r in rows if r["index"] != 10]
    assert report.models[0].result.n == 23
    assert report.models[0].sp2ps == pytest.approx(np.mean(kept), abs=1e-12)
    untouched = [i for i in range(24) if i not in (3, 5, 10)]
    assert [rows[i]["h"] for i in untouched] == [clean_rows[i]["h"] for i in untouched]
    assert "faults" in " ".join(report.notes)

    with pytest.raises(InputDataError, match="pruned_nonfinite"):
        score_models(ORIGINAL, [Faulty(CamModel(str(PRUNED[0])), nonfinite={3})], DATA,
                     **{**kwargs, "data_options": DataOptions(preset="unit", limit=24,
                                                              strict=True)})


def test_a_run_that_skipped_unreadable_files_is_not_resumed_out_of_line(tmp_path: Path) -> None:
    import imageio.v3 as iio

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "00_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for i, image in enumerate(np.load(DATA)["x"][:6]):
        iio.imwrite(folder / f"{i + 1:02d}.png", image)
    rows = tmp_path / "out" / CHECKPOINT_DIR
    score_models(
        ORIGINAL,
        PRUNED[:1],
        folder,
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(batch_size=2, checkpoint=rows, checkpoint_every=0),
    )
    with pytest.raises(InputDataError, match="skipped unreadable files"):
        score_models(
            ORIGINAL,
            PRUNED[:1],
            folder,
            data_options=DataOptions(preset="unit"),
            metric=MetricOptions(n_bootstrap=0),
            run=RunOptions(batch_size=2, checkpoint=rows, resume=True),
        )
