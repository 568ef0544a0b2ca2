"""Files that a run writes and may read back later: atomic writes and checksummed archives.

Both the resume store (:mod:`.checkpoint`) and the pass cache (:mod:`.cache`) write every
file to a temporary name and rename it, so that a reader never sees half a file; the pass
cache also seals each archive with a checksum of its arrays, so that a file damaged on disk
is detected and recomputed instead of trusted.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np

_CHECKSUM = "__sha256__"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling file and a rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: every name, dtype, shape and the bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sealed_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as ``.npz`` bytes, with their checksum stored beside them."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_CHECKSUM: np.array(arrays_digest(arrays))})
    return buffer.getvalue()


def read_sealed_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a :func:`sealed_npz` file, or ``None`` when it is missing, unreadable
    or its arrays no longer match their checksum (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception:  # a truncated or overwritten file fails in zipfile, zlib or NumPy
        return None
    stored = arrays.pop(_CHECKSUM, None)
    if stored is None or str(stored) != arrays_digest(arrays):
        return None
    return arrays
