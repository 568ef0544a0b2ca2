"""The rows of a run kept on disk (RowSpill) give every number of the in-memory aggregation,
bit for bit: the rows of a real run with faults marked in them, added in any order and
batching, with sample ids of several widths."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, aggregate, score_models
from sp2ps_onnx.scoring.rows import FAULTS, ROW_COLUMNS, RowSpill, RowTable, concat_rows

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx", MODELS / "pruned" / "fmnist_cnn_l1filter50.onnx",
          MODELS / "keras" / "fmnist_keras_mag70.onnx"]
DATA = MODELS / "samples" / "fmnist_test.npz"
N = 120
OPTIONS = MetricOptions(n_bootstrap=200, seed=4, examples=3, aggregation="class-weighted")


@pytest.fixture(scope="module")
def run():
    """A real run's rows (3 pruned models), with fault flags set on random rows and ids of
    growing width (as ``x.npz[9]`` then ``x.npz[10]``), and its worst/best candidates."""
    report = score_models(ORIGINAL, PRUNED, DATA, data_options=DataOptions(preset="unit", limit=N),
                          metric=OPTIONS, run=RunOptions(batch_size=16))
    table = concat_rows([{key: np.asarray(m.rows.columns[key]) for key in ROW_COLUMNS}
                         for m in report.models])
    rng = np.random.default_rng(1)
    flags = table["flags"].copy()
    for bit in FAULTS:
        flags[rng.random(flags.size) < 0.08] |= bit
    table["flags"] = flags
    table["id"] = np.array([f"s{i}" + "x" * (i // 40) for i in table["index"]])
    candidates = [m.worst + m.best + m.moved for m in report.models]
    return table, candidates, [m.info.name for m in report.models]


def batches(table: dict, order: np.ndarray, size: int) -> list[dict]:
    """The rows in ``order``, cut into batches of ``size`` rows, each with its own id width."""
    parts = []
    for start in range(0, order.size, size):
        part = {key: value[order[start:start + size]] for key, value in table.items()}
        part["id"] = part["id"].astype(f"<U{max(1, max(map(len, part['id'])))}")
        parts.append(part)
    return parts


def expected_faults(table: dict, names: list[str], max_listed: int, uncounted: set[int]) -> dict:
    """The fault summary straight from the whole table: by fault, then model, then sample;
    the original model's faults once per sample (the first model's row)."""
    order = np.lexsort((table["index"], table["model"]))
    model, index, ids = table["model"][order], table["index"][order], table["id"][order]
    flags = np.where(np.isin(model, list(uncounted)), 0, table["flags"][order])
    counts, listed = {}, []
    for bit, fault in FAULTS.items():
        per_sample = fault.startswith("original")
        hit = ((flags & bit) != 0) & ((model == 0) if per_sample else True)
        counts[fault] = int(hit.sum())
        for i in np.flatnonzero(hit)[: max(0, max_listed - len(listed))]:
            listed.append({"fault": fault, "id": str(ids[i]), "index": int(index[i]),
                           "model": None if per_sample else names[int(model[i])]})
    total = sum(counts.values())
    return {"counts": counts, "total": total, "samples": listed, "listed": len(listed),
            "truncated": total > len(listed)}


def numbers(result) -> str:
    """Every number of an aggregate as JSON text (NaN included), to compare bit for bit."""
    return json.dumps({
        "results": [{k: v for k, v in r.to_dict().items() if k != "per_sample"}
                    for r in result.results],
        "faithfulness": result.faithfulness, "original": result.original_faithfulness,
        "n": result.n, "faults": result.faults,
        "examples": [[(e.index, e.h) for e in group] for kind in
                     (result.worst, result.best, result.moved) for group in kind],
    }, sort_keys=True)


@pytest.mark.parametrize("arrival", ["data order", "shuffled"])
def test_spilled_rows_give_the_numbers_of_the_in_memory_aggregation(run, arrival) -> None:
    table, candidates, names = run
    rng = np.random.default_rng(7)
    order = (np.arange(table["index"].size) if arrival == "data order"
             else rng.permutation(table["index"].size))
    parts = batches(table, order, 37)
    spill = RowSpill()
    for part in parts:
        spill.add(part)
    kwargs = dict(expected=N, max_listed=25, uncounted={2})
    in_memory = aggregate(concat_rows(parts), candidates, names, OPTIONS, **kwargs)
    spilled = aggregate(spill, candidates, names, OPTIONS, **kwargs)

    assert numbers(spilled) == numbers(in_memory)
    assert spilled.faults == expected_faults(table, names, 25, {2})
    assert spilled.faults["truncated"] and spilled.faults["counts"]["pruned_nonfinite"] > 0
    for mine, theirs in zip(spilled.results, in_memory.results, strict=True):
        for key, value in theirs.per_sample.items():
            assert isinstance(mine.per_sample[key], np.memmap)
            assert mine.per_sample[key].dtype == value.dtype
            assert np.array_equal(mine.per_sample[key], value)
    for mine, theirs in zip(spilled.rows, in_memory.rows, strict=True):
        assert isinstance(mine.columns["h"], np.memmap)
        assert mine.columns["id"].dtype == theirs.columns["id"].dtype  # the widest id
        assert mine.faithfulness == theirs.faithfulness
        assert list(mine) == list(theirs) == [theirs[i] for i in range(len(theirs))]


def test_a_lost_or_duplicated_spilled_row_is_an_error(run) -> None:
    table, candidates, names = run
    spill = RowSpill()
    spill.add({key: np.append(value, value[5:6]) for key, value in table.items()})
    with pytest.raises(Exception, match="scored twice"):
        aggregate(spill, candidates, names, MetricOptions(n_bootstrap=0), expected=N)
    spill = RowSpill()
    spill.add({key: np.delete(value, 3) for key, value in table.items()})
    with pytest.raises(Exception, match="rows were lost"):
        aggregate(spill, candidates, names, MetricOptions(n_bootstrap=0), expected=N)


def test_the_spill_folder_goes_with_the_last_table_that_reads_it(run) -> None:
    table, candidates, names = run
    spill = RowSpill()
    spill.add(table)
    folder = spill.directory
    result = aggregate(spill, candidates, names, OPTIONS, expected=N)
    del spill
    gc.collect()
    assert folder.is_dir()  # the report's tables read it
    rows: RowTable = result.rows[0]
    assert len(list(rows)) == N
    del result, rows
    gc.collect()
    assert not folder.exists()


def test_the_spill_of_a_killed_process_is_removed_by_the_next_one(tmp_path: Path) -> None:
    """A process killed with SIGKILL cannot remove its spill; the next spill made in the
    same folder does, and leaves those of living processes alone."""
    if os.name != "posix":
        pytest.skip("whether a process lives is asked only on POSIX")
    script = ("import sys, os, signal; from sp2ps_onnx.scoring.rows import RowSpill; "
              "spill = RowSpill(sys.argv[1]); print(spill.directory, flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    assert killed.returncode == -signal.SIGKILL
    abandoned = Path(killed.stdout.strip())
    assert abandoned.is_dir()
    living = RowSpill(tmp_path)
    assert not abandoned.exists()
    again = RowSpill(tmp_path)
    assert living.directory.is_dir() and again.directory.is_dir()
