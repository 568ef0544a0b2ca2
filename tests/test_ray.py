"""The Ray backend gives the same rows and numbers as the local one (one local Ray with 2 CPUs
for the whole module), survives a killed actor, and fails clearly without Ray."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.errors import InputDataError, RuntimeMissingError  # noqa: E402
from sp2ps_onnx.scoring import (  # noqa: E402
    DataOptions,
    MetricOptions,
    RayOptions,
    RunOptions,
    score_models,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx", MODELS / "keras" / "fmnist_keras_mag70.onnx"]
DATA = MODELS / "samples" / "fmnist_test.npz"
def options(**run) -> dict:
    """The options of every run here; ``run``: RunOptions fields (e.g. ray=...)."""
    return dict(data_options=DataOptions(preset="unit", limit=96),
                metric=MetricOptions(n_bootstrap=200, seed=5, examples=3),
                run=RunOptions(batch_size=8, **run))


KWARGS = options()


def test_unreachable_address_is_one_clear_error() -> None:
    from sp2ps_onnx.scoring.ray_backend import connect

    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(InputDataError, match="cannot reach the Ray cluster at"):
            connect(address)
    with pytest.raises(InputDataError, match="not a Ray address"):
        connect("localhost")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_report():
    return score_models(ORIGINAL, PRUNED, DATA, **KWARGS)


def assert_same(local, remote) -> None:
    """Identical per-sample rows and examples; aggregates equal to 1e-12."""
    assert remote.n == local.n
    for a, b in zip(local.models, remote.models, strict=True):
        assert list(a.rows) == list(b.rows)
        for key, value in a.result.to_dict().items():
            if key in ("per_sample", "config"):
                continue
            other = b.result.to_dict()[key]
            if isinstance(value, float):
                assert other == pytest.approx(value, abs=1e-12, rel=0), key
            else:
                assert other == value, key
        for mine, theirs in ((a.worst, b.worst), (a.best, b.best)):
            assert [e.index for e in mine] == [e.index for e in theirs]
            assert all(np.array_equal(x.pruned_map, y.pruned_map)
                       for x, y in zip(mine, theirs, strict=True))


def test_ray_gives_the_rows_and_numbers_of_a_local_run(local_ray, local_report) -> None:
    remote = score_models(ORIGINAL, PRUNED, DATA, **options(ray=RayOptions(workers=2)))
    assert remote.config["backend"] == "ray"
    assert_same(local_report, remote)


def test_a_killed_actor_loses_and_duplicates_no_row(local_ray, local_report) -> None:
    killed: list[int] = []

    def kill_one_worker(done: int, total: int) -> None:
        if killed:
            return
        # The GCS actor table (the state API would need the dashboard).
        for actor in ray._private.state.actors().values():
            if "ScoreWorker" in actor["ActorClassName"] and actor["State"] == "ALIVE":
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.append(actor["Pid"])
                return

    remote = score_models(ORIGINAL, PRUNED, DATA,
                          **options(ray=RayOptions(workers=2), progress=kill_one_worker))
    assert killed, "no worker was running to be killed"
    assert_same(local_report, remote)


def test_ray_not_installed_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeMissingError, match=r"sp2ps-onnx\[ray\]"):
        score_models(ORIGINAL, PRUNED[:1], DATA, **options(ray=RayOptions()))


def test_the_workers_report_the_samples_they_skip(local_ray, tmp_path: Path) -> None:
    """Samples skipped on the workers (NaN inputs here) are listed as in a local run, and
    the rows after them keep the numbers of a local run."""
    from tests.test_input_faults import BAD, make_files, score

    files = make_files(tmp_path)
    local = score(files, files["bad"])
    remote = score_models(files["original"], [files["pruned"]], files["bad"],
                          metric=MetricOptions(n_bootstrap=50, examples=2),
                          run=RunOptions(batch_size=4, ray=RayOptions(workers=2)))
    assert [f["id"] for f in remote.faults] == [f"bad.npz[{i}]" for i in sorted(BAD)]
    assert remote.faults == local.faults
    assert list(remote.models[0].rows) == list(local.models[0].rows)
    assert remote.models[0].sp2ps == local.models[0].sp2ps
