"""The Ray backend of :func:`sp2ps_onnx.scoring.score_models`.

The data becomes a Ray Dataset, streamed through ``map_batches`` to an actor pool. Each
actor builds its :class:`~sp2ps_onnx.CamModel`\\ s once, from ONNX bytes in the object store
(workers need no copy of the model files), and runs the same per-batch kernel as the local
backend. Image files given as a URI (``s3://``, ``gs://``, ...) are fetched by Ray Data's
``read_binary_files`` on the cluster and decoded by the actors; other data becomes batch
ranges (``start``, ``stop``) that each actor reads itself (arrays by URI with ranged reads;
local paths must be readable at the same path on every node). Rows, worst/best candidates
and skipped samples come back to the driver in data order and are aggregated there by the
same step as a local run, so every number is the same.

A killed actor is restarted by Ray and its batches retried (at most :data:`WORKER_RESTARTS`
times: then an error naming ``--batch-size``, since a worker killed again and again is most
often out of memory); rows carry their sample indices and the aggregation refuses lost or
duplicated rows. A head that stops answering mid-run is an error within the connect
timeout (:data:`HEAD_LOST_LIMIT` at most), after the rows received are handed over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from .._ort import select_providers
from ..data import DataFault
from ..errors import InputDataError, RuntimeMissingError, Sp2PSError
from ..graph.model_io import load_model
from .batch import ScorerSpec, build_scorer
from .cache import CacheUse
from .models import is_cam_model
from .options import RayOptions, RunOptions
from .rows import BatchOutput

CONNECT_TIMEOUT = 30.0
"""Seconds :func:`connect` waits for a Ray cluster to answer (``--ray-timeout``)."""

WORKER_RESTARTS = 3
"""How many times a scoring actor that died (killed by Ray's memory monitor or the system's
out-of-memory killer, or with its node) is restarted, its batches retried, before the run
fails."""

HEAD_LOST_LIMIT = 40.0
"""The most seconds a run waits for a head that stopped answering mid-run (its
``--ray-timeout``, at most this): Ray itself ends a driver whose GCS has not answered for
60 s (``gcs_rpc_server_reconnect_timeout_s``), with no word and no chance to save."""

_INSTALL_HINT = (
    "the Ray backend needs Ray Data; install it with pip install 'sp2ps-onnx[ray]' "
    "(ray[data]) on the driver and on every node of the cluster"
)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeMissingError(_INSTALL_HINT) from exc
    return ray


def connect(address: str | None, quiet: bool = True,
            timeout: float = CONNECT_TIMEOUT) -> Any:
    """Join the Ray cluster at ``address`` (``auto``, ``host:port``, ``ray://host:port``) or,
    for ``None``, the one this process already joined or a new local one.

    Joining a cluster that does not answer (its head down or still shutting down) is an
    error after ``timeout`` seconds; Ray itself would retry for minutes without a word.
    ``None`` always starts a new Ray: never the cluster that ``RAY_ADDRESS`` or the address
    file of an earlier ``ray start`` (perhaps stopping) names.
    """
    ray = import_ray()
    _probe(address)
    if ray.is_initialized():
        return ray
    options = {"log_to_driver": not quiet, "include_dashboard": False, "logging_level": "ERROR"}
    where = address or "a new local Ray"
    try:
        if address is None:
            # Started in this thread: Ray's processes end with the thread that started them.
            ray.init(address="local", **options)
        else:
            _init_within(ray, address, options, timeout)
    except Sp2PSError:
        raise
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError by address kind
        raise InputDataError(
            f"cannot connect to the Ray cluster at {where}: {' '.join(str(exc).split())[:300]}; "
            "check the address (ray status on the head node prints it; a Ray Client address "
            "starts with ray://) or leave --ray without an address for a local Ray"
        ) from exc
    return ray


def _init_within(ray: Any, address: str, options: dict[str, Any], timeout: float) -> None:
    """``ray.init`` at ``address``, or an error after ``timeout`` seconds.

    The attempt runs in a daemon thread, so a process that gives up can still exit; the
    abandoned attempt ends when Ray's own retries do.
    """
    outcome: dict[str, BaseException] = {}
    finished = threading.Event()

    def attempt() -> None:
        try:
            ray.init(address=address, **options)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=attempt, name="sp2ps-ray-connect", daemon=True).start()
    if not finished.wait(timeout):
        named = os.environ.get("RAY_ADDRESS") if address == "auto" else None
        raise InputDataError(
            f"no answer from the Ray cluster at {address}"
            f"{f' (RAY_ADDRESS={named})' if named else ''} within {timeout:g} s; its head "
            "node is down, still starting or shutting down, or the address is not a Ray "
            "head; check it with ray status on the head node, or give it more time with "
            "--ray-timeout"
        )
    if "error" in outcome:
        raise outcome["error"]


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail within seconds when a host:port address does not answer (Ray itself retries for
    minutes before it gives up)."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputDataError(
            f"--ray {address} is not a Ray address; give auto, HOST:PORT (the GCS port, 6379 by "
            "default) or ray://HOST:PORT (the Ray Client port, 10001 by default)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputDataError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check that the "
            "head node is up (ray status on it prints its address) and that this machine may "
            "connect to that port"
        ) from exc


@dataclasses.dataclass(frozen=True)
class _Mapped:
    """A memory-mapped array, sent as its location instead of its bytes."""

    filename: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    order: str

    def open(self) -> np.memmap:
        return np.memmap(self.filename, dtype=np.dtype(self.dtype), mode="r", offset=self.offset,
                         shape=self.shape, order=self.order)


def _portable(source: Any) -> Any:
    """``source`` with its memory-mapped arrays replaced by their locations."""
    parts = []
    for part in source._parts:
        array = getattr(part, "array", None)
        if isinstance(array, np.memmap) and array.filename:
            order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
            part = dataclasses.replace(part, array=_Mapped(
                str(array.filename), int(array.offset), array.dtype.str, tuple(array.shape), order))
        parts.append(part)
    return dataclasses.replace(source, _parts=parts)


def _local(source: Any) -> Any:
    parts = [
        dataclasses.replace(part, array=part.array.open())
        if isinstance(getattr(part, "array", None), _Mapped) else part
        for part in source._parts
    ]
    return dataclasses.replace(source, _parts=parts)


def _model_bytes(model: Any, allow_domains: Sequence[str]) -> bytes:
    if is_cam_model(model):
        path = getattr(model, "path", None)
        if not path:
            raise InputDataError("the Ray backend needs model files or ModelProtos, not CamModels")
        model = path
    return load_model(model, allow_domains)[0].SerializeToString()


class ScoreWorker:
    """The callable class of ``map_batches``: builds the kernel once, then scores ranges."""

    def __init__(self, payload: Any, names: Sequence[str], spec: ScorerSpec,
                 gpus: float, cache: CacheUse | None = None) -> None:
        import ray

        payload = ray.get(payload[0])
        models, source = payload
        if not os.environ.get("SP2PS_THREADS"):
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            os.environ["SP2PS_THREADS"] = str(max(1, int(cpus)))
        protos = [onnx.load_from_string(data) for data in models]
        providers = select_providers("cuda" if gpus > 0 else "cpu", quiet=True)
        self.source = _local(source)
        listed = source.object_files()
        self.files = {} if listed is None else {path: (i, label) for path, i, label in listed[1]}
        self.scorer = build_scorer(protos[0], protos[1:], list(names), spec,
                                   providers=providers, spinning=False,
                                   cache=None if cache is None else cache.open(),
                                   cached=() if cache is None else cache.cached)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "bytes" in batch:
            return self._score_files(batch)
        return self._score_ranges(batch)

    def _score_files(self, files: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of files read by Ray Data: decoded here, one output row."""
        known = len(self.source.faults)
        paths = [str(path) for path in files["path"]]
        ids, labels = zip(*(self.files[path] for path in paths), strict=True)
        batch = self.source.decode(list(files["bytes"]), paths, ids, labels)
        output = b"" if batch is None else self.scorer(batch, np.arange(len(batch.ids))).to_bytes()
        faults = json.dumps([f.to_dict() for f in self.source.faults[known:]])
        return {"output": np.array([output], dtype=object),
                "faults": np.array([faults], dtype=object)}

    def _score_ranges(self, ranges: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches of sample positions: each read here from the data source."""
        outputs, faults = [], []
        for start, stop in zip(ranges["start"].tolist(), ranges["stop"].tolist(), strict=True):
            known = len(self.source.faults)
            batch = next(self.source.batches(stop - start, start=start, stop=stop), None)
            # Indices within the batch: the driver numbers the samples read, in data order.
            outputs.append(b"" if batch is None else
                           self.scorer(batch, np.arange(len(batch.ids))).to_bytes())
            faults.append(json.dumps([f.to_dict() for f in self.source.faults[known:]]))
        return {"start": ranges["start"], "output": np.array(outputs, dtype=object),
                "faults": np.array(faults, dtype=object)}


def run_ray(
    original: Any,
    pruned: Sequence[Any],
    names: Sequence[str],
    source: Any,
    spec: ScorerSpec,
    run: RunOptions,
    *,
    start: int,
    on_output: Callable[[BatchOutput], None],
    cache: CacheUse | None = None,
) -> None:
    """Score ``source`` from sample ``start`` on with a Ray actor pool (``run.ray``); hand
    each batch's :class:`~sp2ps_onnx.scoring.rows.BatchOutput` to ``on_output`` in data
    order (which saves them when ``run.checkpoint`` is set).

    Every actor builds the kernel of ``spec`` (:func:`~sp2ps_onnx.scoring.batch.build_scorer`),
    with the pass cache ``cache`` (a directory every node reads and writes). A head that
    stops answering mid-run is an error after ``run.ray.connect_timeout`` seconds (at most
    :data:`HEAD_LOST_LIMIT`).
    """
    options: RayOptions = run.ray  # type: ignore[assignment]
    quiet, resumable = run.quiet, run.checkpoint is not None
    total = source.size_hint
    if total is None:
        raise InputDataError(
            "the Ray backend reads the data on the workers, so it needs files or arrays "
            "(an image folder, image files, .npz, .npy), not an iterable of batches"
        )
    ray = connect(options.address, quiet, options.connect_timeout)
    if start >= total:
        return
    gpus_per_worker = options.gpus_per_worker
    workers = options.workers
    if workers is None:
        workers = max(1, int(ray.available_resources().get("GPU" if gpus_per_worker else "CPU",
                                                            1) // max(gpus_per_worker, 1)))
    models = [_model_bytes(m, spec.cam.allow_domains) for m in (original, *pruned)]
    payload = ray.put((models, _portable(source)))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows reach the checkpoint in order
    context.enable_progress_bars = not quiet
    batch_size = spec.batch_size
    inputs, per_call = _inputs(ray, source, start, batch_size, workers)
    # Ray Data's actor pools restart a killed actor (on the nodes left, after a node loss)
    # and retry its batches; by default for ever, so a batch that kills its worker every
    # time (out of memory) would be retried without end and without a word. The retries
    # stay unbounded: an actor on a lost node is unreachable for seconds before Ray knows,
    # and every try in that time counts as one.
    scored = inputs.map_batches(
        ScoreWorker,
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        # The reference is wrapped so that Ray hands it over as is; each actor fetches the
        # models itself, also when it is restarted.
        fn_constructor_kwargs={"payload": [payload], "names": list(names),
                               "spec": spec,
                               "gpus": float(gpus_per_worker),
                               "cache": cache},
        num_gpus=gpus_per_worker or None,
        max_restarts=WORKER_RESTARTS,
        max_task_retries=-1,
    )
    offset = start
    head = _head_address(ray, options.address)
    bound = min(options.connect_timeout, HEAD_LOST_LIMIT)
    try:
        for row in _watched(scored.iter_rows(), head, bound):
            for fault in json.loads(row["faults"]):
                if all(known.id != fault["id"] for known in source.faults):
                    source.faults.append(DataFault(fault["id"], fault["reason"]))
            if not row["output"]:
                continue  # every sample of the batch was skipped
            output = _numbered(BatchOutput.from_bytes(row["output"]), offset)
            offset += int(np.count_nonzero(output.rows["model"] == 0))
            on_output(output)
    except _HeadLost as lost:
        kept = (f"the {offset} samples scored so far are saved: run the same command again "
                "with --resume to continue, on this machine without --ray or on the cluster "
                "once its head is back" if resumable else
                "nothing is saved without a checkpoint (sp2ps score --out, "
                "RunOptions.checkpoint), which --resume continues")
        raise InputDataError(
            f"lost the Ray cluster's head at {lost.address}: it has not answered for "
            f"{lost.seconds:g} s (the head node or its GCS process died, or the network to it "
            f"failed); {kept}; --ray-timeout sets how long to wait for it"
        ) from None
    except Exception as exc:
        cause = _own_error(exc, Sp2PSError)
        if cause is not None:
            raise cause from None
        died = _worker_died(exc, ray, batch_size)
        if died is None:
            raise
        raise died from exc


def _inputs(ray: Any, source: Any, start: int, batch_size: int, workers: int) -> tuple[Any, int]:
    """The Ray Dataset the actors score from sample ``start`` on, and the rows it gives each
    call: image files in object storage (a batch of files per call), else batch ranges."""
    listed = source.object_files()
    if listed is not None:
        # Image files in object storage: Ray Data's reader fetches them on the cluster,
        # ahead of the actors; each actor decodes and scores its batches. A sample's
        # numbers do not depend on the batch it shares (rows equal a local run's).
        filesystem, files = listed
        files = files[start:]
        return ray.data.read_binary_files(
            [path for path, _, _ in files], filesystem=filesystem, include_paths=True,
            # About a batch of files per read task, several tasks per actor at once:
            # object stores answer each request after tens of milliseconds.
            override_num_blocks=max(1, -(-len(files) // batch_size)),
            # Fetching is I/O: the reads take no CPU from the actors, which hold them all
            # by default (a read waiting for a CPU would wait for ever).
            num_cpus=0, concurrency=4 * workers,
        ), batch_size
    total = source.size_hint
    starts = list(range(start, total, batch_size))
    return ray.data.from_items(
        [{"start": s, "stop": min(s + batch_size, total)} for s in starts],
        override_num_blocks=max(1, min(len(starts), 4 * workers)),
    ), 1


def _worker_died(exc: BaseException, ray: Any, batch_size: int) -> InputDataError | None:
    """An error naming ``--batch-size`` when ``exc`` (raised by Ray Data) says that a
    worker died on every try of a batch; ``None`` for anything else."""
    reason = _own_error(exc, ray.exceptions.OutOfMemoryError)
    if reason is not None:
        return InputDataError(
            f"a Ray worker ran out of memory scoring batches of {batch_size} samples "
            f"{WORKER_RESTARTS + 1} times ({_short(reason)}); lower --batch-size, or give the "
            "workers more memory; --resume continues the run from the rows saved so far"
        )
    died = tuple(getattr(ray.exceptions, name) for name in
                 ("RayActorError", "WorkerCrashedError", "NodeDiedError")
                 if hasattr(ray.exceptions, name))
    reason = _own_error(exc, died)
    if reason is not None:
        # The system's out-of-memory killer sends SIGKILL, which Ray cannot tell from any
        # other kill: it reports a worker that died.
        return InputDataError(
            f"a Ray worker died {WORKER_RESTARTS + 1} times scoring batches of "
            f"{batch_size} samples ({_short(reason)}); a worker that runs out of memory is "
            "killed (by the system's out-of-memory killer or Ray's memory monitor), so lower "
            "--batch-size or give the workers more memory; --resume continues the run from "
            "the rows saved so far"
        )
    return None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240]


def _head_address(ray: Any, address: str | None) -> str | None:
    """The ``host:port`` that answers while the cluster's head is up: its GCS (or, through
    Ray Client, the client server); ``None`` when unknown."""
    if address and address.startswith("ray://"):
        return address.removeprefix("ray://")
    try:
        return str(ray.get_runtime_context().gcs_address) or None
    except Exception:  # noqa: BLE001 - an older Ray, or Ray Client: no watch
        return None


class _HeadLost(Exception):
    """The head at ``address`` has not answered for ``seconds``."""

    def __init__(self, address: str, seconds: float) -> None:
        super().__init__(address, seconds)
        self.address = address
        self.seconds = seconds


class _HeadWatch:
    """Knocks at the head's port every ``every`` seconds in a daemon thread, and knows for
    how long it has not answered (a head that died or a network that failed)."""

    def __init__(self, address: str, every: float = 0.5) -> None:
        host, _, port = address.rpartition(":")
        self._target = (host, int(port))
        self._every = every
        self._down_since: float | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="sp2ps-ray-head", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                socket.create_connection(self._target, timeout=max(self._every, 1.0)).close()
                self._down_since = None
            except OSError:
                if self._down_since is None:
                    self._down_since = time.monotonic()
            self._stop.wait(self._every)

    def down_for(self) -> float:
        """Seconds since the head stopped answering (0 while it answers)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self) -> None:
        self._stop.set()


def _watched(rows: Iterable[Any], head: str | None, bound: float) -> Iterator[Any]:
    """The items of ``rows``, read in a daemon thread while :class:`_HeadWatch` watches
    ``head``: an error once the head has not answered for ``bound`` seconds.

    Ray Data's iterator can wait for a head that is gone until Ray ends the process (60 s,
    without a word); the caller's thread never waits on it, so it ends the run itself, with
    a message, and the rows received so far are saved by the caller (``--resume``).
    """
    if head is None:
        yield from rows
        return
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def offer(kind: str, item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, item), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in rows:
                if not offer("row", item):
                    return
            offer("end", None)
        except BaseException as exc:  # handed to the caller's thread
            offer("error", exc)

    watch = _HeadWatch(head)
    threading.Thread(target=pump, name="sp2ps-ray-rows", daemon=True).start()
    try:
        while True:
            if watch.down_for() >= bound:
                raise _HeadLost(head, bound)
            try:
                kind, item = items.get(timeout=0.25)
            except queue.Empty:
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        watch.close()


def _numbered(output: BatchOutput, offset: int) -> BatchOutput:
    """``output`` with its in-batch sample indices moved to start at ``offset``, the number
    of samples read before it (what a local run numbers them)."""
    output.rows["index"] = output.rows["index"] + offset
    for candidates in output.examples:
        for example in candidates:
            example.index += offset
    return output


def _own_error(exc: BaseException, kind: type | tuple[type, ...]) -> BaseException | None:
    """Our own error inside the wrappers Ray puts around an exception raised in a worker."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None
