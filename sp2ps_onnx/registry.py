"""One way to register a named choice: a :class:`Registry` maps names to entries.

Graph VJP rules, CAM methods and the metric's spatial, spectral and aggregation functions
are all registries. A module registers one small function per name with a decorator, as
JAX and PyTorch's ``derivatives.yaml`` do for gradient rules::

    SPATIAL = Registry("spatial component", entry=Component.of, error=UnknownComponentError)

    @SPATIAL.register("ssim", prepare=..., pair=...)
    def ssim_similarity(P, Q): ...

``entry`` builds what is stored from the registered object and the decorator's keywords
(by default the object itself), so that every entry can carry what its users need to know
about it (a rule's differentiable inputs, a CAM method's inputs, ...). A registry is a
mutable mapping in registration order: ``name in registry``, ``registry[name]``,
iteration, ``len`` and item assignment (``registry[name] = obj``, which goes through
``entry`` too) all work. :meth:`Registry.get` is the lookup for names that come from a
user: an unknown name raises one clear error that lists the valid names.

This module is the bottom layer with :mod:`sp2ps_onnx.errors`: it imports nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from .errors import Sp2PSError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F")

_MISSING: Any = object()


def _as_is(name: str, obj: Any) -> Any:
    return obj


class Registry(MutableMapping[str, T], Generic[T]):
    """Names mapped to entries of type ``T``, in registration order.

    Args:
        kind: what a name names, for error messages ("CAM method", "spatial component").
        entry: ``entry(name, obj, **details) -> T`` builds the stored entry from a
            registered (or assigned) object and the keywords given to :meth:`register`;
            by default the object itself is stored.
        error: the exception :meth:`get` raises for an unknown name, a subclass of
            :class:`~sp2ps_onnx.errors.Sp2PSError`.
    """

    def __init__(
        self,
        kind: str,
        *,
        entry: Callable[..., T] = _as_is,
        error: type[Sp2PSError] = UnknownNameError,
    ) -> None:
        self.kind = kind
        self._entry = entry
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, *names: str, **details: Any) -> Callable[[F], F]:
        """Decorator: store ``entry(name, obj, **details)`` under every name in ``names``.

        The decorated object is returned unchanged. Registering a name twice is a
        programming error and raises ``ValueError``; assign with ``registry[name] = obj``
        to replace an entry on purpose.
        """
        if not names:
            raise TypeError("register() needs at least one name")

        def decorator(obj: F) -> F:
            for name in names:
                if name in self._entries:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                self._entries[name] = self._entry(name, obj, **details)
            return obj

        return decorator

    def get(self, name: Any, default: Any = _MISSING) -> Any:
        """The entry of ``name``; for an unknown name ``default`` if given, else the
        registry's error, whose message lists the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name"
            if default is not _MISSING:
                return default
            raise self._error(self.unknown_message(name)) from None

    def unknown_message(self, name: Any, valid: tuple[str, ...] | None = None) -> str:
        """The message for an unknown ``name``: what, and the names to choose from
        (``valid``, default all)."""
        choices = ", ".join(repr(key) for key in (self.names() if valid is None else valid))
        return f"unknown {self.kind} {name!r}; choose one of: {choices}"

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, obj: Any) -> None:
        self._entries[name] = self._entry(name, obj)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
