"""Reading evaluation data and preprocessing it for each model.

Inputs (see :func:`open_data`):

* an image folder with one subfolder per class; labels follow torchvision's ``ImageFolder``:
  subfolder names sorted as strings map to ``0..K-1`` unless ``classes`` gives the order;
* a flat folder of images (no labels), or single image files;
* an ``.npz`` archive with an array ``x`` and optionally integer labels ``y``;
* an ``.npy`` array (no labels);
* any of the above in object storage or another file system, as a URI (``s3://``,
  ``gs://``, ``hdfs://``, ``file://``, ...): read through pyarrow's file systems (or
  fsspec's, for schemes pyarrow lacks), with credentials from the environment as those
  libraries expect; each batch's files or array rows are read when the batch is;
* any iterable of ``(images, labels)`` batches (a ``torch.utils.data.DataLoader``, a
  ``tf.data.Dataset.as_numpy_iterator()``, a generator, a Hugging Face dataset's
  ``.iter(batch_size)`` of dicts): see :func:`open_batches`. Nothing is copied to disk.

``uint8`` (and ``uint16``/``bool``) arrays and decoded image files are *images*: ``(N, H, W)``
or ``(N, H, W, C)`` (channels-first ``(N, C, H, W)`` with ``C`` in 1 or 3 is recognised too).
They are resized, cropped, converted to the model's channel count, normalised and laid out
per model by :class:`Preprocessing`. Floating-point arrays are taken as *already
preprocessed*: they must have the model's input shape in the model's layout (a
``(N, C, H, W)`` array is transposed for an ``NHWC`` model and vice versa) and are passed
through unchanged.

Data is streamed: :meth:`DataSource.batches` yields :class:`Batch` tuples, one batch at a
time, so memory does not grow with the dataset (``.npy`` files are memory-mapped).

Bad data does not end a run: an image file that cannot be decoded (truncated, corrupt, a
decompression bomb), a float sample holding NaN or infinite values and a class folder
without images are skipped and recorded in :attr:`DataSource.faults`; ``strict=True`` makes
each of them an error instead.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import struct
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import imageio.v3 as iio
import numpy as np
import skimage.color
import skimage.transform
from PIL import Image

from .classes import BUILT_IN_CLASS_LISTS, built_in_classes
from .errors import InputDataError

MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (width x height) that is decoded: Pillow's own decompression-bomb limit
(about 9460 x 9460), checked from the file header before any pixel is decompressed."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File name endings read as images (the same set torchvision's ``ImageFolder`` accepts)."""

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5,), (0.5,)),
    "unit": ((0.0,), (1.0,)),
    "raw": ((0.0,), (1.0 / 255.0,)),
}
"""Normalisation presets as ``(mean, std)`` applied to pixel values scaled to [0, 1].

``x = (pixel / 255 - mean) / std``: *imagenet* is torchvision's ImageNet mean/std,
*inception* maps to [-1, 1], *unit* keeps [0, 1] and *raw* gives 0..255.
"""


class Batch(NamedTuple):
    """One batch of evaluation data.

    ``images`` is a list of per-sample arrays (images as ``uint8`` ``(H, W)`` or
    ``(H, W, C)``) or a float array of already-preprocessed inputs; ``labels`` is an int64
    array or ``None`` when the data has no labels; ``ids`` names each sample (file path
    relative to the data root, or ``name[index]`` for arrays).
    """

    images: list[np.ndarray] | np.ndarray
    labels: np.ndarray | None
    ids: list[str]


@dataclass(frozen=True)
class DataFault:
    """A sample or folder that was skipped: ``id`` as in :attr:`Batch.ids` (a class folder
    ends with ``/``) and the reason, one line."""

    id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


# --------------------------------------------------------------------------------------
# Data sources


@dataclass
class _ArrayPart:
    array: np.ndarray  # memory-mapped or loaded; images or preprocessed floats
    labels: np.ndarray | None
    name: str
    preprocessed: bool
    origin: str = ""  # the file it was read from, for messages


@dataclass
class _FilePart:
    files: list[tuple[Any, int]]  # (Path, or a path inside ``filesystem``; label or -1)
    root: Any  # Path, a path inside ``filesystem``, or None for loose files
    filesystem: Any = None  # a pyarrow FileSystem for data given as a URI
    scheme: str = ""  # the URI's scheme, for messages


@dataclass
class _IterablePart:
    iterable: Iterable[Any]
    pending: Iterator[Any] | None  # the iterator whose first batch was read by open_batches
    first: tuple[np.ndarray, np.ndarray | None]
    name: str
    labelled: bool
    preprocessed: bool
    length: int | None  # samples, when the iterable knows (a DataLoader's dataset)


@dataclass
class DataSource:
    """A dataset opened by :func:`open_data`; iterate it with :meth:`batches`.

    ``faults`` lists what was skipped so far (empty class folders when opened, unreadable
    images as the batches are read); with ``strict`` each of them raises
    :class:`~sp2ps_onnx.errors.InputDataError` instead.
    """

    description: str
    class_names: list[str] | None = None
    _parts: list[_ArrayPart | _FilePart] = field(default_factory=list, repr=False)
    _limit: int | None = None
    strict: bool = False
    faults: list[DataFault] = field(default_factory=list)

    def _skip(self, sample_id: str, error: InputDataError) -> None:
        if self.strict:
            raise error
        if all(f.id != sample_id for f in self.faults):
            self.faults.append(DataFault(sample_id, " ".join(str(error).split())))

    @property
    def max_label(self) -> int | None:
        """The largest label among the samples used (known without reading any image;
        ``None`` for an iterable of batches, whose labels are checked batch by batch)."""
        if any(isinstance(p, _IterablePart) for p in self._parts):
            return None
        largest: int | None = None
        remaining = len(self)
        for part in self._parts:
            if remaining <= 0:
                break
            if isinstance(part, _ArrayPart):
                count = min(len(part.array), remaining)
                labels = [] if part.labels is None else np.asarray(part.labels[:count])
            else:
                count = min(len(part.files), remaining)
                labels = [label for _, label in part.files[:count]]
            if len(labels):
                top = int(np.max(labels))
                largest = top if largest is None else max(largest, top)
            remaining -= count
        return largest

    @property
    def has_labels(self) -> bool:
        """Whether every sample has a label."""
        return bool(self._parts) and all(
            (isinstance(p, _ArrayPart) and p.labels is not None)
            or (isinstance(p, _IterablePart) and p.labelled)
            or (isinstance(p, _FilePart) and all(lab >= 0 for _, lab in p.files))
            for p in self._parts
        )

    @property
    def preprocessed(self) -> bool:
        """Whether the samples are float arrays that bypass preprocessing."""
        return any(
            isinstance(p, (_ArrayPart, _IterablePart)) and p.preprocessed for p in self._parts
        )

    @property
    def size_hint(self) -> int | None:
        """The number of samples, or ``None`` for an iterable that does not say."""
        if any(isinstance(p, _IterablePart) for p in self._parts):
            known = [p.length for p in self._parts if isinstance(p, _IterablePart)]
            if None in known:
                return self._limit
            total = sum(k for k in known if k is not None)
            return total if self._limit is None else min(total, self._limit)
        return len(self)

    def __len__(self) -> int:
        if any(isinstance(p, _IterablePart) for p in self._parts):
            size = self.size_hint
            if size is None:
                raise TypeError("the length of a data iterable is not known; use size_hint")
            return size
        total = sum(len(p.array) if isinstance(p, _ArrayPart) else len(p.files) for p in self._parts)
        return total if self._limit is None else min(total, self._limit)

    def object_files(self) -> tuple[Any, list[tuple[str, str, int]]] | None:
        """For data that is only image files of one URI's file system: that (pyarrow) file
        system and every file used, as ``(path in it, sample id, label or -1)`` in data
        order; else ``None``. Readers elsewhere (Ray Data's) fetch these files themselves."""
        parts = self._parts
        if not parts or not all(isinstance(p, _FilePart) and p.filesystem is not None
                                for p in parts):
            return None
        filesystem = parts[0].filesystem
        if any(p.filesystem is not filesystem for p in parts):
            return None
        files, remaining = [], len(self)
        for part in parts:
            for path, label in part.files[:remaining]:
                files.append((path, _file_id(path, part.root), label))
            remaining -= len(part.files)
        return filesystem, files

    def decode(self, contents: Sequence[bytes], paths: Sequence[str], ids: Sequence[str],
               labels: Sequence[int]) -> Batch | None:
        """The batch of these image files' ``contents`` (as :meth:`object_files` lists them),
        without the files that cannot be decoded (each a fault, or an error when strict);
        ``None`` when none can."""
        scheme = next((p.scheme for p in self._parts if isinstance(p, _FilePart)), "")
        images, kept_ids, kept_labels = [], [], []
        for data, path, sample_id, label in zip(contents, paths, ids, labels, strict=True):
            try:
                images.append(read_image(io.BytesIO(data), name=f"{scheme}://{path}"))
            except InputDataError as exc:
                self._skip(sample_id, exc)
                continue
            kept_ids.append(sample_id)
            kept_labels.append(label)
        if not images:
            return None
        with_labels = self.has_labels
        return Batch(images, np.array(kept_labels, dtype=np.int64) if with_labels else None,
                     kept_ids)

    def batches(self, batch_size: int = 32, start: int = 0,
                stop: int | None = None) -> Iterator[Batch]:
        """Yield the data in batches of at most ``batch_size`` samples, from sample ``start``
        on (the samples before it are not read) up to sample ``stop`` (excluded; default:
        the end). Positions count the skipped samples too, so a range names the same
        samples whatever is skipped in it."""
        if batch_size < 1:
            raise InputDataError(f"batch size must be at least 1, not {batch_size}")
        iterables = [p for p in self._parts if isinstance(p, _IterablePart)]
        if iterables:  # open_batches makes sources of one iterable and nothing else
            limit = float("inf") if self._limit is None else self._limit
            yield from _iterable_batches(iterables[0], batch_size, limit, self._finite)
            return
        remaining = len(self) if stop is None else min(len(self), stop)
        skip = max(0, int(start))
        with_labels = self.has_labels
        for part in self._parts:
            if remaining <= 0:
                return
            if isinstance(part, _ArrayPart):
                count = min(len(part.array), remaining)
                first, skip = min(skip, count), max(0, skip - count)
                for begin in range(first, count, batch_size):
                    end = min(begin + batch_size, count)
                    chunk = np.asarray(part.array[begin:end])
                    labels = (
                        np.asarray(part.labels[begin:end], dtype=np.int64) if with_labels else None
                    )
                    ids = [f"{part.name}[{i}]" for i in range(begin, end)]
                    if not part.preprocessed:
                        yield Batch(list(chunk), labels, ids)
                        continue
                    batch = self._finite(Batch(chunk, labels, ids), part.origin or part.name)
                    if batch.ids:
                        yield batch
                remaining -= count
            else:
                files = part.files[:remaining]
                first, skip = min(skip, len(files)), max(0, skip - len(files))
                for begin in range(first, len(files), batch_size):
                    chunk_files, images = [], []
                    chunk = files[begin : begin + batch_size]
                    for (path, label), image in zip(chunk, _read_images(part, chunk),
                                                    strict=True):
                        if isinstance(image, InputDataError):
                            self._skip(_file_id(path, part.root), image)
                            continue
                        images.append(image)
                        chunk_files.append((path, label))
                    if not chunk_files:
                        continue
                    labels = (
                        np.array([lab for _, lab in chunk_files], dtype=np.int64)
                        if with_labels
                        else None
                    )
                    ids = [_file_id(path, part.root) for path, _ in chunk_files]
                    yield Batch(images, labels, ids)
                remaining -= len(files)


    def _finite(self, batch: Batch, where: str) -> Batch:
        """``batch`` as float32, without the samples holding NaN or infinite values (each
        skipped as a fault, or an error when strict); values beyond float32's range count
        as infinite, as the model would receive them."""
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.asarray(batch.images).astype(np.float32)
        flat = x.reshape(len(x), -1)
        finite = np.isfinite(flat).all(axis=1)
        if finite.all():
            return Batch(x, batch.labels, batch.ids)
        for i in np.flatnonzero(~finite):
            nan = int(np.count_nonzero(np.isnan(flat[i])))
            inf = int(np.count_nonzero(np.isinf(flat[i])))
            self._skip(batch.ids[i], InputDataError(
                f"input sample {batch.ids[i]} of {where} holds {nan} NaN and {inf} infinite "
                f"value(s) (as float32); a model input must be finite: fix or remove sample "
                f"{batch.ids[i]}"
            ))
        return Batch(x[finite], None if batch.labels is None else batch.labels[finite],
                     [sample for sample, ok in zip(batch.ids, finite, strict=True) if ok])


def _file_id(path: Any, root: Any) -> str:
    if isinstance(path, str):  # a path inside a URI's file system
        return posixpath.basename(path) if root is None else posixpath.relpath(path, root)
    if root is None:
        return path.name
    return path.relative_to(root).as_posix()


#: Files of one batch fetched at once from a URI's file system: object stores answer each
#: request after tens of milliseconds, so one request at a time would leave the run waiting.
REMOTE_READERS = 16


def _read_images(part: _FilePart, chunk: Sequence[tuple[Any, int]]) -> list[Any]:
    """The decoded images of ``chunk``'s files, in order; an :class:`InputDataError` in the
    place of each file that cannot be read."""
    def attempt(path: Any) -> Any:
        try:
            return _read_part_image(part, path)
        except InputDataError as exc:
            return exc

    if part.filesystem is None or len(chunk) < 2:
        return [attempt(path) for path, _ in chunk]
    with ThreadPoolExecutor(min(REMOTE_READERS, len(chunk)),
                            thread_name_prefix="sp2ps-fetch") as pool:
        return list(pool.map(attempt, [path for path, _ in chunk]))


def _read_part_image(part: _FilePart, path: Any) -> np.ndarray:
    if part.filesystem is None:
        return read_image(path)
    shown = f"{part.scheme}://{path}"
    try:
        with part.filesystem.open_input_file(path) as handle:
            data = handle.read()
    except Exception as exc:
        raise InputDataError(
            f"cannot read image file {shown}: {' '.join(str(exc).split())[:300]}"
        ) from exc
    return read_image(io.BytesIO(data), name=shown)


CLASS_FILE_EXTENSIONS = (".txt", ".csv", ".tsv", ".json", ".names", ".lst", ".list")
"""File name endings that make a ``--classes`` value a file path, not a class name."""


def looks_like_path(value: str) -> bool:
    """Whether a ``--classes`` value names a file rather than classes: one item (no comma)
    with a path separator, or ending with a class-file extension."""
    if "," in value:
        return False
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in value for sep in separators) or value.strip().lower().endswith(
        CLASS_FILE_EXTENSIONS
    )


def parse_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    """Class names in label order from a text file (one per line), a comma-separated list
    or a built-in list's name (``imagenet``: :mod:`sp2ps_onnx.classes`).

    A value that looks like a path (:func:`looks_like_path`) but names no file is an error,
    never taken as one class name.
    """
    if classes is None:
        return None
    if isinstance(classes, os.PathLike):
        classes = os.fspath(classes)
    if is_uri(classes):
        return _parse_names(_read_uri_text(classes), redact(classes))
    if isinstance(classes, str) and not os.path.isfile(classes) and looks_like_path(classes):
        what = "is a folder, not a file" if os.path.isdir(classes) else "does not exist"
        raise InputDataError(
            f"--classes {classes} looks like a file path but {what}; give a text file with "
            "one class name per line, the names as a comma-separated list, or a built-in "
            f"list ({', '.join(BUILT_IN_CLASS_LISTS)})"
        )
    if not isinstance(classes, str):
        names = [str(c) for c in classes]
    elif classes in BUILT_IN_CLASS_LISTS and not os.path.isfile(classes):
        names = built_in_classes(classes) or []  # --classes imagenet
    elif os.path.isfile(classes):
        try:
            text = Path(classes).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputDataError(
                f"cannot read the class list {classes}: {exc}; give a UTF-8 text file with one "
                "class name per line, or a comma-separated list"
            ) from exc
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = [c.strip() for c in classes.split(",") if c.strip()]
    return _parse_names(names, classes)


def _read_uri_text(uri: str) -> list[str]:
    """The non-empty lines of a text file given as a URI."""
    filesystem, path = open_filesystem(uri)
    try:
        with filesystem.open_input_file(path) as handle:
            text = handle.read().decode("utf-8")
    except Exception as exc:
        raise InputDataError(
            f"cannot read the class list --classes {redact(uri)}: {_scrubbed(str(exc), uri)}; "
            "give a UTF-8 text file with one class name per line"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_names(names: list[str], classes: Any) -> list[str]:
    """``names`` checked: at least one, none twice."""
    if not names:
        raise InputDataError(f"the class list {classes!r} is empty; give at least one class name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputDataError(
            f"the class list {classes!r} names {', '.join(duplicates)} more than once; "
            "each class must appear once, in label order"
        )
    return names


def check_class_count(source: DataSource, num_classes: int, *, given: bool,
                      partial: bool = False) -> None:
    """Refuse class names whose number differs from the model's class count (labels are
    positions in that list, so they would not be the model's classes) unless ``partial``.

    ``given``: the names came from ``--classes``, not from the class folders.
    """
    names = source.class_names
    if partial or not names or len(names) == num_classes:
        return
    if given:
        what = f"--classes names {len(names)} class(es)"
    else:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        what = f"the data {source.description} has {len(names)} class folder(s) ({shown})"
    raise InputDataError(
        f"{what} but the model has {num_classes} classes; labels are positions in that list, "
        f"so give --classes with all {num_classes} class names in label order, or "
        f"--classes-partial (DataOptions(classes_partial=True)) when the list is the model's "
        f"first {len(names)} classes in order"
    )


def open_data(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[Any],
    *,
    classes: str | Sequence[str] | None = None,
    limit: int | None = None,
    strict: bool = False,
) -> DataSource:
    """Open one or more data paths (image folder, image files, ``.npz``, ``.npy``), or an
    iterable of ``(images, labels)`` batches (see :func:`open_batches`).

    ``classes`` (a file with one name per line, a comma-separated string or a list) fixes
    the label order of an image folder and names the integer labels of ``.npz`` files.
    ``limit`` keeps only the first ``limit`` samples. Empty folders and, while reading,
    unreadable images are skipped and recorded in :attr:`DataSource.faults`, or raise
    :class:`~sp2ps_onnx.errors.InputDataError` with ``strict=True``.
    """
    if _is_batch_iterable(paths):
        return open_batches(paths, classes=classes, limit=limit, strict=strict)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise InputDataError("no input data given; pass an image folder, image files, .npz or .npy")
    if limit is not None and limit < 1:
        raise InputDataError(f"--limit must be at least 1, not {limit}")
    class_names = parse_classes(classes)
    parts: list[_ArrayPart | _FilePart] = []
    loose_files: list[tuple[Path, int]] = []
    source = DataSource(
        description=", ".join(redact(p) if is_uri(p) else str(p) for p in paths),
        class_names=None, strict=strict,
    )
    for raw in paths:
        if is_uri(raw):
            found, found_classes = _open_uri(str(raw), class_names, source)
            if found_classes is not None:
                class_names = class_names or found_classes
            parts.extend(found)
            continue
        path = Path(raw)
        if not path.exists():
            raise InputDataError(
                f"input {path} does not exist; give an image folder, an image file, "
                "an .npz (with x and optional y) or an .npy file"
            )
        if path.is_dir():
            part, found_classes = _open_folder(path, class_names, source)
            if found_classes is not None:
                class_names = class_names or found_classes
            if part.files:
                parts.append(part)
        elif path.suffix.lower() == ".npz":
            parts.append(_open_npz(path))
        elif path.suffix.lower() == ".npy":
            parts.append(_open_npy(path))
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            loose_files.append((path, -1))
        else:
            raise InputDataError(
                f"input {path} has an unsupported format {path.suffix or '(no extension)'!r}; "
                f"give an image ({', '.join(IMAGE_EXTENSIONS)}), a folder of images, "
                "an .npz (with x and optional y) or an .npy file"
            )
    if loose_files:
        parts.append(_FilePart(loose_files, None))
    kinds = {isinstance(p, _ArrayPart) and p.preprocessed for p in parts}
    if len(kinds) > 1:
        raise InputDataError(
            "inputs mix preprocessed float arrays with images; give either images "
            "(uint8 arrays or image files) or float arrays in the model's input layout"
        )
    source.class_names = class_names
    source._parts = parts
    source._limit = limit
    if len(source) == 0:
        skipped = "".join(f"; skipped {f.id}: {f.reason}" for f in source.faults[:3])
        raise InputDataError(f"no samples found in {source.description}{skipped}")
    return source


# --------------------------------------------------------------------------------------
# Iterables of batches

_IMAGE_KEYS = ("image", "images", "pixel_values", "img", "x")
_LABEL_KEYS = ("label", "labels", "y")


def _is_batch_iterable(data: Any) -> bool:
    if isinstance(data, (str, os.PathLike, np.ndarray)):
        return False
    if isinstance(data, Sequence):
        return bool(data) and not all(isinstance(p, (str, os.PathLike)) for p in data)
    return isinstance(data, Iterable)


def open_batches(
    batches: Iterable[Any],
    *,
    classes: str | Sequence[str] | None = None,
    limit: int | None = None,
    name: str | None = None,
    strict: bool = False,
) -> DataSource:
    """A data source over an iterable of batches, read as it is iterated (nothing on disk).

    Each batch is ``(images, labels)``, ``(images,)`` or a bare ``images`` array, or a
    mapping with one image key (``image``, ``images``, ``pixel_values``, ``img`` or ``x``)
    and optionally one label key (``label``, ``labels`` or ``y``). Arrays may be NumPy
    arrays or anything ``numpy.asarray`` converts (CPU torch tensors, TensorFlow eager
    tensors). Images are ``uint8`` ``(N, H, W[, C])`` or ``(N, C, H, W)`` and are
    preprocessed per model like image files; ``float`` batches are taken as already
    preprocessed model inputs (what a torchvision ``transforms`` pipeline gives). A
    ``DataLoader`` is iterated again for each pass; a one-shot iterator (a generator, a
    ``tf.data`` numpy iterator) can be read once. Float samples holding NaN or infinite
    values are skipped and listed in :attr:`DataSource.faults` (``strict``: an error).
    """
    if isinstance(batches, np.ndarray):
        raise InputDataError(
            "got a bare array as data; pass a path, or batches such as [(images, labels)]"
        )
    if limit is not None and limit < 1:
        raise InputDataError(f"--limit must be at least 1, not {limit}")
    name = name or type(batches).__name__
    iterator = iter(batches)
    try:
        raw = next(iterator)
    except StopIteration:
        raise InputDataError(f"the data iterable {name} yielded no batches") from None
    first = _unpack_batch(raw, name, 0)
    labelled = first[1] is not None
    preprocessed = _check_array(first[0], name, "batch 0")
    dataset = getattr(batches, "dataset", None)
    length: int | None = None
    if dataset is not None and hasattr(dataset, "__len__") and not getattr(
        batches, "drop_last", False
    ):
        length = len(dataset)
    part = _IterablePart(batches, iterator, first, name, labelled, preprocessed, length)
    return DataSource(
        description=name,
        class_names=parse_classes(classes),
        _parts=[part],
        _limit=limit,
        strict=strict,
    )


def _unpack_batch(raw: Any, name: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    where = f"batch {index} of {name}"
    if isinstance(raw, Mapping):
        image_keys = [k for k in _IMAGE_KEYS if k in raw]
        label_keys = [k for k in _LABEL_KEYS if k in raw]
        if len(image_keys) != 1 or len(label_keys) > 1:
            raise InputDataError(
                f"{where} is a mapping with keys {', '.join(map(str, raw))}; it needs exactly one "
                f"image key ({', '.join(_IMAGE_KEYS)}) and at most one label key "
                f"({', '.join(_LABEL_KEYS)})"
            )
        raw = (raw[image_keys[0]], raw[label_keys[0]] if label_keys else None)
    if isinstance(raw, (tuple, list)):
        if len(raw) not in (1, 2):
            raise InputDataError(
                f"{where} has {len(raw)} items; each batch must be (images, labels) or (images,)"
            )
        images, labels = raw[0], raw[1] if len(raw) == 2 else None
    else:
        images, labels = raw, None
    try:
        images = np.asarray(images)
        labels = None if labels is None else np.asarray(labels)
    except Exception as exc:
        raise InputDataError(
            f"{where} cannot be read as NumPy arrays ({exc}); yield NumPy arrays or CPU tensors"
        ) from exc
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(
            labels.dtype, np.integer
        ):
            raise InputDataError(
                f"labels of {where} have shape {labels.shape} and dtype {labels.dtype}; they "
                f"must be integers of shape ({len(images)},), one class index per image"
            )
        if len(labels) and labels.min() < 0:
            raise InputDataError(f"labels of {where} contain negative values; use 0..K-1")
    return images, labels


def _iterable_batches(part: _IterablePart, batch_size: int, remaining: float,
                      finite: Callable[[Batch, str], Batch]) -> Iterator[Batch]:
    if part.pending is not None:
        iterator, pending = part.pending, [part.first]
        part.pending = None
    else:
        iterator = iter(part.iterable)
        if iterator is part.iterable:
            raise InputDataError(
                f"the data iterable {part.name} was already read and cannot be read again; "
                "pass a re-iterable source (a DataLoader, a list) or open the data again"
            )
        pending = []
    index = 0
    for number, raw in enumerate(_chain(pending, iterator)):
        images, labels = raw if number == 0 and pending else _unpack_batch(raw, part.name, number)
        if (labels is not None) != part.labelled:
            raise InputDataError(
                f"batch {number} of {part.name} {'has no' if part.labelled else 'has'} labels "
                f"but batch 0 {'has' if part.labelled else 'has none'}; give labels for all "
                "batches or for none"
            )
        if _check_array(images, part.name, f"batch {number}") != part.preprocessed:
            raise InputDataError(
                f"batch {number} of {part.name} is {images.dtype} but batch 0 was "
                f"{part.first[0].dtype}; give uint8 images or preprocessed floats throughout"
            )
        count = int(min(len(images), remaining))
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            chunk = images[start:stop]
            batch = Batch(
                chunk if part.preprocessed else list(chunk),
                None if labels is None else labels[start:stop].astype(np.int64),
                [f"{part.name}[{index + i}]" for i in range(start, stop)],
            )
            if part.preprocessed:
                batch = finite(batch, f"batch {number} of {part.name}")
            if batch.ids:
                yield batch
        index += count
        remaining -= count
        if remaining <= 0:
            return


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_folder(
    root: Path, class_names: list[str] | None, source: DataSource
) -> tuple[_FilePart, list[str] | None]:
    try:
        subdirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as exc:
        raise InputDataError(f"cannot list folder {root}: {exc}; check its permissions") from exc
    if not subdirs:
        files = sorted(p for p in root.iterdir() if p.is_file() and _is_image_file(p.name))
        if not files:
            source._skip(f"{root.as_posix()}/", InputDataError(
                f"folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)}) "
                "and no class subfolders"
            ))
        return _FilePart([(p, -1) for p in files], root), None
    order = _class_order(subdirs, class_names, root)
    index = {name: i for i, name in enumerate(order)}
    files: list[tuple[Path, int]] = []
    empty: list[str] = []
    for name in sorted(subdirs):
        before = len(files)
        for dirpath, _dirs, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                if _is_image_file(fname):
                    files.append((Path(dirpath) / fname, index[name]))
        if len(files) == before:
            empty.append(name)
    for name in empty:
        # The class keeps its label (torchvision's ImageFolder with allow_empty=True).
        source._skip(f"{name}/", InputDataError(
            f"class folder {name} in {root} contains no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
        ))
    return _FilePart(files, root), list(order)


def _class_order(subdirs: list[str], class_names: list[str] | None, root: Any) -> list[str]:
    """Class names in label order: the sorted subfolders, as torchvision's ImageFolder, or
    ``class_names`` when given (every subfolder must be in it)."""
    if class_names is None:
        return list(subdirs)
    unknown = [d for d in subdirs if d not in class_names]
    if unknown:
        raise InputDataError(
            f"subfolder(s) {', '.join(unknown)} of {root} are not in the class list "
            f"({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''}); "
            "fix --classes or rename the folders"
        )
    return class_names


def _check_array(array: np.ndarray, path: Path, key: str) -> bool:
    """Validate an input array; return True when it holds preprocessed floats."""
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim not in (3, 4):
            raise InputDataError(
                f"array {key!r} in {path} has shape {array.shape}; float arrays must be "
                "preprocessed model inputs of shape (N, C, H, W) or (N, H, W, C)"
            )
        return True
    if array.dtype in (np.uint8, np.uint16, np.bool_):
        if array.ndim == 3 or (array.ndim == 4 and _channel_axis(array.shape[1:]) is not None):
            return False
        raise InputDataError(
            f"array {key!r} in {path} has shape {array.shape}; image arrays must be "
            "(N, H, W) or (N, H, W, C) with C in 1, 3 or 4"
        )
    raise InputDataError(
        f"array {key!r} in {path} has dtype {array.dtype}; give uint8 images "
        "(N, H, W[, C]) or float32 inputs already preprocessed in the model's layout"
    )


def _channel_axis(shape: tuple[int, ...]) -> int | None:
    """For one image of shape (H, W, C) or (C, H, W): the channel axis, or None."""
    if shape[-1] in (1, 2, 3, 4):
        return 2
    if shape[0] in (1, 3):
        return 0
    return None


def _open_npz(path: Path) -> _ArrayPart:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = list(archive.keys())
    except Exception as exc:
        raise InputDataError(
            f"cannot read {path} as an .npz archive: {exc}; save it with numpy.savez(x=..., y=...)"
        ) from exc
    if "x" not in keys:
        raise InputDataError(
            f"{path} has no array 'x' (it has: {', '.join(keys) or 'nothing'}); save the images "
            "as x (and labels as y) with numpy.savez(path, x=images, y=labels)"
        )
    try:
        x = _npz_member(path, archive, "x")
        y = archive["y"] if "y" in keys else None
    except Exception as exc:
        raise InputDataError(f"cannot read the arrays in {path}: {exc}") from exc
    return _npz_part(x, y, path, path.name, str(path))


def _npz_part(x: Any, y: Any, path: Any, name: str, origin: str) -> _ArrayPart:
    """The part of an .npz's ``x`` and ``y`` (``path`` as messages name it)."""
    preprocessed = _check_array(x, path, "x")
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise InputDataError(
                f"labels 'y' in {path} have shape {y.shape} and dtype {y.dtype}; they must be "
                f"integers of shape ({len(x)},), one class index per image in x"
            )
        if len(y) and y.min() < 0:
            raise InputDataError(f"labels 'y' in {path} contain negative values; use 0..K-1")
    return _ArrayPart(x, y, name, preprocessed, origin)


def _npz_member(path: Path, archive: Any, key: str) -> np.ndarray:
    """Array ``key`` of an .npz: memory-mapped when stored uncompressed (numpy.savez), read
    into memory when compressed, if it fits (else a hint to save it as .npy)."""
    with zipfile.ZipFile(path) as zipped:
        info = zipped.getinfo(f"{key}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if not dtype.hasobject and int(np.prod(shape)) > 0:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
    available = _available_memory()
    if available is not None and info.file_size > available // 2:
        raise InputDataError(
            f"{key} in {path} is compressed and needs {info.file_size / 2**30:.1f} GiB of memory "
            f"to read, with {available / 2**30:.1f} GiB available; save the images with "
            "numpy.save as an .npy file (or numpy.savez, uncompressed): both are memory-mapped "
            "and read batch by batch"
        )
    return archive[key]


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------
# Data given as a URI (object storage, HDFS, ...)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_QUERY_KEYS = ("key", "secret", "token", "pass", "cred", "sig")


def is_uri(value: Any) -> bool:
    """Whether ``value`` is a URI (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and bool(_URI.match(value))


def redact(uri: str) -> str:
    """``uri`` as it may be shown or saved: without a ``user:password@`` and without the
    values of query parameters that carry credentials (keys, secrets, tokens)."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = [
        (key, "***" if any(word in key.lower() for word in _SECRET_QUERY_KEYS) else value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path,
                                    urllib.parse.urlencode(query, safe="*:/"), parts.fragment))


def _scrubbed(text: str, uri: str) -> str:
    """An error message about ``uri`` with its credentials (if any) replaced by ***."""
    text = " ".join(str(text).split()).replace(uri, redact(uri))
    parts = urllib.parse.urlsplit(uri)
    secrets = [parts.password or "", parts.username or ""] if "@" in parts.netloc else []
    secrets += [value for key, value in urllib.parse.parse_qsl(parts.query)
                if any(word in key.lower() for word in _SECRET_QUERY_KEYS)]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:300]


def open_filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow file system of ``uri`` and the path inside it.

    pyarrow's own file systems first (S3 and compatible stores, GCS, HDFS, local files);
    other schemes through fsspec. Credentials come from the environment, as each library
    expects (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
    ...); they are never shown: messages carry :func:`redact`'s form of the URI.
    """
    shown = redact(uri)
    try:
        import pyarrow.fs as pafs
    except ImportError as exc:
        raise InputDataError(
            f"reading {shown} needs pyarrow; install it with pip install 'sp2ps-onnx[cloud]'"
        ) from exc
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        first = exc
    try:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path
    except Exception:
        pass
    raise InputDataError(
        f"cannot open {shown}: {_scrubbed(str(first), uri)}; give a URI that pyarrow or fsspec "
        "reads (s3://bucket/path, gs://bucket/path, hdfs://host/path, file:///path), with the "
        "credentials in the environment"
    ) from None


def _open_uri(
    uri: str, class_names: list[str] | None, source: DataSource
) -> tuple[list[_ArrayPart | _FilePart], list[str] | None]:
    """The parts of the data at ``uri``, listed (not read) like a local path's."""
    import pyarrow.fs as pafs

    filesystem, root = open_filesystem(uri)
    shown, scheme = redact(uri), urllib.parse.urlsplit(uri).scheme
    try:
        info = filesystem.get_file_info(root)
        entries = (filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
                   if info.type == pafs.FileType.Directory else [])
    except Exception as exc:
        raise InputDataError(
            f"cannot list {shown}: {_scrubbed(str(exc), uri)}; check the URI and the "
            "credentials in the environment"
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise InputDataError(
            f"input {shown} does not exist; give an image folder, an image file, an .npz "
            "(with x and optional y) or an .npy file"
        )
    if info.type == pafs.FileType.File:
        suffix = posixpath.splitext(root)[1].lower()
        if suffix in (".npz", ".npy"):
            return [_open_remote_array(filesystem, root, shown, suffix)], None
        if suffix in IMAGE_EXTENSIONS:
            return [_FilePart([(root, -1)], None, filesystem, scheme)], None
        raise InputDataError(
            f"input {shown} has an unsupported format {suffix or '(no extension)'!r}; give an "
            f"image ({', '.join(IMAGE_EXTENSIONS)}), a folder of images, an .npz or an .npy"
        )
    root = root.rstrip("/")
    images = [e.path for e in entries
              if e.type == pafs.FileType.File and _is_image_file(e.path)]
    relative = [posixpath.relpath(path, root) for path in images]
    subdirs = sorted({posixpath.relpath(e.path, root).split("/")[0] for e in entries
                      if e.type == pafs.FileType.Directory}
                     | {rel.split("/")[0] for rel in relative if "/" in rel})
    if not subdirs:
        if not images:
            source._skip(f"{shown.rstrip('/')}/", InputDataError(
                f"folder {shown} contains no images ({', '.join(IMAGE_EXTENSIONS)}) "
                "and no class subfolders"
            ))
        files = [(path, -1) for path in sorted(images)]
        return ([_FilePart(files, root, filesystem, scheme)] if files else []), None
    order = _class_order(subdirs, class_names, shown)
    index = {name: i for i, name in enumerate(order)}
    by_class: dict[str, list[str]] = {name: [] for name in subdirs}
    for path, rel in zip(images, relative, strict=True):
        if "/" in rel:
            by_class[rel.split("/")[0]].append(path)
    files = []
    for name in subdirs:
        # The order os.walk gives a local folder: by directory, then by file name.
        found = sorted(by_class[name], key=lambda p: (posixpath.dirname(p), posixpath.basename(p)))
        if not found:
            source._skip(f"{name}/", InputDataError(
                f"class folder {name} in {shown} contains no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
            ))
        files.extend((path, index[name]) for path in found)
    return ([_FilePart(files, root, filesystem, scheme)] if files else []), list(order)


@dataclass
class _RemoteArray:
    """An array stored uncompressed in a file of a URI's file system (an .npy, or a member
    of an .npz saved by numpy.savez): its rows are read when they are indexed."""

    filesystem: Any
    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("a remote array is read in contiguous row ranges")
        count = max(0, stop - start)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with self.filesystem.open_input_file(self.path) as handle:
            data = handle.read_at(count * row_bytes, self.offset + start * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((count, *self.shape[1:]))


def _open_remote_array(filesystem: Any, path: str, shown: str, suffix: str) -> _ArrayPart:
    """An .npy or .npz of a URI's file system: the header now, the rows batch by batch."""
    name = posixpath.basename(path)
    try:
        with filesystem.open_input_file(path) as handle:
            if suffix == ".npy":
                x = _remote_member(filesystem, path, handle, 0, shown)
                return _ArrayPart(x, None, name, _check_array(x, shown, name), shown)
            with zipfile.ZipFile(handle) as zipped:
                names = zipped.namelist()
                if "x.npy" not in names:
                    raise InputDataError(
                        f"{shown} has no array 'x' (it has: "
                        f"{', '.join(n.removesuffix('.npy') for n in names) or 'nothing'}); "
                        "save the images as x (and labels as y) with numpy.savez"
                    )
                info = zipped.getinfo("x.npy")
                if info.compress_type == zipfile.ZIP_STORED:
                    handle.seek(info.header_offset)
                    local = handle.read(30)
                    name_length, extra_length = struct.unpack("<HH", local[26:30])
                    x = _remote_member(filesystem, path, handle,
                                       info.header_offset + 30 + name_length + extra_length,
                                       shown)
                else:
                    with zipped.open("x.npy") as member:
                        x = np.lib.format.read_array(member, allow_pickle=False)
                y = None
                if "y.npy" in names:
                    with zipped.open("y.npy") as member:
                        y = np.lib.format.read_array(member, allow_pickle=False)
    except InputDataError:
        raise
    except Exception as exc:
        raise InputDataError(
            f"cannot read {shown} as an {suffix} array: {' '.join(str(exc).split())[:300]}; "
            "save it with numpy.save or numpy.savez(x=..., y=...)"
        ) from None
    return _npz_part(x, y, shown, name, shown)


def _remote_member(filesystem: Any, path: str, handle: Any, start: int,
                   shown: str) -> Any:
    """The array whose .npy header starts at byte ``start`` of ``handle``: a
    :class:`_RemoteArray`, or the array itself when it is stored in Fortran order."""
    handle.seek(start)
    version = np.lib.format.read_magic(handle)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(handle)
    if dtype.hasobject or not shape:
        raise InputDataError(f"{shown} holds objects or a scalar, not an array of images")
    if fortran:
        handle.seek(start)
        return np.lib.format.read_array(handle, allow_pickle=False)
    return _RemoteArray(filesystem, path, handle.tell(), dtype, tuple(shape))


def _open_npy(path: Path) -> _ArrayPart:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputDataError(
            f"cannot read {path} as a .npy array: {exc}; save it with numpy.save"
        ) from exc
    return _ArrayPart(x, None, path.name, _check_array(x, path, path.name), str(path))


def read_image(path: str | os.PathLike[str] | io.BytesIO, max_pixels: int | None = None,
               name: str | None = None) -> np.ndarray:
    """Decode the first frame of an image file to ``uint8`` ``(H, W)`` or ``(H, W, C)``.

    ``path`` may also be the file's bytes in a :class:`io.BytesIO`, named ``name`` in
    messages. The size the file declares is checked against ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`) before decoding, so a small file that would expand to
    gigabytes (a decompression bomb) is refused with :class:`InputDataError`.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(path, io.BytesIO):
        source: Any = path
        path = name or "image bytes"
    else:
        source = path
    kind = Path(str(path)).suffix.lstrip(".").upper() or "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            with Image.open(source) as header:  # reads the header, not the pixels
                width, height = header.size
    except Image.DecompressionBombError:
        width = height = -1
    except Exception as exc:
        raise InputDataError(
            f"cannot decode image file {path}: {' '.join(str(exc).split())}; check that it "
            f"is a valid {kind} file"
        ) from exc
    if width < 0 or width * height > limit:
        size = "more pixels than Pillow allows" if width < 0 else f"{width} x {height} pixels"
        raise InputDataError(
            f"image file {path} declares {size}, over the limit of {limit:,} pixels; refused "
            "before decoding as a possible decompression bomb; downscale the image"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow warns about damaged metadata (EXIF, TIFF tags) that does not affect the
            # pixels; damaged pixel data raises, and is reported below.
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            if isinstance(source, io.BytesIO):
                source.seek(0)
            image = np.asarray(iio.imread(source, plugin="pillow", index=0))
    except Exception as exc:
        raise InputDataError(
            f"cannot decode image file {path}: {' '.join(str(exc).split())}; check that it "
            f"is a valid {kind} file"
        ) from exc
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4)):
        raise InputDataError(f"image file {path} decodes to shape {image.shape}; not an image")
    if image.size == 0:
        raise InputDataError(f"image file {path} has no pixels (shape {image.shape})")
    return _to_uint8(image, str(path))


def _to_uint8(image: np.ndarray, where: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if image.dtype == np.uint16:
        return (image.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputDataError(f"image {where} holds NaN or infinite pixel values")
    if np.issubdtype(image.dtype, np.floating) and image.size and 0 <= image.min() <= image.max() <= 1:
        return np.round(image * 255).astype(np.uint8)
    raise InputDataError(f"image {where} has unsupported pixel type {image.dtype}")


# --------------------------------------------------------------------------------------
# Preprocessing


def parse_size(size: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """Parse ``"224"``, ``"224,192"``, ``"224x192"``, an int or a pair into ``(H, W)``."""
    if size is None:
        return None
    if isinstance(size, int):
        values = [size]
    elif isinstance(size, str):
        parts = [v for v in re.split(r"[,x\s]+", size.strip().lower()) if v]
        values = [int(v) for v in parts] if all(v.isdigit() for v in parts) else []
    else:
        values = [int(v) for v in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise InputDataError(f"size {size!r} is not valid; give H or H,W (e.g. 224 or 224,192)")
    return values[0], values[1]


def _parse_floats(values: str | float | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return (float(values),)
    if isinstance(values, str):
        try:
            parsed = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError as exc:
            raise InputDataError(
                f"--{what} {values!r} is not a comma-separated list of numbers"
            ) from exc
    else:
        parsed = tuple(float(v) for v in values)
    if not parsed:
        raise InputDataError(f"--{what} is empty; give one value or one per channel")
    return parsed


@dataclass(frozen=True)
class Preprocessing:
    """Turns images into one model's input tensor.

    Steps: scale shorter side (so the image covers ``height x width``) with anti-aliased
    bilinear resampling, centre crop, convert grey/RGB to ``channels``, scale to [0, 1],
    subtract ``mean`` and divide by ``std`` (per channel), lay out as ``layout``.
    """

    layout: str
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(
        cls,
        model: Any,
        preset: str = "imagenet",
        *,
        mean: str | Sequence[float] | None = None,
        std: str | Sequence[float] | None = None,
        size: str | int | Sequence[int] | None = None,
    ) -> Preprocessing:
        """Build the preprocessing for a :class:`~sp2ps_onnx.CamModel`-like object.

        Reads ``layout``, ``channels`` and ``input_spatial_size`` from ``model``; ``size``
        is needed only when the model's input height/width are dynamic and overrides them.
        """
        if preset not in PRESETS:
            raise InputDataError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
            )
        preset_mean, preset_std = PRESETS[preset]
        mean_values = _parse_floats(mean, "mean") or preset_mean
        std_values = _parse_floats(std, "std") or preset_std
        if any(s == 0 for s in std_values):
            raise InputDataError("--std must not contain 0")
        channels = int(getattr(model, "channels", 0) or 0)
        if channels not in (1, 3):
            raise InputDataError(
                f"model {getattr(model, 'path', None) or ''} expects {channels or 'unknown'} input "
                "channels; image preprocessing handles 1 (grey) or 3 (RGB) channels, so pass "
                "float arrays already preprocessed in the model's input layout"
            )
        explicit = parse_size(size)
        if explicit is not None:
            height, width = explicit
        else:
            spatial = getattr(model, "input_spatial_size", None) or (None, None)
            if not all(isinstance(v, (int, np.integer)) and v > 0 for v in spatial):
                raise InputDataError(
                    f"model {getattr(model, 'path', None) or ''} has a dynamic input size; "
                    "give the size to resize images to with --size H[,W] (e.g. --size 224)"
                )
            height, width = int(spatial[0]), int(spatial[1])
        mean_values = _fit_channels(mean_values, channels, "mean")
        std_values = _fit_channels(std_values, channels, "std")
        layout = str(getattr(model, "layout", "NCHW"))
        if layout not in ("NCHW", "NHWC"):
            raise InputDataError(f"unsupported model input layout {layout!r}")
        return cls(layout, height, width, channels, mean_values, std_values)

    def __call__(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Return the float32 model input for a batch (see :meth:`with_display`)."""
        return self.with_display(images)[0]

    def with_display(self, images: list[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(model input float32, display images uint8 (N, H, W, C))``.

        The display images are the resized and cropped pixels before normalisation
        (for preprocessed float input: each sample min-max scaled), used for overlays.
        """
        if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
            x = self._fit_preprocessed(images)
            return x, _display_from_input(x, self.layout)
        pixels = np.stack([self._pixels(np.asarray(image)) for image in images])
        unit = pixels.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (unit - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32), pixels

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        """Resize, crop and convert one image to uint8 (height, width, channels)."""
        image = _to_uint8(image, "array")
        if image.ndim == 3 and _channel_axis(image.shape) == 0 and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
            raise InputDataError(f"image of shape {image.shape} is not (H, W) or (H, W, C)")
        if image.shape[-1] in (2, 4):  # drop alpha
            image = image[:, :, :-1]
        image = self._resize_crop(image)
        if self.channels == 1 and image.shape[-1] == 3:
            grey = skimage.color.rgb2gray(image.astype(np.float64) / 255.0)
            image = np.round(grey * 255.0).astype(np.uint8)[:, :, None]
        elif self.channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=2)
        return image

    def _resize_crop(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if (h, w) == (self.height, self.width):
            return image
        scale = max(self.height / h, self.width / w)
        new_h = max(self.height, int(round(h * scale)))
        new_w = max(self.width, int(round(w * scale)))
        resized = skimage.transform.resize(
            image.astype(np.float64),
            (new_h, new_w, image.shape[2]),
            order=1,
            anti_aliasing=scale < 1,
            preserve_range=True,
        )
        top = (new_h - self.height) // 2
        left = (new_w - self.width) // 2
        crop = resized[top : top + self.height, left : left + self.width]
        return np.clip(np.round(crop), 0, 255).astype(np.uint8)

    def _fit_preprocessed(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        c, h, w = self.channels, self.height, self.width
        own = (c, h, w) if self.layout == "NCHW" else (h, w, c)
        other = (h, w, c) if self.layout == "NCHW" else (c, h, w)
        if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
            x = x[:, None] if self.layout == "NCHW" else x[..., None]
        if x.ndim == 4 and x.shape[1:] == own:
            return np.ascontiguousarray(x)
        if x.ndim == 4 and x.shape[1:] == other:
            axes = (0, 3, 1, 2) if self.layout == "NCHW" else (0, 2, 3, 1)
            return np.ascontiguousarray(x.transpose(axes))
        raise InputDataError(
            f"float input of shape {x.shape} does not fit the model input "
            f"(N, {', '.join(map(str, own))}) ({self.layout}); float arrays are used as "
            "preprocessed model inputs, so give uint8 images to have them resized and normalised"
        )


def _fit_channels(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        # An RGB preset on a grey model: the grey pixel stands for equal R, G, B.
        return (float(np.mean(values)),)
    raise InputDataError(
        f"--{what} has {len(values)} values but the model has {channels} input channel(s); "
        f"give 1 or {channels} values"
    )


def _display_from_input(x: np.ndarray, layout: str) -> np.ndarray:
    channels_last = x.transpose(0, 2, 3, 1) if layout == "NCHW" else x
    low = channels_last.min(axis=(1, 2, 3), keepdims=True)
    high = channels_last.max(axis=(1, 2, 3), keepdims=True)
    scaled = (channels_last - low) / np.maximum(high - low, 1e-12)
    return np.round(scaled * 255).astype(np.uint8)
