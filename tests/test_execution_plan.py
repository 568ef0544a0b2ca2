"""The local run's execution plan: batches scored side by side give the rows of a one-batch-
at-a-time run, in data order, and the threads never outnumber the run's thread budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx import CamModel
from sp2ps_onnx.data import Batch, open_data
from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.prefetch import Prefetcher
from sp2ps_onnx.runtime import physical_cores, thread_budget
from sp2ps_onnx.scoring import (
    CamOptions,
    DataOptions,
    MetricOptions,
    RunOptions,
    ScorerSpec,
    build_scorer,
    score_models,
)
from sp2ps_onnx.scoring.run import MAX_IN_FLIGHT, ExecutionPlan, plan_execution, run_local

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = sorted((MODELS / "pruned").glob("*.onnx"))[:3]
DATA = MODELS / "samples" / "fmnist_test.npz"


def spec(batch_size: int = 32, examples: int = 4) -> ScorerSpec:
    return ScorerSpec(CamOptions(), DataOptions(preset="unit"), MetricOptions(examples=examples),
                      mode="original", batch_size=batch_size)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 16, 33])
def test_cpu_plan_never_uses_more_threads_than_the_budget(monkeypatch, budget: int) -> None:
    monkeypatch.setenv("SP2PS_THREADS", str(budget))
    assert thread_budget() == budget
    plan = plan_execution(["CPUExecutionProvider"])
    assert 1 <= plan.in_flight <= min(MAX_IN_FLIGHT, budget)
    assert plan.session_threads >= 1 and plan.metric_workers == 1
    # Each batch in flight runs one session (or the metric) at a time.
    assert plan.in_flight * plan.session_threads <= budget
    # ...and the budget is not left idle: at most one thread per batch short of it.
    assert budget - plan.in_flight * plan.session_threads < plan.in_flight


def test_cpu_plan_defaults_to_the_physical_cores(monkeypatch) -> None:
    monkeypatch.delenv("SP2PS_THREADS", raising=False)
    plan = plan_execution(["CPUExecutionProvider"])
    assert plan.in_flight * plan.session_threads <= physical_cores()
    assert plan.in_flight == min(MAX_IN_FLIGHT, physical_cores())


def test_gpu_plan_overlaps_two_batches_and_leaves_cpu_threads_alone() -> None:
    plan = plan_execution(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert plan == ExecutionPlan(in_flight=2, session_threads=None, metric_workers=None)


def test_sessions_get_the_planned_intra_op_threads() -> None:
    scorer = build_scorer(ORIGINAL, PRUNED[:1], ["o", "p"], spec(),
                          providers=["CPUExecutionProvider"], session_threads=1)
    for model in (scorer.original, *scorer.pruned):
        assert model.threads == 1
        options = model._session.get_session_options()
        assert options.intra_op_num_threads == 1


def test_spinning_is_off_in_a_scoring_run_and_left_to_onnx_runtime_for_one_model() -> None:
    key = "session.intra_op.allow_spinning"
    plan = plan_execution(["CPUExecutionProvider"])
    assert plan.session_spinning is False
    scorer = build_scorer(ORIGINAL, PRUNED[:1], ["o", "p"], spec(),
                          providers=["CPUExecutionProvider"], spinning=plan.session_spinning)
    for model in (scorer.original, *scorer.pruned):
        assert model._session.get_session_options().get_session_config_entry(key) == "0"
    alone = CamModel(str(ORIGINAL), providers=["CPUExecutionProvider"])
    options = alone._session.get_session_options()
    # Not set: ONNX Runtime's own default (spinning) applies.
    with pytest.raises(Exception, match=key):
        options.get_session_config_entry(key)


def _rows_of(plan: ExecutionPlan, batch_size: int = 7, start: int = 0) -> list:
    scorer = build_scorer(ORIGINAL, PRUNED, ["o", *map(str, range(len(PRUNED)))],
                          spec(batch_size, examples=2), providers=["CPUExecutionProvider"],
                          session_threads=plan.session_threads)
    outputs: list = []
    run_local(scorer, open_data(DATA, limit=60), start, outputs.append, plan)
    return outputs


def test_batches_in_flight_give_the_rows_of_one_at_a_time_in_data_order() -> None:
    one = _rows_of(ExecutionPlan(1, 1, None))
    many = _rows_of(ExecutionPlan(4, 1, 1))
    assert len(one) == len(many) == 9  # ceil(60 / 7)
    for a, b in zip(one, many, strict=True):
        assert a.rows.keys() == b.rows.keys()
        for key in a.rows:
            np.testing.assert_array_equal(a.rows[key], b.rows[key], err_msg=key)
        assert [[e.index for e in found] for found in a.examples] == [
            [e.index for e in found] for found in b.examples
        ]
    indices = np.concatenate([o.rows["index"][o.rows["model"] == 0] for o in many])
    np.testing.assert_array_equal(indices, np.arange(60))


def test_a_run_resumed_mid_data_continues_with_the_right_indices() -> None:
    outputs = _rows_of(ExecutionPlan(3, 1, 1), batch_size=8, start=20)
    indices = np.concatenate([o.rows["index"][o.rows["model"] == 0] for o in outputs])
    np.testing.assert_array_equal(indices, np.arange(20, 60))


def test_whole_run_numbers_do_not_depend_on_the_thread_budget(monkeypatch) -> None:
    def run():
        return score_models(
            ORIGINAL,
            PRUNED,
            DATA,
            cam=CamOptions(target="original"),
            data_options=DataOptions(preset="unit", limit=50),
            metric=MetricOptions(n_bootstrap=50),
            run=RunOptions(batch_size=8, device="cpu"),
        )

    monkeypatch.setenv("SP2PS_THREADS", "1")
    serial = run()
    monkeypatch.setenv("SP2PS_THREADS", "4")
    parallel = run()
    for a, b in zip(serial.models, parallel.models, strict=True):
        assert a.result.sp2ps == b.result.sp2ps
        assert a.result.ci95 == b.result.ci95


class _FailingSource:
    """A data source whose reading fails after ``good`` batches."""

    has_labels = True
    size_hint = None
    description = "a failing source"
    faults: list = []

    def __init__(self, good: int) -> None:
        self.good = good
        archive = np.load(DATA)
        self.x = archive["x"][:40].astype(np.uint8)
        self.y = archive["y"][:40].astype(np.int64)

    def batches(self, size: int, start: int = 0) -> Iterator[Batch]:
        for i in range(self.good):
            part = slice(i * size, (i + 1) * size)
            yield Batch(self.x[part], self.y[part], [str(j) for j in range(40)][part])
        raise InputDataError("image 99.png cannot be read")


def test_a_read_error_reaches_the_caller_after_the_batches_before_it() -> None:
    scorer = build_scorer(ORIGINAL, PRUNED[:1], ["o", "p"], spec(8),
                          providers=["CPUExecutionProvider"], session_threads=1)
    outputs: list = []
    with pytest.raises(InputDataError, match="99.png"):
        run_local(scorer, _FailingSource(good=3), 0, outputs.append, ExecutionPlan(2, 1, 1))
    assert len(outputs) <= 3


def test_prefetcher_stops_its_thread_when_the_consumer_leaves_early() -> None:
    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    reader = Prefetcher(endless(), depth=2)
    for item in reader:
        if item == 3:
            break
    started = time.perf_counter()
    reader.close()
    assert time.perf_counter() - started < 5
    assert threading.active_count() == before
    assert len(produced) <= 3 + 1 + 2 + 1  # consumed, queued (depth) and one being put
