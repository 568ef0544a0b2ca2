"""The Ray backend gives the same rows and numbers as the local one (one local Ray with 2 CPUs
for the whole module), survives a killed actor, and fails clearly without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.cli import cli  # noqa: E402
from sp2ps_onnx.errors import InputDataError, RuntimeMissingError  # noqa: E402
from sp2ps_onnx.scoring import (  # noqa: E402
    DataOptions,
    MetricOptions,
    RayOptions,
    RunOptions,
    score_models,
)
from tests.test_object_storage import BUCKET, FOLDER, s3_server  # noqa: E402

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


def test_a_head_that_does_not_answer_is_an_error_within_the_bound(tmp_path: Path) -> None:
    """A port that accepts connections but never speaks (a head that hangs or is shutting
    down): Ray alone retries for minutes; the command ends with one error line after
    --ray-timeout seconds."""
    bound = 3.0
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead.listen()
        address = f"127.0.0.1:{dead.getsockname()[1]}"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "sp2ps_onnx.cli", "score", str(ORIGINAL), str(PRUNED[0]),
             "--data", str(DATA), "--limit", "8", "--no-report", "--ray", address,
             "--ray-timeout", str(bound)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sp2ps: error:")]
    assert len(errors) == 1 and "--ray-timeout" in errors[0]
    assert errors[0].startswith(f"sp2ps: error: no answer from the Ray cluster at {address} "
                                "within 3 s; ")
    # The bound plus the start of Python, the models and the data (seconds here), not the
    # minutes of Ray's own retries.
    assert elapsed < bound + 30, elapsed


s3 = pytest.fixture(scope="module")(s3_server)


@pytest.fixture(scope="module")
def local_ray(s3):
    """A local Ray started by the backend itself while RAY_ADDRESS names a head that never
    answers (what a Ray that is shutting down looks like): it must not wait for that one.
    The S3 server starts first, so that the workers find its address in their environment."""
    from sp2ps_onnx.scoring.ray_backend import connect

    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead.listen()
        before = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{dead.getsockname()[1]}"
        try:
            connect(None)
        finally:
            os.environ.pop("RAY_ADDRESS")
            if before is not None:
                os.environ["RAY_ADDRESS"] = before
    assert ray.available_resources().get("CPU", 0) >= 1
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


def test_a_worker_killed_on_every_try_is_an_error_naming_batch_size(local_ray,
                                                                    monkeypatch) -> None:
    """A worker killed on every try of its batches, as the system's out-of-memory killer
    does (SIGKILL: Ray cannot tell it from another kill): Ray restarts it and retries its
    batches WORKER_RESTARTS times (1 here, to keep the test short), then the run ends with
    one error that names --batch-size, not Ray's exception or a run retried for ever.
    (Killed once, the retry completes: test_a_killed_actor_loses_and_duplicates_no_row.)"""
    from sp2ps_onnx.scoring import ray_backend

    monkeypatch.setattr(ray_backend, "WORKER_RESTARTS", 1)
    killed: list[int] = []
    stop = threading.Event()

    def kill_every_worker() -> None:
        while not stop.is_set():
            for actor in ray._private.state.actors().values():
                if ("ScoreWorker" in actor["ActorClassName"] and actor["State"] == "ALIVE"
                        and actor["Pid"] not in killed):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(actor["Pid"], signal.SIGKILL)
                        killed.append(actor["Pid"])
            stop.wait(0.05)

    killer = threading.Thread(target=kill_every_worker, daemon=True)
    killer.start()
    try:
        with pytest.raises(InputDataError) as error:
            score_models(ORIGINAL, PRUNED, DATA, **options(ray=RayOptions(workers=1)))
    finally:
        stop.set()
        killer.join()
    assert len(killed) >= 2
    message = str(error.value)
    assert message.startswith("a Ray worker died 2 times scoring batches of 8 samples")
    assert "lower --batch-size" in message and "--resume" in message


def test_ray_not_installed_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeMissingError, match=r"sp2ps-onnx\[ray\]"):
        score_models(ORIGINAL, PRUNED[:1], DATA, **options(ray=RayOptions()))


def test_the_workers_report_the_samples_they_skip(local_ray, s3, tmp_path: Path) -> None:
    """Samples skipped on the workers (NaN inputs here) are listed as in a local run, and
    the rows after them keep the numbers of a local run. The inputs are read from the S3
    server when there is one: each worker reads its batches' rows with ranged reads."""
    from tests.test_input_faults import BAD, make_files, score

    files = make_files(tmp_path)
    local = score(files, files["bad"])
    data = files["bad"]
    if s3 is not None:
        import boto3

        boto3.client("s3").upload_file(str(data), BUCKET, "faults/bad.npz")
        data = f"s3://{BUCKET}/faults/bad.npz"
    remote = score_models(files["original"], [files["pruned"]], data,
                          metric=MetricOptions(n_bootstrap=50, examples=2),
                          run=RunOptions(batch_size=4, ray=RayOptions(workers=2)))
    assert [f["id"] for f in remote.faults] == [f"bad.npz[{i}]" for i in sorted(BAD)]
    assert [f["id"] for f in remote.faults] == [f["id"] for f in local.faults]
    assert all(str(data) in f["reason"] for f in remote.faults)
    assert list(remote.models[0].rows) == list(local.models[0].rows)
    assert remote.models[0].sp2ps == local.models[0].sp2ps


def test_ray_reads_object_storage_on_the_workers(local_ray, s3) -> None:
    """sp2ps score --ray --data s3://... : each worker reads its own batches from the S3
    server; the ranking equals a local run on the same files on disk."""
    if s3 is None:
        pytest.skip("moto[server] is not installed (the test extra)")
    from click.testing import CliRunner

    common = ["score", str(ORIGINAL), *map(str, PRUNED), "--preset", "unit", "--limit", "48",
              "--batch-size", "8", "--bootstrap", "100", "--no-report", "--format", "json",
              "-q"]
    local = CliRunner().invoke(cli, [*common, "--data", str(FOLDER)])
    remote = CliRunner().invoke(cli, [*common, "--data", f"s3://{BUCKET}/val", "--ray",
                                      "--workers", "2"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert json.loads(local.stdout)["n"] == 48
