"""Per-sample rows saved while a scoring run goes, so that an interrupted run can resume.

A :class:`RowStore` directory holds ``manifest.json`` (what was being scored: model hashes,
data, options), ``rows-NNNNNN.npz`` chunks (the rows of consecutive batches, in data order)
and ``examples-NNNNNN.npz`` (the worst/best candidates of everything up to chunk
``NNNNNN``). Every file is written to a temporary name and renamed, and a chunk counts only
once its examples file exists, so a run killed at any moment leaves a consistent prefix of
the data; resuming scores the rest and gives the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputDataError
from .files import atomic_write
from .rows import concat_rows, examples_from_arrays, examples_to_arrays, npz_bytes

MANIFEST = "manifest.json"
_CHUNK = re.compile(r"^(rows|examples)-(\d{6})\.npz$")


class RowStore:
    """Saves the rows of a run in chunks and reloads them to resume it.

    Args:
        directory: where the chunks go (created if missing).
        fingerprint: JSON-able description of the run; a resumed run must match it.
        resume: continue the rows found in ``directory``. Without it an existing store
            is an error, so that the rows of an interrupted hour-long run are never
            discarded by accident.
        flush_rows / flush_seconds: write a chunk when this many rows are waiting or this
            long after the last chunk, whichever comes first.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fingerprint: dict[str, Any],
        resume: bool = False,
        flush_rows: int = 20_000,
        flush_seconds: float = 30.0,
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.done = 0
        self._chunks = 0
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._candidates: list[Any] = []
        self._last_flush = time.monotonic()
        self._made_parent = False
        self._data_faults = 0
        manifest = self.directory / MANIFEST
        if manifest.exists():
            if not resume:
                raise InputDataError(
                    f"{self.directory} holds the rows of an interrupted run; pass --resume "
                    "(resume=True) to continue it, or delete that folder to start again"
                )
            self._load(manifest)
        else:
            self._made_parent = not self.directory.parent.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, json.dumps(self.fingerprint, indent=2).encode())

    # -- resuming ---------------------------------------------------------------------
    def _load(self, manifest: Path) -> None:
        try:
            saved = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise InputDataError(
                f"cannot read {manifest} ({exc}); delete {self.directory} to start again"
            ) from exc
        differ = [key for key in sorted(set(saved) | set(self.fingerprint))
                  if saved.get(key) != self.fingerprint.get(key)]
        if differ:
            raise InputDataError(
                f"the interrupted run in {self.directory} scored other "
                f"{', '.join(differ)} than this one; resume with the same models, data and "
                "options, or delete that folder to start again"
            )
        chunks: dict[str, set[int]] = {"rows": set(), "examples": set()}
        for path in self.directory.iterdir():
            match = _CHUNK.match(path.name)
            if match:
                chunks[match.group(1)].add(int(match.group(2)))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that was cut off
        complete = chunks["examples"] & chunks["rows"]
        self._chunks = max(complete, default=0)
        for number in chunks["rows"] - set(range(1, self._chunks + 1)):
            self._path("rows", number).unlink(missing_ok=True)  # rows without examples
        if self._chunks and int(self._read("examples", self._chunks).get("data_faults", 0)):
            # Samples are resumed by position among the readable ones, which skipped files
            # before that position would shift.
            raise InputDataError(
                f"the interrupted run in {self.directory} skipped unreadable files, so it "
                "cannot be resumed exactly; delete that folder and start the run again"
            )
        # One chunk in memory at a time: the saved rows may be larger than memory.
        self.done = sum(int(np.count_nonzero(rows["model"] == 0))
                        for rows in self.saved_chunks())

    def saved_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows of the interrupted run, one saved chunk at a time, in data order."""
        for number in range(1, self._chunks + 1):
            yield self._read("rows", number)

    def saved_examples(self, n_models: int) -> list[list[Any]]:
        """The worst/best candidates of the interrupted run, per pruned model."""
        if not self._chunks:
            return [[] for _ in range(n_models)]
        arrays = self._read("examples", self._chunks)
        return [examples_from_arrays(arrays, f"ex{j}.") for j in range(n_models)]

    # -- saving -----------------------------------------------------------------------
    def add(
        self, rows: dict[str, np.ndarray], candidates: Sequence[Sequence[Any]], data_faults: int = 0
    ) -> None:
        """Queue one batch's rows (the candidates are the merged ones so far; ``data_faults``:
        the unreadable files skipped so far)."""
        self._data_faults = data_faults
        self._pending.append(rows)
        self._pending_rows += int(rows["index"].size)
        self._candidates = [list(c) for c in candidates]
        if (self._pending_rows >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the queued rows as the next chunk (then its examples file)."""
        if not self._pending:
            return
        number = self._chunks + 1
        self._write("rows", number, concat_rows(self._pending))
        arrays: dict[str, np.ndarray] = {}
        for j, found in enumerate(self._candidates):
            arrays.update(examples_to_arrays(found, f"ex{j}."))
        arrays["data_faults"] = np.array(self._data_faults)
        atomic_write(self._path("examples", number), npz_bytes(arrays))
        if number > 1:
            self._path("examples", number - 1).unlink(missing_ok=True)
        self._chunks = number
        self._pending, self._pending_rows = [], 0
        self._last_flush = time.monotonic()

    def discard_if_empty(self) -> None:
        """Remove the store (and the folder made for it) when no chunk was saved, so that
        a run that failed before its first chunk leaves nothing behind."""
        if self._chunks:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._made_parent:
            try:
                self.directory.parent.rmdir()
            except OSError:
                pass  # something else is in it now

    def _path(self, kind: str, number: int) -> Path:
        return self.directory / f"{kind}-{number:06d}.npz"

    def _write(self, kind: str, number: int, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self._path(kind, number), npz_bytes(arrays))

    def _read(self, kind: str, number: int) -> dict[str, np.ndarray]:
        path = self._path(kind, number)
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except Exception as exc:
            raise InputDataError(
                f"cannot read {path} ({exc}); delete {self.directory} to start again"
            ) from exc
