"""CAMs of one model over a dataset, batch by batch: the loop behind ``sp2ps cam``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._ort import select_providers
from .data import DataSource, Preprocessing, open_data
from .prefetch import Prefetcher
from .scoring.checks import check_label_range, check_labels, resolve_target
from .scoring.models import ModelLike, open_model
from .scoring.options import CamOptions, DataOptions, RunOptions
from .scoring.run import DataLike


@dataclass
class CamBatch:
    """CAMs of one batch from :func:`explain`."""

    ids: list[str]
    images: np.ndarray  # uint8 (N, H, W, C) as fed to the model
    maps: np.ndarray  # float32 (N, H, W) in [0, 1]
    targets: np.ndarray  # int64 (N,)
    scores: np.ndarray  # logits (N, K)
    labels: np.ndarray | None


def explain(
    model: ModelLike,
    data: DataLike,
    *,
    cam: CamOptions = CamOptions(),
    data_options: DataOptions = DataOptions(),
    run: RunOptions = RunOptions(),
) -> Iterator[CamBatch]:
    """Yield the CAMs of ``model`` for ``data`` batch by batch.

    ``cam.target`` is ``label`` (needs labels) or ``original``/``self`` (the model's
    top-1); the default is ``label`` when the data has labels, else the top-1 class.
    Unreadable images are skipped and recorded in the source's ``faults``
    (``data_options.strict``: an error). ``cam.pruned_layer`` does not apply.
    """
    source = data if isinstance(data, DataSource) else open_data(
        data, classes=data_options.classes, limit=data_options.limit,
        strict=data_options.strict,
    )
    mode = resolve_target(cam.target, source.has_labels)
    cam_model = open_model(
        model, cam.layer, select_providers(run.device, quiet=run.quiet), data_options.size,
        run.batch_size, cam.allow_domains, grid=cam.grid,
    )
    check_label_range(source, int(cam_model.num_classes))
    prep = Preprocessing.for_model(cam_model, data_options.preset, mean=data_options.mean,
                                   std=data_options.std, size=data_options.size)
    # The next batches are decoded in a thread while ONNX Runtime explains this one.
    reader = Prefetcher(source.batches(run.batch_size), depth=2)
    try:
        for batch in reader:
            check_labels(batch.labels, int(cam_model.num_classes), batch.ids)
            x, display = prep.with_display(batch.images)
            wanted = batch.labels if mode == "label" else None
            maps, targets, scores = cam_model.cams(
                x, method=cam.method, targets=wanted, size=(prep.height, prep.width),
                return_scores=True, eigen_smooth=cam.eigen_smooth, aug_smooth=cam.aug_smooth,
                **({"layers": cam.cam_layers} if cam.cam_layers else {}),
            )
            yield CamBatch(
                ids=batch.ids,
                images=display,
                maps=np.asarray(maps, dtype=np.float32),
                targets=np.asarray(targets, dtype=np.int64),
                scores=np.asarray(scores),
                labels=batch.labels,
            )
    finally:
        reader.close()
