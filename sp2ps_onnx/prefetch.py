"""Reading ahead: an iterator consumed in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


class Prefetcher:
    """Reads an iterator in a background thread, ``depth`` items ahead (decoding overlaps
    the scoring of earlier batches). Exceptions reach the consumer in order."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], depth: int) -> None:
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="sp2ps-read", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._iterator:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((self._END, exc))
            return
        self._put((self._END, None))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
