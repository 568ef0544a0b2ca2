"""The pass cache on Ray: the workers write the entries a local run reads, and the numbers
are the same (one local Ray with 2 CPUs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from sp2ps_onnx.scoring import (  # noqa: E402
    DataOptions,
    MetricOptions,
    RayOptions,
    RunOptions,
    score_models,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = MODELS / "pruned" / "fmnist_cnn_mag80.onnx"
DATA = MODELS / "samples" / "fmnist_test.npz"


def test_ray_workers_fill_the_cache_a_local_run_reads(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        def run(**extra):
            return score_models(ORIGINAL, [PRUNED], DATA,
                                data_options=DataOptions(preset="unit", limit=48),
                                metric=MetricOptions(n_bootstrap=100, examples=2),
                                run=RunOptions(batch_size=16, cache=tmp_path, **extra))

        remote = run(ray=RayOptions(workers=1))
    finally:
        ray.shutdown()
    assert remote.config["cache"] == {"directory": str(tmp_path)}
    assert len(list(tmp_path.glob("*/*.npz"))) == 2 * 3  # original and floor, 3 batches
    local = run()
    assert local.config["cache"]["hits"] == 6 and local.config["cache"]["misses"] == 0
    for a, b in zip(remote.models + remote.references, local.models + local.references,
                    strict=True):
        assert a.result.to_dict() == b.result.to_dict()
        for column, values in a.rows.columns.items():
            np.testing.assert_array_equal(values, b.rows.columns[column], err_msg=column)
