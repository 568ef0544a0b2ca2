"""The head of a Ray cluster lost mid-run: the driver ends with one clear error within the
stated bound (``--ray-timeout``), instead of waiting until Ray ends it without a word 60 s
later, and the rows scored so far are kept, so that ``--resume`` on this machine (no Ray)
gives the numbers of an uninterrupted run.

The cluster (ray.cluster_utils, a head and a worker node) lives in this process, which never
joins it; the driver is a subprocess, as a user's ``sp2ps score --ray`` would be. The head's
GCS process is killed once the driver has saved its first batches."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.report import CHECKPOINT_DIR  # noqa: E402
from tests.test_resume import DATA, ORIGINAL, PRUNED, ROOT, invoke, numbers, per_sample  # noqa: E402

BOUND = 10.0  # --ray-timeout of the driver (also its bound to connect: a loaded machine)
OPTIONS = ["--preset", "unit", "--limit", 160, "--batch-size", 8, "--bootstrap", 200, "--seed", 3,
           "--no-floor"]

# score_models as `sp2ps score --ray ADDRESS --ray-timeout 10 --no-floor` runs it, with a chunk of rows
# saved after every batch and a pause per batch, so that the run outlasts the bound; an
# error is printed as the CLI prints it, with the time it was raised.
DRIVER = """
import sys, time
from pathlib import Path
from sp2ps_onnx.errors import Sp2PSError
from sp2ps_onnx.scoring import (DataOptions, MetricOptions, RayOptions, ReferenceOptions,
                                RunOptions, score_models)
try:
    score_models({original!r}, {pruned!r}, {data!r},
                 data_options=DataOptions(preset="unit", limit=160),
                 metric=MetricOptions(n_bootstrap=200, seed=3),
                 references=ReferenceOptions(floor=False),
                 run=RunOptions(batch_size=8, checkpoint=Path({out!r}) / {checkpoint!r},
                                checkpoint_every=0, progress=lambda done, total: time.sleep(0.8),
                                ray=RayOptions(address={address!r}, workers=2,
                                               connect_timeout={bound!r})))
except Sp2PSError as exc:
    print(f"{{time.time()}} sp2ps: error: {{exc}}", flush=True)
    sys.exit(2)
print("finished", flush=True)
"""


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "this process must not be a driver of the doomed cluster"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_a_lost_head_is_an_error_within_the_bound_and_resume_finishes_the_run(
    cluster, tmp_path: Path
) -> None:
    address = cluster.address
    out = tmp_path / "interrupted"
    rows = out / CHECKPOINT_DIR
    script = DRIVER.format(original=str(ORIGINAL), pruned=[str(p) for p in PRUNED],
                           data=str(DATA), out=str(out), checkpoint=CHECKPOINT_DIR,
                           address=address, bound=BOUND)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 150  # actors start slowly on a loaded machine
        while len(list(rows.glob("rows-*.npz"))) < 2 and time.monotonic() < deadline:
            assert driver.poll() is None, ("the driver ended before the head was killed: "
                                           f"{driver.stdout.read()}")
            time.sleep(0.05)
        killed = time.time()
        cluster.head_node.kill_gcs_server()
        output, _ = driver.communicate(timeout=BOUND + 40)
    finally:
        driver.kill()
    ended = time.time()

    assert driver.returncode == 2, output
    errors = [line for line in output.splitlines() if " sp2ps: error: " in line]
    assert len(errors) == 1, output
    raised, message = errors[0].split(" ", 1)
    assert message.startswith(f"sp2ps: error: lost the Ray cluster's head at {address}:"
                              f" it has not answered for {BOUND:g} s")
    assert "scored so far are saved" in message and "--resume" in message
    # The bound, plus the probe's interval, a batch's pause and the slack a shared 2-core
    # machine needs (Ray alone: 60 s, and no message).
    assert float(raised) - killed < BOUND + 10, float(raised) - killed
    # Ray's own shutdown after the error waits for the lost GCS for some seconds more.
    assert ended - killed < BOUND + 40, ended - killed
    saved = len(list(rows.glob("rows-*.npz")))
    assert 2 <= saved < 20  # 160 samples in batches of 8: 20 chunks when complete

    # --resume on this machine, without Ray, finishes the run with an uninterrupted run's
    # numbers and rows.
    resumed = invoke("score", ORIGINAL, *PRUNED, "--data", DATA, *OPTIONS, "--out", out,
                     "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    whole = tmp_path / "whole"
    assert invoke("score", ORIGINAL, *PRUNED, "--data", DATA, *OPTIONS, "--out", whole,
                  "-q").exit_code == 0
    assert numbers(out) == numbers(whole)
    assert per_sample(out) == per_sample(whole)
