"""The score stage: Sp2PS of every model against its base model, through the public API.

Each model is scored with :func:`sp2ps_onnx.scoring.score_models` exactly as ``sp2ps score``
does (Fashion-MNIST test images as a uint8 ``.npz``, ``--preset unit``, ``--target label``),
in chunks of a few models so the per-sample tables stay small. A model the engine cannot
score is recorded with its error message, not skipped silently. The noise ceiling, which
compares the original with itself on noisy inputs, uses :class:`sp2ps_onnx.CamModel` and
:class:`sp2ps_onnx.metric.Sp2PSAccumulator` with the same settings as ``score_models``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sp2ps_onnx.formatting import percent

from .config import StudyConfig

Log = Callable[[str], None]
CHUNK = 8


class ScoreStore:
    """Scores by model name and CAM method, kept as JSON in the cache."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / "scores.json"
        self.examples = cache / "examples"
        self.records: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )

    def get(self, name: str, method: str) -> dict[str, Any] | None:
        return self.records.get(name, {}).get(method)

    def put(self, name: str, method: str, record: dict[str, Any]) -> None:
        if self.path.is_file():  # another process may score other architectures
            for key, value in json.loads(self.path.read_text()).items():
                self.records.setdefault(key, {}).update(
                    {m: r for m, r in value.items() if key != name or m != method})
        self.records.setdefault(name, {})[method] = record
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        tmp.replace(self.path)

    def example_path(self, name: str, method: str) -> Path:
        return self.examples / f"{name}__{method.replace('+', 'p')}.npz"


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    return value


def _record(model_score: Any, sha: str, seconds: float) -> dict[str, Any]:
    result, info = model_score.result, model_score.info
    return {
        "sha256": sha,
        "sp2ps": _clean(result.sp2ps),
        "ci95": _clean(result.ci95),
        "mean_spatial": _clean(result.mean_spatial),
        "mean_spectral": _clean(result.mean_spectral),
        "median_h": _clean(result.median_h),
        "p05_h": _clean(result.p05_h),
        "accuracy_original": _clean(result.accuracy_original),
        "accuracy": _clean(result.accuracy_pruned),
        "top1_agreement": _clean(result.top1_agreement),
        "n": int(result.n),
        "parameters": int(info.parameters),
        "sparsity": float(info.sparsity),
        "file_size": info.file_size,
        "layer": info.layer,
        "seconds": round(seconds, 2),
        "error": None,
    }


def _save_examples(store: ScoreStore, name: str, method: str, model_score: Any) -> None:
    examples = model_score.worst
    if not examples:
        return
    store.examples.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        store.example_path(name, method),
        image=np.stack([e.image for e in examples]),
        original_map=np.stack([e.original_map for e in examples]),
        pruned_map=np.stack([e.pruned_map for e in examples]),
        h=np.array([e.h for e in examples]),
        label=np.array([-1 if e.label is None else e.label for e in examples]),
        pred_original=np.array([e.pred_original for e in examples]),
        pred_pruned=np.array([e.pred_pruned for e in examples]),
        index=np.array([e.index for e in examples]),
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def score_stage(data: dict, config: StudyConfig, cache: Path, manifest: Any, log: Log,
                rescore: list[str]) -> None:
    from sp2ps_onnx.scoring import (
        CamOptions,
        DataOptions,
        MetricOptions,
        ReferenceOptions,
        RunOptions,
        file_sha256,
        score_models,
    )

    test_file = cache / "fmnist_test.npz"
    np.savez(test_file, x=data["x_test"], y=data["y_test"])
    store = ScoreStore(cache)

    def stale(entry: Any, method: str, sha: str) -> bool:
        record = store.get(entry.name, method)
        forced = any(fnmatch.fnmatch(entry.name, pattern) for pattern in rescore)
        return forced or record is None or record.get("sha256") != sha

    data_options = DataOptions(preset="unit")
    metric = MetricOptions(n_bootstrap=config.n_bootstrap, seed=config.seed,
                           examples=config.examples)
    run = RunOptions(batch_size=config.score_batch, device="cpu")

    def options(method: str) -> dict[str, Any]:
        # The first round's design: no random floor (its retrained models are the references).
        return dict(cam=CamOptions(method=method, target="label"), data_options=data_options,
                    metric=metric, run=run, references=ReferenceOptions(floor=False))

    for arch in config.architectures:
        original = manifest.entries.get(arch)
        if original is None:
            log(f"score: {arch} is not trained, skipped")
            continue
        entries = [e for e in manifest.of(arch)]
        for method in config.cam_methods:
            failed = [e for e in entries if not e.path]
            for entry in failed:
                store.put(entry.name, method, {"sha256": None, "error": entry.note})
            todo = [(e, file_sha256(e.path)) for e in entries if e.path]
            todo = [(e, sha) for e, sha in todo if stale(e, method, sha)]
            log(f"score {arch} with {method}: {len(todo)} models to score")
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                began = time.time()
                try:
                    report = score_models(original.path, [e.path for e, _ in chunk], str(test_file),
                                          **options(method))
                    seconds = (time.time() - began) / len(chunk)
                    results = list(zip(chunk, report.models, strict=True))
                except Exception as exc:  # isolate the model the engine cannot score
                    log(f"  a chunk failed ({_error_text(exc)}); scoring its models one by one")
                    results = []
                    for entry, sha in chunk:
                        began = time.time()
                        try:
                            single = score_models(original.path, [entry.path], str(test_file),
                                                  **options(method))
                            results.append(((entry, sha), single.models[0]))
                        except Exception as single_exc:
                            log(f"  {entry.name}: {_error_text(single_exc)}")
                            store.put(entry.name, method, {"sha256": sha,
                                                           "error": _error_text(single_exc)})
                    report = None
                    seconds = None
                for (entry, sha), model_score in results:
                    record = _record(model_score, sha, seconds or 0.0)
                    if entry.kind == "deploy":
                        record.update(score_target(entry.path))
                    store.put(entry.name, method, record)
                    _save_examples(store, entry.name, method, model_score)
                    accuracy = percent(model_score.result.accuracy_pruned, 2, suffix=" %",
                                       missing="n/a")
                    log(f"  {entry.name}: Sp2PS {model_score.sp2ps:.3f}, accuracy {accuracy}")
                if report is not None:
                    original_record = {
                        "sha256": file_sha256(original.path),
                        "accuracy": _clean(report.accuracy_original),
                        "parameters": int(report.original.parameters),
                        "sparsity": float(report.original.sparsity),
                        "file_size": report.original.file_size,
                        "layer": report.original.layer,
                        "n": int(report.n),
                        "versions": report.config.get("versions"),
                        **score_target(original.path),
                    }
                    store.put(arch, method, original_record)
            ceiling = f"{arch}-ceiling"
            sha = file_sha256(original.path)
            record = store.get(ceiling, method)
            if record is None or record.get("sha256") != sha or any(
                    fnmatch.fnmatch(ceiling, p) for p in rescore):
                began = time.time()
                store.put(ceiling, method, {**noise_ceiling(original.path, test_file, method,
                                                            config), "sha256": sha,
                                            "seconds": round(time.time() - began, 2)})
                log(f"  {ceiling}: Sp2PS {store.get(ceiling, method)['sp2ps']:.3f}")


def score_target(path: str) -> dict[str, Any]:
    """Which tensor the engine explains, as ``sp2ps inspect`` shows it: the score tensor
    and the Softmax it cut off (None when it explains the model's output as is)."""
    from sp2ps_onnx import CamModel

    graph = CamModel(path, providers=["CPUExecutionProvider"]).graph
    return {"score_tensor": graph.score_tensor, "softmax_cut": graph.softmax_cut}


def noise_ceiling(model_path: str, test_file: Path, method: str,
                  config: StudyConfig) -> dict[str, Any]:
    """The original against itself with Gaussian noise (sigma in [0, 1] pixel units) added
    to its input: the highest Sp2PS a model can be expected to reach."""
    from sp2ps_onnx import CamModel
    from sp2ps_onnx.data import Preprocessing, open_data
    from sp2ps_onnx.metric import Sp2PSAccumulator

    model = CamModel(model_path, providers=["CPUExecutionProvider"],
                     batch_size=config.score_batch)
    prep = Preprocessing.for_model(model, "unit")
    accumulator = Sp2PSAccumulator(keep_per_sample=True, n_bootstrap=config.n_bootstrap,
                                   seed=config.seed, normalize=True)
    rng = np.random.default_rng(config.seed + 1)
    for batch in open_data(str(test_file)).batches(config.score_batch):
        x = prep(batch.images)
        noisy = (x + rng.normal(0.0, config.noise_sigma, x.shape)).astype(np.float32)
        maps, targets, scores = model.cams(x, method=method, targets=batch.labels,
                                           return_scores=True)
        noisy_maps, _, noisy_scores = model.cams(noisy, method=method, targets=targets,
                                                 return_scores=True)
        accumulator.update(maps, noisy_maps, batch.labels, targets=targets,
                           original_scores=scores, pruned_scores=noisy_scores)
    result = accumulator.result()
    return {
        "sp2ps": _clean(result.sp2ps),
        "ci95": _clean(result.ci95),
        "mean_spatial": _clean(result.mean_spatial),
        "mean_spectral": _clean(result.mean_spectral),
        "accuracy_original": _clean(result.accuracy_original),
        "accuracy": _clean(result.accuracy_pruned),
        "top1_agreement": _clean(result.top1_agreement),
        "n": int(result.n),
        "error": None,
        "note": f"original vs itself on inputs + N(0, {config.noise_sigma}^2)",
    }
