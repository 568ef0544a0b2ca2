"""The pass cache: the outputs of the models that do not change from one run to the next.

A compression loop scores many candidates against one original, over the same data. The
original's pass (its class scores, the class each CAM explains, its CAMs at the chosen
layer, and its faithfulness figures when they are asked for) is the same every time, and so
are the random floor's and the reference models' passes. :class:`PassCache` keeps each
batch's pass of such a model in one file, so that a later run with a new candidate runs
only the candidate.

**Key.** One entry is one model's pass over one batch. Its name is the SHA-256 of

- the model: the SHA-256 of its rewritten graph (the model with the CAM outputs added at
  the resolved layer: the same for a file, a ModelProto or bytes of the same model), the
  layer and the layout;
- the options that change the pass: CAM method, map size, target rule, patch grid, the
  preprocessing (:class:`~sp2ps_onnx.data.Preprocessing`), the faithfulness settings;
- where it runs: the first ONNX Runtime provider, and the versions of sp2ps-onnx, Python,
  ONNX, ONNX Runtime, NumPy and SciPy (:func:`~sp2ps_onnx.scoring.models.package_versions`);
- the data: the SHA-256 of the batch's preprocessed input tensor (its bytes, dtype and
  shape) and of the classes the CAMs were asked for (the labels, or the original's
  targets, or none for top-1).

Hashing the batch itself, not the data's name, makes the key hold for any data source (image
folders, arrays, a DataLoader) and for any backend: the same batch of the same bytes gives the
same file, a changed image, preprocessing, batch size or sample order gives another one.
Because the input tensor is hashed, the batches of two runs must be cut the same way to
hit: keep ``--batch-size``.

**Trust.** Every file stores its key and a SHA-256 of its arrays; a file that cannot be read,
whose arrays do not match their checksum, or whose key or shapes differ from what was asked
is counted in :attr:`PassCache.stats` as corrupt, recomputed and overwritten. Files are
written atomically, so two runs can share a cache directory. Entries are never expired:
delete the directory to reclaim its space (about ``4 * H * W`` bytes per sample and model
for the CAMs, ``H x W`` the original's input size).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..faithfulness import FaithfulnessResult
from .files import arrays_digest, atomic_write, read_sealed_npz, sealed_npz
from .models import package_versions

#: Changes whenever the files' contents change meaning; part of every key.
CACHE_FORMAT = 1


@dataclass
class Pass:
    """One model's pass over one batch: CAMs ``(N, H, W)``, the classes they explain
    ``(N,)`` and the class scores ``(N, K)``; the faithfulness figures when asked for."""

    maps: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    faithfulness: FaithfulnessResult | None = None
    stages: np.ndarray | None = None  # (S, N, H, W): each stage's CAM (layers="stages")

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.maps, self.targets, self.scores

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"maps": self.maps, "targets": self.targets, "scores": self.scores}
        if self.stages is not None:
            arrays["stages"] = self.stages
        if self.faithfulness is not None:
            for item in fields(self.faithfulness):
                arrays[f"faithfulness.{item.name}"] = getattr(self.faithfulness, item.name)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], faithfulness: bool) -> Pass:
        figures = None
        if faithfulness:
            figures = FaithfulnessResult(**{
                item.name: arrays[f"faithfulness.{item.name}"]
                for item in fields(FaithfulnessResult)
            })
        return cls(arrays["maps"], arrays["targets"], arrays["scores"], figures,
                   arrays.get("stages"))


@dataclass(frozen=True)
class CacheUse:
    """A pass cache as a backend's workers receive it: its directory, and the positions of
    the pruned models whose passes it keeps besides the original's (the floor, references)."""

    directory: str
    cached: tuple[int, ...] = ()

    def open(self) -> PassCache:
        return PassCache(self.directory)


@dataclass
class CacheStats:
    """What a cache did in one run: entries read, computed (and written) and found damaged."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, what: str) -> None:
        with self._lock:  # batches are scored on several threads
            setattr(self, what, getattr(self, what) + 1)

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}


def tensor_digest(array: np.ndarray | None) -> str:
    """SHA-256 of an array's dtype, shape and bytes (``"none"`` for ``None``)."""
    if array is None:
        return "none"
    return arrays_digest({"x": np.asarray(array)})


def model_key(cam_model: Any, options: dict[str, Any], providers: Sequence[str] | None) -> str:
    """The part of every entry's key that names the model, the options and the software."""
    described = {
        "format": CACHE_FORMAT,
        # The rewritten graph, not the file: the same model gives the same key whether it
        # was opened from a file, a ModelProto or bytes (the Ray workers get bytes).
        "model": hashlib.sha256(cam_model.rewritten.SerializeToString()).hexdigest(),
        "layer": str(cam_model.layer),
        "layout": str(cam_model.layout),
        "options": options,
        "provider": providers[0] if providers else "CPUExecutionProvider",
        "versions": package_versions(),
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PassCache:
    """A directory of cached passes (see the module's docstring for the key and the checks).

    Args:
        directory: where the entries are kept (created if missing).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()

    @staticmethod
    def entry_key(model: str, x_digest: str, wanted: np.ndarray | None) -> str:
        """The name of one model's pass over one batch."""
        text = f"{model}\0{x_digest}\0{tensor_digest(wanted)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str, n: int, faithfulness: bool) -> Pass | None:
        """The pass stored under ``key`` for a batch of ``n`` samples, or ``None`` (a damaged
        file is counted as corrupt and will be overwritten by :meth:`put`)."""
        path = self.path(key)
        if not path.exists():
            self.stats.count("misses")
            return None
        arrays = read_sealed_npz(path)
        if arrays is None or str(arrays.pop("key", "")) != key:
            self.stats.count("corrupt")
            return None
        try:
            found = Pass.from_arrays(arrays, faithfulness)
        except KeyError:
            self.stats.count("corrupt")
            return None
        if len(found.maps) != n or len(found.targets) != n or len(found.scores) != n:
            self.stats.count("corrupt")
            return None
        self.stats.count("hits")
        return found

    def put(self, key: str, found: Pass) -> None:
        """Store ``found`` under ``key``."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, sealed_npz({**found.to_arrays(), "key": np.array(key)}))
