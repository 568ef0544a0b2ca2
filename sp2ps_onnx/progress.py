"""Progress reporting for long loops: a tqdm bar (``tqdm.auto``, so it draws in Jupyter
too), a caller's own callback, or nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

ProgressCallback = Callable[[int, int | None], None]
Progress = bool | ProgressCallback | None
"""``True`` draws a tqdm bar, ``False``/``None`` reports nothing, a callable is called as
``callback(done, total)`` after each batch (``total`` is ``None`` when unknown)."""


class ProgressReporter:
    """``reporter(done, total)`` after each batch, ``reporter.close()`` at the end.

    Also a context manager that closes itself.
    """

    def __init__(self, progress: Progress, total: int | None, description: str,
                 unit: str = "sample") -> None:
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be True, False or a callable, not {progress!r}")
        self._callback = progress if callable(progress) else None
        self._bar: Any = None
        if progress is True:
            self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)

    def __call__(self, done: int, total: int | None) -> None:
        if self._callback is not None:
            self._callback(done, total)
        if self._bar is not None:
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """End the bar (a no-op for callbacks and for ``False``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
