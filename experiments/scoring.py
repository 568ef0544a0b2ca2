"""The score stage: Sp2PS of every model against its base model, through the public API.

For each base model, one :func:`sp2ps_onnx.scoring.score_models` call scores, exactly as
``sp2ps score --preset unit --target label --floor`` does on the Fashion-MNIST test images:
its pruned models (as pruned and recovered), its int8 artifacts, and the other base models of
its architecture (independent retrains: same recipe, another seed); the random floor comes
with the call. Every model's summary goes to ``scores.json`` in the cache, its per-sample
rows to ``samples/NAME.npz``. A model the engine cannot score is recorded with its error
message, not skipped silently. The bundled ``fmnist_cnn_l1filter25`` case is scored the same
way on all test images.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .config import StudyConfig
from .models import base_name, file_lock

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("models/fmnist_cnn.onnx", "models/pruned/fmnist_cnn_l1filter25.onnx")


class ScoreStore:
    """Scores by model name, kept as JSON in the cache; per-sample rows as ``.npz``."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / "scores.json"
        self.samples = cache / "samples"
        self.records: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )

    def get(self, name: str) -> dict[str, Any] | None:
        return self.records.get(name)

    def put(self, name: str, record: dict[str, Any]) -> None:
        with file_lock(self.path):
            if self.path.is_file():  # another process may score other architectures
                for key, value in json.loads(self.path.read_text()).items():
                    if key != name:
                        self.records[key] = value
            self.records[name] = record
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.records, indent=1))
            tmp.replace(self.path)

    def sample_path(self, name: str) -> Path:
        return self.samples / f"{name}.npz"


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    return value


RESULT_FIELDS = ("sp2ps", "ci95", "mean_spatial", "mean_spectral", "median_h", "p05_h",
                 "accuracy_original", "top1_agreement", "mean_js_divergence", "same_answer_n",
                 "same_answer_sp2ps", "different_answer_n", "different_answer_sp2ps",
                 "same_answer_gap_share", "n")


def _record(model_score: Any, shas: tuple[str, str]) -> dict[str, Any]:
    result, info = model_score.result, model_score.info
    record = {name: _clean(getattr(result, name)) for name in RESULT_FIELDS}
    record.update(
        accuracy=_clean(result.accuracy_pruned), band=model_score.band,
        parameters=int(info.parameters), sparsity=float(info.sparsity),
        file_size=info.file_size, layer=info.layer, sha256=shas[0], original_sha256=shas[1],
        error=None,
    )
    return record


def _save_samples(store: ScoreStore, name: str, model_score: Any) -> None:
    rows = list(model_score.rows)
    store.samples.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        store.sample_path(name),
        index=np.array([r["index"] for r in rows], dtype=np.int32),
        label=np.array([r["label"] for r in rows], dtype=np.int16),
        pred_original=np.array([r["pred_original"] for r in rows], dtype=np.int16),
        pred=np.array([r["pred_pruned"] for r in rows], dtype=np.int16),
        h=np.array([r["h"] for r in rows], dtype=np.float32),
        spatial=np.array([r["spatial"] for r in rows], dtype=np.float32),
        spectral=np.array([r["spectral"] for r in rows], dtype=np.float32),
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _options(config: StudyConfig) -> dict[str, Any]:
    from sp2ps_onnx.scoring import (
        CamOptions,
        DataOptions,
        MetricOptions,
        ReferenceOptions,
        RunOptions,
    )

    return dict(
        cam=CamOptions(method=config.cam_method, target="label"),
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=config.n_bootstrap, seed=config.seed,
                             examples=config.examples),
        run=RunOptions(batch_size=config.score_batch, device="cpu"),
        references=ReferenceOptions(floor=True),
    )


def _score(original: str, entries: list[Any], test_file: Path, config: StudyConfig,
           store: ScoreStore, original_name: str, log: Log) -> None:
    """One score_models call for ``entries`` against ``original`` (recorded as
    ``original_name``, its floor as ``original_name-floor``); on failure, one by one, so the
    model the engine cannot score carries its error and the others their scores."""
    from sp2ps_onnx.scoring import file_sha256, score_models

    original_sha = file_sha256(original)
    try:
        report = score_models(original, [e.path for e in entries], str(test_file),
                              **_options(config))
        pairs = list(zip(entries, report.models, strict=True))
    except Exception as exc:
        if len(entries) == 1:
            log(f"  {entries[0].name}: {_error_text(exc)}")
            store.put(entries[0].name, {"sha256": file_sha256(entries[0].path),
                                        "original_sha256": original_sha,
                                        "error": _error_text(exc)})
            return
        log(f"  the call failed ({_error_text(exc)}); scoring the models one by one")
        for entry in entries:
            _score(original, [entry], test_file, config, store, original_name, log)
        return
    for entry, model_score in pairs:
        store.put(entry.name, _record(model_score, (file_sha256(entry.path), original_sha)))
        _save_samples(store, entry.name, model_score)
        log(f"  {entry.name}: Sp2PS {model_score.sp2ps:.3f}, accuracy "
            f"{100 * model_score.result.accuracy_pruned:.2f} %")
    if report.floor is not None:
        store.put(f"{original_name}-floor",
                  {**_record(report.floor, ("", original_sha)), "kind": "floor"})
    store.put(original_name, {
        "sha256": original_sha, "accuracy": _clean(report.accuracy_original),
        "parameters": int(report.original.parameters), "file_size": report.original.file_size,
        "layer": report.original.layer, "n": int(report.n),
        "versions": report.config.get("versions"), "error": None,
    })


def score_stage(data: dict, config: StudyConfig, cache: Path, manifest: Any, log: Log,
                rescore: list[str]) -> None:
    from sp2ps_onnx.scoring import file_sha256

    test_file = cache / "fmnist_test.npz"
    np.savez(test_file, x=data["x_test"], y=data["y_test"])
    store = ScoreStore(cache)

    def stale(entry: Any, original_sha: str) -> bool:
        record = store.get(entry.name)
        forced = any(fnmatch.fnmatch(entry.name, pattern) for pattern in rescore)
        return (forced or record is None or record.get("sha256") != file_sha256(entry.path)
                or record.get("original_sha256") != original_sha)

    for arch in config.architectures:
        bases = [manifest.entries.get(base_name(arch, k)) for k in range(config.seeds)]
        for k, original in enumerate(bases):
            if original is None:
                log(f"score: {base_name(arch, k)} is not trained, skipped")
                continue
            # The other seeds are this base's independent retrains: keyed per pair, since
            # each of them is scored against every other base.
            others = [SimpleNamespace(name=retrain_key(b.name, original.name), path=b.path)
                      for j, b in enumerate(bases) if j != k and b is not None]
            entries = [e for e in manifest.entries.values()
                       if e.base == original.name and e.kind != "original"] + others
            for entry in entries:
                if not entry.path:  # a conversion that failed: its error is the finding
                    store.put(entry.name, {"sha256": None, "error": entry.note})
            original_sha = file_sha256(original.path)
            todo = [e for e in entries if e.path and stale(e, original_sha)]
            log(f"score {original.name}: {len(todo)} of {len(entries)} models to score")
            if not todo:
                continue
            started = time.time()
            _score(original.path, todo, test_file, config, store, original.name, log)
            log(f"  {original.name}: {time.time() - started:.0f} s")
    _score_bundled(test_file, config, store, log)


def retrain_key(retrain: str, base: str) -> str:
    """The score record of base model ``retrain`` scored against base model ``base``."""
    return f"{retrain}-vs-{base}"


def _score_bundled(test_file: Path, config: StudyConfig, store: ScoreStore, log: Log) -> None:
    """The bundled CNN and its 25 % L1-filter-pruned version (the README's example) on the
    same test images as the study."""
    from sp2ps_onnx.scoring import file_sha256

    original, pruned = (str(REPO / p) for p in BUNDLED)
    record = store.get("bundled-l1filter25")
    if record and record.get("sha256") == file_sha256(pruned) and record.get("n") == len(
            np.load(test_file)["y"]):
        return
    entry = SimpleNamespace(name="bundled-l1filter25", path=pruned)
    _score(original, [entry], test_file, config, store, "bundled", log)
